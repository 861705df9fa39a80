"""Frozen-feature caching: with a frozen backbone and no random augmentation, every epoch would
compute the same features again. They are computed once, and the head trains on them from then on.

The datamodule serves the cached batches (TransferDataModule.use_cached_features) when the
finetuning policy asks; this module computes them and replays the loader they replace.

On several processes (plain DDP) each process computes the features of its own slice of a split and
the slices are all-gathered, so the backbone's pass is shared out but every process then holds the
whole split's features in host memory (features x 4 bytes per example, times the processes on one
machine). Each process then serves itself the very batches Lightning's DistributedSampler would have
dealt it from the replaced loader.
"""

import os
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from transfer_cli.lightning_private import deals_distributed_samplers

# Rows all-gathered per round are capped so that the receiving buffers (on the device under NCCL) stay
# this small, whatever the split's size.
GATHER_BYTES = 64 * 2**20


def can_cache(trainer: L.Trainer, datamodule: Any) -> str | None:
    """Why caching is off for this run, or None when it can be used. `datamodule` is a TransferDataModule."""
    if datamodule.random_augmentation():
        return "random augmentation changes the inputs every epoch (set data.augment false to cache)"
    if trainer.world_size > 1 and type(trainer.strategy) is not DDPStrategy:
        # The features are shared through torch.distributed and the batches dealt as DDP's sampler
        # would; sharded and other strategies are not checked against that.
        return f"several devices with {type(trainer.strategy).__name__} (cached under strategy ddp only)"
    if trainer.reload_dataloaders_every_n_epochs:
        return "dataloaders are reloaded every epoch"
    if trainer.fast_dev_run or not whole(trainer.limit_train_batches) or trainer.overfit_batches:
        return "the run uses part of the data (fast_dev_run, limit_train_batches or overfit_batches)"
    return None


def whole(limit: int | float) -> bool:
    # Lightning reads an int as a number of batches and a float as a fraction: 1 is one batch, 1.0 all.
    return isinstance(limit, float) and limit == 1.0


def replay_problem(trainer: L.Trainer, like: DataLoader) -> str | None:
    """Why the batches Lightning would make of `like` cannot be replayed from the cache, or None."""
    if _lightning_deals(trainer, like) and not _plain(like):
        return "a custom sampler or batch sampler that Lightning wraps for several devices"
    return None


def _lightning_deals(trainer: L.Trainer, loader: DataLoader) -> bool:
    """Whether Lightning gives `loader` a DistributedSampler of its own: a distributed strategy, even on
    one device, unless the loader brings one or Trainer(use_distributed_sampler=False). Lightning does
    that only to torch DataLoaders, so the cached batches must deal themselves."""
    return deals_distributed_samplers(trainer) and not isinstance(loader.sampler, DistributedSampler)


def _plain(loader: DataLoader) -> bool:
    # The loaders Lightning re-deals with a plain DistributedSampler over the dataset.
    return isinstance(loader.sampler, (RandomSampler, SequentialSampler)) and type(loader.batch_sampler) is BatchSampler


def served_samplers(trainer: L.Trainer, like: DataLoader, train: bool) -> tuple[Any, Any]:
    """(sampler, batch_sampler) of the loader Lightning's loop would iterate in place of `like`.

    As Lightning's `_get_distributed_sampler` and `_update_dataloader` make them: shuffled for
    training (and for a shuffled evaluation loader), seeded with PL_GLOBAL_SEED, the strategy's
    replicas and rank, padded by repeating the first examples so every process takes as many steps.
    """
    if not _lightning_deals(trainer, like):
        return like.sampler, like.batch_sampler
    shuffle = train or isinstance(like.sampler, RandomSampler)
    seed = int(os.getenv("PL_GLOBAL_SEED", 0))
    dealt = DistributedSampler(like.dataset, shuffle=shuffle, seed=seed, **trainer.distributed_sampler_kwargs)
    return dealt, BatchSampler(dealt, like.batch_size, like.drop_last)


