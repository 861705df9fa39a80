"""When fit writes checkpoints: the best ones by the monitored metric, and a last.ckpt that follows every epoch."""

import lightning as L
import torch

from transfer_cli.lightning_private import ModelCheckpointHooks


class RunCheckpoint(ModelCheckpointHooks):
    """ModelCheckpoint whose last.ckpt follows every epoch.

    Lightning 2.6 refreshes last.ckpt only when a best checkpoint is written in the same step, so a
    run that stops improving would resume from a stale epoch and redo (or lose) work.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.saves_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self.saves_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning writes last.ckpt here even under fast_dev_run, a dry run that should write nothing,
        # and not at all when one was written before, losing the steps after the last validation.
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)
            if self.save_last and self.last_saved_step != trainer.global_step:
                self.save_last_checkpoint(trainer, self.monitor_candidates(trainer))

    def save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # A resumed run continues its own last.ckpt: Lightning would write last-v1.ckpt beside it and leave
        # last.ckpt stale whenever the file was not written by this process (an interrupt checkpoint,
        # another process). No other run can share this directory (runs.check_new_or_resumed).
        if self.save_last and "{" not in self.CHECKPOINT_NAME_LAST:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super().save_last_checkpoint(trainer, monitor_candidates)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self.skips_saving(trainer):
            self.save_last_checkpoint(trainer, self.monitor_candidates(trainer))
