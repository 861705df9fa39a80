"""Your own labelled text: CSV, TSV or JSONL files with named text and label columns."""

from pathlib import Path

from transfer_cli.data.base import seeded_split
from transfer_cli.data.text import TextDataModule
from transfer_cli.data.text_records import TABLE_SUFFIXES, Rows
from transfer_cli.errors import ConfigError, DataError


class TextClassificationDataModule(TextDataModule):
    machine_specific = ("root",)  # dropped from a checkpoint's config when predicting (restore.py)

    def __init__(
        self,
        root: str | None = None,
        text_columns: tuple[str, ...] = ("text",),
        label_column: str = "label",
        id_column: str | None = "id",
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 42,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        group_by_length: bool = False,
        predict_input: str | None = None,
    ):
        """Your own labelled texts: root/train.{csv,tsv,jsonl}, optionally val.* and test.* alike.

        Args:
            root: Directory with train.csv, train.tsv or train.jsonl (and optionally val.*, test.*).
                TSV is read without quoting (quotes are text), CSV with double-quote quoting.
            text_columns: The text column, or two columns for sentence pairs (premise, hypothesis).
            label_column: The column holding each row's class name.
            id_column: Column whose value names a row in predictions; rows without it are named file:line.
            class_names: The classes, in order; the sorted labels of the training file when null.
            val_fraction: Without a val file, the fraction of training rows held out (seeded).
            seed: Seed of that split.
            max_length: Longest tokenized example; longer ones are truncated (and counted).
            batch_size: Examples per batch.
            num_workers: Loader worker processes; tokens live in memory, so 0 is fast.
            group_by_length: Batch training examples of similar length together (shuffled batches,
                less padding, faster epochs).
            predict_input: Texts to predict on (set by `transfer predict --input`).
        """
        super().__init__(
            text_columns,
            label_column,
            id_column,
            class_names,
            max_length,
            batch_size,
            num_workers,
            group_by_length,
            predict_input,
        )
        self.root = None if root is None else Path(root).expanduser()
        self.val_fraction, self.seed = val_fraction, seed
        self._train: tuple[Rows, list[str]] | None = None
        if class_names is None:
            self._train = self.read_labeled(self._split_file("train"))
            self.class_names = sorted(set(self._train[1]))
        if len(self.class_names) < 2:
            raise self._one_class()

    def _one_class(self) -> Exception:
        if self._train is None:
            return ConfigError(f"data.class_names {self.class_names}: a classifier needs at least two classes.")
        return DataError(
            f"Only one class in {self._split_file('train')}: every row's {self.label_column!r} is "
            f"{self.class_names[0]!r}. A classifier needs at least two: add rows of the other classes."
        )

    def _split_file(self, split: str) -> Path | None:
        if self.root is None:
            raise DataError("data.root is required: a directory with train.csv, train.tsv or train.jsonl.")
        found = [
            self.root / f"{split}{suffix}" for suffix in TABLE_SUFFIXES if (self.root / f"{split}{suffix}").is_file()
        ]
        if len(found) > 1:
            raise DataError(f"Several {split} files in {self.root}: {', '.join(p.name for p in found)}; keep one.")
        if not found and split == "train":
            raise DataError(f"No train.csv, train.tsv or train.jsonl in {self.root} (data.root).")
        return found[0] if found else None

    def split_rows(self, split: str) -> Rows:
        path = self._split_file(split)
        if split == "test" and path is None:
            raise DataError(f"No test split: no test.csv, test.tsv or test.jsonl in {self.root}.")
        if split != "train" and path is not None:
            return self.with_label_indices(*self.read_labeled(path))
        train = self.with_label_indices(*(self._train or self.read_labeled(self._split_file("train"))))
        if self._split_file("val") is not None:
            return train
        val, rest = seeded_split(len(train.texts), self.val_fraction, self.seed)
        return train.subset(val if split == "val" else rest)
