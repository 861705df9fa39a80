"""What every image datamodule shares: class names, the backbone's preprocessing, batches on device."""

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data.image_ops import IMAGE_SUFFIXES, BatchImageTransform, find_images, read_image, resize_center_crop
from transfer_cli.errors import ConfigError, DataError


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class ImageFiles(Dataset):
    """Image files decoded and brought to the backbone's input size in the loader workers."""

    def __init__(self, paths: list[Path], preprocessing: ImagePreprocessing, labels: list[int] | None = None):
        self.paths = paths
        self.labels = labels
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.preprocessing
        image = resize_center_crop(read_image(self.paths[index]), p.resize_size, p.crop_size, p.interpolation)
        if self.labels is None:
            return {"inputs": image, "ids": str(self.paths[index])}
        return {"inputs": image, "labels": self.labels[index]}


def list_image_inputs(spec: str) -> list[Path]:
    """An image file, a folder (searched recursively, sorted), or `-` for paths on stdin, one a line."""
    if spec == "-":
        paths = [Path(line) for line in (raw.strip() for raw in sys.stdin) if line]
        if not paths:
            raise DataError("No image paths on stdin (--input -): give one path per line.")
        return paths
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = find_images(path)  # hidden folders and files (.git, .DS_Store, ._IMG.jpg) left out
        if not files:
            raise DataError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) under {path} (--input).")
        return files
    raise DataError(f"Input not found: {path} (--input). Give an image file, a folder, or - for paths on stdin.")


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses load their train/val/test datasets in `setup` and set `class_names`."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None,
        augment: bool,
        predict_input: str | None,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.augment = augment
        self.predict_input = predict_input
        self.preprocessing: ImagePreprocessing | None = None
        self._transform: BatchImageTransform | None = None
        self.class_names: list[str] = []

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

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "inputs" not in batch:  # cached features: nothing left to preprocess
            return batch
        augment = self.augment and self.trainer is not None and self.trainer.training
        batch["inputs"] = self._transform(batch["inputs"], augment=augment)
        return batch

    def _loader(self, dataset: Dataset, shuffle: bool, collate_fn: Any = None) -> DataLoader:
        # No more workers than batches: starting processes costs more than a batch or two of images.
        workers = max(0, min(self.num_workers, -(-len(dataset) // self.batch_size) - 1))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def predict_dataloader(self) -> DataLoader:
        if self.predict_input is None:
            raise ConfigError("Nothing to predict: give --input PATH (an image, a folder, or - for stdin).")
        return self._loader(ImageFiles(list_image_inputs(self.predict_input), self.preprocessing), shuffle=False)
