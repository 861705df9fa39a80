"""Training that fails safely: atomic checkpoints loaded safely, a stop on non-finite loss, a
resumable checkpoint on Ctrl-C or SIGTERM, and random state carried across a resume."""

import io
import os
import random
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer_cli.checkpoint import read_checkpoint, reads_safely
from transfer_cli.errors import NonFiniteLossError, ResourceError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints appear complete under their final name or not at all, and load only as plain data."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ResourceError(
                f"Cannot write checkpoint {path}: {err.strerror or err}. Earlier checkpoints are intact. "
                "Free disk space or point trainer.logger.init_args.save_dir at a writable disk, then resume "
                "with --ckpt_path last."
            ) from err

    @reads_safely
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # Always the safe loader, whatever the caller or an environment variable asks for.
        checkpoint = read_checkpoint(path)
        return checkpoint if map_location is None else _to(checkpoint, map_location)


def _to(checkpoint: dict[str, Any], map_location: Any) -> dict[str, Any]:
    if isinstance(map_location, (str, torch.device)):
        return torch.utils._pytree.tree_map(
            lambda v: v.to(map_location) if isinstance(v, torch.Tensor) else v, checkpoint
        )
    return checkpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt follows every epoch.

    Lightning 2.6 refreshes last.ckpt only when a best checkpoint is written in the same step, so a
    run that stops improving would resume from a stale epoch and redo (or lose) work.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning writes last.ckpt here even under fast_dev_run, a dry run that should write nothing,
        # and not at all when one was written before, losing the steps after the last validation.
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)
            if self.save_last and self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # A resumed run continues its own last.ckpt: Lightning would write last-v1.ckpt beside it and leave
        # last.ckpt stale whenever the file was not written by this process (an interrupt checkpoint,
        # another process). No other run can share this directory (runs.check_new_or_resumed).
        if self.save_last and "{" not in self.CHECKPOINT_NAME_LAST:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class NonFiniteLossGuard(Callback):
    """Stops at the first NaN or infinite loss, before it reaches the weights or a checkpoint."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Decided together: one process stopping alone would leave the others waiting in an all-reduce.
        bad = not bool(torch.isfinite(loss).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}). Training stopped; the last checkpoint written before it "
                "is intact. Lower the learning rate, enable gradient clipping (--trainer.gradient_clip_val 1.0), "
                "or use 32-bit precision."
            )


class InterruptCheckpoint(Callback):
    """On Ctrl-C or SIGTERM at any point of fit (training, validation, the sanity check), writes last.ckpt
    so `--ckpt_path last` continues the run; before the first training step there is nothing to keep."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # trainer.training is False while fit validates; the function being run is still fit.
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not fitting:
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None or trainer.fast_dev_run:
            return
        if trainer.global_step == 0:
            if trainer.is_global_zero:
                print(
                    "transfer: interrupted before the first training step; nothing to resume: run the same "
                    "command again to start over.",
                    file=sys.stderr,
                )
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        checkpoint.last_model_path = str(path)  # part of the saved state: the resumed run continues this file
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            print(f"transfer: interrupted; resumable checkpoint written to {path}", file=sys.stderr)


class RandomState(Callback):
    """Carries the random generators through a checkpoint, so a resumed run draws the same data order
    and augmentations as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        random.setstate((state_dict["python_version"], tuple(state_dict["python"]), state_dict["python_gauss"]))
        kind, keys, *rest = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        cuda = state_dict.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)  # augmentation draws its random numbers on the device
