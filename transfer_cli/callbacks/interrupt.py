"""A resumable checkpoint when fit is interrupted (Ctrl-C or SIGTERM)."""

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


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
