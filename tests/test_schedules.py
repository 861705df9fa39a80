"""The learning-rate schedule: warmup from the first step, decay to zero at the last, and a resumed
run that is extended keeps learning."""

import csv
import math

import pytest
import torch

from transfer_cli.schedules import WarmupDecay

from conftest import TINY_IMAGE_BACKBONE, run_transfer


def _lrs(scheduler: WarmupDecay, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])  # the lr the coming step uses
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def _scheduler(**kwargs) -> WarmupDecay:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupDecay(optimizer, **kwargs)


def test_linear_warmup_then_decay_to_zero():
    scheduler = _scheduler(warmup_fraction=0.3, decay="linear")
    scheduler.set_total_steps(10)
    lrs = _lrs(scheduler, 10)
    assert lrs[0] == 0.25 and lrs[2] == 0.75  # warmup of 3 steps starts above zero
    assert lrs[3] == 1.0 and lrs[-1] == 1.0 - 6 / 7
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))


def test_without_warmup_the_first_step_uses_the_full_rate():
    scheduler = _scheduler(warmup_fraction=0.0, decay="cosine")
    scheduler.set_total_steps(4)
    assert _lrs(scheduler, 2) == [1.0, 0.5 * (1 + math.cos(math.pi / 4))]


def test_an_extended_resume_keeps_its_own_length():
    first = _scheduler(warmup_fraction=0.0, decay="linear")
    first.set_total_steps(4)
    _lrs(first, 4)
    resumed = _scheduler(warmup_fraction=0.0, decay="linear")
    resumed.set_total_steps(8)  # the resumed run asks for twice as many steps
    resumed.load_state_dict(first.state_dict())
    assert resumed.total_steps == 8
    assert resumed.optimizer.param_groups[0]["lr"] == 0.5  # step 4 of 8, not 0


# From the CLI: torch's schedules as configured, each stepped on its own interval ---------------------

EPOCHS, BATCHES = 4, 3


def _fit_with_schedule(tmp_path, cifar_root, env, *extra: str) -> tuple[list[dict[str, str]], dict]:
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}", *TINY_IMAGE_BACKBONE,
        f"--trainer.max_epochs={EPOCHS}", f"--trainer.limit_train_batches={BATCHES}", "--trainer.log_every_n_steps=1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
        "--model.init_args.optimizer.init_args.lr=0.05",
        *extra,
        cwd=tmp_path, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "resnet50-cifar10" / "version_0"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_one_cycle_learns_the_run_length_and_steps_every_batch(tmp_path, cifar_root, offline_env):
    rows, ckpt = _fit_with_schedule(
        tmp_path, cifar_root, offline_env,
        "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.OneCycleLR",
        "--model.init_args.lr_scheduler.init_args.max_lr=0.1",
        "--model.init_args.lr_scheduler.init_args.cycle_momentum=false",
    )  # fmt: skip
    total = EPOCHS * BATCHES
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05), max_lr=0.1, total_steps=total,
        cycle_momentum=False,
    )  # fmt: skip
    expected = []
    for _ in range(total):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert _logged(rows, "lr-SGD/head") == pytest.approx(expected, rel=1e-6)  # the lr of every step
    scheduler = ckpt["lr_schedulers"][0]
    assert scheduler["total_steps"] == total  # from the trainer: max_epochs x limit_train_batches
    assert scheduler["last_epoch"] == total  # stepped per batch, not per epoch


def test_reduce_on_plateau_follows_the_monitored_metric_every_epoch(tmp_path, cifar_root, offline_env):
    # An absolute threshold of 1e9: no epoch after the first counts as an improvement, so with
    # patience 0 the rate halves after every later epoch, whatever the losses are.
    plateau = "--model.init_args.lr_scheduler.init_args."
    rows, ckpt = _fit_with_schedule(
        tmp_path, cifar_root, offline_env,
        "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
        f"{plateau}threshold_mode=abs", f"{plateau}threshold=1e9", f"{plateau}patience=0", f"{plateau}factor=0.5",
    )  # fmt: skip
    assert _logged(rows, "lr-SGD/head") == pytest.approx([0.05, 0.05, 0.025, 0.0125])  # at each epoch's start
    val_losses = _logged(rows, "val_loss")
    assert len(val_losses) == EPOCHS
    scheduler = ckpt["lr_schedulers"][0]
    assert scheduler["best"] == pytest.approx(val_losses[0], rel=1e-5)  # it followed val_loss, the default


def test_reduce_on_plateau_monitor_is_configurable_and_checked(tmp_path, cifar_root, offline_env):
    monitor = "--model.init_args.lr_scheduler_monitor="
    schedule = "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau"
    rows, ckpt = _fit_with_schedule(tmp_path, cifar_root, offline_env, schedule, f"{monitor}train_loss_epoch")
    best = ckpt["lr_schedulers"][0]["best"]
    assert any(best == pytest.approx(v, rel=1e-5) for v in _logged(rows, "train_loss_epoch"))
    assert not any(best == pytest.approx(v, rel=1e-5) for v in _logged(rows, "val_loss"))
    (tmp_path / "bad").mkdir()
    bad = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}", *TINY_IMAGE_BACKBONE,
        schedule, f"{monitor}val_los", cwd=tmp_path / "bad", env=offline_env,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "val_los" in bad.stderr and "val_loss" in bad.stderr and "Traceback" not in bad.stderr


def test_settings_the_optimizer_rejects_are_a_config_error(tmp_path, cifar_root, offline_env):
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}", *TINY_IMAGE_BACKBONE,
        "--model.init_args.optimizer.init_args.momentum=0.0",  # the recipe's SGD is nesterov: needs momentum
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "model.optimizer" in result.stderr and "Nesterov" in result.stderr and "Traceback" not in result.stderr
