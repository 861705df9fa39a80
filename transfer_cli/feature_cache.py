"""Frozen-feature caching: with a frozen backbone and no random augmentation, every epoch would
compute the same features again. They are computed once, and the head trains on them from then on.
"""

import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, TensorDataset


def can_cache(trainer: L.Trainer, datamodule: Any) -> str | None:
    """Why caching is off for this run, or None when it can be used."""
    if datamodule is None:
        return "no datamodule"
    if getattr(datamodule, "augment", False):
        return "random augmentation changes the inputs every epoch (set data.augment false to cache)"
    if trainer.world_size > 1:
        return "several devices (each would need its own shard of the cache)"
    if trainer.reload_dataloaders_every_n_epochs:
        return "dataloaders are reloaded every epoch"
    if trainer.fast_dev_run or trainer.limit_train_batches != 1.0 or trainer.overfit_batches:
        return "the run uses part of the data (fast_dev_run, limit_train_batches or overfit_batches)"
    return None


@torch.inference_mode()
def compute_features(trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader) -> TensorDataset:
    """One pass of the frozen backbone over a loader, kept in host memory (pinned on CUDA machines):
    a large data set's features would not fit beside the model on the device."""
    device = trainer.strategy.root_device
    backbone = pl_module.backbone.to(device).eval()
    features, labels = [], []
    for batch in loader:
        # Lightning's transfer runs the datamodule's on_after_batch_transfer (the preprocessing) too.
        batch = trainer.strategy.batch_to_device(batch, device)
        with trainer.precision_plugin.forward_context():
            features.append(backbone(batch["inputs"]).float().cpu())
        labels.append(batch["labels"].cpu())
    features, labels = torch.cat(features), torch.cat(labels)
    if torch.cuda.is_available():
        features, labels = features.pin_memory(), labels.pin_memory()
    return TensorDataset(features, labels)


class _FeatureBatches(DataLoader):
    """Batches of cached features, in the dict layout the model's steps take."""

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool):
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_as_batch)


def _as_batch(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    features, labels = zip(*rows)
    return {"features": torch.stack(features), "labels": torch.stack(labels)}


def use_cached_features(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Replace the datamodule's train and val loaders with loaders over cached features."""
    datamodule = trainer.datamodule
    start = time.perf_counter()
    batch_size = datamodule.batch_size
    train = compute_features(trainer, pl_module, datamodule.train_dataloader())
    # Instance attributes shadow the datamodule's methods: Lightning asks the datamodule for its
    # loaders by name, and the datamodule classes stay unaware of the cache.
    datamodule.train_dataloader = lambda: _FeatureBatches(train, batch_size, shuffle=True)
    cached = f"{len(train)} train"
    if trainer.limit_val_batches == 1.0 and is_overridden("val_dataloader", datamodule):
        val = compute_features(trainer, pl_module, datamodule.val_dataloader())
        datamodule.val_dataloader = lambda: _FeatureBatches(val, batch_size, shuffle=False)
        cached += f" and {len(val)} val"
    print(
        f"transfer: cached frozen features of {cached} examples in {time.perf_counter() - start:.1f}s; "
        "the head trains on them from now on",
        file=sys.stderr,
    )
