"""Frozen means frozen (weights and BatchNorm statistics bit-identical); gradual unfreezes on time."""

from pathlib import Path

import torch
import torchvision

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
    env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        "--model.init_args.backbone.init_args.name=resnet18", f"--model.init_args.backbone.init_args.weights={weights}",
        "--model.init_args.backbone.init_args.image_size=32", "--trainer.limit_train_batches=3",
        "--checkpoint.save_top_k=-1", "--checkpoint.every_n_epochs=1", "--checkpoint.filename={epoch}",
        *extra,
        cwd=tmp_path, env=env,
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
