"""The device part of `transfer check`: real training and evaluation steps, timed, with peak memory.

The steps run the model's own training_step, validation_step and configure_optimizers through a
Lightning Trainer on one device of the requested accelerator and precision, with no logger and no
checkpoints, rooted in a temporary directory that is removed afterwards: nothing is written.
"""

import gc
import math
import resource
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_cli.callbacks.finetuning import FinetuningPolicy
from transfer_cli.feature_cache import can_cache

# Timed after one warm-up step (first-step allocations, cudnn autotuning, lazy init). On a CPU a full-size
# model's step takes seconds and varies little from step to step, so one timed step keeps check quick.
TIMED_STEPS = {"cpu": 1}
DEFAULT_TIMED_STEPS = 3
# A batch size fits when two training steps run (the optimizer's state exists from the first step on,
# so the second shows the steady state) and, on CUDA, the peak stays under this share of the memory.
CUDA_MEMORY_SHARE = 0.9
MAX_SEARCH_TRIALS = 25  # as Lightning's BatchSizeFinder


class StepTimer(Callback):
    """Seconds per training and per evaluation batch, the device synchronised at both ends."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.eval: list[float] = []
        self._started = 0.0

    def _start(self, trainer: L.Trainer) -> None:
        _synchronize(trainer)
        self._started = time.perf_counter()

    def _stop(self, trainer: L.Trainer, into: list[float]) -> None:
        _synchronize(trainer)
        into.append(time.perf_counter() - self._started)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop(trainer, self.train)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop(trainer, self.eval)


def _synchronize(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize(trainer.strategy.root_device)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


def _finetuning(trainer: L.Trainer) -> FinetuningPolicy | None:
    callback = next((c for c in trainer.callbacks if isinstance(c, FinetuningPolicy)), None)
    if callback is None:
        return None
    # A fresh one per run (BaseFinetuning keeps per-fit state); the cache would encode the whole data set.
    return FinetuningPolicy(callback.strategy, callback.unfreeze_at_epoch, callback.backbone_warmup_steps, False)


def run_steps(model: Any, datamodule: Any, trainer: L.Trainer, steps: int, eval_steps: int) -> dict[str, Any]:
    """`steps` training steps and `eval_steps` evaluation steps on one device; times and peak memory."""
    timer = StepTimer()
    on_cuda = trainer.strategy.root_device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="transfer-check-") as root:
        settings = dict(
            accelerator=trainer.accelerator, devices=1, precision=trainer.precision, default_root_dir=root,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, max_steps=steps, max_epochs=-1,
        )  # fmt: skip
        callbacks = [c for c in (_finetuning(trainer), timer) if c is not None]
        L.Trainer(**settings, callbacks=callbacks).fit(model, datamodule=datamodule)
        if eval_steps:
            settings.update(limit_val_batches=eval_steps)
            L.Trainer(**settings, callbacks=[timer]).validate(model, datamodule=datamodule, verbose=False)
    if on_cuda:
        peak, measure = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:  # ru_maxrss is in KiB on Linux; it grows only past the process's earlier peak
        peak, measure = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024, "CPU peak RSS growth"
    return {"train": timer.train, "eval": timer.eval, "peak_memory_bytes": peak, "memory_measure": measure}


def measure(model: Any, datamodule: Any, trainer: L.Trainer, find_batch_size: bool) -> dict[str, Any]:
    """One warm-up and a few timed training and evaluation steps, and the estimates from them."""
    start = time.perf_counter()
    timed = TIMED_STEPS.get(trainer.strategy.root_device.type, DEFAULT_TIMED_STEPS)
    steps = run_steps(model, datamodule, trainer, 1 + timed, 1 + timed)
    train_s = _typical(steps["train"])
    eval_s = _typical(steps["eval"])
    train_batches, val_batches, epochs = _run_length(trainer, datamodule)
    epoch_s = train_batches * train_s + val_batches * eval_s
    report = {
        "accelerator": trainer.strategy.root_device.type,
        "precision": str(trainer.precision),
        "batch_size": datamodule.batch_size,
        "train_step_s": train_s,
        "eval_step_s": eval_s,
        "peak_memory_bytes": steps["peak_memory_bytes"],
        "memory_measure": steps["memory_measure"],
        "train_batches": train_batches,
        "val_batches": val_batches,
        "epochs": epochs,
        "epoch_s": epoch_s,
        "run_s": _run_seconds(trainer, train_batches, val_batches, epochs, train_s, eval_s),
        "feature_cache": _feature_cache(trainer, datamodule),
    }
    if find_batch_size:
        report["batch_size_search"] = search_batch_size(model, datamodule, trainer)
    print(f"transfer: check measured the device in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return report


def _typical(seconds: list[float]) -> float:
    timed = seconds[1:] or seconds  # the first is the warm-up
    return sorted(timed)[len(timed) // 2] if timed else 0.0


def _limited(batches: int, limit: int | float) -> int:
    # Lightning reads an int as a number of batches and a float as a fraction of them.
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def _run_length(trainer: L.Trainer, datamodule: Any) -> tuple[int, int, int]:
    """Training and validation batches per epoch and the number of epochs, as fit will run them."""
    train = _limited(len(datamodule.train_dataloader()), trainer.limit_train_batches)
    val = _limited(len(datamodule.val_dataloader()), trainer.limit_val_batches)
    if trainer.fast_dev_run:
        return min(train, int(trainer.fast_dev_run)), min(val, int(trainer.fast_dev_run)), 1
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else 1000
    if trainer.max_steps not in (None, -1):
        per_epoch = max(1, math.ceil(train / trainer.accumulate_grad_batches))
        epochs = min(epochs, math.ceil(trainer.max_steps / per_epoch))
    return train, val, epochs


def _run_seconds(trainer: L.Trainer, train: int, val: int, epochs: int, train_s: float, eval_s: float) -> float:
    batches = epochs * train
    if trainer.max_steps not in (None, -1):
        batches = min(batches, trainer.max_steps * trainer.accumulate_grad_batches)
    validations = epochs // max(1, trainer.check_val_every_n_epoch or 1)
    return batches * train_s + validations * val * eval_s


def _feature_cache(trainer: L.Trainer, datamodule: Any) -> str:
    finetuning = next((c for c in trainer.callbacks if isinstance(c, FinetuningPolicy)), None)
    if finetuning is None or finetuning.strategy != "frozen":
        return "not used (the backbone trains)"
    if not finetuning.cache_features:
        return "not used (finetuning.cache_features false)"
    reason = can_cache(trainer, datamodule)
    if reason is not None:
        return f"not used: {reason}"
    return "used: the first epoch computes the backbone's features once, later epochs train the head on them"


def _fits(model: Any, datamodule: Any, trainer: L.Trainer, batch_size: int) -> bool:
    datamodule.batch_size = batch_size
    try:
        steps = run_steps(model, datamodule, trainer, 2, 0)
    except Exception as err:  # noqa: BLE001 - anything else is a real failure, re-raised
        if not is_out_of_memory(err):
            raise
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if steps["memory_measure"].startswith("torch.cuda"):
        total = torch.cuda.get_device_properties(trainer.strategy.root_device).total_memory
        return steps["peak_memory_bytes"] <= CUDA_MEMORY_SHARE * total
    return True


def search_batch_size(model: Any, datamodule: Any, trainer: L.Trainer) -> dict[str, Any]:
    """Powers of two from the configured batch size: double while it fits (up to the training set's
    size), or halve until it does; the largest size that fit, with the flag that sets it."""
    configured = datamodule.batch_size
    ceiling = len(datamodule.train_dataloader().dataset)
    tried: dict[int, bool] = {}
    size = configured
    try:
        for _ in range(MAX_SEARCH_TRIALS):
            tried[size] = _fits(model, datamodule, trainer, size)
            print(f"transfer: batch size {size}: {'fits' if tried[size] else 'out of memory'}", file=sys.stderr)
            if tried[size] and size < ceiling and size * 2 not in tried:
                size *= 2
            elif not tried[size] and size > 1 and not any(tried.get(s) for s in tried if s < size):
                size //= 2
            else:
                break
    finally:
        datamodule.batch_size = configured
    fitting = [s for s, ok in tried.items() if ok]
    largest = max(fitting) if fitting else None
    return {
        "tried": {str(s): ok for s, ok in sorted(tried.items())},
        "largest": largest,
        "flag": f"--data.init_args.batch_size {largest}" if largest else None,
    }
