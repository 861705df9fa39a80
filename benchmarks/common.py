"""Shared pieces of the benchmark workers: synthetic data, a step clock, peak memory, the trainer.

Both sides of every comparison (the `transfer` library driven by Lightning, and a plain PyTorch
loop) use these, so the only difference left between them is the library and Lightning themselves.
"""

import contextlib
import ctypes
import gc
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

WARNINGS_TO_SILENCE = (
    r".*module\(s\) in eval mode.*",
    r".*smaller than the logging interval.*",
    r".*does not have many workers.*",
    r".*LeafSpec.*is deprecated.*",
    r".*Tensor Cores.*",
)


class SyntheticImages(Dataset):
    """CIFAR-shaped uint8 images [3, 32, 32] with labels, in memory (like CIFAR10DataModule's)."""

    def __init__(self, count: int, num_classes: int = 10, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, num_classes, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.images[index], "labels": self.labels[index]}


class SyntheticTokens(Dataset):
    """Token ids of one fixed length (no padding) with labels, like a tokenised sentence-pair task."""

    def __init__(self, count: int, seq_len: int, vocab_size: int, num_classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1000, vocab_size, (count, seq_len), generator=g)
        self.attention_mask = torch.ones(count, seq_len, dtype=torch.long)
        self.labels = torch.randint(0, num_classes, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        return {"inputs": inputs, "labels": self.labels[index]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Timestamps the end of step `warmup` and of the last step; the window between them is timed.

    The device is synchronised only at those two points, so that the host can run ahead of the GPU
    in between, as it does in a real run.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.total, self.device = warmup, warmup + steps, device
        self.steps = self.total - self.warmup
        self.done = 0
        self.start = self.end = None

    def tick(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            synchronize(self.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        elif self.done == self.total:
            synchronize(self.device)
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"the clock saw {self.done} of {self.total} steps")
        return self.end - self.start

    def result(self, batch_size: int) -> dict[str, float]:
        """Items per wall-clock second, and per CPU second of this process (all its threads).

        CPU time hardly moves when other processes share the cores; wall time does. On a GPU the
        host mostly waits, so only the wall-clock figure means anything there.
        """
        items = self.steps * batch_size
        return {"throughput": items / self.seconds(), "throughput_cpu": items / (self.cpu_end - self.cpu_start)}


class ClockCallback(Callback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick()


def trainer(device: torch.device, precision: str, callbacks: list, **settings: Any) -> L.Trainer:
    """A Lightning trainer that writes nothing: no logger, checkpoints, progress bar or summary.

    Validation is off unless `settings` turn it on (`limit_val_batches`).
    """
    defaults = {"num_sanity_val_steps": 0, "limit_val_batches": 0}
    return L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{**defaults, **settings},
    )


def autocast(device: torch.device, precision: str):
    """What Lightning's precision plugin does around the training step, written out by hand."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "32-true":
        return torch.autocast(device.type, enabled=False)
    raise ValueError(f"unsupported precision {precision}")


# Memory --------------------------------------------------------------------------------------


def _rss_mb(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of one measured phase: CUDA max allocated on GPU, peak resident set on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        else:
            with contextlib.suppress(OSError):  # give freed heap back: the last phase's garbage is not ours
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.kind = "peak_rss" if _reset_peak_rss() else "process_peak_rss"
        self.start_mb = self._current()
        return self

    def _current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _rss_mb("VmRSS") or 0.0

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "peak_rss":
            self.peak_mb = _rss_mb("VmHWM")
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def report(self) -> dict[str, Any]:
        return {"kind": self.kind, "peak_mb": round(self.peak_mb, 1), "start_mb": round(self.start_mb, 1)}


# Repeats -------------------------------------------------------------------------------------


def interleaved(sides: dict[str, Any], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run each side `repeats` times, rotating the order, so drift on a shared machine hits all sides."""
    names = list(sides)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(sides[name]())
    return runs


def summarise(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Medians of `key` (and of its CPU-time twin) over the repeats, and the largest peak memory."""
    out = {"memory": max((run["memory"] for run in runs), key=lambda m: m["peak_mb"])}
    for name in (key, f"{key}_cpu"):
        if name in runs[0]:
            values = [run[name] for run in runs]
            out[name], out[f"{name}_runs"] = statistics.median(values), values
    return out


def compare(unit: str, sides: dict[str, Any]) -> dict[str, Any]:
    """Throughput ratio transfer / plain, by wall-clock time and by CPU time."""
    t, p = sides["transfer"], sides["plain"]
    return {
        "unit": unit,
        "sides": sides,
        "ratio": t["throughput"] / p["throughput"],
        "ratio_cpu": t["throughput_cpu"] / p["throughput_cpu"],
    }
