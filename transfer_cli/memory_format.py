"""The memory layout a convolutional backbone runs in: channels_last on GPUs, the faster one measured on the CPU.

On GPUs channels_last (NHWC) is what tensor cores want. On the CPU neither layout wins everywhere, and the
balance depends on the model, the image size and the processor: on one two-core Intel Xeon
(benchmarks/layouts.py), channels_last ran ResNet50 at 224 px, MobileNetV3-Small and EfficientNet-B0 at 64 px
1.2x faster, but ResNet50 at 32 px 1.25x and ResNet18 at 64 px 1.15x slower. So on the CPU rank 0 times both,
and contiguous (NCHW) is taken only when it is clearly faster; TRANSFER_CPU_LAYOUT=channels_last or
contiguous decides instead.

The choice is kept on disk per processor, torch version, architecture, image size and precision: the two
layouts sum in a different order, and a rerun of `predict` must print the same bytes, and `predict` the
probabilities `validate` computed, not ones that moved with one run's timing noise. Delete
$TRANSFER_CACHE_DIR/cpu-layouts (default ~/.cache/transfer/cpu-layouts) to time again.
"""

import contextlib
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from transfer_cli.errors import ConfigError
from transfer_cli.help_cache import cache_root, store

if TYPE_CHECKING:
    import lightning as L

    from transfer_cli.backbones.base import Backbone

# NCHW must win every round and beat channels_last by this much in the median; otherwise (noise, a busy
# machine) the GPU layout is kept.
CLEARLY_FASTER = 0.9
# Small enough to cost about 2 s for a ResNet50 at 224 px on two cores, once per machine and model; the
# ratio of the two layouts was the same at batch 8 as at 16 for the models measured.
TIMING_BATCH = 8
ROUNDS = 3  # the layouts alternate, so a burst of other work slows both rather than one
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
ENV = "TRANSFER_CPU_LAYOUT"
_chosen: dict[Path, torch.memory_format] = {}  # this process's choices: one run never runs two layouts


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
    """TRANSFER_CPU_LAYOUT's, else the layout chosen for this backbone on this machine before, else timed now."""
    forced = os.environ.get(ENV, "auto")
    if forced != "auto":
        if forced not in LAYOUTS:
            raise ConfigError(f"{ENV}={forced!r} is not a layout: use auto, channels_last or contiguous.")
        return LAYOUTS[forced]
    if precision.endswith("-true") and precision != "32-true":
        # Lightning converts the weights to bf16/fp16 only after setup: a timing here would run float32.
        return torch.channels_last
    image_size = backbone.preprocessing().crop_size
    entry = _entry(backbone, image_size, precision)
    if entry in _chosen:
        return _chosen[entry]
    try:
        layout = LAYOUTS[entry.read_text().strip()]
    except (OSError, ValueError, KeyError):  # none yet, or damaged (UnicodeDecodeError is a ValueError)
        channels = len(backbone.preprocessing().mean)
        try:
            layout = fastest_on_cpu(backbone, image_size, TIMING_BATCH, channels, forward_context)
        except (RuntimeError, ValueError, TypeError) as err:  # out of memory, an input the model refuses
            print(f"transfer: kept channels_last: timing the CPU layouts failed: {err}", file=sys.stderr)
            layout = torch.channels_last
        store(entry, next(name for name, known in LAYOUTS.items() if known == layout))
    _chosen[entry] = layout
    return layout


def fastest_on_cpu(
    backbone: "Backbone",
    image_size: int,
    batch_size: int,
    channels: int = 3,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.memory_format:
    """Time the backbone's forward pass in both layouts on the CPU and return the one to use.

    The backbone is timed in eval mode under no_grad (no batch-norm statistics updated, no random numbers
    drawn); its train/eval flags are restored, its layout is left to the caller.
    """
    generator = torch.Generator().manual_seed(0)  # the run's own random stream is left untouched
    images = torch.rand(max(1, batch_size), channels, image_size, image_size, generator=generator)
    order = (torch.contiguous_format, torch.channels_last)
    inputs = {layout: images.contiguous(memory_format=layout) for layout in order}
    training = {module: module.training for module in backbone.modules()}
    seconds: dict[torch.memory_format, list[float]] = {layout: [] for layout in order}
    try:
        backbone.eval()
        with torch.no_grad(), forward_context():
            for layout in order:
                backbone.use_memory_format(layout)
                backbone(inputs[layout])  # builds the kernels for this shape
            for _ in range(ROUNDS):
                for layout in order:
                    backbone.use_memory_format(layout)
                    seconds[layout].append(_timed(backbone, inputs[layout]))
    finally:
        for module, mode in training.items():
            module.training = mode
    nchw, nhwc = seconds[torch.contiguous_format], seconds[torch.channels_last]
    every_round = all(a < b for a, b in zip(nchw, nhwc))
    if every_round and statistics.median(nchw) < CLEARLY_FASTER * statistics.median(nhwc):
        return torch.contiguous_format
    return torch.channels_last


def align_optimizer_state(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Resumed optimizer state in its parameter's layout. The state keeps the layout it was saved in (a CPU
    checkpoint resumed on a GPU, one saved before this module), and torch's fused Adam and AdamW read state
    and parameter as if laid out alike: a mismatch updates wrongly, with no error. Call once state is restored
    (on_train_start)."""
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _timed(model: nn.Module, inputs: torch.Tensor) -> float:
    start = time.perf_counter()
    model(inputs)
    return time.perf_counter() - start


def _entry(backbone: nn.Module, image_size: int, precision: str) -> Path:
    # The architecture by its tensors' names and shapes: two backbones alike in these run alike. Not the thread
    # count: a fit on several processes (fewer threads each) and a predict on one must run the same layout.
    tensors = [(name, tuple(t.shape)) for name, t in (*backbone.named_parameters(), *backbone.named_buffers())]
    stamp = (_processor(), torch.__version__, type(backbone).__qualname__, tensors, image_size, precision)
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:32]
    return cache_root() / "cpu-layouts" / f"{key}.txt"


def _processor() -> tuple[str, ...]:
    """The processor as far as the kernels see it: a shared home folder or an image may travel between machines."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            field, _, value = line.partition(":")
            fields.setdefault(field.strip(), value.strip())  # the first processor's; the others repeat it
    name = fields.get("model name") or fields.get("CPU part") or platform.processor() or platform.machine()
    flags = hashlib.sha256((fields.get("flags") or fields.get("Features") or "").encode()).hexdigest()[:16]
    return name, flags, torch.backends.cpu.get_cpu_capability(), str(os.cpu_count())
