"""Faults injected into real `transfer` subprocesses through --trainer.callbacks+=faults.X
(the tests put this folder on PYTHONPATH)."""

import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class SignalAtEpochEnd(Callback):
    """Sends a signal to this very process when an epoch ends, like a scheduler or a user would."""

    def __init__(self, epoch: int = 0, signal_name: str = "SIGTERM"):
        self.epoch = epoch
        self.signal_name = signal_name

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class SignalAtBatch(Callback):
    """Sends a signal in the middle of an epoch."""

    def __init__(self, batch: int = 1, signal_name: str = "SIGINT"):
        self.batch = batch
        self.signal_name = signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class PoisonAtEpoch(Callback):
    """Makes the head's weights NaN when an epoch starts, so the next loss is NaN."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for parameter in pl_module.head.parameters():
                    parameter.fill_(float("nan"))


class RequireFrozenBackboneInEvalMode(Callback):
    """Fails the run if a frozen backbone is ever in training mode during a training step (BatchNorm
    would then normalise with batch statistics, dropout would drop)."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        training = [name for name, m in pl_module.backbone.named_modules() if m.training]
        if training:
            raise RuntimeError(f"frozen backbone modules in training mode: {training[:3]}")
