"""The layout of a convolutional backbone (memory_format.py): channels_last on GPUs, on the CPU the one timed
faster, settled once per run before the model is moved or wrapped, with the same results in either layout."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from transfer_cli import memory_format
from transfer_cli.backbones import TorchvisionBackbone
from transfer_cli.backbones.base import ImageModelBackbone, ImagePreprocessing
from transfer_cli.backbones.checkpoint import CheckpointBackbone
from transfer_cli.callbacks.finetuning import FinetuningPolicy
from transfer_cli.data.image_folder import ImageFolderDataModule
from transfer_cli.errors import ConfigError
from transfer_cli.model import TransferModel

from conftest import TINY_IMAGE_BACKBONE, run_transfer, two_class_folder

TESTS = Path(__file__).resolve().parent
NCHW, NHWC = torch.contiguous_format, torch.channels_last
PREPROCESSING = ImagePreprocessing(crop_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)


class LayoutClock(nn.Module):
    """A convolution that notes the layout of every input it runs; `clock` scripts what timing it takes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen: list[torch.memory_format] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen.append(NCHW if inputs.is_contiguous() else NHWC)
        return self.conv(inputs).mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Choices kept by other tests (the same architecture, the same size) or by this process must not decide."""
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(memory_format.ENV, raising=False)
    monkeypatch.setattr(memory_format, "_chosen", {})
    return tmp_path / "cache"


def clock(monkeypatch, nchw: list[float], nhwc: list[float]) -> None:
    """Each timed forward pass takes the next of the seconds given for its input's layout."""
    script = {NCHW: iter(nchw), NHWC: iter(nhwc)}
    monkeypatch.setattr(memory_format, "_timed", lambda model, x: model(x) is None or next(script[_layout(x)]))


def _layout(inputs: torch.Tensor) -> torch.memory_format:
    return NCHW if inputs.is_contiguous() else NHWC


def _clocked() -> ImageModelBackbone:
    return ImageModelBackbone(LayoutClock(), num_features=4, preprocessing=PREPROCESSING)


R = memory_format.ROUNDS


@pytest.mark.parametrize(
    ("nchw", "nhwc", "chosen"),
    [
        ([0.01] * R, [0.1] * R, NCHW),
        ([0.1] * R, [0.01] * R, NHWC),
        ([0.1] * R, [0.1] * R, NHWC),
        ([0.095] * R, [0.1] * R, NHWC),
        ([0.01] * (R - 1) + [0.2], [0.1] * R, NHWC),
    ],
    ids=["nchw-clearly-faster", "nhwc-faster", "even", "nchw-faster-within-noise", "nchw-lost-a-round"],
)
def test_nchw_is_taken_on_the_cpu_only_when_clearly_faster_in_every_round(monkeypatch, nchw, nhwc, chosen):
    clock(monkeypatch, nchw, nhwc)
    backbone = _clocked()
    assert memory_format.fastest_on_cpu(backbone, image_size=8, batch_size=64) == chosen
    # Both layouts warmed up, then timed in alternation (a burst of other work slows both).
    assert backbone.model.seen == [NCHW, NHWC] + [NCHW, NHWC] * R


def test_timing_leaves_the_run_untouched():
    """No batch-norm statistics updated, no random numbers drawn, train/eval flags and gradients as they were."""
    torch.manual_seed(0)
    backbone = TorchvisionBackbone("resnet18", weights=None, image_size=32).train()
    backbone.model.layer1.eval()  # a mixed model: the flags are restored module by module
    buffers = {name: b.clone() for name, b in backbone.named_buffers()}
    flags = {name: m.training for name, m in backbone.named_modules()}
    rng = torch.get_rng_state()
    memory_format.fastest_on_cpu(backbone, image_size=32, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[name]) for name, b in backbone.named_buffers())
    assert {name: m.training for name, m in backbone.named_modules()} == flags
    assert all(p.grad is None for p in backbone.parameters())


def test_both_layouts_give_the_same_features_and_gradients():
    torch.manual_seed(0)
    backbone = TorchvisionBackbone("resnet18", weights=None, image_size=32)
    images = torch.randn(6, 3, 32, 32)  # NCHW, as BatchImageTransform hands them over
    results = {}
    for layout in (NHWC, NCHW):
        backbone.use_memory_format(layout)
        assert all(p.is_contiguous(memory_format=layout) for p in backbone.parameters() if p.dim() == 4)
        backbone.zero_grad(set_to_none=True)
        features = backbone(images)
        features.square().mean().backward()
        results[layout] = (features.detach(), backbone.model.conv1.weight.grad.clone())
    # Different convolution kernels sum in a different order: equal to float32 rounding, 20 layers deep.
    for nchw, nhwc in zip(results[NCHW], results[NHWC]):
        torch.testing.assert_close(nchw, nhwc, rtol=0, atol=1e-4 * nchw.abs().max().item())


