"""CIFAR-10 from the original `cifar-10-batches-py` pickle files, read by our own safe loader."""

import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transfer_cli.data.base import seeded_split
from transfer_cli.data.images import ImageDataModule
from transfer_cli.download import fetch_once
from transfer_cli.errors import DataError

ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
# The names batches.meta holds, in label order: stated here so that building the datamodule reads no file.
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a data file must never run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise DataError(f"Cannot read CIFAR-10 batch {path}: {err}. Re-extract the archive.") from err
    # Python 2 pickles give bytes keys; normalise so either flavour of the files reads the same.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file -> uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    batch = _load_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch: it lacks the 'data' or 'labels' entry.")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise DataError(f"{path}: expected data of shape [N, 3072] and N labels, got {data.shape} and {len(labels)}.")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def find_batches_dir(root: Path) -> Path | None:
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "batches.meta").is_file():
            return candidate
    return None


def fetch(root: Path) -> None:
    archive = root / "cifar-10-python.tar.gz"
    partial = archive.with_suffix(".part")
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=30) as response:
            root.mkdir(parents=True, exist_ok=True)  # only once the server answers: no empty dirs offline
            with open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"Could not download CIFAR-10 from {ARCHIVE_URL} ({err}). Download and extract it by hand into "
            f"{root} so that {root / 'cifar-10-batches-py'} exists."
        ) from err
    if hashlib.md5(partial.read_bytes()).hexdigest() != ARCHIVE_MD5:
        partial.unlink()
        raise DataError(f"The CIFAR-10 archive from {ARCHIVE_URL} is corrupt (md5 mismatch); try again.")
    partial.rename(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


class _Images(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        # Each image's row in its source files (the training batches concatenated, or test_batch): the
        # id an evaluation report names a mistake by.
        self.ids = torch.arange(len(labels)) if ids is None else ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.images[index], "labels": self.labels[index], "ids": self.ids[index]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # The DataLoader fetches a whole batch with one indexing op instead of B calls and a collate.
        index = torch.as_tensor(indices)
        return {"inputs": self.images[index], "labels": self.labels[index], "ids": self.ids[index]}


def _as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class CIFAR10DataModule(ImageDataModule):
    machine_specific = ("root", "download")

    def __init__(
        self,
        root: str | None = None,
        class_names: list[str] | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        seed: int = 42,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: bool = True,
        predict_input: str | None = None,
    ):
        """CIFAR-10 in the original python layout (data_batch_1..5, test_batch, batches.meta).

        Args:
            root: Directory holding `cifar-10-batches-py` (or that directory itself).
            class_names: Expected class names; CIFAR-10's ten (airplane ... truck) when null.
            download: Download and extract the official archive into `root` if it is missing.
            val_fraction: Fraction of the training batches held out for validation (seeded split).
            seed: Seed of the train/validation split.
            batch_size: Images per batch.
            num_workers: Loader worker processes; images live in memory as one tensor, so 0 is fast.
            augment: Random crop and horizontal flip of training images.
            predict_input: Images to predict on (set by `transfer predict --input`).
        """
        super().__init__(batch_size, num_workers, augment, predict_input)
        self.root = None if root is None else Path(root).expanduser()
        self.download = download
        self.val_fraction = val_fraction
        self.seed = seed
        self.class_names = list(CLASS_NAMES if class_names is None else class_names)
        self._held_out: dict[str, _Images] | None = None

    def data_class_names(self) -> list[str] | None:
        """The class names the data itself declares (batches.meta), or None without data."""
        found = None if self.root is None else find_batches_dir(self.root)
        if found is None:
            return None
        meta = _load_pickle(found / "batches.meta")
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]

    def prepare_data(self) -> None:
        if self.root is not None:
            self._batches_dir(download=self.download)

    def _batches_dir(self, download: bool = False) -> Path:
        if self.root is None:
            raise DataError("data.root is required to train, validate or test on CIFAR-10.")
        if download:
            found = fetch_once(self.root, lambda: find_batches_dir(self.root), lambda: fetch(self.root))
        else:
            found = find_batches_dir(self.root)
        if found is None:
            raise DataError(
                f"No CIFAR-10 data in {self.root} (data.root): expected {self.root / 'cifar-10-batches-py'} "
                "with batches.meta, data_batch_1..5 and test_batch. Set data.root to the directory that "
                "holds it, or add --data.download true to fetch it."
            )
        return found

    def load_split(self, split: str) -> Dataset:
        # `transfer test` needs test_batch alone; fit and validate the training batches, of which the
        # validation images are a seeded part.
        if split == "test":
            return _Images(*read_batch(self._batch_files([TEST_BATCH])[0]))
        if self._held_out is None:
            images, labels = zip(*(read_batch(path) for path in self._batch_files(TRAIN_BATCHES)))
            images, labels = torch.cat(images), torch.cat(labels)
            val, train = (torch.as_tensor(i) for i in seeded_split(len(labels), self.val_fraction, self.seed))
            self._held_out = {
                "val": _Images(images[val], labels[val], val),
                "train": _Images(images[train], labels[train], train),
            }
        return self._held_out[split]

    def _batch_files(self, names: list[str]) -> list[Path]:
        batches_dir = self._batches_dir()
        missing = [n for n in names if not (batches_dir / n).is_file()]
        if missing:
            raise DataError(f"CIFAR-10 files missing in {batches_dir}: {', '.join(missing)}.")
        return [batches_dir / n for n in names]

    def split_loader(self, split: str) -> DataLoader:
        return self._loader(self._splits[split], shuffle=split == "train", collate_fn=_as_is)
