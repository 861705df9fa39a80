"""`transfer check`: what fit would resolve and refuse, a measured step, every problem at once, nothing written."""

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_huggingface import make_tiny_bert

from transfer_cli.data.cifar10 import TRAIN_BATCHES, read_batch
from transfer_cli.entry import main
from transfer_cli.model import TransferModel

from conftest import TINY_IMAGE_BACKBONE, run_transfer


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


@pytest.mark.slow
def test_check_on_the_cifar_recipe_reports_the_data_the_model_and_a_step_and_writes_nothing(tmp_path, cifar_root):
    result = run_transfer(
        "check", "--config", "resnet50-cifar10", "--config", "debug", "--data.root", cifar_root,
        *TINY_IMAGE_BACKBONE, "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is the JSON report alone
    assert "fit would run (exit 0)" in result.stderr and "training step" in result.stderr
    assert _files(tmp_path) == []  # no runs/, no config.yaml, nothing
    # Counts equal the data's: all the training batches' labels, split into train and val.
    labels = torch.cat([read_batch(cifar_root / "cifar-10-batches-py" / name)[1] for name in TRAIN_BATCHES])
    splits = report["data"]["splits"]
    assert splits["train"]["examples"] + splits["val"]["examples"] == len(labels)
    together = Counter(splits["train"]["per_class"]) + Counter(splits["val"]["per_class"])
    names = report["data"]["splits"]["train"]["per_class"].keys()
    assert [together[n] for n in names] == np.bincount(labels.numpy(), minlength=10).tolist()
    # Parameters equal the model's: a ResNet18 whose classifier has one output per class.
    expected = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    assert report["model"]["parameters"] == {"total": expected, "trainable": expected}
    assert report["model"]["head"]["in_features"] == 512 and report["model"]["head"]["out_features"] == 10
    device = report["device"]
    assert device["accelerator"] == "cpu" and device["precision"] == "32-true" and device["batch_size"] == 8
    assert device["train_step_s"] > 0 and device["eval_step_s"] > 0 and device["peak_memory_bytes"] >= 0
    assert (device["train_batches"], device["val_batches"], device["epochs"]) == (2, 2, 1)  # the debug overlay
    assert device["run_s"] == pytest.approx(2 * device["train_step_s"] + 2 * device["eval_step_s"])
    # What the user changed, and only that: not the defaults fit's hooks fill in (precision, the run's logger).
    changed = {"data.init_args.root", *(flag.split("=")[0].lstrip("-") for flag in TINY_IMAGE_BACKBONE)}
    assert set(report["config_changes"]) == changed, report["config_changes"]
    assert report["config_changes"]["data.init_args.root"] == str(cifar_root)
    assert report["problems"] == [] and report["exit_code"] == 0


def _mnli_counts(path: Path) -> Counter:
    with open(path, encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return Counter(row["gold_label"] for row in rows if row["gold_label"] != "-")


def test_check_on_the_text_recipe_counts_rows_and_measures_a_step(tmp_path, mnli_root, monkeypatch, capsys):
    glue, tiny = mnli_root / "fastnlp_fixture", make_tiny_bert(tmp_path / "tiny-bert")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["check", "--config", "bert-mnli", "--config", "debug", f"--data.root={glue}",
                 f"--model.init_args.backbone.init_args.model={tiny}", "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    splits = report["data"]["splits"]
    train = _mnli_counts(glue / "train.tsv")
    assert splits["train"]["per_class"] == {k: train[k] for k in splits["train"]["per_class"]}
    assert sum(splits["val"]["per_class"].values()) == sum(_mnli_counts(glue / "dev_matched.tsv").values())
    assert report["model"]["backbone"] == "HuggingFaceBackbone" and report["device"]["train_step_s"] > 0
    assert _files(work) == []


def _photos(tmp_path: Path, imagefolder_root: Path, per_class: int = 6) -> Path:
    photos = tmp_path / "photos"
    for name in ("cat", "dog"):
        (photos / "train" / name).mkdir(parents=True)
        for image in sorted((imagefolder_root / "train" / name).glob("*.jpg"))[:per_class]:
            shutil.copy(image, photos / "train" / name / image.name)
    return photos


def test_check_names_every_problem_fit_would_stop_at_in_one_report(
    tmp_path, imagefolder_root, offline_env, monkeypatch, capsys
):
    photos = _photos(tmp_path, imagefolder_root)
    (photos / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    # Pretrained weights that are not cached, from a server that refuses the connection.
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(weights.value, "url", "http://127.0.0.1:9/models/resnet18-f37072fd.pth")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main([
        "check", "--config", "convnext-imagefolder", "--config", "debug", "--data.root", str(photos),
        "--model.init_args.backbone", "transfer_cli.backbones.TorchvisionBackbone",
        "--model.init_args.backbone.init_args.name=resnet18", "--model.init_args.backbone.init_args.image_size=32",
        # gradual runs with DDP; a strategy it cannot keep synchronised is refused.
        "--finetuning.strategy", "gradual", "--trainer.devices", "2",
        "--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.logger.init_args.save_dir=/proc/transfer-runs", "--json",
    ])  # fmt: skip
    out = capsys.readouterr()
    report = json.loads(out.out)
    found = {(p["exit_code"], p["kind"]) for p in report["problems"]}
    assert found == {(2, "WeightsUnavailableError"), (3, "DataError"), (2, "ConfigError"), (6, "ResourceError")}
    # fit meets the missing weights first (when the model is built), so that is the exit code.
    assert code == report["exit_code"] == 2 and report["problems"][0]["kind"] == "WeightsUnavailableError"
    for fragment in ("resnet18-f37072fd.pth", "transfer fetch", "broken.jpg", "gradual", "/proc/transfer-runs"):
        assert fragment in out.err
    assert _files(work) == [] and not any(Path(offline_env["TORCH_HOME"]).rglob("*.pth"))


def test_check_exits_with_the_data_code_for_an_empty_class_folder_and_a_bad_image(
    tmp_path, imagefolder_root, offline_env, monkeypatch, capsys
):
    photos = _photos(tmp_path, imagefolder_root, per_class=2)
    (photos / "train" / "bird").mkdir()
    monkeypatch.chdir(tmp_path)
    args = [
        "--config", "convnext-imagefolder", "--config", "debug", "--data.root", str(photos),
        "--model.init_args.backbone.init_args.name=resnet10t", "--model.init_args.backbone.init_args.weights=null",
        "--model.init_args.backbone.init_args.image_size=32",
    ]  # fmt: skip
    code = main(["check", *args])
    out = capsys.readouterr()
    assert code == 3, out.err
    assert out.out == ""  # without --json, the report is on stderr alone
    assert "Class folders without images" in out.err and "bird" in out.err and "[exit 3]" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    (photos / "train" / "bird").rmdir()
    (photos / "train" / "cat" / "broken.jpg").write_bytes(b"")  # the full scan fit makes finds it
    assert main(["check", *args]) == 3
    err = capsys.readouterr().err
    assert "1 unreadable image(s)" in err and "broken.jpg: empty file" in err and "[exit 3]" in err


def test_check_never_downloads_and_names_fetch_for_missing_data(tmp_path, offline_env, monkeypatch, capsys):
    """--data.init_args.download true is for fit and fetch: a check writes nothing, so it reports instead."""
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("transfer check tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "cifar"
    empty.mkdir()
    code = main([
        "check", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={empty}",
        "--data.init_args.download=true", *TINY_IMAGE_BACKBONE,
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err
    assert "transfer fetch" in err
    assert list(empty.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cifar"]


@pytest.mark.slow
def test_find_batch_size_returns_the_largest_power_of_two_under_a_memory_cap(tmp_path, cifar_root, monkeypatch, capsys):
    cap = 10  # samples: a larger batch "runs out of memory" as a full GPU would
    real_step = TransferModel.training_step

    def capped(self, batch, batch_idx):
        if batch["labels"].shape[0] > cap:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(TransferModel, "training_step", capped)
    monkeypatch.chdir(tmp_path)
    code = main(["check", "--config", "resnet50-cifar10", "--config", "debug", "--data.root", str(cifar_root),
                 *TINY_IMAGE_BACKBONE, "--data.init_args.batch_size=4", "--find_batch_size", "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    search = json.loads(out.out)["device"]["batch_size_search"]
    assert search["tried"] == {"4": True, "8": True, "16": False}
    assert search["largest"] == 8 and search["flag"] == "--data.init_args.batch_size 8"
    assert "--data.init_args.batch_size 8" in out.err


def test_check_and_fetch_explain_their_flags_and_point_to_fits(capsys):
    for verb in ("check", "fetch"):
        assert main([verb, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: transfer {verb} --config R") and "`transfer fit --help`" in out
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "  check " in usage and "  fetch " in usage


def test_check_on_an_image_folder_read_on_threads_counts_every_class_and_validates(tmp_path, imagefolder_root):
    # A model on the CPU reads the folder on threads in this process (num_workers left to transfer), and
    # check validates after fit's setup, under inference mode, on the decoded-once cache fit made.
    result = run_transfer(
        "check", "--config", "resnet50-cifar10", "--config", "debug", *TINY_IMAGE_BACKBONE,
        "--data=transfer_cli.data.ImageFolderDataModule", f"--data.init_args.root={imagefolder_root}", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    splits = report["data"]["splits"]
    together = Counter(splits["train"]["per_class"]) + Counter(splits["val"]["per_class"])
    folder = {d.name: len(list(d.glob("*.jpg"))) for d in (imagefolder_root / "train").iterdir() if d.is_dir()}
    assert dict(together) == folder and report["data"]["few_examples"] == []
    assert report["device"]["eval_step_s"] > 0 and report["exit_code"] == 0
