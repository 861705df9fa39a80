"""The layout of a convolutional backbone (memory_format.py): channels_last on GPUs, on the CPU the one timed
faster, settled once per run before the model is moved or wrapped, with the same results in either layout."""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from transfer_cli import memory_format
from transfer_cli.backbones import TorchvisionBackbone
from transfer_cli.backbones.base import ImageModelBackbone, ImagePreprocessing
from transfer_cli.callbacks.finetuning import FinetuningPolicy
from transfer_cli.data.image_folder import ImageFolderDataModule
from transfer_cli.model import TransferModel

from conftest import TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
NCHW, NHWC = torch.contiguous_format, torch.channels_last
PREPROCESSING = ImagePreprocessing(crop_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)


class LayoutClock(nn.Module):
    """A convolution whose forward pass takes `seconds[layout]` of the layout its input arrives in."""

    def __init__(self, nchw: float, nhwc: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seconds = {NCHW: nchw, NHWC: nhwc}
        self.seen: list[torch.memory_format] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        layout = NCHW if inputs.is_contiguous() else NHWC
        self.seen.append(layout)
        time.sleep(self.seconds[layout])
        return self.conv(inputs).mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Choices kept by other tests (the same architecture, the same size) must not decide these."""
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _clocked(nchw: float, nhwc: float) -> ImageModelBackbone:
    return ImageModelBackbone(LayoutClock(nchw, nhwc), num_features=4, preprocessing=PREPROCESSING)


@pytest.mark.parametrize(
    ("nchw", "nhwc", "chosen"),
    # Sleeps long enough that a loaded machine's scheduling delays (a few ms) do not decide.
    [(0.01, 0.1, NCHW), (0.1, 0.01, NHWC), (0.1, 0.1, NHWC), (0.095, 0.1, NHWC)],
    ids=["nchw-clearly-faster", "nhwc-faster", "even", "nchw-faster-within-noise"],
)
def test_nchw_is_taken_on_the_cpu_only_when_clearly_faster(nchw, nhwc, chosen):
    backbone = _clocked(nchw, nhwc)
    assert memory_format.fastest_on_cpu(backbone, image_size=8, batch_size=64) == chosen
    # Both layouts were run, each warmed up before it was timed.
    assert backbone.model.seen.count(NCHW) == backbone.model.seen.count(NHWC) == 1 + memory_format.TIMED_RUNS


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


def _trainer(device: str) -> SimpleNamespace:
    """What settle reads of a Lightning Trainer."""
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device), broadcast=lambda obj: obj),
        is_global_zero=True,
        precision="32-true",
        precision_plugin=SimpleNamespace(forward_context=lambda: torch.autocast("cpu", enabled=False)),
    )


def test_a_gpu_run_keeps_channels_last_without_timing(monkeypatch):
    monkeypatch.setattr(memory_format, "fastest_on_cpu", _never_timed)
    backbone = _clocked(0.0, 0.0)
    backbone.use_memory_format(NCHW)
    memory_format.settle(backbone, _trainer("cuda"))
    assert backbone.memory_format == NHWC and backbone.model.conv.weight.is_contiguous(memory_format=NHWC)


def _never_timed(*args, **kwargs):
    raise AssertionError("timed on a GPU run")


def test_the_choice_is_kept_so_reruns_compute_the_same_numbers(own_cache):
    """Both layouts sum in a different order: a rerun timed afresh could flip and print other digits."""
    first = _clocked(0.0, 0.03)
    memory_format.settle(first, _trainer("cpu"))
    assert first.memory_format == NCHW and first.model.conv.weight.is_contiguous()
    assert first.model.seen  # timed
    [kept] = (own_cache / "cpu-layouts").iterdir()
    assert kept.read_text() == "contiguous_format"

    again = _clocked(0.03, 0.0)  # the same architecture, timed now it would choose channels_last
    memory_format.settle(again, _trainer("cpu"))
    assert again.memory_format == NCHW and not again.model.seen  # read back, not timed
    again(torch.randn(2, 3, 8, 8).contiguous(memory_format=NHWC))
    assert again.model.seen == [NCHW]  # inputs follow the settled layout

    kept.write_text("garbage")  # a damaged entry is timed again and replaced
    memory_format.settle(again, _trainer("cpu"))
    assert again.memory_format == NHWC and kept.read_text() == "channels_last"


def test_an_unwritable_cache_only_means_timing_again(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(blocked))
    backbone = _clocked(0.0, 0.03)
    memory_format.settle(backbone, _trainer("cpu"))
    assert backbone.memory_format == NCHW
    assert not list(tmp_path.glob(".layout-*")) and blocked.read_text().startswith("a file")


def test_text_backbones_are_left_alone():
    class Text(nn.Module):
        memory_format = None

    memory_format.settle(Text(), _trainer("cpu"))  # nothing to time, nothing to set


def test_frozen_features_are_cached_in_the_layout_the_run_settled_on(imagefolder_root, tmp_path, monkeypatch):
    """The feature cache runs the backbone in the finetuning callback's setup, before the model's own setup:
    the layout must be settled by then, or the whole cached pass runs in the slower one."""
    monkeypatch.setattr(memory_format, "fastest_on_cpu", lambda *args, **kwargs: NCHW)
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for jpg in sorted((imagefolder_root / "train" / name).glob("*.jpg"))[:8]:
            (root / "train" / name / jpg.name).symlink_to(jpg)
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
    assert kept.read_text() == "contiguous_format"