def _trainer(device: str, precision: str = "32-true") -> SimpleNamespace:
    """What settle reads of a Lightning Trainer."""
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device), broadcast=lambda obj: obj),
        is_global_zero=True,
        precision=precision,
        precision_plugin=SimpleNamespace(forward_context=lambda: torch.autocast("cpu", enabled=False)),
    )


def test_a_gpu_run_keeps_channels_last_without_timing(monkeypatch):
    monkeypatch.setattr(memory_format, "fastest_on_cpu", _never_timed)
    backbone = _clocked()
    backbone.use_memory_format(NCHW)
    memory_format.settle(backbone, _trainer("cuda"))
    assert backbone.memory_format == NHWC and backbone.model.conv.weight.is_contiguous(memory_format=NHWC)


def _never_timed(*args, **kwargs):
    raise AssertionError("timed")


def test_the_choice_is_kept_so_reruns_compute_the_same_numbers(own_cache, monkeypatch):
    """Both layouts sum in a different order: a rerun timed afresh could flip and print other digits."""
    clock(monkeypatch, [0.01] * R, [0.1] * R)
    first = _clocked()
    memory_format.settle(first, _trainer("cpu"))
    assert first.memory_format == NCHW and first.model.conv.weight.is_contiguous()
    [kept] = (own_cache / "cpu-layouts").iterdir()
    assert kept.read_text() == "contiguous"

    monkeypatch.setattr(memory_format, "_chosen", {})  # as a new process
    monkeypatch.setattr(memory_format, "fastest_on_cpu", _never_timed)
    again = _clocked()  # the same architecture
    memory_format.settle(again, _trainer("cpu"))
    assert again.memory_format == NCHW and not again.model.seen  # read back, not timed
    again(torch.randn(2, 3, 8, 8).contiguous(memory_format=NHWC))
    assert again.model.seen == [NCHW]  # inputs follow the settled layout


@pytest.mark.parametrize("damage", [b"garbage", b"\xff\xfe\x00"], ids=["text", "binary"])
def test_a_damaged_choice_is_timed_again_and_replaced(own_cache, monkeypatch, damage):
    clock(monkeypatch, [0.1] * R, [0.01] * R)
    memory_format.settle(_clocked(), _trainer("cpu"))
    [kept] = (own_cache / "cpu-layouts").iterdir()
    kept.write_bytes(damage)
    monkeypatch.setattr(memory_format, "_chosen", {})
    clock(monkeypatch, [0.01] * R, [0.1] * R)
    backbone = _clocked()
    memory_format.settle(backbone, _trainer("cpu"))
    assert backbone.memory_format == NCHW and kept.read_text() == "contiguous"


