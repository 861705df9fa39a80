"""Your own images in class folders: root/train/<class>/*, optionally root/val/<class>/*."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from transfer_cli.data.base import ImageDataModule, ImageFiles
from transfer_cli.data.image_ops import IMAGE_SUFFIXES, image_problem
from transfer_cli.errors import DataError


def scan_classes(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"No class folders in {split_dir}: expected {split_dir}/<class name>/<image files>.")
    found = {
        d.name: sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) for d in classes
    }
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise DataError(
            f"Class folders without images in {split_dir}: {', '.join(empty)}. Add images "
            f"({', '.join(IMAGE_SUFFIXES)}) or remove the folders."
        )
    return found


def drop_bad_images(paths: list[Path], labels: list[int], skip: bool) -> tuple[list[Path], list[int]]:
    """Find unreadable images before training; fail listing them, or (opt-in) leave them out."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = list(pool.map(image_problem, paths))
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if not bad:
        return paths, labels
    if not skip:
        listed = "\n".join(f"  {p}: {why}" for p, why in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} unreadable image(s):\n{listed}{more}\nRemove or replace them, or pass "
            "--data.init_args.skip_bad_images true to leave them out."
        )
    print(f"transfer: skipped {len(bad)} unreadable image(s), first: {bad[0][0]}", file=sys.stderr)
    kept = [(p, y) for (p, y), why in zip(zip(paths, labels), problems) if why is None]
    return [p for p, _ in kept], [y for _, y in kept]


def _flatten(found: dict[str, list[Path]], class_names: list[str]) -> tuple[list[Path], list[int]]:
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for name, files in found.items():
        paths += files
        labels += [index[name]] * len(files)
    return paths, labels


class ImageFolderDataModule(ImageDataModule):
    def __init__(
        self,
        root: str | None = None,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 42,
        batch_size: int = 64,
        num_workers: int | None = None,
        augment: bool = True,
        skip_bad_images: bool = False,
        predict_input: str | None = None,
    ):
        """Images in class folders (JPEG, PNG, WebP, ...); class names are the folder names.

        Args:
            root: Directory with `train/<class>/` and optionally `val/<class>/` and `test/<class>/`.
            class_names: Expected class names; the sorted folder names of root/train when null.
            val_fraction: Without root/val, the fraction of training images held out (seeded).
            seed: Seed of that split.
            batch_size: Images per batch.
            num_workers: Loader worker processes decoding images; null picks min(8, CPU count).
            augment: Random crop and horizontal flip of training images.
            skip_bad_images: Leave out unreadable images (counted on stderr) instead of failing.
            predict_input: Images to predict on (set by `transfer predict --input`).
        """
        super().__init__(batch_size, num_workers, augment, predict_input)
        self.root = None if root is None else Path(root).expanduser()
        self.skip_bad_images = skip_bad_images
        self.val_fraction = val_fraction
        self.seed = seed
        self._train_found: dict[str, list[Path]] | None = None
        if class_names is None:
            self._train_found = scan_classes(self._split_dir("train"))
            class_names = list(self._train_found)
        self.class_names = class_names
        self._splits: dict[str, ImageFiles] = {}

    def data_class_names(self) -> list[str] | None:
        """The class folders of root/train, or None without data."""
        if self.root is None:
            return None
        return list(self._train_found or scan_classes(self._split_dir("train")))

    def _split_dir(self, split: str) -> Path:
        if self.root is None:
            raise DataError("data.root is required: a directory with train/<class>/ folders of images.")
        path = self.root / split
        if not path.is_dir():
            raise DataError(f"Missing {path} (data.root={self.root}): expected {split}/<class>/<images>.")
        return path

    def _split(self, split: str) -> tuple[list[Path], list[int]]:
        found = scan_classes(self._split_dir(split))
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise DataError(
                f"Classes in {self.root / split} that the model does not know: {', '.join(unknown)} "
                f"(known: {', '.join(self.class_names)})."
            )
        return drop_bad_images(*_flatten(found, self.class_names), skip=self.skip_bad_images)

    def setup(self, stage: str) -> None:
        if stage == "predict" or self._splits:
            return
        if self._train_found is not None:
            train_paths, train_labels = drop_bad_images(
                *_flatten(self._train_found, self.class_names), skip=self.skip_bad_images
            )
        else:
            train_paths, train_labels = self._split("train")
        if (self.root / "val").is_dir():
            val_paths, val_labels = self._split("val")
        else:
            order = torch.randperm(len(train_paths), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(round(self.val_fraction * len(order))))
            val_idx, train_idx = order[:n_val], order[n_val:]
            val_paths, val_labels = [train_paths[i] for i in val_idx], [train_labels[i] for i in val_idx]
            train_paths, train_labels = [train_paths[i] for i in train_idx], [train_labels[i] for i in train_idx]
        self._splits = {
            "train": ImageFiles(train_paths, self.preprocessing, train_labels),
            "val": ImageFiles(val_paths, self.preprocessing, val_labels),
        }
        if (self.root / "test").is_dir():
            test_paths, test_labels = self._split("test")
            self._splits["test"] = ImageFiles(test_paths, self.preprocessing, test_labels)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._splits["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._splits["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self._splits:
            raise DataError(f"No test split: {self.root / 'test'} does not exist.")
        return self._loader(self._splits["test"], shuffle=False)
