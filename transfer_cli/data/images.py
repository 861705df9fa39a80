"""What every image datamodule shares: the backbone's preprocessing, batches on device, image inputs to predict on."""

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data.base import PredictShard, TransferDataModule, default_workers, predict_rank
from transfer_cli.data.image_ops import IMAGE_SUFFIXES, BatchImageTransform, find_images, read_image, resize_center_crop
from transfer_cli.data.lines import read_line_batches
from transfer_cli.errors import ConfigError, DataError


class ImageFiles(Dataset):
    """Image files decoded and brought to the backbone's input size in the loader workers."""

    def __init__(self, paths: list[Path], preprocessing: ImagePreprocessing, labels: list[int] | None = None):
        self.paths = paths
        self.labels = labels
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.labels is None:
            return predict_item(self.paths[index], self.preprocessing)
        p = self.preprocessing
        image = resize_center_crop(read_image(self.paths[index]), p.resize_size, p.crop_size, p.interpolation)
        return {"inputs": image, "labels": self.labels[index], "ids": str(self.paths[index])}


class ThreadDecoded(Dataset):
    """Image files decoded in the main process a batch at a time, on a pool of threads.

    For a model on the CPU: its own threads already use every core, so loader worker processes only
    take cores from it while they decode ahead (and a core taken from one of its threads stalls the
    others at every layer), besides a fork each and a shared-memory hand-over per batch. Here a batch
    is decoded while the model waits, as a plain script does, spread over `threads` threads (PIL and
    torch release the GIL while decoding and resizing), and nothing is started before the first batch.
    Images the decoded-once cache already holds (decoded_cache.DecodedImages.kept) are read directly.
    """

    def __init__(self, files: Dataset, threads: int):
        self.files, self.threads = files, threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> list[int] | None:
        return getattr(self.files, "labels", None)  # what `transfer check` counts per class

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.files[index]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        # The DataLoader (num_workers=0) asks for a whole batch at once when a dataset has this method.
        kept = getattr(self.files, "kept", lambda index: False)
        todo = [index for index in indices if not kept(index)]
        if self.threads <= 1 or len(todo) <= 1:
            return [self.files[index] for index in indices]
        if self._pool is None:
            self._pool = decode_pool(self.threads)
        decoded = dict(zip(todo, self._pool.map(self.files.__getitem__, todo), strict=True))
        return [decoded[index] if index in decoded else self.files[index] for index in indices]


def decode_pool(threads: int) -> ThreadPoolExecutor:
    """Threads that decode an image each, their torch calls (resizing) confined to the thread.

    A torch operation big enough to split runs an OpenMP team of helper threads on the thread calling
    it, and once libgomp manages more threads than there are cores its teams stop spinning at their
    barriers, the model's team on the main thread included. Measured on two cores: a MobileNetV3-Small
    forward pass ran 2.5x slower for as long as the decoding threads lived, as slow as the whole process
    under OMP_WAIT_POLICY=passive. One image per thread needs no team.
    """
    # torch.set_num_threads also sets the count that any thread's first torch call takes from then on:
    # this thread's is settled here first. A fit computes on this thread (CPU autograd included), and
    # torch's own loader and pin-memory threads set theirs to 1 anyway.
    torch.get_num_threads()
    return ThreadPoolExecutor(
        threads, thread_name_prefix="transfer-decode", initializer=torch.set_num_threads, initargs=(1,)
    )


def predict_item(path: Path, preprocessing: ImagePreprocessing) -> dict[str, Any]:
    """One input to predict on. An unreadable file becomes a blank image and its error, so the writer
    (in the main process, in input order) decides between an error row and stopping after the rows
    before it; a worker raising instead would lose the good rows of the same batch."""
    p = preprocessing
    try:
        image = resize_center_crop(read_image(path), p.resize_size, p.crop_size, p.interpolation)
    except DataError as err:
        blank = torch.zeros(3, p.crop_size, p.crop_size, dtype=torch.uint8)
        return {"inputs": blank, "ids": str(path), "errors": str(err)}
    return {"inputs": image, "ids": str(path), "errors": None}


def collate_predict(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "inputs": torch.stack([item["inputs"] for item in items]),
        "ids": [item["ids"] for item in items],
        "errors": [item["errors"] for item in items],
    }


