"""Learning-rate schedules that span the whole run and learn its length from the trainer."""

import math
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupDecay(LambdaLR):
    """Linear warmup from 0, then linear or cosine decay to 0 at the last optimizer step.

    Stepped every optimizer step. `total_steps` is filled in by the model from
    `trainer.estimated_stepping_batches`, so it follows max_epochs, limit_train_batches and
    gradient accumulation without being stated twice.
    """

    interval = "step"

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_fraction: float = 0.06,
        decay: Literal["linear", "cosine"] = "linear",
        total_steps: int | None = None,
    ):
        """
        Args:
            optimizer: The optimizer whose learning rates are scheduled.
            warmup_fraction: Fraction of all steps spent warming up.
            decay: Shape of the decay after warmup.
            total_steps: Number of optimizer steps; null takes it from the trainer.
        """
        self.warmup_fraction = warmup_fraction
        self.decay = decay
        self.total_steps = total_steps
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run's length and apply the learning rate of the current step under it."""
        self.total_steps = total_steps
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        # A resumed run may be longer than the one that saved it (more epochs): its own length wins,
        # otherwise the schedule would already have decayed to zero.
        total_steps = self.total_steps
        super().load_state_dict(state_dict)
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def _factor(self, step: int) -> float:
        if self.total_steps is None:  # only during construction; set_total_steps() applies the real one
            return 0.0
        total = max(1, self.total_steps)
        warmup = int(self.warmup_fraction * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def optimizers(optimizer: Optimizer, lr_scheduler_factory: Any, trainer: Any) -> Any:
    """What configure_optimizers returns: the optimizer, with its schedule when there is one."""
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    if isinstance(scheduler, WarmupDecay) and scheduler.total_steps is None:
        scheduler.set_total_steps(int(trainer.estimated_stepping_batches))
    interval = getattr(scheduler, "interval", "epoch")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
