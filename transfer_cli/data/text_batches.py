"""Tokenized text as datasets and batches: tokenized once, stored flat, padded per batch."""

import sys
from collections.abc import Callable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, Sampler

if TYPE_CHECKING:  # transformers is imported by the backbone that makes the tokenizer
    from transformers import PreTrainedTokenizerBase

from transfer_cli.data.base import owns_batch
from transfer_cli.data.text_records import Rows
from transfer_cli.errors import DataError

TOKENIZE_CHUNK = 2048

PredictRow = tuple[str, tuple[str, ...], str | None]  # id, texts, error


class TokenizedTexts(Dataset):
    """Token ids of all examples as flat int32 arrays plus offsets: a few bytes per token."""

    def __init__(self, features: dict[str, np.ndarray], offsets: np.ndarray, labels: list[int], ids: list[str]):
        self.features, self.offsets = features, offsets
        self.labels = torch.tensor(labels, dtype=torch.long) if labels else None
        self.ids = ids

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = self.offsets[index], self.offsets[index + 1]
        item = {"features": {key: values[start:end] for key, values in self.features.items()}}
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.ids:
            item["id"] = self.ids[index]
        return item


def tokenize(tokenizer: "PreTrainedTokenizerBase", rows: Rows, max_length: int, what: str) -> TokenizedTexts:
    """Tokenize every example once, truncating at max_length, and report how many were truncated."""
    chunks: dict[str, list[np.ndarray]] = {}
    lengths, truncated = [], 0
    for start in range(0, len(rows.texts), TOKENIZE_CHUNK):
        encoded, cut = encode(tokenizer, rows.texts[start : start + TOKENIZE_CHUNK], max_length)
        truncated += cut
        for key, values in encoded.items():
            chunks.setdefault(key, []).append(np.fromiter(chain.from_iterable(values), dtype=np.int32))
        input_ids = encoded["input_ids"]
        lengths.append(np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids)))
    report_truncated(what, len(rows.texts), truncated, max_length)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else np.zeros(1, dtype=np.int64)
    features = {key: np.concatenate(parts) for key, parts in chunks.items()}
    # Labelled rows keep their ids too: an evaluation report names its mistakes by them.
    return TokenizedTexts(features, offsets, rows.labels, rows.ids)


def encode(
    tokenizer: "PreTrainedTokenizerBase", texts: list[tuple[str, ...]], max_length: int
) -> tuple[dict[str, list[list[int]]], int]:
    """Token ids of a chunk of examples, and how many of them were truncated at max_length."""
    columns = [list(c) for c in zip(*texts)]
    encoded = tokenizer(*columns, truncation=True, max_length=max_length, return_attention_mask=False)
    # Only an example that fills max_length can have been cut; tokenizing those few again with
    # one more token allowed tells which ones really were longer.
    full = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) >= max_length]
    truncated = 0
    if full:
        again = tokenizer(*[[c[i] for i in full] for c in columns], truncation=True, max_length=max_length + 1)
        truncated = sum(len(ids) > max_length for ids in again["input_ids"])
    return dict(encoded), truncated


def report_truncated(what: str, total: int, truncated: int, max_length: int) -> None:
    print(f"transfer: {what}: {total} examples, {truncated} truncated to max_length {max_length}", file=sys.stderr)


class PredictTexts(IterableDataset):
    """Texts to predict on, tokenized a batch at a time as they are read, so a file or a stream of
    any length is never held whole; each yielded batch is padded and in input order.

    `batches` gives lists of (id, texts, error): a row whose text could not be read keeps its place
    with an empty text and its error, and the writer decides between an error row and stopping.

    Under several processes each reads the whole input (cheap) and tokenizes and yields only the
    batches `shard` (rank, world size) owns (data.base.owns_batch).
    """

    def __init__(
        self,
        batches: Callable[[], Iterator[list[PredictRow]]],
        tokenizer,
        max_length: int,
        collate,
        shard: tuple[int, int] = (0, 1),
    ):
        self.batches, self.tokenizer, self.max_length, self.collate = batches, tokenizer, max_length, collate
        self.shard = shard

    def __iter__(self) -> Iterator[dict[str, Any]]:
        total = truncated = 0
        for number, rows in enumerate(self.batches()):
            if not owns_batch(number, *self.shard):
                continue
            encoded, cut = encode(self.tokenizer, [texts for _, texts, _ in rows], self.max_length)
            total, truncated = total + len(rows), truncated + cut
            items = [
                {"features": {key: np.asarray(values[i], dtype=np.int32) for key, values in encoded.items()}, "id": id_}
                for i, (id_, _, _) in enumerate(rows)
            ]
            yield {**self.collate(items), "errors": [error for _, _, error in rows]}
        rank, world_size = self.shard
        what = "predict" if world_size == 1 else f"predict (rank {rank}'s share)"
        report_truncated(what, total, truncated, self.max_length)


