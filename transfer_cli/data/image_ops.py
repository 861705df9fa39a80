"""Image operations on uint8/float tensors in batches, so they run wherever the batch lives (GPU too).

Datasets hand out uint8 images; resizing, augmentation and normalisation happen here, once per
batch, after the batch reaches the accelerator.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# What a damaged or hostile file makes PIL raise. DecompressionBombError (a plain Exception) comes
# from Image.open when the header claims more than 2 x Image.MAX_IMAGE_PIXELS pixels (PIL's default,
# about 179 million: a 200-megapixel photo is over it, every common camera and phone is under it).
_UNREADABLE = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)


def read_image(path: Path) -> torch.Tensor:
    """Decode any common image file to a uint8 RGB tensor [3, H, W], upright.

    The one decode function of training, evaluation and prediction, so a photo looks the same to the
    model in all three. Phones store pixels as the sensor saw them plus an EXIF Orientation tag;
    applying the tag is what every viewer does, so the model sees the photo as its owner does.
    """
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except _UNREADABLE as err:
        raise DataError(f"Cannot read image {path}: {_reason(err)}. Remove or replace the file.") from err
    return torch.from_numpy(_as_array(rgb)).permute(2, 0, 1).contiguous()


def image_problem(path: Path) -> str | None:
    """A cheap check that runs before training: empty, not an image, too large, or visibly truncated.

    Reads the header and the last bytes only, so a whole dataset is checked in seconds; a file that
    is damaged in the middle still fails later, when it is decoded, naming its path.
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            kind = image.format
        with open(path, "rb") as f:
            f.seek(max(0, size - 32))
            tail = f.read()
    except _UNREADABLE as err:
        return f"not a readable image ({_reason(err)})"
    if kind == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def _reason(err: Exception) -> str:
    if isinstance(err, Image.DecompressionBombError):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return f"{err} It is refused as a possible decompression bomb; downscale it below {limit:,} pixels"
    return str(err)


def find_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, leaving out hidden folders and files.

    Hidden folders are pruned, not walked: a .git or .ipynb_checkpoints tree can be large, and
    macOS's ._IMG.jpg companions carry an image suffix without being images.
    """
    found = []
    # Linked folders are followed (a data set assembled from links is common); each real folder is
    # walked once, so a link back up the tree cannot loop.
    seen = set()
    for parent, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        named = (Path(parent) / n for n in files if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES)
        found += [p for p in named if p.is_file()]  # as before: no broken links, sockets or pipes
    return sorted(found)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16- and 32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255.0).round().clip(0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite onto white: transparent pixels carry arbitrary colour values underneath.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _as_array(image: Image.Image):
    import numpy as np

    return np.array(image, dtype=np.uint8, copy=True)


def resize_center_crop(images: torch.Tensor, resize: int, crop: int, interpolation: str) -> torch.Tensor:
    """Resize the shorter side to `resize`, then take the central `crop` x `crop` square.

    Takes a batch [B, C, H, W] or one image [C, H, W]. An image already `crop` x `crop` is taken as
    it is, which makes the step idempotent: file images are brought to size in the loader workers,
    in-memory ones (CIFAR-10) on the device, and both then look alike to the backbone.
    """
    if images.dim() == 3:
        return resize_center_crop(images[None], resize, crop, interpolation)[0]
    height, width = images.shape[-2:]
    if (height, width) == (crop, crop):
        return images
    # The arithmetic of torchvision's Resize(int) and CenterCrop, which the weights' own transforms
    # (torchvision's and timm's) use: the long side truncated, the crop offset rounded.
    short, long = sorted((height, width))
    new_short, new_long = max(crop, resize), max(crop, int(resize * long / short))
    size = (new_short, new_long) if height <= width else (new_long, new_short)
    if size != (height, width):
        images = _resize(images, size, interpolation)
    top, left = round((images.shape[-2] - crop) / 2), round((images.shape[-1] - crop) / 2)
    return images[..., top : top + crop, left : left + crop]


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """PIL's resampling kernels, as torchvision's and timm's transforms use them, up or down.

    Antialiased kernels whatever the direction: they are PIL's (bicubic with a = -0.5), while the
    plain ones differ on upscaling (a = -0.75). Always in float, so files (uint8, in the workers)
    and in-memory images (float, on the device) differ by the final rounding only.
    """
    smooth = interpolation in ("bilinear", "bicubic")
    options = {"mode": interpolation, "antialias": smooth, "align_corners": False if smooth else None}
    # Clamped as PIL clamps: bicubic overshoots past black and white at sharp edges.
    resized = F.interpolate(images.float(), size=size, **options).clamp(0, 255)
    return resized.round().to(torch.uint8) if images.dtype == torch.uint8 else resized


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after reflect padding, and random horizontal flip, for a whole batch.

    The padding, the crop and the flip only choose which source pixel each output pixel is, so they
    are one row index and one column index per image, applied by two gathers in the input's own
    dtype: no padded copy, no float round trip for uint8, several times faster per step than padding,
    indexing and flipping the batch (and the same pixels: tests/test_image_data.py).
    """
    batch, channels, height, width = images.shape
    device = images.device  # random numbers are drawn where the batch is: no host-device copies
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    if padding > 0:
        offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
        offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
        rows = _reflect(rows + (offset_y - padding)[:, None], height)
        cols = _reflect(cols + (offset_x - padding)[:, None], width)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    shape = (batch, channels, height, width)
    picked = images.gather(2, rows[:, None, :, None].expand(shape))
    return picked.gather(3, cols[:, None, None, :].expand(shape))


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside [0, size) mirrored back in without repeating the edge, as reflect padding does."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


class BatchImageTransform:
    """uint8 batch -> normalised float batch at the backbone's input size, with optional augmentation."""

    def __init__(self, preprocessing: ImagePreprocessing):
        self.preprocessing = preprocessing
        self._scale: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        p = self.preprocessing
        if augment:
            # Crop at the native resolution (CIFAR's classic pad-4-of-32), then scale like evaluation.
            # Cropping and flipping only move pixels: gathered in the batch's own dtype (uint8: a quarter
            # of the memory traffic of floats), with the same values.
            images = random_crop_flip(images, padding=max(1, images.shape[-1] // 8))
        # Resized as uint8 (rounded), exactly as image files are in the loader workers (ImageFiles):
        # in-memory images (CIFAR-10) are then trained and evaluated on the pixels that predicting on
        # their files sees. Resized as floats, they differed by up to half a grey level.
        images = resize_center_crop(images, p.resize_size, p.crop_size, p.interpolation).float()
        mean, std = self._mean_std(images.device)
        # In NCHW: the backbone brings its inputs to the layout its weights run in (backbones/base.py).
        return (images - mean) / std

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: building them per batch is a blocking host-to-device copy each time.
        if device not in self._scale:
            p = self.preprocessing
            mean = torch.tensor(p.mean, device=device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(p.std, device=device).view(1, 3, 1, 1) * 255.0
            self._scale[device] = (mean, std)
        return self._scale[device]
