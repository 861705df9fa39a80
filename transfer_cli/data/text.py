"""Text classification data: CSV/TSV/JSONL rows, tokenized once per split, padded per batch.

Shared by every text datamodule (MNLI in transfer_cli.data.mnli, your own files here). Rows are
read by column name, tokenized once when a split is set up (not every epoch), stored flat in numpy
arrays, and padded only to the longest sequence of each batch.
"""

import sys
from collections.abc import Callable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from transformers import PreTrainedTokenizerBase

from transfer_cli.data.base import TransferDataModule
from transfer_cli.data.lines import read_line_batches
from transfer_cli.data.text_records import TABLE_SUFFIXES, Rows, field_text, read_records
from transfer_cli.errors import ConfigError, DataError

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
        else:
            item["id"] = self.ids[index]
        return item


def tokenize(tokenizer: PreTrainedTokenizerBase, rows: Rows, max_length: int, what: str) -> TokenizedTexts:
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
    # Labelled rows are named only in error messages, which come before this point.
    return TokenizedTexts(features, offsets, rows.labels, [] if rows.labels else rows.ids)


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[tuple[str, ...]], max_length: int
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
    """

    def __init__(self, batches: Callable[[], Iterator[list[PredictRow]]], tokenizer, max_length: int, collate):
        self.batches, self.tokenizer, self.max_length, self.collate = batches, tokenizer, max_length, collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        total = truncated = 0
        for rows in self.batches():
            encoded, cut = encode(self.tokenizer, [texts for _, texts, _ in rows], self.max_length)
            total, truncated = total + len(rows), truncated + cut
            items = [
                {"features": {key: np.asarray(values[i], dtype=np.int32) for key, values in encoded.items()}, "id": id_}
                for i, (id_, _, _) in enumerate(rows)
            ]
            yield {**self.collate(items), "errors": [error for _, _, error in rows]}
        report_truncated("predict", total, truncated, self.max_length)


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
            return {"inputs": inputs, "labels": torch.stack([item["label"] for item in items])}
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
        order = torch.randperm(len(self.lengths))
        size = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches)).tolist())


class TextDataModule(TransferDataModule):
    """Base of the text datamodules: subclasses say where each split's labelled rows come from (`split_rows`)."""

    skip_labels: tuple[str, ...] = ()  # labels that mean "no gold label": such rows are dropped and counted
    drop_empty: bool = False  # drop (and count) training rows with an empty text instead of failing

    def __init__(
        self,
        text_columns: tuple[str, ...],
        label_column: str,
        id_column: str | None,
        class_names: list[str] | None,
        max_length: int,
        batch_size: int,
        num_workers: int,
        group_by_length: bool,
        predict_input: str | None,
    ):
        super().__init__(batch_size, num_workers, predict_input)
        self.group_by_length = group_by_length
        if len(text_columns) not in (1, 2):
            raise ConfigError(f"data.text_columns: one column (a sentence) or two (a pair), not {list(text_columns)}.")
        self.text_columns = tuple(text_columns)
        self.label_column, self.id_column = label_column, id_column
        self.class_names: list[str] = list(class_names) if class_names is not None else []
        self.max_length = max_length
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._collate: PadCollate | None = None

    def connect(self, backbone: Any) -> None:
        """Take the backbone's tokenizer: the text must be cut into the pieces its weights know."""
        tokenizer = backbone.preprocessing()
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ConfigError(
                f"{type(self).__name__} holds text, but the backbone {type(backbone).__name__} expects images. "
                "Pair text data with a text backbone (transfer_cli.backbones.HuggingFaceBackbone)."
            )
        limit = tokenizer.model_max_length
        if limit < 1_000_000 and self.max_length > limit:  # huge values mean "no limit stated"
            raise ConfigError(f"data.max_length {self.max_length} exceeds what the model takes ({limit} tokens).")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ConfigError(f"The tokenizer of {type(backbone).__name__} has no pad token to pad batches with.")
        self.tokenizer = tokenizer
        pad_values = {"input_ids": pad_id, "token_type_ids": tokenizer.pad_token_type_id}
        self._collate = PadCollate(pad_values, pad_left=tokenizer.padding_side == "left")

    def split_rows(self, split: str) -> Rows:
        """The labelled rows of `train`, `val` or `test`."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            raise ConfigError(f"{type(self).__name__}.connect(backbone) must be called before setup.")
        super().setup(stage)

    def load_split(self, split: str) -> TokenizedTexts:
        # Tokenized once here, whatever the number of epochs.
        return tokenize(self.tokenizer, self.split_rows(split), self.max_length, split)

    def texts(self, record: dict[str, Any], where: str, drop_empty: bool = False) -> tuple[str, ...] | None:
        """The row's text(s); an empty one is an error, or None with drop_empty."""
        texts = tuple(field_text(record, column, where) for column in self.text_columns)
        for column, text in zip(self.text_columns, texts):
            if not text.strip():
                if drop_empty:
                    return None
                raise DataError(f"{where}: the {column!r} text is empty. Fill it in or remove the row.")
        return texts

    def read_labeled(self, path: Path) -> tuple[Rows, list[str]]:
        """Rows of a labelled file, with their label strings; `ids` hold each row's file:line."""
        rows, labels, no_label, no_text = Rows(), [], 0, 0
        for where, record in read_records(path):
            label = field_text(record, self.label_column, where).strip()
            if label in self.skip_labels:
                no_label += 1
                continue
            if not label:
                raise DataError(f"{where}: the {self.label_column!r} label is empty.")
            texts = self.texts(record, where, drop_empty=self.drop_empty)
            if texts is None:
                no_text += 1
                continue
            rows.texts.append(texts)
            rows.ids.append(where)
            labels.append(label)
        if no_label or no_text:
            print(
                f"transfer: {path}: dropped {no_label} rows without a gold label, {no_text} with an empty text",
                file=sys.stderr,
            )
        if not rows.texts:
            raise DataError(f"{path}: no labelled rows.")
        return rows, labels

    def with_label_indices(self, rows: Rows, labels: list[str]) -> Rows:
        index = {name: i for i, name in enumerate(self.class_names)}
        for where, label in zip(rows.ids, labels):
            if label not in index:
                raise DataError(
                    f"{where}: unknown label {label!r}; the classes are {', '.join(self.class_names)}. "
                    "Fix the row, or list every class in data.class_names."
                )
        rows.labels = [index[label] for label in labels]
        return rows

    def predict_rows(self) -> Iterator[list[PredictRow]]:
        """Batches of --input rows, read as needed: a TSV/CSV/JSONL file with the text columns, or
        `-` for lines on stdin (sent on as soon as the producer pauses)."""
        if self.predict_input == "-":
            yield from self._lines(sys.stdin, "stdin")
            return
        path = Path(self.predict_input)
        if not path.is_file():
            raise DataError(
                f"Input not found: {path} (--input). Give a {'/'.join(TABLE_SUFFIXES)} file or - for stdin."
            )
        records, empty = iter(read_records(path)), True
        while batch := [self._record_row(where, record) for where, record in islice(records, self.batch_size)]:
            empty = False
            yield batch
        if empty:
            raise DataError(f"{path}: no rows to predict.")

    def _record_row(self, where: str, record: dict[str, Any]) -> PredictRow:
        given_id = str(record.get(self.id_column) or "").strip() if self.id_column else ""
        return self._checked(given_id or where, lambda: self.texts(record, where))

    def _lines(self, stream: Any, name: str) -> Iterator[list[PredictRow]]:
        """One example a line: the whole line for one text column, `first<TAB>second` for a pair."""
        stopped = lambda: self.trainer is not None and self.trainer.received_sigterm  # noqa: E731
        empty = True
        for lines in read_line_batches(stream, self.batch_size, stopped):
            empty = False
            yield [self._line_row(f"{name}:{line_no}", line) for line_no, line in lines]
        if empty:
            raise DataError(f"Nothing to predict: no lines on {name}.")

    def _line_row(self, where: str, raw: bytes) -> PredictRow:
        def texts() -> tuple[str, ...]:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
            fields = (line,) if len(self.text_columns) == 1 else tuple(line.split("\t"))
            if len(fields) != len(self.text_columns):
                expected = "<TAB>".join(self.text_columns)
                raise DataError(f"{where}: expected {expected} (one tab), got {len(fields)} tab-separated fields.")
            return self.texts(dict(zip(self.text_columns, fields)), where)

        return self._checked(where, texts)

    def _checked(self, where: str, texts: Callable[[], tuple[str, ...]]) -> PredictRow:
        try:
            return where, texts(), None
        except DataError as err:
            return where, ("",) * len(self.text_columns), str(err)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def split_loader(self, split: str) -> DataLoader:
        dataset = self._splits[split]
        if split != "train" or not self.group_by_length:
            return self._loader(dataset, shuffle=split == "train")
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError("data.group_by_length works on one device; turn it off for multi-device runs.")
        batches = LengthGroupedBatches(np.diff(dataset.offsets), self.batch_size)
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=self._collate)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_input is None:
            raise ConfigError("Nothing to predict: give --input FILE (TSV, CSV, JSONL) or - for lines on stdin.")
        if self.tokenizer is None:
            raise ConfigError(f"{type(self).__name__}.connect(backbone) must be called before predicting.")
        texts = PredictTexts(self.predict_rows, self.tokenizer, self.max_length, self._collate)
        # One process reads the input in order; tokenizing a batch costs far less than the model's step.
        return DataLoader(texts, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())
