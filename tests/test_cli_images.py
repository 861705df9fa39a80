"""The image path through the real CLI, as a user runs it: recipes, fit, predict, the shell contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from conftest import REPO, TINY_IMAGE_BACKBONE, run_transfer

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fit_tiny(tmp_path: Path, cifar_root: Path, env, *extra: str) -> Path:
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen", *extra,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    checkpoints = sorted((tmp_path / "runs" / "resnet50-cifar10").glob("version_*/checkpoints"))
    return checkpoints[-1]


def test_help_and_version_answer_without_a_config(tmp_path):
    help_ = run_transfer("--help", cwd=tmp_path)
    assert help_.returncode == 0
    assert "resnet50-cifar10" in help_.stdout and "predict" in help_.stdout
    version = run_transfer("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("transfer ")


def test_recipe_by_name_from_any_directory_and_stacked_configs(tmp_path):
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", "--trainer.max_epochs=7", "--print_config",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "name: resnet50" in result.stdout
    assert "limit_train_batches: 2" in result.stdout  # from the overlay
    assert "max_epochs: 7" in result.stdout  # flags win over configs


def test_resnet50_recipe_runs_offline_with_default_weights_from_torch_cache(tmp_path, cifar_root, offline_env):
    # What a user on an offline GPU box does: put the weights file in $TORCH_HOME/hub/checkpoints.
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    cache = Path(offline_env["TORCH_HOME"]) / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, cache / Path(weights.url).name)

    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        "--model.init_args.backbone.init_args.image_size=32",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "resnet50-cifar10" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (run_dir / "config.yaml").is_file()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["transfer"]["class_names"] == CIFAR_CLASSES


def test_missing_weights_offline_names_the_file_to_supply(tmp_path, cifar_root, offline_env):
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 2
    expected = (
        Path(offline_env["TORCH_HOME"])
        / "hub"
        / "checkpoints"
        / Path(torchvision.models.ResNet50_Weights.DEFAULT.url).name
    )
    assert str(expected) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_new_run_never_overwrites_an_earlier_one_and_last_resumes(tmp_path, cifar_root, offline_env):
    first = _fit_tiny(tmp_path, cifar_root, offline_env)
    second = _fit_tiny(tmp_path, cifar_root, offline_env)
    assert first != second and (first / "last.ckpt").is_file()

    resumed = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, "--trainer.max_epochs=2", "--ckpt_path=last",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(second / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # two epochs of two steps: the newest run went on, in its own directory
    assert sorted(p.name for p in (tmp_path / "runs" / "resnet50-cifar10").iterdir()) == ["version_0", "version_1"]
    # The first segment's metrics survive the resume.
    assert (second.parent / "metrics-segment1.csv").read_text().count("\n") == 3
    assert (second.parent / "metrics.csv").is_file()


@pytest.mark.slow
def test_real_cifar_frozen_fit_then_predict_from_checkpoint_alone(tmp_path, cifar_root, imagefolder_root, offline_env):
    checkpoints = _fit_tiny(
        tmp_path, cifar_root, offline_env, "--trainer.limit_train_batches=10", "--data.init_args.batch_size=32"
    )
    ckpt = checkpoints / "last.ckpt"
    predict_dir = tmp_path / "elsewhere"
    predict_dir.mkdir()
    folder = imagefolder_root / "test"
    result = run_transfer("predict", "--ckpt", ckpt, "--input", folder, "--topk", "2", cwd=predict_dir, env=offline_env)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected_inputs = sorted(str(p) for p in folder.rglob("*.jpg"))
    assert [r["input"] for r in rows] == expected_inputs  # one row per image, in input order
    for row in rows:
        assert row["label"] in CIFAR_CLASSES and 0.0 <= row["score"] <= 1.0
        assert len(row["topk"]) == 2 and row["topk"][0] == [row["label"], row["score"]]
    assert list(predict_dir.iterdir()) == []  # predicting leaves no run directory behind

    # Rerunning gives byte-identical output; stdin input gives the same rows for the same paths.
    again = run_transfer("predict", "--ckpt", ckpt, "--input", folder, "--topk", "2", cwd=predict_dir, env=offline_env)
    assert again.stdout == result.stdout
    some = "\n".join(expected_inputs[:5]) + "\n"
    piped = run_transfer(
        "predict", "--ckpt", ckpt, "--input", "-", "--topk", "2", cwd=predict_dir, env=offline_env, stdin=some
    )
    assert piped.stdout.splitlines() == result.stdout.splitlines()[:5]

    # A CSV file appears only complete, under its final name, with nothing temporary left beside it.
    out = tmp_path / "preds.csv"
    as_csv = run_transfer(
        "predict", "--ckpt", ckpt, "--input", folder, "--output", out, cwd=predict_dir, env=offline_env
    )
    assert as_csv.returncode == 0, as_csv.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "input,label,score,topk" and len(lines) == len(rows) + 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_predict_into_head_exits_quietly(tmp_path, cifar_root, imagefolder_root, offline_env):
    ckpt = _fit_tiny(tmp_path, cifar_root, offline_env) / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "predict", "--ckpt", str(ckpt),
         "--input", str(imagefolder_root / "test"), "--data.init_args.batch_size=4"],
        cwd=tmp_path, env=offline_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = process.stdout.readline()
    process.stdout.close()  # what `| head -1` does after its line
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0
    assert json.loads(first)["label"] in CIFAR_CLASSES
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_test_subcommand_evaluates_a_checkpoint_on_its_own_data(tmp_path, cifar_root, offline_env):
    ckpt = _fit_tiny(tmp_path, cifar_root, offline_env) / "last.ckpt"
    result = run_transfer("test", "--ckpt", ckpt, "--trainer.limit_test_batches=2", cwd=tmp_path, env=offline_env)
    assert result.returncode == 0, result.stderr
    assert "test_acc" in result.stderr and result.stdout == ""


def test_every_shipped_config_parses(tmp_path):
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    # An overlay (debug, ddp) names no model: they are parsed together, stacked on a recipe, as they are used.
    overlays = [c for c in configs if "model" not in yaml.safe_load(c.read_text())]
    for config in [c for c in configs if c not in overlays]:
        result = run_transfer("fit", "--config", config, "--print_config", cwd=tmp_path)
        assert result.returncode == 0, f"{config.name}: {result.stderr}"
    stacked = [arg for overlay in overlays for arg in ("--config", overlay)]
    result = run_transfer("fit", "--config", "resnet50-cifar10", *stacked, "--print_config", cwd=tmp_path)
    assert result.returncode == 0, f"{[o.name for o in overlays]}: {result.stderr}"
    for overlay in overlays:  # each overlay's own settings are in the printed config (they share no key)
        _assert_contains(yaml.safe_load(result.stdout), yaml.safe_load(overlay.read_text()), overlay.name)


def _assert_contains(printed: dict, given: dict, where: str) -> None:
    for key, value in given.items():
        if isinstance(value, dict):
            _assert_contains(printed[key], value, f"{where}: {key}")
        else:
            assert printed[key] == value, f"{where}: {key}"


def test_fast_dev_run_trains_a_step_and_writes_nothing(tmp_path, cifar_root, offline_env):
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", f"--data.root={cifar_root}", *TINY_IMAGE_BACKBONE,
        "--trainer.fast_dev_run=true",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_model_and_data_from_python_without_running(cifar_root):
    from transfer_cli.cli import TransferCLI

    cli = TransferCLI(
        args=["--config", str(REPO / "configs" / "resnet50-cifar10.yaml"), f"--data.root={cifar_root}",
              "--model.init_args.backbone.init_args.weights=null"],
        run=False,
    )  # fmt: skip
    assert cli.model.head[1].in_features == cli.model.backbone.num_features == 2048
    assert cli.model.head[1].out_features == len(cli.datamodule.class_names) == 10
    assert cli.datamodule.preprocessing == cli.model.backbone.preprocessing()