@torch.inference_mode()
def compute_features(trainer: L.Trainer, backbone: torch.nn.Module, loader: DataLoader) -> TensorDataset:
    """One pass of the frozen backbone over a loader's dataset, in dataset order, kept in host memory
    (pinned on CUDA machines): a large data set's features would not fit beside the model on the device.
    On several processes each computes a contiguous slice and all of them get every slice.

    The training random state is left exactly as it was, so the head then sees the same batches, in
    the same order, as it would without the cache.
    """
    device = trainer.strategy.root_device
    count = len(loader.dataset)
    world, rank = (dist.get_world_size(), dist.get_rank()) if _shared(trainer) else (1, 0)
    share = -(-count // world)
    rows = range(min(count, rank * share), min(count, (rank + 1) * share))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        features, labels = _features_in_order(trainer, backbone.to(device).eval(), loader, rows, device)
    if world > 1:
        features = _all_gather_rows(features, count, share, device)
        labels = _all_gather_rows(labels, count, share, device)
    if torch.cuda.is_available():
        features, labels = features.pin_memory(), labels.pin_memory()
    return TensorDataset(features, labels)


def _shared(trainer: L.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def _features_in_order(
    trainer: L.Trainer, backbone: torch.nn.Module, loader: DataLoader, rows: range, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    index = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    # A loader driven by a batch sampler (text's group_by_length) has no batch_size of its own.
    size = loader.batch_size or len(next(iter(index)))
    chunks = [list(rows[i : i + size]) for i in range(0, len(rows), size)]
    common = {"collate_fn": loader.collate_fn, "num_workers": loader.num_workers, "pin_memory": loader.pin_memory}
    if loader.batch_sampler is None:  # batch_size None: its dataset takes a whole batch of indices
        in_order = DataLoader(loader.dataset, sampler=chunks, batch_size=None, **common)
    else:
        in_order = DataLoader(loader.dataset, batch_sampler=chunks, **common)
    # A process with no rows still joins the all-gather, with the widths every process agrees on.
    features, labels = [torch.empty(0, backbone.num_features)], [torch.empty(0, dtype=torch.int64)]
    for batch in in_order:
        # Lightning's transfer runs the datamodule's on_after_batch_transfer (the preprocessing) too.
        batch = trainer.strategy.batch_to_device(batch, device)
        with trainer.precision_plugin.forward_context():
            features.append(backbone(batch["inputs"]).float().cpu())
        # Class indices, cross_entropy's targets: int64 on every process, so they gather as one.
        labels.append(torch.as_tensor(batch["labels"]).to(torch.int64).cpu())
    return torch.cat(features), torch.cat(labels)


def _all_gather_rows(mine: torch.Tensor, count: int, share: int, device: torch.device) -> torch.Tensor:
    """The first `count` rows of every process's `mine` laid end to end in rank order (process r
    holds rows r * share onwards; only the last ones hold fewer than `share`), in host memory.

    Gathered through `device` (NCCL takes device tensors only) a bounded number of rows at a time.
    """
    world, rest = dist.get_world_size(), mine.shape[1:]
    row_bytes = max(1, rest.numel() * mine.element_size())
    step = max(1, GATHER_BYTES // (world * row_bytes))
    gathered = torch.empty((world, share, *rest), dtype=mine.dtype)
    for start in range(0, share, step):
        stop = min(share, start + step)
        sent = torch.zeros((stop - start, *rest), dtype=mine.dtype, device=device)
        part = mine[start:stop]
        sent[: len(part)] = part.to(device)
        received = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(received, sent)
        for rank, rows in enumerate(received):
            gathered[rank, start:stop] = rows.cpu()
    return gathered.reshape(world * share, *rest)[:count]


class FeatureBatches:
    """Batches of cached features, in the dict layout the model's steps take, in exactly the order the
    replaced loader would have given its examples (on several processes: this process's share).

    The order comes from the sampler and batch sampler Lightning's loop would have iterated (see
    `served_samplers`), and the one random number a torch DataLoader draws when it starts an epoch
    (its workers' base seed: every epoch, or only the first with persistent workers) is drawn here
    too. The global random state then moves as it would have without the cache, and so do the
    shuffles, dropout masks and everything else drawn from it.
    """

    def __init__(self, cached: TensorDataset, like: DataLoader, samplers: tuple[Any, Any]):
        self.features, self.labels = cached.tensors
        self.like = like
        # Named as a DataLoader names them: at the start of every epoch (resumed ones included)
        # Lightning's loops call set_epoch on `sampler` and `batch_sampler.sampler` of any loader,
        # which a DistributedSampler's shuffle needs.
        self.sampler, self.batch_sampler = samplers
        self._started = False

    def _index(self) -> Any:
        return self.batch_sampler if self.batch_sampler is not None else self.sampler

    def __len__(self) -> int:
        return len(self._index())

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # Drawn at the first batch, not in __iter__: Lightning calls iter() once on a loader that is
        # not a DataLoader just to check it, and that call must not move the random state.
        reuses_workers = self.like.persistent_workers and self.like.num_workers > 0
        if not (reuses_workers and self._started):
            torch.empty((), dtype=torch.int64).random_(generator=self.like.generator)
        self._started = True
        for indices in self._index():
            index = torch.as_tensor(indices)
            yield {"features": self.features[index], "labels": self.labels[index]}


class CachedFeatures:
    """One split's features and the loader they stand in for; each request for the split's loader
    gets fresh batches over them, as each request would have got a fresh loader (and sampler)."""

    def __init__(self, trainer: L.Trainer, features: TensorDataset, like: DataLoader, train: bool):
        self.trainer, self.features, self.like, self.train = trainer, features, like, train

    def __len__(self) -> int:
        return len(self.features)

    def batches(self) -> FeatureBatches:
        return FeatureBatches(self.features, self.like, served_samplers(self.trainer, self.like, self.train))


def cache_features(
    trainer: L.Trainer, backbone: torch.nn.Module, loaders: dict[str, DataLoader]
) -> dict[str, CachedFeatures]:
    """The features of every example the given loaders hold, by split, and a line on stderr saying so;
    none, and the reason on stderr, when a loader's batches could not be replayed."""
    problem = next(filter(None, (replay_problem(trainer, like) for like in loaders.values())), None)
    if problem is not None:
        print(f"transfer: frozen features are not cached: {problem}", file=sys.stderr)
        return {}
    start = time.perf_counter()
    cached = {
        split: CachedFeatures(trainer, compute_features(trainer, backbone, like), like, train=split == "train")
        for split, like in loaders.items()
    }
    counts = " and ".join(f"{len(features)} {split}" for split, features in cached.items())
    where = f" on {trainer.world_size} processes (each computed a share and holds them all)" if _shared(trainer) else ""
    if trainer.is_global_zero:
        print(
            f"transfer: cached frozen features of {counts} examples{where} in {time.perf_counter() - start:.1f}s; "
            "the head trains on them from now on",
            file=sys.stderr,
        )
    return cached
