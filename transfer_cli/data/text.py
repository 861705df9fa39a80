"""Text classification data: CSV/TSV/JSONL rows, tokenized once per split (text_batches.py), padded per batch.

Shared by every text datamodule (MNLI in transfer_cli.data.mnli, your own files here). Rows are
read by column name, tokenized once when a split is set up (not every epoch), stored flat in numpy
arrays, and padded only to the longest sequence of each batch.
"""

import os
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:  # transformers is imported by the backbone that makes the tokenizer
    from transformers import PreTrainedTokenizerBase

from transfer_cli.data.base import TransferDataModule, predict_rank
from transfer_cli.data.lines import read_line_batches
from transfer_cli.data.text_batches import (
    BatchedItems,
    DistributedLengthGroupedBatches,
    LengthGroupedBatches,
    PadCollate,
    PredictRow,
    PredictTexts,
    TokenizedTexts,
    tokenize,
)
from transfer_cli.data.text_records import TABLE_SUFFIXES, Rows, field_text, read_records
from transfer_cli.errors import ConfigError, DataError


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
        from transformers import PreTrainedTokenizerBase

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
        lengths = np.diff(dataset.offsets)
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's seed, as its own DistributedSampler uses: the same batches on every rank.
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            shard = DistributedLengthGroupedBatches(
                lengths, self.batch_size, self.trainer.global_rank, self.trainer.world_size, seed
            )
            return DataLoader(
                BatchedItems(dataset), sampler=shard, batch_size=None, num_workers=self.num_workers,
                collate_fn=self._collate,
            )  # fmt: skip
        batches = LengthGroupedBatches(lengths, self.batch_size)
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=self._collate)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_input is None:
            raise ConfigError("Nothing to predict: give --input FILE (TSV, CSV, JSONL) or - for lines on stdin.")
        if self.tokenizer is None:
            raise ConfigError(f"{type(self).__name__}.connect(backbone) must be called before predicting.")
        shard = predict_rank(self.trainer)
        texts = PredictTexts(self.predict_rows, self.tokenizer, self.max_length, self._collate, shard)
        # One process reads the input in order; tokenizing a batch costs far less than the model's step.
        return DataLoader(texts, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())
