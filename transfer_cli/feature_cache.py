"""Frozen-feature caching: with a frozen backbone and no random augmentation, every epoch would
compute the same features again. They are computed once, and the head trains on them from then on.

The datamodule serves the cached batches (TransferDataModule.use_cached_features) when the
finetuning policy asks; this module computes them and replays the loader they replace.
"""

import sys
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


def can_cache(trainer: L.Trainer, datamodule: Any) -> str | None:
    """Why caching is off for this run, or None when it can be used. `datamodule` is a TransferDataModule."""
    if datamodule.random_augmentation():
        return "random augmentation changes the inputs every epoch (set data.augment false to cache)"
    if trainer.world_size > 1:
        return "several devices (each would need its own shard of the cache)"
    if trainer.reload_dataloaders_every_n_epochs:
        return "dataloaders are reloaded every epoch"
    if trainer.fast_dev_run or not whole(trainer.limit_train_batches) or trainer.overfit_batches:
        return "the run uses part of the data (fast_dev_run, limit_train_batches or overfit_batches)"
    return None


def whole(limit: int | float) -> bool:
    # Lightning reads an int as a number of batches and a float as a fraction: 1 is one batch, 1.0 all.
    return isinstance(limit, float) and limit == 1.0


@torch.inference_mode()
def compute_features(trainer: L.Trainer, backbone: torch.nn.Module, loader: DataLoader) -> TensorDataset:
    """One pass of the frozen backbone over a loader's dataset, in dataset order, kept in host memory
    (pinned on CUDA machines): a large data set's features would not fit beside the model on the device.

    The training random state is left exactly as it was, so the head then sees the same batches, in
    the same order, as it would without the cache.
    """
    device = trainer.strategy.root_device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        features, labels = _features_in_order(trainer, backbone.to(device).eval(), loader, device)
    if torch.cuda.is_available():
        features, labels = features.pin_memory(), labels.pin_memory()
    return TensorDataset(features, labels)


def _features_in_order(
    trainer: L.Trainer, backbone: torch.nn.Module, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    in_order = DataLoader(
        loader.dataset,
        # A loader driven by a batch sampler (text's group_by_length) has no batch_size of its own.
        batch_size=loader.batch_size or len(next(iter(loader.batch_sampler))),
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
    features, labels = [], []
    for batch in in_order:
        # Lightning's transfer runs the datamodule's on_after_batch_transfer (the preprocessing) too.
        batch = trainer.strategy.batch_to_device(batch, device)
        with trainer.precision_plugin.forward_context():
            features.append(backbone(batch["inputs"]).float().cpu())
        labels.append(torch.as_tensor(batch["labels"]).cpu())
    return torch.cat(features), torch.cat(labels)


class FeatureBatches:
    """Batches of cached features, in the dict layout the model's steps take, in exactly the order the
    replaced loader would have given its examples.

    The order comes from the replaced loader's own batch sampler, and the one random number a torch
    DataLoader draws when it starts an epoch (its workers' base seed: every epoch, or only the first
    with persistent workers) is drawn here too. The global random state then moves as it would have
    without the cache, and so do the shuffles, dropout masks and everything else drawn from it.
    """

    def __init__(self, cached: TensorDataset, like: DataLoader):
        self.features, self.labels = cached.tensors
        self.like = like
        self._started = False

    def __len__(self) -> int:
        return len(self.like.batch_sampler)

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # Drawn at the first batch, not in __iter__: Lightning calls iter() once on a loader that is
        # not a DataLoader just to check it, and that call must not move the random state.
        reuses_workers = self.like.persistent_workers and self.like.num_workers > 0
        if not (reuses_workers and self._started):
            torch.empty((), dtype=torch.int64).random_(generator=self.like.generator)
        self._started = True
        for indices in self.like.batch_sampler:
            index = torch.as_tensor(indices)
            yield {"features": self.features[index], "labels": self.labels[index]}


class CachedFeatures:
    """One split's features and the loader they stand in for; each request for the split's loader
    gets fresh batches over them, as each request would have got a fresh loader."""

    def __init__(self, features: TensorDataset, like: DataLoader):
        self.features, self.like = features, like

    def __len__(self) -> int:
        return len(self.features)

    def batches(self) -> FeatureBatches:
        return FeatureBatches(self.features, self.like)


def cache_features(
    trainer: L.Trainer, backbone: torch.nn.Module, loaders: dict[str, DataLoader]
) -> dict[str, CachedFeatures]:
    """The features of every example the given loaders hold, by split, and a line on stderr saying so."""
    start = time.perf_counter()
    cached = {split: CachedFeatures(compute_features(trainer, backbone, like), like) for split, like in loaders.items()}
    counts = " and ".join(f"{len(features)} {split}" for split, features in cached.items())
    print(
        f"transfer: cached frozen features of {counts} examples in {time.perf_counter() - start:.1f}s; "
        "the head trains on them from now on",
        file=sys.stderr,
    )
    return cached
