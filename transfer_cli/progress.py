"""Progress on stderr: a rich bar on a terminal, plain periodic lines in logs and pipelines."""

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from rich.console import Console
from rich.table import Table


def progress_bar() -> ProgressBar:
    if sys.stderr.isatty():
        return RichProgressBar(console_kwargs={"stderr": True})
    return LineProgressBar()


class LineProgressBar(ProgressBar):
    """One line every `interval_s` seconds and one at the end of each epoch, for logs that are files."""

    def __init__(self, interval_s: float = 30.0):
        super().__init__()
        self.interval_s = interval_s
        self._enabled = True
        self._last = 0.0
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled:
            print(text, file=sys.stderr, flush=True)

    def _metrics(self, trainer: L.Trainer) -> str:
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        metrics.pop("v_num", None)
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            done, total = batch_idx + 1, self.total_train_batches
            self._print(f"epoch {trainer.current_epoch} batch {done}/{total} {self._metrics(trainer)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.monotonic() - self._start
        self._print(f"epoch {trainer.current_epoch} done in {seconds:.1f}s {self._metrics(trainer)}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.monotonic()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            # A stream's length is unknown (inf) until it ends.
            total = trainer.num_predict_batches[dataloader_idx]
            self._print(f"predict batch {batch_idx + 1}" + ("" if total == float("inf") else f"/{total}"))


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
