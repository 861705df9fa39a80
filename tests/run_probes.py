"""Callbacks the run tests inject into real `transfer fit` subprocesses with --trainer.callbacks+=run_probes.X
(the tests put this folder on PYTHONPATH): they record where a process starts and send signals while fit
validates."""

import json
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class RecordSteps(Callback):
    """Appends one JSON line per process to `path`: the epoch and step it started training at, and the
    training batches it ran. Proves a resume started where the checkpoint left off."""

    def __init__(self, path: str = "steps.jsonl"):
        self.path = Path(path)
        self.record: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record = {"start_epoch": trainer.current_epoch, "start_step": trainer.global_step, "batches": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["batches"] += 1

    def _write(self) -> None:
        if self.record:
            with open(self.path, "a") as f:
                f.write(json.dumps(self.record) + "\n")
            self.record = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write()


class SignalDuringValidation(Callback):
    """Sends a signal to this process after the first validation batch of the validation that runs at
    training step `at_step` (-1: the sanity check), like a scheduler or a user would."""

    def __init__(self, at_step: int = 0, signal_name: str = "SIGTERM"):
        self.at_step = at_step
        self.signal_name = signal_name

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        step = -1 if trainer.sanity_checking else trainer.global_step
        if batch_idx == 0 and step == self.at_step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
