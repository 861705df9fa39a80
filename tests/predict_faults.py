"""Faults injected into one rank of a `transfer predict` on several processes, through
--trainer.callbacks+=predict_faults.X (the tests put this folder on PYTHONPATH)."""

import errno
import os

import lightning as L
from lightning.pytorch.callbacks import Callback

from transfer_cli.callbacks.prediction_writer import PredictionWriter


class _FullDisk:
    """Stands for a rank's part file on a disk that has just filled up."""

    closed = False

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        self.closed = True


class FullDiskOnRank(Callback):
    """From its `batch`-th predict batch on, rank `rank` cannot write its predictions any more."""

    def __init__(self, rank: int = 1, batch: int = 1):
        self.rank, self.batch = rank, batch

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx, *args) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            writer = next(c for c in trainer.callbacks if isinstance(c, PredictionWriter))
            writer._shards._file = _FullDisk()


class CrashOnRank(Callback):
    """Rank `rank` fails at its `batch`-th predict batch with an error of its own (not a write)."""

    def __init__(self, rank: int = 1, batch: int = 1):
        self.rank, self.batch = rank, batch

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx, *args) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            raise RuntimeError(f"injected failure on rank {self.rank}")


class OomMovingModelOnRank(Callback):
    """Rank `rank` runs out of memory moving the model to its device (Strategy.setup: after the writer
    opened its parts, before Lightning's barriers ahead of the predict loop), as on a GPU another job holds."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.global_rank == self.rank:

            def out_of_memory(*args, **kwargs):
                raise RuntimeError(f"CUDA out of memory (injected on rank {self.rank})")

            trainer.strategy.model_to_device = out_of_memory
