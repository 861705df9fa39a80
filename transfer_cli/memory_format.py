"""The memory layout a convolutional backbone runs in: channels_last on GPUs, the faster one measured on the CPU.

On GPUs channels_last (NHWC) is what tensor cores want. On the CPU neither layout wins everywhere, and the
balance depends on the model, the image size and the processor: on one two-core Intel Xeon, channels_last
made MobileNetV3-Small and EfficientNet-B0 (depthwise convolutions) 1.2-5x faster and ResNet50 at 224 px
1.1x faster, but ResNet50 at 32 px 1.15x slower to train and 1.5x slower to run, and ResNet18 at 64 px
1.2x slower. So on the CPU both are timed, on a batch of the run's image size, and contiguous (NCHW) is
taken only when it is clearly faster.

The choice is kept on disk per processor, torch version, thread count, architecture, image size and
precision: the two layouts sum in a different order, and a rerun of `predict` must print the same bytes,
and `predict` the probabilities `validate` computed, not ones that moved with one run's timing noise.
"""

import contextlib
import hashlib
import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from transfer_cli.help_cache import cache_root

if TYPE_CHECKING:
    import lightning as L

    from transfer_cli.backbones.base import Backbone

# NCHW must beat channels_last by this much: closer timings are noise, and the GPU layout is kept.
CLEARLY_FASTER = 0.9
# The timing batch: large enough for the kernels a run uses, small enough to cost about a second for a
# ResNet50 at 224 px on two cores. The same for every verb, so fit, validate and predict agree.
TIMING_BATCH = 16
TIMED_RUNS = 2  # the faster of two: a run the scheduler interrupted does not decide
LAYOUTS = {"channels_last": torch.channels_last, "contiguous_format": torch.contiguous_format}


def settle(backbone: "Backbone", trainer: "L.Trainer") -> None:
    """Set the layout a backbone's weights and inputs keep for the run, before Lightning moves the model to its
    device and wraps it (DDP): parameters change layout only here. Called from the finetuning callback's setup
    (the feature cache runs the backbone there) and from the model's, which Lightning calls after it."""
    if backbone.memory_format is None:  # not an image backbone
        return
    layout = torch.channels_last
    if trainer.strategy.root_device.type == "cpu":
        # Rank 0 alone times and keeps the choice, and every process runs it: DDP replicas stay alike.
        if trainer.is_global_zero:
            layout = cpu_layout(backbone, str(trainer.precision), trainer.precision_plugin.forward_context)
        layout = trainer.strategy.broadcast(layout)
    backbone.use_memory_format(layout)


def cpu_layout(
    backbone: "Backbone",
    precision: str,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.memory_format:
    """The layout chosen for this backbone on this machine before, else timed now and kept."""
    image_size = backbone.preprocessing().crop_size
    entry = _entry(backbone, image_size, precision)
    try:
        return LAYOUTS[entry.read_text().strip()]
    except (OSError, KeyError):
        pass
    layout = fastest_on_cpu(backbone, image_size, TIMING_BATCH, forward_context)
    _keep(entry, str(layout).removeprefix("torch."))
    return layout


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def fastest_on_cpu(
    backbone: "Backbone",
    image_size: int,
    batch_size: int,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.memory_format:
    """Time the backbone's forward pass in both layouts on the CPU and return the one to use.

    The backbone is timed in eval mode under no_grad (no batch-norm statistics updated, no random numbers
    drawn); its train/eval flags are restored, its layout is left to the caller.
    """
    conv = first_conv(backbone)
    if conv is None:
        return torch.channels_last
    generator = torch.Generator().manual_seed(0)  # the run's own random stream is left untouched
    images = torch.rand(max(1, batch_size), conv.in_channels, image_size, image_size, generator=generator)
    training = {module: module.training for module in backbone.modules()}
    seconds = {}
    try:
        backbone.eval()
        with torch.no_grad(), forward_context():
            for layout in (torch.contiguous_format, torch.channels_last):
                backbone.use_memory_format(layout)
                inputs = images.contiguous(memory_format=layout)
                backbone(inputs)  # builds the kernels for this shape
                seconds[layout] = min(_timed(backbone, inputs) for _ in range(TIMED_RUNS))
    finally:
        for module, mode in training.items():
            module.training = mode
    if seconds[torch.contiguous_format] < CLEARLY_FASTER * seconds[torch.channels_last]:
        return torch.contiguous_format
    return torch.channels_last


def _timed(model: nn.Module, inputs: torch.Tensor) -> float:
    start = time.perf_counter()
    model(inputs)
    return time.perf_counter() - start


def _entry(backbone: nn.Module, image_size: int, precision: str) -> Path:
    # The architecture by its tensors' names and shapes: two backbones alike in these run alike.
    tensors = [(name, tuple(t.shape)) for name, t in (*backbone.named_parameters(), *backbone.named_buffers())]
    stamp = (_processor(), torch.__version__, torch.get_num_threads(), type(backbone).__qualname__, tensors)
    key = hashlib.sha256(repr((*stamp, image_size, precision)).encode()).hexdigest()[:32]
    return cache_root() / "cpu-layouts" / f"{key}.txt"


def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _keep(entry: Path, name: str) -> None:
    """Written whole or not at all (a rename); a folder that cannot be written only means timing again."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".layout-")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name)
        os.replace(tmp, entry)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