class PadCollate:
    """Pads each batch to its own longest sequence (not to max_length) and adds the attention mask."""

    def __init__(self, pad_values: dict[str, int], pad_left: bool):
        self.pad_values, self.pad_left = pad_values, pad_left

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(item["features"]["input_ids"]) for item in items]
        width = max(lengths)
        inputs = {}
        for key in items[0]["features"]:
            padded = np.full((len(items), width), self.pad_values.get(key, 0), dtype=np.int64)
            for row, (item, length) in enumerate(zip(items, lengths)):
                start = width - length if self.pad_left else 0
                padded[row, start : start + length] = item["features"][key]
            inputs[key] = torch.from_numpy(padded)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, length in enumerate(lengths):
            if self.pad_left:
                mask[row, width - length :] = 1
            else:
                mask[row, :length] = 1
        inputs["attention_mask"] = mask
        if "label" in items[0]:
            labels = torch.stack([item["label"] for item in items])
            return {"inputs": inputs, "labels": labels, "ids": [item.get("id") for item in items]}
        return {"inputs": inputs, "ids": [item["id"] for item in items]}


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of examples of similar length, so little of each batch is padding.

    Examples are shuffled, cut into windows of `window` batches, sorted by length inside each window,
    and the resulting batches are shuffled again: random like plain shuffling at the batch level,
    but with near-uniform lengths inside a batch (the HuggingFace Trainer's group_by_length).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, window: int = 50):
        self.lengths, self.batch_size, self.window = torch.as_tensor(lengths), batch_size, window

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        yield from self.batches()

    def batches(self, generator: torch.Generator | None = None) -> list[list[int]]:
        """One epoch's batches, drawn from `generator` (None: torch's global generator)."""
        order = torch.randperm(len(self.lengths), generator=generator)
        size = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class DistributedLengthGroupedBatches(DistributedSampler):
    """LengthGroupedBatches on several processes: each rank a disjoint share, every example once per epoch.

    Every rank draws the same epoch's batches (a generator seeded with seed + epoch, which Lightning
    advances through `set_epoch`) and rank r takes batches r, r + W, r + 2W, ... DDP needs every rank
    to take as many steps (one short would leave the others waiting in an all-reduce), so the biggest
    batches are split in two until the count divides by W, where DistributedSampler would repeat
    examples instead. A DistributedSampler yielding whole batches (the loader runs with
    batch_size=None over `BatchedItems`), so Lightning keeps it instead of injecting its own.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int, window: int = 50):
        super().__init__(range(len(lengths)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.grouped = LengthGroupedBatches(lengths, batch_size, window)
        if len(self) * world_size > len(lengths):  # not enough examples to split batches into
            raise DataError(
                f"{len(lengths)} training examples in batches of {batch_size} cannot give each of the "
                f"{world_size} processes as many batches; use fewer devices or turn data.group_by_length off."
            )

    def __len__(self) -> int:
        return -(-len(self.grouped) // self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.grouped.batches(torch.Generator().manual_seed(self.seed + self.epoch))
        while len(batches) % self.num_replicas:
            biggest = max(range(len(batches)), key=lambda i: len(batches[i]))
            batch = batches[biggest]
            batches[biggest : biggest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        return iter(batches[self.rank :: self.num_replicas])


class BatchedItems(Dataset):
    """A dataset indexed by a whole batch of indices (for a loader with batch_size=None over a batch sampler)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[Any]:
        return [self.dataset[i] for i in indices]
