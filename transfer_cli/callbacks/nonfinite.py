"""A stop at the first NaN or infinite training loss."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_cli.errors import NonFiniteLossError


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