def test_one_process_never_runs_two_layouts_even_when_nothing_can_be_kept(tmp_path, monkeypatch):
    """The feature cache's pass (finetuning callback's setup) and the model's setup settle alike."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(blocked))
    clock(monkeypatch, [0.01] * R, [0.1] * R)
    backbone = _clocked()
    memory_format.settle(backbone, _trainer("cpu"))
    clock(monkeypatch, [0.1] * R, [0.01] * R)  # timed again, it would now choose channels_last
    memory_format.settle(backbone, _trainer("cpu"))
    assert backbone.memory_format == NCHW
    assert blocked.read_text().startswith("a file")


@pytest.mark.parametrize(("value", "chosen"), [("contiguous", NCHW), ("channels_last", NHWC)])
def test_the_environment_decides_without_timing(monkeypatch, own_cache, value, chosen):
    monkeypatch.setenv(memory_format.ENV, value)
    monkeypatch.setattr(memory_format, "fastest_on_cpu", _never_timed)
    backbone = _clocked()
    memory_format.settle(backbone, _trainer("cpu"))
    assert backbone.memory_format == chosen and not own_cache.exists()


def test_an_unknown_layout_in_the_environment_is_a_config_error(monkeypatch):
    monkeypatch.setenv(memory_format.ENV, "nhwc")
    with pytest.raises(ConfigError, match="TRANSFER_CPU_LAYOUT='nhwc' is not a layout: use auto"):
        memory_format.settle(_clocked(), _trainer("cpu"))


def test_half_precision_weights_keep_channels_last_untimed(monkeypatch):
    """Lightning converts the weights to bf16 after setup: a timing then would measure float32."""
    monkeypatch.setattr(memory_format, "fastest_on_cpu", _never_timed)
    backbone = _clocked()
    memory_format.settle(backbone, _trainer("cpu", precision="bf16-true"))
    assert backbone.memory_format == NHWC


def test_a_timing_that_fails_keeps_channels_last_and_says_so(monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(memory_format, "fastest_on_cpu", fails)
    backbone = _clocked()
    memory_format.settle(backbone, _trainer("cpu"))
    assert backbone.memory_format == NHWC
    assert "kept channels_last: timing the CPU layouts failed: out of memory" in capsys.readouterr().err


def test_text_backbones_are_left_alone():
    class Text(nn.Module):
        memory_format = None

        def use_memory_format(self, layout):
            raise AssertionError("a text backbone was given a layout")

    memory_format.settle(Text(), _trainer("cpu"))


def test_a_checkpoint_backbone_passes_the_layout_to_its_encoder():
    encoder = _clocked()
    wrapped = CheckpointBackbone(source=encoder)
    wrapped.use_memory_format(NCHW)
    assert wrapped.memory_format == encoder.memory_format == NCHW and encoder.model.conv.weight.is_contiguous()


def test_frozen_features_are_cached_in_the_layout_the_run_settled_on(imagefolder_root, tmp_path, monkeypatch):
    """The feature cache runs the backbone in the finetuning callback's setup, before the model's own setup:
    the layout must be settled by then, or the whole cached pass runs in the slower one."""
    monkeypatch.setattr(memory_format, "fastest_on_cpu", lambda *args, **kwargs: NCHW)
    root = two_class_folder(imagefolder_root, tmp_path / "images", per_class=8)
    data = ImageFolderDataModule(str(root), augment=False, num_workers=0, batch_size=4)
    model = TransferModel(TorchvisionBackbone("resnet18", weights=None, image_size=32), data.class_names)
    data.connect(model.backbone)
    layouts = []
    run = model.backbone.model.forward
    monkeypatch.setattr(model.backbone.model, "forward", lambda x: layouts.append(x.is_contiguous()) or run(x))
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[FinetuningPolicy(strategy="frozen")],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert layouts and all(layouts), "the cached pass ran in channels_last, not the settled NCHW"
    assert model.backbone.memory_format == NCHW


def test_two_processes_run_rank_zeros_layout(tmp_path, imagefolder_root, offline_env):
    """DDP needs every replica alike: rank 1, timing on its own, would settle on the other layout here."""
    cwd = tmp_path / "run"
    cwd.mkdir()
    env = {
        **offline_env,
        "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")]),
        "TRANSFER_CACHE_DIR": str(cwd / "cache"),
    }
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", f"--data.root={imagefolder_root}",
        "--data=transfer_cli.data.ImageFolderDataModule", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=16", *TINY_IMAGE_BACKBONE, "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.strategy=ddp",
        "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.callbacks+=ddp_probes.RankLayouts",
        cwd=cwd, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((cwd / "layouts.json").read_text())
    assert [r["timed"] for r in ranks] == [True, False]  # rank 0 alone times
    assert [r["runs"] for r in ranks] == ["contiguous_format", "contiguous_format"]
    assert all(r["weights_follow"] for r in ranks)
    [kept] = (cwd / "cache" / "cpu-layouts").iterdir()
    assert kept.read_text() == "contiguous"


def test_optimizer_state_resumed_in_another_layout_follows_the_weights(tmp_path, cifar_root, offline_env):
    """State saved channels_last, resumed where the weights run NCHW (a GPU checkpoint resumed on a CPU, a
    checkpoint of an earlier version): torch's fused AdamW reads state and weights as if laid out alike and
    would update those weights wrongly, with no error."""
    env = {**offline_env, "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")])}
    env["TRANSFER_CACHE_DIR"] = str(tmp_path / "cache")
    fit = (
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}", *TINY_IMAGE_BACKBONE,
        "--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.optimizer.init_args.fused=true",
        "--model.init_args.lr_scheduler=null", "--trainer.callbacks+=probes.OptimizerStateLayout",
    )  # fmt: skip
    first = run_transfer(*fit, cwd=tmp_path, env={**env, memory_format.ENV: "channels_last"})
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "optimizer_layout.json").unlink()
    resumed = run_transfer(
        *fit, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path, env={**env, memory_format.ENV: "contiguous"}
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = json.loads((tmp_path / "optimizer_layout.json").read_text())
    assert found["layout"] == "contiguous_format" and set(found["fused"]) == {True}
    assert found["state_tensors"] > 0 and found["state_follows"]
