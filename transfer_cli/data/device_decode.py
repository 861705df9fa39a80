"""JPEGs decoded on the training device (data.decode_on=device): loader workers only read file bytes.

A batch's encoded JPEGs cross to the device as they are (a few tens of KB each, less than their
pixels) and `torchvision.io.decode_jpeg` decodes the whole list there in one call (nvjpeg on CUDA),
then the same resize and centre crop as in the workers brings them to the input size. The CPU then
only reads files, which is what a GPU fed by a handful of cores needs.

Files the device decoder would not decode as PIL does stay in the workers, decoded by the one
decode function of the project (image_ops.read_image): PNG, WebP and other formats, CMYK JPEGs, and
JPEGs with an EXIF orientation (decode_jpeg applies it on the CPU only). A batch may mix both.

With the decoded-once cache (decoded_cache.py) the cache wins: an image it holds is read from
memory in every later epoch instead of being decoded again, on any device. Images decoded on the
device in the first epoch are copied back into the cache by the main process (one device-to-host
copy of input-size pixels per batch, first epoch only); workers read them from the next epoch on.
"""

import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from transfer_cli.data.decoded_cache import DecodedImages
from transfer_cli.data.image_ops import _UNREADABLE, resize_center_crop
from transfer_cli.data.images import ImageFiles
from transfer_cli.errors import DataError

EXIF_ORIENTATION = 0x0112
# torchvision prefixes its decoder's message with its own source file and line: not the user's business.
_SOURCE_PREFIX = re.compile(r"^.*\.(cpp|cu|h):\d+,\s*")


def device_decodable(path: Path) -> bool:
    """Whether the device decoder gives what PIL gives: a baseline/progressive RGB or grey JPEG shown
    as stored. Reads the header only; an unreadable file goes to the workers' decoder, which names it."""
    try:
        with Image.open(path) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return False
            return image.getexif().get(EXIF_ORIENTATION, 1) == 1
    except _UNREADABLE:
        return False


class EncodedImages(Dataset):
    """The images of `files` as encoded bytes where the device can decode them, as pixels otherwise.

    `files` may be a DecodedImages: an image it already holds is handed out as pixels (see module doc).
    """

    def __init__(self, files: ImageFiles, split: str):
        self.files, self.split = files, split
        self.cache = files if isinstance(files, DecodedImages) else None
        self._decodable: dict[int, bool] = {}  # per worker: the header is read once per image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        files = self.files
        cached = self.cache is not None and index < self.cache.capacity and bool(self.cache.filled[index])
        if cached or not self._on_device(index):
            return {**files[index], "index": index, "split": self.split}
        path = files.paths[index]
        encoded = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        return {
            "encoded": encoded,
            "labels": files.labels[index],
            "ids": str(path),
            "index": index,
            "split": self.split,
        }

    def _on_device(self, index: int) -> bool:
        if index not in self._decodable:
            self._decodable[index] = device_decodable(self.files.paths[index])
        return self._decodable[index]


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of encoded and decoded images, each kind with its positions in the batch."""
    encoded = [i for i, item in enumerate(items) if "encoded" in item]
    decoded = [i for i, item in enumerate(items) if "encoded" not in item]
    return {
        "encoded": [items[i]["encoded"] for i in encoded],
        "encoded_at": encoded,
        "decoded": torch.stack([items[i]["inputs"] for i in decoded]) if decoded else None,
        "decoded_at": decoded,
        "index": [item["index"] for item in items],
        "split": items[0]["split"],
        "labels": torch.tensor([item["labels"] for item in items]),
        "ids": [item["ids"] for item in items],
    }


def decode_on_device(
    batch: dict[str, Any], device: torch.device, preprocessing: Any, caches: dict[str, Dataset]
) -> dict[str, Any]:
    """The batch with `inputs`: uint8 [B, 3, crop, crop] on `device`, as the workers would have made it."""
    p = preprocessing
    encoded, encoded_at = batch.pop("encoded"), batch.pop("encoded_at")
    decoded, decoded_at = batch.pop("decoded"), batch.pop("decoded_at")
    index, split = batch.pop("index"), batch.pop("split")
    inputs = torch.empty((len(batch["ids"]), 3, p.crop_size, p.crop_size), dtype=torch.uint8, device=device)
    if decoded is not None:
        inputs[decoded_at] = decoded.to(device, non_blocking=True)
    if encoded:
        images = _decode(encoded, [batch["ids"][i] for i in encoded_at], device)
        crops = _resize_crop(images, p)
        inputs[encoded_at] = crops
        cache = caches.get(split)
        if isinstance(cache, DecodedImages):
            _keep(cache, [index[i] for i in encoded_at], crops)
    batch["inputs"] = inputs
    return batch


def _decode(encoded: list[torch.Tensor], ids: list[str], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass  # one bad file fails the whole list: find it, to name it
    for data, path in zip(encoded, ids):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:
            reason = _SOURCE_PREFIX.sub("", str(err).strip().splitlines()[-1])
            raise DataError(
                f"Cannot read image {path}: {reason} (decoded on {device}). Remove or replace the file."
            ) from err
    raise DataError(f"Cannot decode the JPEGs of a batch on {device}, though each decodes alone: first {ids[0]}.")


def _resize_crop(images: list[torch.Tensor], p: Any) -> torch.Tensor:
    """Resize and crop per image size, each size as one batch: a folder of photos of a few sizes costs a
    few kernel launches, not one per image."""
    out = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for positions in by_shape.values():
        same = torch.stack([images[i] for i in positions])
        for i, crop in zip(positions, resize_center_crop(same, p.resize_size, p.crop_size, p.interpolation)):
            out[i] = crop
    return torch.stack(out)


def _keep(cache: DecodedImages, indices: list[int], crops: torch.Tensor) -> None:
    kept = [k for k, i in enumerate(indices) if i < cache.capacity]
    if kept:
        rows = [indices[k] for k in kept]
        cache.images[rows] = crops[kept].cpu()
        cache.filled[rows] = True
