"""Freezing and unfreezing the backbone, as a Lightning callback."""

import math
import sys
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy

from transfer_cli import memory_format
from transfer_cli.data.base import TransferDataModule
from transfer_cli.errors import ConfigError
from transfer_cli.feature_cache import can_cache
from transfer_cli.lightning_private import rewrap_ddp


class FinetuningPolicy(BaseFinetuning):
    def __init__(
        self,
        strategy: Literal["frozen", "full", "gradual"] = "full",
        unfreeze_at_epoch: int = 1,
        backbone_warmup_steps: int | None = None,
        cache_features: bool = True,
    ):
        """How the backbone trains.

        Args:
            strategy: `frozen` trains only the head (a linear probe); `full` trains everything from
                the start; `gradual` keeps the backbone frozen until `unfreeze_at_epoch`.
            unfreeze_at_epoch: With `gradual`, the first epoch (0-based) in which the backbone trains.
            backbone_warmup_steps: With `gradual`, the optimizer steps over which the backbone's learning
                rate rises linearly from near 0 to the scheduled rate once it trains; null takes one
                epoch's steps, 0 starts it at the full rate.
            cache_features: With `frozen` and no random augmentation, compute the backbone's features
                once and train the head on them (same result, epochs cost about as much as the head).
        """
        super().__init__()
        self.strategy = strategy
        self.unfreeze_at_epoch = unfreeze_at_epoch
        if backbone_warmup_steps is not None and backbone_warmup_steps < 0:
            raise ConfigError(f"finetuning.backbone_warmup_steps {backbone_warmup_steps}: give 0 or more, or null.")
        self.backbone_warmup_steps = backbone_warmup_steps
        self.cache_features = cache_features
        self._step_hooks: list[Any] = []
        self._scheduled: list[tuple[dict, float]] = []  # backbone rates during one scaled update
        self._wrapped_trainable: frozenset[str] = frozenset()  # what the strategy's wrap synchronises

    def backbone_frozen(self, epoch: int) -> bool:
        return self.strategy == "frozen" or (self.strategy == "gradual" and epoch < self.unfreeze_at_epoch)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.strategy != "full":
            self._freeze(pl_module)

    def check_devices(self, processes: int, strategy: Any = None) -> None:
        """Refuse a gradual unfreezing the strategy cannot keep synchronised, before any process starts."""
        if self.strategy != "gradual" or processes <= 1 or _rewraps(strategy):
            return
        name = type(strategy).__name__ if strategy is not None else "this strategy"
        # Sharded and other wrappers fix what they synchronise or shard when they wrap the model, like
        # DDP; only DDP is re-wrapped at the unfreeze epoch (see on_train_epoch_start).
        raise ConfigError(
            f"finetuning.strategy gradual on several devices runs with --trainer.strategy ddp (or ddp_spawn, "
            f"ddp_fork), not with {name}: use ddp, or finetuning.strategy full or frozen with {name}, or one device."
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_devices(trainer.world_size, trainer.strategy)  # launched by other means than `transfer fit`
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.strategy != "frozen" or not self.cache_features:
            return
        datamodule = trainer.datamodule
        if isinstance(datamodule, TransferDataModule):  # the data serves the cache
            reason = can_cache(trainer, datamodule)
        else:
            reason = "the data does not come from a transfer datamodule (transfer_cli.data)"
        if reason is None:
            memory_format.settle(pl_module.backbone, trainer)  # before the features are computed
            datamodule.use_cached_features(trainer, pl_module.backbone)
        else:
            print(f"transfer: frozen features are not cached: {reason}", file=sys.stderr)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.strategy == "gradual":
            self._warm_up_backbone(trainer)
        # The strategy has just wrapped the model (setup): what DDP synchronises from now on.
        self._wrapped_trainable = _trainable(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # finetune_function: the epoch's trainable set
        if _rewraps(trainer.strategy) and _trainable(pl_module) != self._wrapped_trainable:
            # Gradual unfreezing under DDP, synchronised by construction: DDP all-reduces the gradients
            # only of the parameters that required grad when it wrapped the model. The backbone made
            # trainable now (at the unfreeze epoch, or at the first epoch of a run resumed past it, which
            # Lightning wrapped with the backbone frozen as setup leaves it) gets a fresh wrap by the
            # strategy itself (same device ids, kwargs and communication hooks), which registers it and
            # broadcasts rank 0's weights. The alternative, wrapping the backbone from the start and
            # holding it still, would pay for its backward pass in every frozen epoch.
            rewrap_ddp(trainer.strategy)
            self._wrapped_trainable = _trainable(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks = []

    def backbone_lr_scale(self, trainer: L.Trainer) -> float:
        """The fraction of its scheduled learning rate the backbone gets in the coming optimizer step.

        A function of the global step alone, so a resumed run continues the warmup where it stood.
        """
        if self.strategy != "gradual" or self.backbone_frozen(trainer.current_epoch):
            return 1.0
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        warmup = per_epoch if self.backbone_warmup_steps is None else self.backbone_warmup_steps
        since_unfreeze = trainer.global_step - self.unfreeze_at_epoch * per_epoch
        return min(1.0, (since_unfreeze + 1) / (warmup + 1))

    def _warm_up_backbone(self, trainer: L.Trainer) -> None:
        # The scaled rate holds for the update alone and is put back right after it: the schedule
        # keeps stepping from its own rates (chainable schedules such as StepLR would otherwise
        # compound the scale) and checkpoints hold the scheduled rates.
        def scale(optimizer: Any, args: Any, kwargs: Any) -> None:
            # Groups looked up per step: restoring a checkpoint replaces the optimizer's group dicts.
            groups = [g for g in optimizer.param_groups if g.get("name") == "backbone"]
            factor = self.backbone_lr_scale(trainer)
            self._scheduled = [(g, g["lr"]) for g in groups]
            for group in groups:
                group["lr"] = group["lr"] * factor

        for optimizer in trainer.optimizers:
            self._step_hooks += [
                optimizer.register_step_pre_hook(scale),
                optimizer.register_step_post_hook(lambda *_: self._restore_scheduled_lr()),
            ]

    def _restore_scheduled_lr(self) -> None:
        for group, lr in self._scheduled:
            group["lr"] = lr
        self._scheduled = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Stopped inside a step (Ctrl-C, a non-finite loss): a checkpoint written now keeps the scheduled rate.
        self._restore_scheduled_lr()

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Any) -> None:
        # A function of the epoch alone, so a resumed run lands in the right state.
        if self.backbone_frozen(epoch):
            self._freeze(pl_module)
        else:
            self.make_trainable(pl_module.backbone)
            pl_module.backbone.train()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Frozen means eval mode too (BatchNorm statistics and dropout fixed). Lightning restores
        # module modes after validation and anything may call .train(); re-assert it every batch.
        # .train() and .eval() set the backbone's own flag too, so reading it spares walking every
        # submodule each step (about a millisecond of host time for a ResNet50).
        if pl_module.backbone.training and self.backbone_frozen(trainer.current_epoch):
            pl_module.backbone.eval()

    def _freeze(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        pl_module.backbone.eval()

    def state_dict(self) -> dict[str, Any]:
        # The optimizer's parameter groups never change (see TransferModel.configure_optimizers), so
        # there is nothing to restore; BaseFinetuning's restore would reset learning rates to stale
        # epoch-start values and break exact resumption.
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _trainable(module: L.LightningModule) -> frozenset[str]:
    return frozenset(name for name, p in module.named_parameters() if p.requires_grad)


def _rewraps(strategy: Any) -> bool:
    """Whether the strategy is plain DDP (ddp, ddp_spawn, ddp_fork, ...), which on_train_epoch_start re-wraps.

    Its subclasses (DeepSpeed, XLA) and the sharded strategies (FSDP, ModelParallel) wrap otherwise.
    """
    return type(strategy) is DDPStrategy


# Its name until it was renamed apart from Lightning's own BackboneFinetuning (a different callback):
# code and saved configs written before may still name it.
BackboneFinetuning = FinetuningPolicy
