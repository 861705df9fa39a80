"""Image files decoded once per fit: the second and later epochs read uint8 pixels from memory.

Decoding a JPEG and resizing it to the backbone's input size is most of a small model's epoch, and
its result never changes: augmentation (random crop, flip) and normalisation run later, on the batch
(image_ops.BatchImageTransform). So each image is decoded the first time a loader asks for it and
its uint8 pixels at the input size are kept: in shared memory that the loader workers write and
read, so one cache serves every worker and every epoch, or, decoding on threads in the main process
(a model on the CPU, images.ThreadDecoded), in its own memory. The tensors are exactly what ImageFiles
returns: cached and decoded images are the same to the bit.
"""

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from transfer_cli.data.images import ImageFiles
from transfer_cli.errors import ConfigError

GB = 2**30
SHARED_MEMORY = Path("/dev/shm")  # where torch's shared tensors live on Linux


def check_limit(decoded_cache_gb: float) -> float:
    if not decoded_cache_gb >= 0:  # also refuses NaN
        raise ConfigError(
            f"data.decoded_cache_gb must be a size in GiB, 0 or more (0 turns the cache off), got {decoded_cache_gb}."
        )
    return float(decoded_cache_gb)


class DecodedImages(ImageFiles):
    """ImageFiles whose first `capacity` images are decoded once and then served from memory.

    `images` and `filled` live in shared memory when `shared` (loader workers are separate processes:
    what one worker decodes, every worker of every later epoch reads). Each index is read once per
    epoch, and an epoch's batches pass through the loader's queues before the next epoch starts, so
    the pixels are written before their `filled` flag is read.
    """

    def __init__(self, files: ImageFiles, capacity: int, shared: bool):
        super().__init__(files.paths, files.preprocessing, files.labels)
        size = self.preprocessing.crop_size
        self.capacity, self.shared = min(capacity, len(files)), shared
        # Normal tensors even when made under inference mode (Lightning's validate: `transfer check`
        # validates after fit's setup): decoding threads and processes write them outside it.
        with torch.inference_mode(False):
            self.images = torch.empty((self.capacity, 3, size, size), dtype=torch.uint8)
            self.filled = torch.zeros(self.capacity, dtype=torch.bool)
        if shared:
            self.images.share_memory_()
            self.filled.share_memory_()

    def kept(self, index: int) -> bool:
        """Whether the image is held decoded (read without decoding)."""
        return index < self.capacity and bool(self.filled[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index >= self.capacity:
            return super().__getitem__(index)
        if self.filled[index]:
            return {"inputs": self.images[index], "labels": self.labels[index], "ids": str(self.paths[index])}
        item = super().__getitem__(index)
        self.images[index] = item["inputs"]
        self.filled[index] = True
        return item


class DecodedBudget:
    """The bytes of decoded images a fit may keep (data.decoded_cache_gb), shared by its splits."""

    def __init__(self, limit_gb: float):
        self.limit_gb = limit_gb
        self.left = int(limit_gb * GB)

    def wrap(self, split: str, files: ImageFiles, shared: bool) -> ImageFiles:
        """`files` with as many images cached as the budget and the machine's free memory allow."""
        if self.limit_gb == 0 or len(files) == 0 or files.preprocessing is None:
            return files  # off, nothing to keep, or no input size known yet
        per_image = 3 * files.preprocessing.crop_size**2
        room = min(self.left, free_memory(shared))
        capacity = min(len(files), room // per_image)
        if capacity < len(files):
            print(notice(split, len(files), capacity, per_image, self.limit_gb, room < self.left), file=sys.stderr)
        if capacity == 0:
            return files
        self.left -= capacity * per_image
        return DecodedImages(files, capacity, shared)

    def release(self, decoded: DecodedImages) -> None:
        """Give back the bytes `decoded` took (it is dropped and made again)."""
        self.left += decoded.images.nbytes


def notice(split: str, count: int, capacity: int, per_image: int, limit_gb: float, memory_bound: bool) -> str:
    need = count * per_image
    size = f"{need / GB:.2f} GiB" if need >= GB // 10 else f"{need / 2**20:.1f} MiB"
    bound = "free memory" if memory_bound else f"data.decoded_cache_gb={limit_gb:g}"
    return (
        f"transfer: the {split} images decoded at the input size need {size}; {bound} holds "
        f"{capacity:,} of {count:,}, the other {count - capacity:,} are decoded again every epoch "
        "(raise data.decoded_cache_gb, or train at a smaller image size, to keep them all)."
    )


def free_memory(shared: bool) -> int:
    """Bytes that may be filled without running the machine short: half the memory the kernel says is
    available (the model, the loader workers and the rest of the machine need the other half) and, for
    shared tensors, the free space of /dev/shm (a container's is often small, and a write past its end
    kills the process with SIGBUS instead of raising)."""
    free = _available_memory() // 2
    if shared and SHARED_MEMORY.is_dir():
        free = min(free, shutil.disk_usage(SHARED_MEMORY).free)
    return free


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
