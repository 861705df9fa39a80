"""Your own images in class folders: root/train/<class>/*, optionally root/val/<class>/*, root/test/<class>/*."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from transfer_cli.data.base import seeded_split
from transfer_cli.data.decoded_cache import DecodedBudget, DecodedImages, check_limit
from transfer_cli.data.device_decode import EncodedImages, collate_encoded, decode_on_device
from transfer_cli.data.image_ops import IMAGE_SUFFIXES, find_images, image_problem
from transfer_cli.data.images import ImageDataModule, ImageFiles
from transfer_cli.errors import ConfigError, DataError


def class_folders(split_dir: Path) -> list[str]:
    """The class folder names of a split, sorted; hidden folders (.git, .ipynb_checkpoints) are not classes."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_classes(split_dir: Path) -> dict[str, list[Path]]:
    found = {name: find_images(split_dir / name) for name in class_folders(split_dir)}
    if not found:
        raise DataError(f"No class folders in {split_dir}: expected {split_dir}/<class name>/<image files>.")
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
    machine_specific = ("root",)  # dropped from a checkpoint's config when predicting (restore.py)

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
        decoded_cache_gb: float = 4.0,
        decode_on: Literal["workers", "device"] = "workers",
        predict_input: str | None = None,
    ):
        """Images in class folders (JPEG, PNG, WebP, ...); class names are the folder names.

        Folders and files whose names start with a dot are ignored. EXIF orientation is applied.

        Args:
            root: Directory with `train/<class>/` and optionally `val/<class>/` and `test/<class>/`.
                `fit` reads train (and val), `validate` val (or the held-out part of train), `test`
                test: evaluating a checkpoint needs only the folder of its split.
            class_names: Expected class names; the sorted folder names of root/train when null.
            val_fraction: Without root/val, the fraction of training images held out (seeded).
            seed: Seed of that split.
            batch_size: Images per batch.
            num_workers: Loader worker processes decoding images. null: min(8, CPU count) of them for a
                model on an accelerator; for a model on the CPU, that many threads in the main process
                instead (worker processes would take cores from the model's own threads).
            augment: Random crop and horizontal flip of training images.
            skip_bad_images: Leave out unreadable images (counted on stderr) instead of failing.
            decoded_cache_gb: Most host memory (GiB) that `fit` may keep its training and validation
                images in, decoded and resized to the input size (uint8), so that only the first
                epoch decodes them; augmentation still differs every epoch. Images past the limit
                (or past half the free memory) are decoded every epoch, as a one-line notice says.
                0 turns the cache off.
            decode_on: Where JPEGs are decoded for fit, validate and test. `workers`: in the loader
                workers (PIL). `device`: the workers only read the files, and each batch's JPEGs are
                decoded together on the training device (torchvision's decode_jpeg: nvjpeg on a GPU),
                for a GPU that a few CPU cores cannot keep fed. Other formats, CMYK and EXIF-rotated
                JPEGs are still decoded in the workers. The decoded-once cache still applies and wins:
                images it holds are not decoded again. Predicting always decodes in the workers.
            predict_input: Images to predict on (set by `transfer predict --input`).
        """
        super().__init__(batch_size, num_workers, augment, predict_input)
        self.root = None if root is None else Path(root).expanduser()
        self.skip_bad_images = skip_bad_images
        self.val_fraction = val_fraction
        self.seed = seed
        self.decoded_cache_gb = check_limit(decoded_cache_gb)
        if decode_on not in ("workers", "device"):  # the parser checks the CLI; this, Python callers
            raise ConfigError(f"data.decode_on must be 'workers' or 'device', got {decode_on!r}.")
        self.decode_on = decode_on
        self._decoded: dict[str, Dataset] = {}
        self._budget: DecodedBudget | None = None
        self._found: dict[str, dict[str, list[Path]]] = {}
        self._held_out: dict[str, tuple[list[Path], list[int]]] | None = None
        if class_names is None:
            class_names = list(self._scan("train"))
            if len(class_names) < 2:
                train = self._split_dir("train")
                raise DataError(
                    f"Only one class in {train}: {class_names[0]}. A classifier needs at least two: add a "
                    f"folder of images per class ({train}/<class name>/<images>)."
                )
        elif len(class_names) < 2:
            raise ConfigError(f"data.class_names {list(class_names)}: a classifier needs at least two classes.")
        self.class_names = list(class_names)

    def data_class_names(self) -> list[str] | None:
        """The classes the data holds, to check against a checkpoint's; None without data.

        root/train names every class. Without it, the evaluation folders may hold a subset of the
        model's classes (a test set without frogs is still a test set), so they are reported in the
        model's order, followed by any class the model does not know, for the check to name.
        """
        if self.root is None:
            return None
        if (self.root / "train").is_dir():
            return class_folders(self.root / "train")
        present = [class_folders(self.root / s) for s in ("val", "test") if (self.root / s).is_dir()]
        if not present:
            return None  # nothing to compare: setup names the missing folder
        unknown = set().union(*present) - set(self.class_names)
        return self.class_names + sorted(unknown)

    def _split_dir(self, split: str) -> Path:
        if self.root is None:
            raise DataError("data.root is required: a directory with train/<class>/ folders of images.")
        path = self.root / split
        if not path.is_dir():
            raise DataError(f"Missing {path} (data.root={self.root}): expected {split}/<class>/<images>.")
        return path

    def _scan(self, split: str) -> dict[str, list[Path]]:
        if split not in self._found:
            self._found[split] = scan_classes(self._split_dir(split))
        return self._found[split]

    def _labelled(self, split: str) -> tuple[list[Path], list[int]]:
        """The readable images of a split folder with their class indices."""
        found = self._scan(split)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise DataError(
                f"Classes in {self.root / split} that the model does not know: {', '.join(unknown)} "
                f"(known: {', '.join(self.class_names)})."
            )
        return drop_bad_images(*_flatten(found, self.class_names), skip=self.skip_bad_images)

    def _files(self, split: str) -> tuple[list[Path], list[int]]:
        if split == "test" or (self.root is not None and (self.root / "val").is_dir()):
            return self._labelled(split)
        if split == "val" and self.root is not None and not (self.root / "train").is_dir():
            raise DataError(
                f"No validation images in {self.root} (data.root): expected val/<class>/<images>, or "
                "train/<class>/<images> of which a seeded fraction (data.val_fraction) validates."
            )
        return self._train_val_split()[split]

    def _train_val_split(self) -> dict[str, tuple[list[Path], list[int]]]:
        """Without root/val, a seeded fraction of train validates; `validate` holds out the same images as `fit`."""
        if self._held_out is None:
            paths, labels = self._labelled("train")
            val, train = seeded_split(len(paths), self.val_fraction, self.seed)
            self._held_out = {
                "val": ([paths[i] for i in val], [labels[i] for i in val]),
                "train": ([paths[i] for i in train], [labels[i] for i in train]),
            }
        return self._held_out

    def load_split(self, split: str) -> Dataset:
        paths, labels = self._files(split)
        return ImageFiles(paths, self.preprocessing, labels)

    def split_loader(self, split: str) -> DataLoader:
        if self.decode_on == "device":
            encoded = EncodedImages(self._decoded_once(split), split)
            return self._loader(encoded, shuffle=split == "train", collate_fn=collate_encoded)
        in_process = self._decode_in_process()
        return self._loader(self._decoded_once(split), shuffle=split == "train", in_process=in_process)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "encoded" in batch:
            batch = decode_on_device(batch, device, self.preprocessing, self._decoded)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _decoded_once(self, split: str) -> Dataset:
        """A fit reads its training and validation images every epoch: those are decoded once (see
        decoded_cache). Made when the loader is, in this process, so that every loader worker shares it.
        Decoding on the device, this process fills it (device_decode): the same shared tensors."""
        if "train" not in self._splits or split not in ("train", "val"):
            return self._splits[split]  # read once (validate, test): nothing to keep
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and self.decoded_cache_gb > 0:
            # Each process would keep the whole split for itself, and DistributedSampler deals each one
            # other images every epoch (a hit rate of about 1/W in epoch 2): memory times W for little.
            if split == "train" and self.trainer.global_rank == 0:
                print(
                    f"transfer: image folders are decoded every epoch on {world} processes "
                    "(data.decoded_cache_gb applies to one process)",
                    file=sys.stderr,
                )
            return self._splits[split]
        if self._budget is None:
            self._budget = DecodedBudget(self.decoded_cache_gb)
        # In shared memory where loader processes read it (worker processes decoding, or reading files for
        # decode_on device, which this process decodes into it); threads in this process keep it in its own.
        shared = self.num_workers > 0 and (self.decode_on == "device" or not self._decode_in_process())
        kept = self._decoded.get(split)
        if isinstance(kept, DecodedImages) and kept.shared != shared:
            # Made before the trainer said where the model runs (`transfer check` counts the examples first).
            self._budget.release(self._decoded.pop(split))
        if split not in self._decoded:
            self._decoded[split] = self._budget.wrap(split, self._splits[split], shared=shared)
        return self._decoded[split]

    def use_cached_features(self, trainer: Any, backbone: Any) -> None:
        # The frozen backbone's features are computed in one pass over the images: none to keep.
        budget, self._budget = self._budget, DecodedBudget(0)
        try:
            super().use_cached_features(trainer, backbone)
        finally:
            self._budget = budget

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        self._decoded = {}  # a whole data set's pixels: not kept past the fit that read them
        self._budget = None
