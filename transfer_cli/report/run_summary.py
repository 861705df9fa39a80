"""curves.png and summary.json in a fit's run directory, at the end of fit and at an interrupt that left
a resumable last.ckpt; drawn from the run's metrics across resumed segments (runs.keep_metrics)."""

import csv
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer_cli.lightning_private import logging_step, logs_this_step
from transfer_cli.report.plots import curves_png
from transfer_cli.runs import run_dir

EPOCH_METRICS = ("train_loss_epoch", "train_acc", "val_loss", "val_acc")


class RunSummary(Callback):
    """Counts examples and wall time (carried through checkpoints, so a resumed run adds to them), logs
    the learning rate per parameter group, and writes curves.png and summary.json."""

    def __init__(self) -> None:
        self._wall_s = 0.0
        self._examples = 0
        self._started: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"wall_time_s": self._elapsed(), "examples": self._examples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._wall_s = float(state_dict.get("wall_time_s", 0.0))
        self._examples = int(state_dict.get("examples", 0))

    def _elapsed(self) -> float:
        return self._wall_s + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Straight to the logger on the steps Lightning logs (as its LearningRateMonitor does): no
        # per-step bookkeeping, and nothing added to the progress bar or the metric tables.
        if trainer.loggers and logs_this_step(trainer):
            rates = {
                f"lr-{group.get('name', i)}": group["lr"]
                for optimizer in trainer.optimizers
                for i, group in enumerate(optimizer.param_groups)
            }
            for logger in trainer.loggers:
                logger.log_metrics(rates, step=logging_step(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is not None:
            self._examples += len(labels) * trainer.world_size
        elif isinstance(batch, dict) and isinstance(batch.get("inputs"), torch.Tensor):
            self._examples += batch["inputs"].shape[0] * trainer.world_size

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, interrupted=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        last = Path(checkpoint.last_model_path) if checkpoint is not None and checkpoint.last_model_path else None
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and last is not None and last.is_file():
            try:
                self._write(trainer, interrupted=True)
            except Exception as err:  # the interrupt and its checkpoint matter more than the pictures
                print(f"transfer: could not draw the training curves: {err}", file=sys.stderr)

    def _write(self, trainer: L.Trainer, interrupted: bool) -> None:
        if not trainer.is_global_zero or trainer.logger is None or run_dir(trainer) is None:
            return
        for logger in trainer.loggers:
            logger.save()  # rows Lightning still buffers (it flushes them only at teardown)
        folder = Path(run_dir(trainer))
        epochs, rates = read_metrics(folder)
        if not epochs and not rates:
            return
        curves = folder / "curves.png"
        _atomic(curves, lambda tmp: curves_png(tmp, epochs, rates, _unfreeze_epoch(trainer)))
        summary = folder / "summary.json"
        text = json.dumps(self._summary(trainer, epochs, interrupted), indent=2) + "\n"
        _atomic(summary, lambda tmp: tmp.write_text(text))
        print(f"curves: {curves}\nsummary: {summary}", file=sys.stderr)

    def _summary(
        self, trainer: L.Trainer, epochs: dict[str, list[tuple[int, float]]], interrupted: bool
    ) -> dict[str, Any]:
        wall = self._elapsed()
        checkpoint = trainer.checkpoint_callback
        by_epoch = _rows_by_epoch(epochs)
        monitor = getattr(checkpoint, "monitor", None) or "val_acc"
        mode = getattr(checkpoint, "mode", "max")
        scored = [e for e in by_epoch if monitor in by_epoch[e]]
        best = (max if mode == "max" else min)(scored, key=lambda e: by_epoch[e][monitor]) if scored else None
        last = max(by_epoch) if by_epoch else None
        return {
            "epochs": len(by_epoch),
            "steps": trainer.global_step,
            "interrupted": interrupted,
            "best": {"epoch": best, "monitor": monitor, **by_epoch.get(best, {})} if best is not None else None,
            "last": {"epoch": last, **by_epoch[last]} if last is not None else None,
            "wall_time_s": round(wall, 3),
            "examples_seen": self._examples,
            "examples_per_second": round(self._examples / wall, 3) if wall > 0 else None,
            "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "checkpoints": {
                "last": getattr(checkpoint, "last_model_path", None) or None,
                "best": getattr(checkpoint, "best_model_path", None) or None,
            },
        }


def _unfreeze_epoch(trainer: L.Trainer) -> int | None:
    from transfer_cli.callbacks.finetuning import FinetuningPolicy

    for callback in trainer.callbacks:
        if isinstance(callback, FinetuningPolicy) and callback.strategy == "gradual":
            return callback.unfreeze_at_epoch
    return None


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def metrics_files(run_dir: Path) -> list[Path]:
    """The run's metrics in the order they were written: earlier segments first, then the current file."""
    segments = sorted(
        run_dir.glob("metrics-segment*.csv"), key=lambda p: int(p.stem.removeprefix("metrics-segment") or 0)
    )
    current = run_dir / "metrics.csv"
    return [*segments, *([current] if current.is_file() else [])]


def read_metrics(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """Per-epoch metrics {name: [(epoch, value)]} and learning rates {group: [(step, value)]}. A later
    segment's row for the same epoch or step wins: a run resumed mid-epoch repeats the rest of it."""
    epochs: dict[str, dict[int, float]] = {}
    rates: dict[str, dict[int, float]] = {}
    for path in metrics_files(run_dir):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for name, value in row.items():
                    if not value or name in ("epoch", "step"):
                        continue
                    if name in EPOCH_METRICS and row.get("epoch"):
                        epochs.setdefault(name, {})[int(float(row["epoch"]))] = float(value)
                    elif name.startswith("lr-") and row.get("step"):
                        rates.setdefault(name.removeprefix("lr-"), {})[int(float(row["step"]))] = float(value)
    return (
        {name: sorted(points.items()) for name, points in epochs.items()},
        {name: sorted(points.items()) for name, points in rates.items()},
    )


def _rows_by_epoch(epochs: dict[str, list[tuple[int, float]]]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for name, points in epochs.items():
        for epoch, value in points:
            rows.setdefault(epoch, {})[name] = value
    return rows
