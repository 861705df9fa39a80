"""Progress on stderr: a rich bar on a terminal, plain periodic lines in logs and pipelines."""

import math
import os
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.console import Console
from rich.table import Table

from transfer_cli.errors import ConfigError
from transfer_cli.lightning_private import RichProgressBarHooks, stop_redirecting_io

INTERVAL_ENV = "TRANSFER_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def progress_bar() -> ProgressBar:
    interval_s = progress_interval()
    if sys.stderr.isatty():
        return TerminalProgressBar(console_kwargs={"stderr": True})
    return LineProgressBar(interval_s)


def progress_interval() -> float:
    """Seconds between periodic lines, from TRANSFER_PROGRESS_INTERVAL (0: a line every batch)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds. Set it to 0 or more "
            f"(0 prints a progress line every batch; default {DEFAULT_INTERVAL_S:g}), or unset it."
        )
    return value


class TerminalProgressBar(RichProgressBarHooks):
    """Lightning's rich bar, drawn on stderr without taking over stdout or stderr.

    rich's Live display redirects sys.stdout into its console by default, so on a terminal the
    predictions of `transfer predict > out.jsonl` would land on the screen instead of in the file.
    """

    def after_init_progress(self, trainer: L.Trainer) -> None:
        if self.progress is not None:
            stop_redirecting_io(self.progress.live)


class StepMetricsOnDemand:
    """A progress bar that knows, before a training step runs, whether it will show that step's metrics.

    The model logs a step's loss only when something reads it (see TransferModel._step_loss_read); a bar
    that is not one of these is taken to show the metrics after every step.
    """

    def shows_step_metrics(self, trainer: L.Trainer) -> bool:
        raise NotImplementedError


class LineProgressBar(StepMetricsOnDemand, ProgressBar):
    """At most one line every `interval_s` seconds, and one at the end of each epoch, for logs that are files."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S):
        super().__init__()
        self.interval_s = interval_s
        self._enabled = True
        self._last = time.monotonic()
        self._epoch_start: float | None = None
        self._line_due = False  # whether the running training step ends with a line

    def shows_step_metrics(self, trainer: L.Trainer) -> bool:
        return self._enabled and self._line_due

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled:
            print(text, file=sys.stderr, flush=True)

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        return True

    def _metrics(self, trainer: L.Trainer) -> str:
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        metrics.pop("v_num", None)
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

    # Training ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch does not call on_train_epoch_start for that epoch: its time counts from here.
        self._epoch_start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # Decided before the step, so that the model logs the loss of the steps that get a line.
        self._line_due = self._due()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._line_due:
            position = _position(batch_idx, self.total_train_batches)
            self._print(f"epoch {trainer.current_epoch} {position} {self._metrics(trainer)}".rstrip())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.monotonic() - (self._epoch_start or time.monotonic())
        self._last = time.monotonic()
        self._print(f"epoch {trainer.current_epoch} done in {seconds:.1f}s {self._metrics(trainer)}".rstrip())

    # Evaluation and prediction ----------------------------------------------------------------

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not self._due():
            return
        total = _loader_total(trainer.num_val_batches, dataloader_idx)
        stage = f"epoch {trainer.current_epoch} validation" if trainer.state.fn == "fit" else "validate"
        self._print(f"{stage}{_loader(trainer.num_val_batches, dataloader_idx)} {_position(batch_idx, total)}")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._due():
            total = _loader_total(trainer.num_test_batches, dataloader_idx)
            self._print(f"test{_loader(trainer.num_test_batches, dataloader_idx)} {_position(batch_idx, total)}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._due():
            total = _loader_total(trainer.num_predict_batches, dataloader_idx)
            self._print(f"predict{_loader(trainer.num_predict_batches, dataloader_idx)} {_position(batch_idx, total)}")


def _loader_total(batches: Any, dataloader_idx: int) -> Any:
    """Lightning's batch count for one dataloader: a list per loader, a number, or nothing yet."""
    if isinstance(batches, (list, tuple)):
        return batches[dataloader_idx] if dataloader_idx < len(batches) else None
    return batches


def _loader(batches: Any, dataloader_idx: int) -> str:
    """Names the dataloader only when there are several."""
    several = isinstance(batches, (list, tuple)) and len(batches) > 1
    return f" dataloader {dataloader_idx}" if several else ""


def _position(batch_idx: int, total: Any) -> str:
    """`batch N/T`, or `batch N` where the total is unknown (an iterable or unsized loader: None or inf)."""
    done = batch_idx + 1
    if isinstance(total, (int, float)) and math.isfinite(total) and total > 0:
        return f"batch {done}/{int(total)}"
    return f"batch {done}"


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    """The final metrics as a table on stderr (stdout is for data)."""
    if not metrics:
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        value = metrics[name]
        value = value.item() if hasattr(value, "item") else value
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(stderr=True).print(table)
