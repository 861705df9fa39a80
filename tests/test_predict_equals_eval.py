"""What `transfer predict` writes equals what the model gives in evaluation on the same inputs.

Each test fits a tiny model through the CLI, predicts with `transfer predict` (a subprocess, as
users run it), and evaluates the same checkpoint in process with `transfer test`/`validate`, where a
probe keeps softmax(model(batch)) of every batch as the evaluation step receives it. The two must
agree to rounding: any difference is a train/predict preprocessing mismatch.
"""

import csv
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from probes import EvaluationProbabilities
from test_huggingface import make_tiny_bert

from transfer_cli.cli import TransferCLI
from transfer_cli.data.cifar10 import read_batch
from transfer_cli.data.image_ops import IMAGE_SUFFIXES

from conftest import run_transfer

# Not the 32 px of CIFAR-10: images are resized, so the resizing path is compared too.
IMAGE_BACKBONE = (
    "--model.init_args.backbone.init_args.name=resnet18",
    "--model.init_args.backbone.init_args.weights=null",
    "--model.init_args.backbone.init_args.image_size=48",
)


def _fit(cwd: Path, env: dict, recipe: str, *args: str) -> Path:
    result = run_transfer("fit", "--config", recipe, "--config", "debug", *args, cwd=cwd, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    return cwd / "runs" / recipe / "version_0" / "checkpoints" / "last.ckpt"


def _predicted(cwd: Path, env: dict, ckpt: Path, source: str, stdin: str | None = None) -> dict[str, torch.Tensor]:
    """predict's rows as full probability vectors (in the checkpoint's class order), by input."""
    # No progress lines: a predict that outlasts their interval crashes in LineProgressBar (reported apart).
    quiet = "--trainer.enable_progress_bar=false"
    result = run_transfer(
        "predict", "--ckpt", ckpt, "--input", source, "--topk", "100", quiet, cwd=cwd, env=env, stdin=stdin, timeout=900
    )
    assert result.returncode == 0, result.stderr
    classes = torch.load(ckpt, map_location="cpu", weights_only=True)["transfer"]["class_names"]
    rows = {}
    for line in result.stdout.splitlines():
        row = json.loads(line)
        scores = dict(row["topk"])
        rows[row["input"]] = torch.tensor([scores[name] for name in classes])
    return rows


def _evaluated(cwd: Path, monkeypatch, subcommand: str, ckpt: Path, *args: str) -> tuple[TransferCLI, torch.Tensor]:
    """The checkpoint evaluated as the CLI does it, with the probabilities of every example in order."""
    monkeypatch.chdir(cwd)
    cli = TransferCLI(
        args=[subcommand, "--ckpt", str(ckpt), "--trainer.callbacks+=probes.EvaluationProbabilities", *args]
    )
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, EvaluationProbabilities))
    return cli, torch.cat(probe.probs)


def _assert_same(predicted: list[torch.Tensor], evaluated: torch.Tensor) -> None:
    assert len(predicted) == len(evaluated) > 0
    # predict rounds its scores to 6 decimals
    torch.testing.assert_close(torch.stack(predicted), evaluated, rtol=0, atol=1e-5)


def test_image_files_predict_as_the_model_evaluates_them(tmp_path, imagefolder_root, offline_env, monkeypatch):
    ckpt = _fit(
        tmp_path, offline_env, "resnet50-cifar10", "--data=transfer_cli.data.ImageFolderDataModule",
        f"--data.root={imagefolder_root}", "--data.init_args.num_workers=0", *IMAGE_BACKBONE,
    )  # fmt: skip
    # Eight real JPEGs of every class (links): the whole test folder took most of this test's time.
    subset = tmp_path / "subset"
    for folder in sorted(p for p in (imagefolder_root / "test").iterdir() if p.is_dir()):
        (subset / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:8]:
            (subset / "test" / folder.name / image.name).symlink_to(image)
    predicted = _predicted(tmp_path, offline_env, ckpt, str(subset / "test"))
    cli, evaluated = _evaluated(
        tmp_path, monkeypatch, "test", ckpt, "--trainer.limit_test_batches=1.0", f"--data.root={subset}"
    )
    paths = [str(p) for p in cli.datamodule.test_dataloader().dataset.paths]  # the loader's order
    assert sorted(paths) == sorted(predicted)
    _assert_same([predicted[p] for p in paths], evaluated)


def test_cifar_in_memory_predicts_as_its_image_files(tmp_path, cifar_root, offline_env, monkeypatch):
    # CIFAR-10 trains and evaluates on the pickles' pixels in memory, resized on the device; users
    # predict on image files. The same pixels, written losslessly (PNG), must give the same output.
    ckpt = _fit(tmp_path, offline_env, "resnet50-cifar10", f"--data.root={cifar_root}", *IMAGE_BACKBONE)
    count = 40
    images, _ = read_batch(next(cifar_root.rglob("test_batch")))
    files = tmp_path / "png"
    files.mkdir()
    for i, image in enumerate(images[:count]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(files / f"{i:04d}.png")
    assert ".png" in IMAGE_SUFFIXES
    predicted = _predicted(tmp_path, offline_env, ckpt, str(files))
    limit = f"--trainer.limit_test_batches={count // 8}"
    _, evaluated = _evaluated(tmp_path, monkeypatch, "test", ckpt, "--data.init_args.batch_size=8", limit)
    _assert_same([predicted[str(files / f"{i:04d}.png")] for i in range(count)], evaluated)


def test_texts_from_a_file_and_from_stdin_predict_as_the_model_evaluates_them(
    tmp_path, mnli_root, offline_env, monkeypatch
):
    glue = mnli_root / "fastnlp_fixture"
    tiny = make_tiny_bert(tmp_path / "tiny-bert")
    backbone = f"--model.init_args.backbone.init_args.model={tiny}"
    ckpt = _fit(tmp_path, offline_env, "bert-mnli", f"--data.root={glue}", backbone)
    shutil.rmtree(tiny)
    dev = glue / "dev_matched.tsv"  # the validation split: every row labelled, none dropped
    with open(dev, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows and all(r["gold_label"] != "-" for r in rows)
    _, evaluated = _evaluated(tmp_path, monkeypatch, "validate", ckpt, "--trainer.limit_val_batches=1.0")

    from_file = _predicted(tmp_path, offline_env, ckpt, str(dev))
    _assert_same([from_file[r["pairID"]] for r in rows], evaluated)
    lines = "".join(f"{r['sentence1']}\t{r['sentence2']}\n" for r in rows)
    from_stdin = _predicted(tmp_path, offline_env, ckpt, "-", stdin=lines)
    _assert_same([from_stdin[f"stdin:{i}"] for i in range(1, len(rows) + 1)], evaluated)
