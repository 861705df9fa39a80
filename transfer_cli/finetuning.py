"""Freezing and unfreezing the backbone, as a Lightning callback."""

import sys
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning

from transfer_cli.errors import ConfigError
from transfer_cli.feature_cache import can_cache, use_cached_features


class BackboneFinetuning(BaseFinetuning):
    def __init__(
        self,
        strategy: Literal["frozen", "full", "gradual"] = "full",
        unfreeze_at_epoch: int = 1,
        cache_features: bool = True,
    ):
        """How the backbone trains.

        Args:
            strategy: `frozen` trains only the head (a linear probe); `full` trains everything from
                the start; `gradual` keeps the backbone frozen until `unfreeze_at_epoch`.
            unfreeze_at_epoch: With `gradual`, the first epoch (0-based) in which the backbone trains.
            cache_features: With `frozen` and no random augmentation, compute the backbone's features
                once and train the head on them (same result, epochs cost about as much as the head).
        """
        super().__init__()
        self.strategy = strategy
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.cache_features = cache_features

    def backbone_frozen(self, epoch: int) -> bool:
        return self.strategy == "frozen" or (self.strategy == "gradual" and epoch < self.unfreeze_at_epoch)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.strategy != "full":
            self._freeze(pl_module)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.strategy == "gradual" and trainer.world_size > 1:
            # DDP fixes the set of synchronised parameters when it wraps the model: a backbone unfrozen
            # later would train apart on every process (Lightning-AI/pytorch-lightning#20340).
            raise ConfigError(
                "finetuning.strategy gradual cannot run on several devices: use full or frozen, or one device."
            )
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.strategy != "frozen" or not self.cache_features:
            return
        reason = can_cache(trainer, trainer.datamodule)
        if reason is None:
            use_cached_features(trainer, pl_module)
        else:
            print(f"transfer: frozen features are not cached: {reason}", file=sys.stderr)

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
        if self.backbone_frozen(trainer.current_epoch):
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
