"""The datamodule contract: what the CLI, the model and the finetuning policy may rely on, for images
and text alike, so none of them asks a datamodule what it can do."""

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from transfer_cli.feature_cache import CachedFeatures, cache_features, whole

# The splits each stage reads: evaluating needs neither the training files nor their folder.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def seeded_split(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(validation, training) indices of `count` examples held in one pool: a seeded permutation whose
    first round(val_fraction * count), at least one, validate. A function of its arguments alone, so
    `validate` holds out the very examples `fit` held out."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * count))
    return order[:n_val], order[n_val:]


def owns_batch(batch: int, rank: int, world_size: int) -> bool:
    """Whether predict batch number `batch` (counted over the whole input) is this process's to predict.

    Several processes share the input by whole batches, batch b to rank b % world_size: each batch then
    holds the very inputs it holds on one process (same rows, same padding), so its rows come out bit
    for bit the same, and the writer (callbacks/prediction_writer.py) restores input order by taking
    the ranks' batches in turn.
    """
    return batch % world_size == rank


class PredictShard(DistributedSampler):
    """The indices of a map-style predict input that this process predicts (see `owns_batch`), in order.

    A DistributedSampler, so Lightning keeps it instead of injecting its own, which spreads single
    inputs over the ranks (changing every batch) and asserts that each rank gets at least one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.count, self.batch_size = len(dataset), batch_size

    def _owned(self) -> range:
        return range(self.rank, -(-self.count // self.batch_size), self.num_replicas)

    def __iter__(self):
        for batch in self._owned():
            yield from range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.count))

    def __len__(self) -> int:
        if -(-self.count // self.batch_size) < self.num_replicas:
            # Some rank has no batch at all, which Lightning refuses of a sized loader ("within local rank
            # has zero length"); without a length (TypeError, as len() of any unsized object) every rank
            # runs its share as a stream, an empty one included. Decided alike on every rank: Lightning
            # sums the lengths of sized loaders across ranks, a collective all must join.
            raise TypeError("a predict shard has no length when some rank gets no batch")
        return sum(min(self.batch_size, self.count - b * self.batch_size) for b in self._owned())


def predict_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, world size) of this predict process; (0, 1) outside a trainer."""
    return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)


class TransferDataModule(L.LightningDataModule, ABC):
    """Base of every datamodule. `__init__` states the class names and reads nothing else (a
    checkpoint restored on another machine builds its datamodule without the training data);
    `prepare_data` downloads; `setup(stage)` reads that stage's files only."""

    # Init parameters that describe this machine rather than the experiment: a checkpoint's stored
    # config drops them, so that it runs where the data lives elsewhere.
    machine_specific: tuple[str, ...] = ("root",)

    def __init__(self, batch_size: int, num_workers: int, predict_input: str | None):
        super().__init__()
        self.batch_size, self.num_workers, self.predict_input = batch_size, num_workers, predict_input
        self.class_names: list[str] = []
        self._splits: dict[str, Dataset] = {}
        self._cached: dict[str, CachedFeatures] = {}

    # What the model and a checkpoint need ---------------------------------------------------

    def data_class_names(self) -> list[str] | None:
        """The classes the data files name, to compare with a checkpoint's; None when the files
        cannot tell (no data given, or a format whose labels are only known by reading every row)."""
        return None

    @abstractmethod
    def connect(self, backbone: Any) -> None:
        """Take what the backbone's weights expect of their inputs (image preprocessing, tokenizer)."""

    def preprocessing_config(self) -> dict[str, Any] | None:
        """The input preprocessing to store in a checkpoint; None where the backbone alone rebuilds it."""
        return None

    def use_stored_preprocessing(self, stored: dict[str, Any] | None) -> None:
        """Preprocess as the checkpoint's model was trained (its stored `preprocessing_config`)."""

    def random_augmentation(self) -> bool:
        """Whether training inputs change randomly from epoch to epoch (then features cannot be cached)."""
        return False

    # Data -----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download what is missing (Lightning calls this once per node, before `setup`)."""

    def setup(self, stage: str) -> None:
        for split in STAGE_SPLITS.get(stage, ()):
            if split not in self._splits:  # read once, however often Lightning and the CLI call setup
                self._splits[split] = self.load_split(split)

    @abstractmethod
    def load_split(self, split: str) -> Dataset:
        """The labelled examples of `train`, `val` or `test`, read from that split's files only."""

    @abstractmethod
    def split_loader(self, split: str) -> DataLoader:
        """A loader over a split set up by `setup`, shuffled for `train`."""

    @abstractmethod
    def predict_dataloader(self) -> Any:
        """Batches of `predict_input`, in input order, each with its `ids` and per-row `errors`."""

    def train_dataloader(self) -> Any:
        return self._served("train")

    def val_dataloader(self) -> Any:
        return self._served("val")

    def test_dataloader(self) -> Any:
        return self._served("test")

    def _served(self, split: str) -> Any:
        cached = self._cached.get(split)
        return cached.batches() if cached is not None else self.split_loader(split)

    # Cached features ------------------------------------------------------------------------

    def use_cached_features(self, trainer: L.Trainer, backbone: torch.nn.Module) -> None:
        """From now on serve the train loader, and the val loader when validation reads it whole, as
        the frozen backbone's features, computed here once. The finetuning policy asks for this when
        the backbone never trains and nothing random changes the inputs (see feature_cache.can_cache)."""
        splits: Iterable[str] = ("train", "val") if whole(trainer.limit_val_batches) else ("train",)
        loaders = {split: self.split_loader(split) for split in splits if split in self._splits}
        self._cached = cache_features(trainer, backbone, loaders)

    def teardown(self, stage: str) -> None:
        self._cached = {}  # the features of a whole data set: not kept past the fit that needed them
