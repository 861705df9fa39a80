"""MultiNLI from the GLUE files (train.tsv, dev_matched.tsv, dev_mismatched.tsv), read as GLUE does."""

import sys
import urllib.request
import zipfile
from pathlib import Path

from transfer_cli.data.text import TextDataModule
from transfer_cli.data.text_records import Rows
from transfer_cli.download import fetch_once
from transfer_cli.errors import DataError

ARCHIVE_URL = "https://dl.fbaipublicfiles.com/glue/data/MNLI.zip"
LABELS = ["entailment", "neutral", "contradiction"]
# GLUE has no test labels; the mismatched dev set (other genres) serves as the test split.
SPLIT_FILES = {"train": "train.tsv", "val": "dev_matched.tsv", "test": "dev_mismatched.tsv"}


def find_mnli_dir(root: Path) -> Path | None:
    """The directory holding the GLUE files: root itself, or root/MNLI as the GLUE archive unpacks."""
    for candidate in (root, root / "MNLI"):
        if any((candidate / name).is_file() for name in SPLIT_FILES.values()):
            return candidate
    return None


def fetch(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "MNLI.zip"
    partial = archive.with_suffix(".part")
    print(f"transfer: downloading {ARCHIVE_URL} to {root}", file=sys.stderr)
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=30) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"Could not download MNLI from {ARCHIVE_URL} ({err}). Download the GLUE MNLI archive by hand and "
            f"unpack it into {root}, so that {root / 'MNLI' / 'train.tsv'} exists."
        ) from err
    partial.rename(archive)
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(root)  # zipfile drops absolute and '..' parts of member names
    except zipfile.BadZipFile as err:
        archive.unlink()
        raise DataError(f"The MNLI archive from {ARCHIVE_URL} is corrupt ({err}); try again.") from err


class MNLIDataModule(TextDataModule):
    machine_specific = ("root", "download")
    skip_labels = ("-",)  # GLUE's marker for pairs whose annotators did not agree
    drop_empty = True  # the GLUE files are used as published: a stray empty pair is counted, not fatal

    def __init__(
        self,
        root: str | None = None,
        class_names: list[str] | None = None,
        download: bool = False,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        group_by_length: bool = False,
        predict_input: str | None = None,
    ):
        """MultiNLI sentence pairs in the GLUE layout; val is dev_matched, test is dev_mismatched.

        Columns are found by header name (sentence1, sentence2, gold_label, pairID), so the 12-column
        train files and the 16-column dev files read alike. Rows labelled `-` are dropped and counted.

        Args:
            root: Directory with train.tsv, dev_matched.tsv and dev_mismatched.tsv (or its MNLI/ folder).
            class_names: The classes, in order; entailment, neutral, contradiction when null.
            download: Download and unpack the GLUE MNLI archive into `root` if the files are missing.
            max_length: Longest tokenized pair; longer ones are truncated (and counted).
            batch_size: Pairs per batch.
            num_workers: Loader worker processes; tokens live in memory, so 0 is fast.
            group_by_length: Batch training examples of similar length together (shuffled batches,
                less padding, faster epochs).
            predict_input: Pairs to predict on (set by `transfer predict --input`): a TSV/CSV/JSONL
                file with sentence1 and sentence2 columns, or - for premise<TAB>hypothesis lines on stdin.
        """
        super().__init__(
            ("sentence1", "sentence2"),
            "gold_label",
            "pairID",
            LABELS if class_names is None else class_names,
            max_length,
            batch_size,
            num_workers,
            group_by_length,
            predict_input,
        )
        self.root = None if root is None else Path(root).expanduser()
        self.download = download

    def prepare_data(self) -> None:
        if self.root is not None:
            self._data_dir(download=self.download)

    @property
    def data_dir(self) -> Path:
        """The directory holding the GLUE files (looked up when asked: building the datamodule reads nothing)."""
        return self._data_dir()

    def _data_dir(self, download: bool = False) -> Path:
        if self.root is None:
            raise DataError("data.root is required to train, validate or test on MNLI: the GLUE MNLI directory.")
        if download:
            found = fetch_once(self.root, lambda: find_mnli_dir(self.root), lambda: fetch(self.root))
        else:
            found = find_mnli_dir(self.root)
        if found is None:
            raise DataError(
                f"No MNLI data in {self.root} (data.root): expected the GLUE files train.tsv, dev_matched.tsv "
                "and dev_mismatched.tsv there or in its MNLI/ folder. Set data.root to the directory that holds "
                "them, or add --data.download true to fetch the GLUE archive."
            )
        return found

    def split_rows(self, split: str) -> Rows:
        path = self.data_dir / SPLIT_FILES[split]
        if not path.is_file():
            raise DataError(f"Missing {path}: the {split} split of MNLI is {SPLIT_FILES[split]} in the GLUE layout.")
        return self.with_label_indices(*self.read_labeled(path))
