"""Image folders decoded once per fit (data.decoded_cache_gb): the same pixels as decoding every epoch,
no decoding after the first epoch (loader workers too), and a notice when the limit is too small."""

from types import SimpleNamespace

import pytest
import torch

import transfer_cli.data.decoded_cache as decoded_cache
import transfer_cli.data.images as images
from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data import ImageFolderDataModule
from transfer_cli.data.image_ops import random_crop_flip
from transfer_cli.errors import ConfigError

from conftest import TINY_IMAGE_BACKBONE, run_transfer

# The shared JPEGs are 32 px: 40 px via a resize to 46 makes every image go through resampling and
# rounding, the part of decoding whose result the cache keeps.
PREP = ImagePreprocessing(crop_size=40, resize_size=46, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
TRAIN, VAL = 270, 30  # the shared folder's 300 training images, 10% held out


def _folder(root, cache_gb: float, workers: int = 0) -> ImageFolderDataModule:
    data = ImageFolderDataModule(str(root), batch_size=32, num_workers=workers, decoded_cache_gb=cache_gb)
    data.use_preprocessing(PREP)
    data.setup("fit")
    return data


def _epoch(loader, seed: int) -> list[dict]:
    torch.manual_seed(seed)  # the shuffle's order, as Lightning's seed_everything fixes it per run
    return list(loader)


def test_cached_epochs_give_the_pixels_and_augmented_batches_of_decoding(imagefolder_root):
    cached, plain = _folder(imagefolder_root, cache_gb=1.0), _folder(imagefolder_root, cache_gb=0)
    for split in ("val", "train"):
        fast, slow = cached.split_loader(split), plain.split_loader(split)
        assert type(fast.dataset) is decoded_cache.DecodedImages and type(slow.dataset) is images.ImageFiles
        _epoch(fast, seed=0)  # the first epoch decodes and keeps; the second reads what was kept
        for a, b in zip(_epoch(fast, seed=1), _epoch(slow, seed=1), strict=True):
            assert a["ids"] == b["ids"] and torch.equal(a["labels"], b["labels"])
            assert a["inputs"].dtype == torch.uint8 and torch.equal(a["inputs"], b["inputs"])  # to the bit
            torch.manual_seed(2)
            fast_aug = cached._transform(a["inputs"], augment=split == "train")
            torch.manual_seed(2)
            assert torch.equal(fast_aug, plain._transform(b["inputs"], augment=split == "train"))


def test_a_second_epoch_decodes_nothing_with_loader_workers(imagefolder_root, decodes):
    data = _folder(imagefolder_root, cache_gb=1.0, workers=2)
    loaders = [data.train_dataloader(), data.val_dataloader()]
    assert loaders[0].num_workers == 2  # (30 validation images are one batch: read without workers)
    seen = [sorted(sum((batch["ids"] for batch in loader), [])) for loader in loaders]
    assert decodes() == TRAIN + VAL
    again = [sorted(sum((batch["ids"] for batch in loader), [])) for loader in loaders]
    assert decodes() == TRAIN + VAL and again == seen  # every image again, none decoded again
    data.teardown("fit")
    assert data._decoded == {}


def test_over_the_limit_what_fits_is_kept_the_rest_decoded_and_a_notice_says_so(imagefolder_root, decodes, capsys):
    per_image = 3 * PREP.crop_size**2
    data = _folder(imagefolder_root, cache_gb=100 * per_image / 2**30)
    for loader in (data.train_dataloader(), data.val_dataloader()):
        list(loader), list(loader)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("data.decoded_cache_gb=" in line for line in lines)
    assert f"holds 100 of {TRAIN}, the other {TRAIN - 100} are decoded again every epoch" in lines[0]
    assert f"holds 0 of {VAL}" in lines[1]  # the training images took the whole limit
    assert decodes() == 2 * (TRAIN + VAL) - 100

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoded_cache, "free_memory", lambda shared: 10 * per_image)
        _folder(imagefolder_root, cache_gb=1.0).train_dataloader()
    assert "free memory holds 10 of" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_a_negative_limit_is_a_config_error(imagefolder_root, bad):
    with pytest.raises(ConfigError, match="data.decoded_cache_gb"):
        ImageFolderDataModule(str(imagefolder_root), decoded_cache_gb=bad)


def test_fit_over_the_limit_trains_and_says_so_on_stderr(tmp_path, imagefolder_root, offline_env):
    limit = 50 * 3 * 32 * 32 / 2**30  # 50 images at the tiny backbone's 32 px
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", *TINY_IMAGE_BACKBONE,
        "--data=transfer_cli.data.ImageFolderDataModule", f"--data.init_args.root={imagefolder_root}",
        f"--data.init_args.decoded_cache_gb={limit}",
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path / 'runs'}",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "transfer: the train images decoded at the input size need" in result.stderr
    assert "holds 50 of 270, the other 220 are decoded again every epoch" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_a_frozen_feature_pass_keeps_no_decoded_images(imagefolder_root, monkeypatch):
    import transfer_cli.data.base as base

    seen = {}
    monkeypatch.setattr(base, "cache_features", lambda trainer, backbone, loaders: seen.update(loaders) or {})
    data = _folder(imagefolder_root, cache_gb=1.0)
    data.use_cached_features(SimpleNamespace(limit_val_batches=1.0), backbone=None)
    assert set(seen) == {"train", "val"}  # features are computed in one pass: nothing to decode again
    assert all(type(loader.dataset) is images.ImageFiles for loader in seen.values())


def test_augmenting_uint8_pixels_moves_them_as_augmenting_floats_does():
    pixels = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    torch.manual_seed(3)
    moved = random_crop_flip(pixels, padding=3)
    torch.manual_seed(3)
    as_floats = random_crop_flip(pixels.float(), padding=3)
    assert moved.dtype == torch.uint8 and torch.equal(moved, as_floats.to(torch.uint8))
