"""Lightning's DDP is the engine beyond one device: two CPU processes (gloo) through the real CLI."""

import torch

from conftest import TINY_IMAGE_BACKBONE, run_transfer

DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")


def _fit(tmp_path, cifar_root, env, *extra: str):
    return run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, *DDP, *extra,
        cwd=tmp_path, env=env,
    )  # fmt: skip


def test_ddp_fit_writes_one_run_and_one_summary(tmp_path, cifar_root, offline_env):
    result = _fit(tmp_path, cifar_root, offline_env, "--finetuning.strategy=frozen")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.count("checkpoints: ") == 1  # summaries from rank zero only
    runs = list((tmp_path / "runs" / "resnet50-cifar10").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    state = torch.load(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    # Drawn on rank zero alone, after the other process has finished: no collective may be waiting there.
    assert (runs[0] / "curves.png").is_file() and (runs[0] / "summary.json").is_file()


def test_gradual_unfreezing_is_refused_on_several_devices(tmp_path, cifar_root, offline_env):
    result = _fit(tmp_path, cifar_root, offline_env, "--finetuning.strategy=gradual")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "gradual cannot run on several devices" in result.stderr
    # Refused before the other processes start: an error after that could abort them all (SIGABRT).
    assert "Initializing distributed" not in result.stderr
    assert not (tmp_path / "runs").exists()
