"""Frozen means frozen (weights and BatchNorm statistics bit-identical); gradual unfreezes on time."""

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

from transfer_cli.schedules import WarmupDecay

from conftest import run_transfer


def _backbone_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "backbone.model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _head_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("head.")}


def _initial_weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    # Non-default BatchNorm statistics, so "unchanged" cannot pass by coincidence with fresh buffers.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18-start.pth"
    torch.save(model.state_dict(), path)
    initial = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return path, initial


def _fit(tmp_path, cifar_root, env, weights: Path, *extra: str):
    # Prepended: the code under test may itself come from PYTHONPATH (a checkout beside an installed copy).
    env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])}
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        "--model.init_args.backbone.init_args.name=resnet18", f"--model.init_args.backbone.init_args.weights={weights}",
        "--model.init_args.backbone.init_args.image_size=32", "--trainer.limit_train_batches=3",
        "--checkpoint.save_top_k=-1", "--checkpoint.every_n_epochs=1", "--checkpoint.filename={epoch}",
        *extra,
        cwd=tmp_path, env=env, timeout=900,  # a loaded CI machine
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tmp_path / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints"


def test_frozen_backbone_is_bit_identical_after_fit(tmp_path, cifar_root, offline_env):
    weights, initial = _initial_weights(tmp_path)
    checkpoints = _fit(
        tmp_path, cifar_root, offline_env, weights,
        "--finetuning.strategy=frozen", "--trainer.callbacks+=faults.RequireFrozenBackboneInEvalMode",
        "--trainer.val_check_interval=2",  # validation mid-epoch, then training again: still eval mode
    )  # fmt: skip
    after = _backbone_state(checkpoints / "last.ckpt")
    assert after.keys() == initial.keys()
    for name, tensor in initial.items():  # parameters and buffers (running stats, num_batches_tracked)
        assert torch.equal(after[name], tensor), name
    # ...while the optimizer did step (the head trained).
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3


def test_gradual_starts_changing_the_backbone_exactly_at_the_stated_epoch(tmp_path, cifar_root, offline_env):
    weights, initial = _initial_weights(tmp_path)
    checkpoints = _fit(
        tmp_path, cifar_root, offline_env, weights,
        "--finetuning.strategy=gradual", "--finetuning.unfreeze_at_epoch=2", "--trainer.max_epochs=3",
        "--model.init_args.optimizer.init_args.lr=0.05",
    )  # fmt: skip
    by_epoch = [_backbone_state(checkpoints / f"epoch={e}.ckpt") for e in range(3)]
    heads = [_head_state(checkpoints / f"epoch={e}.ckpt") for e in range(3)]
    for epoch in (0, 1):
        assert all(torch.equal(by_epoch[epoch][k], v) for k, v in initial.items()), f"backbone moved in epoch {epoch}"
    assert not torch.equal(heads[0]["head.1.weight"], heads[1]["head.1.weight"])  # the head trains meanwhile
    changed = [k for k, v in initial.items() if not torch.equal(by_epoch[2][k], v)]
    assert any(k.endswith("conv1.weight") for k in changed)  # weights moved in epoch 2
    assert any(k.endswith("running_mean") for k in changed)  # and BatchNorm statistics resumed updating


def _fit_gradual(tmp_path, cifar_root, env, name: str, *extra: str) -> tuple[list[dict[str, float]], Path]:
    cwd = tmp_path / name
    cwd.mkdir(exist_ok=True)
    checkpoints = _fit(
        cwd, cifar_root, env, "null",
        "--finetuning.strategy=gradual", "--finetuning.unfreeze_at_epoch=1", "--trainer.max_epochs=3",
        "--trainer.callbacks+=probes.LearningRateProbe", "--model.init_args.optimizer.init_args.lr=0.05",
        *extra,
    )  # fmt: skip
    return json.loads((cwd / "lr_probe.json").read_text()), checkpoints


def _warmup_reference(total_steps: int) -> list[float]:
    """The recipe's schedule (WarmupDecay, 5% warmup, cosine) at lr 0.05, step by step."""
    reference = WarmupDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05), 0.05, "cosine")
    reference.set_total_steps(total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    return lrs


def test_gradual_warms_the_backbone_rate_up_from_near_zero_after_unfreezing(tmp_path, cifar_root, offline_env):
    # 3 epochs of 3 steps; the backbone trains from step 3 on and warms up over one epoch's steps.
    steps, _ = _fit_gradual(tmp_path, cifar_root, offline_env, "one-epoch")
    assert [s["step"] for s in steps] == list(range(9))
    assert [s["head"] for s in steps] == pytest.approx(_warmup_reference(9), rel=1e-6)  # the head's schedule as is
    ratios = [s["backbone"] / s["head"] for s in steps[3:]]
    assert ratios == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0, 1.0, 1.0])
    # A set number of steps, reaching into the next epoch.
    steps, _ = _fit_gradual(tmp_path, cifar_root, offline_env, "five-steps", "--finetuning.backbone_warmup_steps=5")
    assert [s["backbone"] / s["head"] for s in steps[3:]] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])


def test_gradual_warmup_resumes_exactly_at_an_epoch_boundary(tmp_path, cifar_root, offline_env):
    # The warmup spans epochs 1 and 2; the run stops after epoch 1 and is resumed for epoch 2.
    # The schedule's length fixed, so the shorter first part runs the same steps as the whole run.
    warmup = ("--finetuning.backbone_warmup_steps=5", "--model.init_args.lr_scheduler.init_args.total_steps=9")
    whole, whole_ckpts = _fit_gradual(tmp_path, cifar_root, offline_env, "whole", *warmup)
    first, first_ckpts = _fit_gradual(tmp_path, cifar_root, offline_env, "parts", *warmup, "--trainer.max_epochs=2")
    assert first == whole[:6]
    # Mid-warmup, the checkpoint holds the scheduled rates, not the scaled ones of the last update.
    groups = torch.load(first_ckpts / "last.ckpt", map_location="cpu", weights_only=True)["optimizer_states"][0]
    head, backbone = groups["param_groups"]
    assert backbone["name"] == "backbone" and backbone["lr"] == head["lr"]
    resumed, resumed_ckpts = _fit_gradual(tmp_path, cifar_root, offline_env, "parts", *warmup, "--ckpt_path=last")
    assert [s["step"] for s in resumed] == [6, 7, 8]
    assert resumed == whole[6:]
    stored = torch.load(resumed_ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    expected = torch.load(whole_ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    for key, tensor in expected["state_dict"].items():
        assert torch.equal(stored["state_dict"][key], tensor), key