def list_image_inputs(spec: str) -> list[Path]:
    """An image file or a folder (searched recursively, sorted); stdin is read by StdinImages."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = find_images(path)  # hidden folders and files (.git, .DS_Store, ._IMG.jpg) left out
        if not files:
            raise DataError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) under {path} (--input).")
        return files
    raise DataError(f"Input not found: {path} (--input). Give an image file, a folder, or - for paths on stdin.")


class StdinImages(IterableDataset):
    """Image paths read from stdin as they arrive, decoded by a pool of threads, batched in input order.

    Loader worker processes cannot share one stdin and keep its order, so this runs in the main
    process (num_workers=0) and decodes each batch on `threads` threads instead (PIL and torch
    release the GIL while decoding and resizing). Memory holds one batch, whatever the stream's length.
    """

    def __init__(self, preprocessing: ImagePreprocessing, batch_size: int, threads: int, stopped: Callable[[], bool]):
        self.preprocessing, self.batch_size, self.threads, self.stopped = preprocessing, batch_size, threads, stopped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty = True
        with decode_pool(max(1, self.threads)) as pool:
            for lines in read_line_batches(sys.stdin, self.batch_size, self.stopped):
                empty = False
                paths = [Path(os.fsdecode(line.strip())) for _, line in lines]
                yield collate_predict(list(pool.map(predict_item, paths, repeat(self.preprocessing))))
        if empty:
            raise DataError("No image paths on stdin (--input -): give one path per line.")


class ImageDataModule(TransferDataModule):
    """Base of the image datamodules: subclasses read each split in `load_split`."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None,
        augment: bool,
        predict_input: str | None,
    ):
        super().__init__(batch_size, default_workers() if num_workers is None else num_workers, predict_input)
        # Worker processes as asked; left to us, predicting on the CPU decodes on threads instead.
        self.workers_given = num_workers is not None
        self.augment = augment
        self.preprocessing: ImagePreprocessing | None = None
        self._transform: BatchImageTransform | None = None

    def connect(self, backbone: Any) -> None:
        """Take the preprocessing the backbone's weights expect."""
        preprocessing = backbone.preprocessing()
        if not isinstance(preprocessing, ImagePreprocessing):
            raise ConfigError(
                f"{type(self).__name__} holds images, but the backbone {type(backbone).__name__} expects "
                "text. Pair image data with an image backbone."
            )
        self.use_preprocessing(preprocessing)

    def use_preprocessing(self, preprocessing: ImagePreprocessing) -> None:
        self.preprocessing = preprocessing
        self._transform = BatchImageTransform(preprocessing)

    def preprocessing_config(self) -> dict[str, Any] | None:
        return None if self.preprocessing is None else self.preprocessing.to_dict()

    def use_stored_preprocessing(self, stored: dict[str, Any] | None) -> None:
        # What the model was trained with, even if a newer torchvision describes the weights anew.
        if stored is not None:
            self.use_preprocessing(ImagePreprocessing.from_dict(stored))

    def random_augmentation(self) -> bool:
        return self.augment

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "inputs" not in batch:  # cached features: nothing left to preprocess
            return batch
        augment = self.augment and self.trainer is not None and self.trainer.training
        batch["inputs"] = self._transform(batch["inputs"], augment=augment)
        return batch

    def split_loader(self, split: str) -> DataLoader:
        return self._loader(self._splits[split], shuffle=split == "train")

    def _loader(
        self, dataset: Dataset, shuffle: bool, collate_fn: Any = None, sampler: Any = None, in_process: bool = False
    ) -> DataLoader:
        """`in_process`: the dataset's files are decoded on num_workers threads of this process (ThreadDecoded)."""
        if in_process:
            dataset, workers = ThreadDecoded(dataset, self.num_workers), 0
        else:  # no more workers than batches: starting processes costs more than a batch or two of images
            workers = max(0, min(self.num_workers, -(-len(dataset) // self.batch_size) - 1))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available() and not in_process,  # in process: the model is on the CPU
            drop_last=False,
        )

    def predict_dataloader(self) -> DataLoader:
        if self.predict_input is None:
            raise ConfigError("Nothing to predict: give --input PATH (an image, a folder, or - for stdin).")
        if self.predict_input == "-":
            stream = StdinImages(self.preprocessing, self.batch_size, self.num_workers, self._sigterm_received)
            return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())
        paths = list_image_inputs(self.predict_input)
        rank, world_size = predict_rank(self.trainer)
        files = ImageFiles(paths, self.preprocessing)
        shard = PredictShard(files, self.batch_size, rank, world_size) if world_size > 1 else None
        in_process = self._decode_in_process()
        return self._loader(files, shuffle=False, collate_fn=collate_predict, sampler=shard, in_process=in_process)

    def _decode_in_process(self) -> bool:
        """Threads in this process rather than worker processes: for a model on the CPU, unless the
        user asked for worker processes (an accelerator computes while the workers decode ahead)."""
        on_cpu = self.trainer is None or self.trainer.strategy.root_device.type == "cpu"
        return on_cpu and not self.workers_given

    def _sigterm_received(self) -> bool:
        return self.trainer is not None and self.trainer.received_sigterm
