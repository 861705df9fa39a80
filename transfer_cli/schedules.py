"""Learning-rate schedules that span the whole run and learn its length from the trainer."""

import math
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR, ReduceLROnPlateau

from transfer_cli.errors import ConfigError


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


# torch's schedules built to move every optimizer step; all others move once per epoch.
PER_STEP_SCHEDULES = (OneCycleLR, CyclicLR)


def optimizers(
    optimizer: Optimizer,
    lr_scheduler_factory: Any,
    trainer: Any,
    monitor: str = "val_loss",
    interval: str | None = None,
) -> Any:
    """What configure_optimizers returns: the optimizer, with its schedule when there is one.

    A schedule that takes `total_steps` and was not given one (nor `epochs`) gets the run's length
    from the trainer; ReduceLROnPlateau follows `monitor` (or its own `monitor`, as Lightning's CLI
    subclass has); `interval` overrides where the schedule steps.
    """
    if lr_scheduler_factory is None:
        return optimizer
    run_length = _run_length(lr_scheduler_factory, trainer)
    scheduler = build(lr_scheduler_factory, "model.lr_scheduler", optimizer, **run_length)
    if isinstance(scheduler, WarmupDecay) and scheduler.total_steps is None:
        scheduler.set_total_steps(int(trainer.estimated_stepping_batches))
    config = {"scheduler": scheduler, "interval": interval or _interval(scheduler)}
    if isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = getattr(scheduler, "monitor", None) or monitor
    return {"optimizer": optimizer, "lr_scheduler": config}


def build(factory: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """Construct an optimizer or schedule; settings it rejects are config errors, not crashes."""
    try:
        return factory(*args, **kwargs)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}. Change its init_args (`--print_config` shows them).") from err


def _run_length(factory: Any, trainer: Any) -> dict[str, int]:
    # The CLI hands schedules over as partials holding every init arg, so an unset length shows as None.
    given = getattr(factory, "keywords", None) or {}
    if "total_steps" in given and given["total_steps"] is None and given.get("epochs") is None:
        return {"total_steps": int(trainer.estimated_stepping_batches)}
    return {}


def _interval(scheduler: Any) -> str:
    if hasattr(scheduler, "interval"):
        return scheduler.interval
    return "step" if isinstance(scheduler, PER_STEP_SCHEDULES) else "epoch"
