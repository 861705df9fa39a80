"""CIFAR-10 pickles, image folders and image decoding, on the real files in ../shared/data."""

import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_cli.data import CIFAR10DataModule, ImageFolderDataModule
from transfer_cli.data.cifar10 import read_batch
from transfer_cli.data.image_ops import random_crop_flip, read_image, resize_center_crop
from transfer_cli.errors import DataError


def test_cifar_reads_the_original_layout_with_short_batches_and_no_filenames(cifar_root):
    data = CIFAR10DataModule(str(cifar_root), val_fraction=0.1, seed=7)
    assert data.class_names[:3] == ["airplane", "automobile", "bird"] and len(data.class_names) == 10
    data.setup("fit")
    data.setup("test")
    train, val, test = (data._splits[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (2250, 250, 1000)  # 5 x 500 images, 1000 test images
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)

    again = CIFAR10DataModule(str(cifar_root), val_fraction=0.1, seed=7)
    again.setup("fit")
    assert torch.equal(again._splits["val"].labels, val.labels)  # the split is seeded


def test_cifar_accepts_the_batches_dir_itself_and_latin1_style_pickles(cifar_root, tmp_path):
    images, labels = read_batch(cifar_root / "cifar-10-batches-py" / "data_batch_1")
    path = tmp_path / "batch"
    with open(path, "wb") as f:  # the layout torchvision writes: str keys, not bytes
        pickle.dump({"data": images.reshape(len(images), -1).numpy(), "labels": labels.tolist()}, f)
    again, again_labels = read_batch(path)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    assert CIFAR10DataModule(str(cifar_root / "cifar-10-batches-py")).class_names[-1] == "truck"


def test_cifar_missing_directory_names_where_it_looked(tmp_path):
    data = CIFAR10DataModule(str(tmp_path / "nowhere"))  # building it reads nothing: preparing the data looks
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        data.prepare_data()


def test_cifar_download_offline_says_how_to_supply_the_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()
    assert not list(tmp_path.glob("*.part"))


def test_a_data_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to load"):
        read_batch(path)
    assert not marker.exists()


def test_image_folder_takes_class_names_from_folders_and_splits_seeded(imagefolder_root):
    data = ImageFolderDataModule(str(imagefolder_root), val_fraction=0.2, seed=1, num_workers=0)
    assert data.class_names == sorted(p.name for p in (imagefolder_root / "train").iterdir())
    data.preprocessing = None  # setup only lists files; decoding happens in the loader
    data.setup("fit")
    assert len(data._splits["train"]) == 240 and len(data._splits["val"]) == 60
    assert "test" not in data._splits  # each stage reads only its own splits
    data.setup("test")
    assert len(data._splits["test"]) == 300  # root/test is used as the test split


def test_image_folder_with_an_empty_class_is_a_data_error(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    with pytest.raises(DataError, match="dog"):
        ImageFolderDataModule(str(tmp_path))


@pytest.mark.parametrize(
    "mode,value",
    [("L", 128), ("P", 3), ("RGBA", (10, 20, 30, 255)), ("CMYK", (0, 0, 0, 0)), ("I;16", 65535), ("RGB", (1, 2, 3))],
)
def test_every_common_pixel_format_becomes_rgb(tmp_path, mode, value):
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (5, 4), value).save(path)
    image = read_image(path)
    assert image.shape == (3, 4, 5) and image.dtype == torch.uint8
    if mode == "I;16":
        assert int(image.max()) == 255  # 16-bit white stays white, not clipped garbage


def test_truncated_and_non_image_files_name_the_path(tmp_path, imagefolder_root):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((imagefolder_root / "test" / "cat" / "0000.jpg").read_bytes()[:100])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path in (broken, text):
        with pytest.raises(DataError, match=path.name):
            read_image(path)


def test_resize_center_crop_and_augmentation_keep_shapes():
    batch = torch.randint(0, 256, (4, 3, 32, 48), dtype=torch.uint8)
    out = resize_center_crop(batch, resize=40, crop=36, interpolation="bilinear")
    assert out.shape == (4, 3, 36, 36) and out.dtype == torch.uint8
    flipped = random_crop_flip(batch.float(), padding=4, generator=torch.Generator().manual_seed(0))
    assert flipped.shape == batch.shape
    # Every output row is a window of the reflect-padded input, so values stay within the input's range.
    assert flipped.min() >= 0 and flipped.max() <= 255 and not np.isnan(flipped.numpy()).any()


def _padded_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """The augmentation written out the slow way: reflect-pad, crop each image at its offset, flip half."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images.float(), (padding,) * 4, mode="reflect") if padding else images.float()
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator) if padding else [0] * batch
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator) if padding else [0] * batch
    flip = torch.rand(batch, generator=generator) < 0.5
    out = []
    for i in range(batch):
        crop = padded[i, :, offset_y[i] : offset_y[i] + height, offset_x[i] : offset_x[i] + width]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out).to(images.dtype)


@pytest.mark.parametrize("padding", [0, 1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_the_gathered_crop_and_flip_equals_padding_cropping_and_flipping(padding, dtype):
    images = torch.randint(0, 256, (16, 3, 8, 11), dtype=torch.uint8).to(dtype)
    fast = random_crop_flip(images, padding, generator=torch.Generator().manual_seed(5))
    slow = _padded_crop_flip(images, padding, generator=torch.Generator().manual_seed(5))
    assert fast.dtype == dtype and torch.equal(fast, slow)


def test_file_images_and_in_memory_images_reach_the_backbone_alike(cifar_root, tmp_path):
    """The same picture from a PNG file (ImageFolder, predict) and from the CIFAR pickle (training)
    must give the backbone the same tensor, at the native size and upscaled."""
    from transfer_cli.backbones import ImagePreprocessing
    from transfer_cli.data.image_ops import BatchImageTransform
    from transfer_cli.data.images import ImageFiles

    images, _ = read_batch(cifar_root / "cifar-10-batches-py" / "test_batch")
    path = tmp_path / "first.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(path)
    for crop, resize in ((32, 33), (64, 73)):
        prep = ImagePreprocessing(crop, resize, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
        transform = BatchImageTransform(prep)
        from_file = transform(ImageFiles([path], prep)[0]["inputs"][None], augment=False)
        from_memory = transform(images[:1], augment=False)
        assert from_file.shape == (1, 3, crop, crop)
        # Files are resized to uint8 in the workers: at most half a grey level (0.5/255/std) apart.
        torch.testing.assert_close(from_file, from_memory, rtol=0, atol=0.5 / 255 / 0.25 + 1e-6)


def test_resize_center_crop_matches_torchvision_weights_transforms(tmp_path):
    import torchvision

    reference = torchvision.models.ResNet18_Weights.DEFAULT.transforms(antialias=True)
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    ours = resize_center_crop(image, reference.resize_size[0], reference.crop_size[0], "bilinear")
    theirs = torchvision.transforms.functional.center_crop(
        torchvision.transforms.functional.resize(image, reference.resize_size, antialias=True), reference.crop_size
    )
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours.int() - theirs.int()).abs().max() <= 1  # rounding of the interpolation only
