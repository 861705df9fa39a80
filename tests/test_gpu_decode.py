"""data.decode_on=device: workers read bytes, the batch's JPEGs are decoded together on the device.

No GPU here or in CI: the device is the CPU, which runs the very code path (decode_jpeg takes a list
and a device on the CPU too; only the decoder behind it is libjpeg-turbo instead of nvjpeg).
"""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import transfer_cli.data.device_decode as device_decode
from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data import ImageFolderDataModule
from transfer_cli.errors import EXIT_DATA

from conftest import TINY_IMAGE_BACKBONE, run_transfer

# 32 px JPEGs to 40 px via 46: every image is resampled and cropped after decoding.
PREP = ImagePreprocessing(crop_size=40, resize_size=46, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
CPU = torch.device("cpu")


def _folder(root, decode_on: str, cache_gb: float = 0, workers: int = 0) -> ImageFolderDataModule:
    data = ImageFolderDataModule(
        str(root), batch_size=32, num_workers=workers, decode_on=decode_on, decoded_cache_gb=cache_gb
    )
    data.use_preprocessing(PREP)
    data.setup("fit")
    return data


def _epoch(data: ImageFolderDataModule, split: str, seed: int) -> list[dict]:
    torch.manual_seed(seed)  # the shuffle's order, as Lightning's seed_everything fixes it per run
    return [data.transfer_batch_to_device(batch, CPU, 0) for batch in data.split_loader(split)]


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal within what two JPEG decoders may differ by, image by image.

    The IDCT and the chroma upsampling are not fixed bit for bit by the JPEG standard: libjpeg-turbo
    versions, libjpeg 9's smart upsampling and nvjpeg differ by a grey level or two on some pixels,
    most at sharp colour edges. Allowed: a mean difference of at most half a grey level and at most
    1% of the values more than 2 apart. A swapped channel, a crop off by one pixel or a rotated
    photo are tens of grey levels on most pixels. (With the same libjpeg-turbo, here, they are equal.)
    """
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    for x, y in zip(a, b):
        diff = (x.int() - y.int()).abs()
        assert diff.float().mean() <= 0.5 and (diff > 2).float().mean() <= 0.01, diff.float().mean()


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decoding_gives_the_images_labels_and_order_of_worker_decoding(imagefolder_root, workers):
    device, plain = _folder(imagefolder_root, "device", workers=workers), _folder(imagefolder_root, "workers")
    for split in ("val", "train"):
        ours, theirs = _epoch(device, split, seed=3), _epoch(plain, split, seed=3)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert a["ids"] == b["ids"] and torch.equal(a["labels"], b["labels"])
            assert_same_images(a["inputs"], b["inputs"])
            assert set(a) == set(b)  # nothing of the encoded batch is left for the model to trip over


def test_the_device_decoder_gets_every_jpeg_of_a_batch_in_one_call(imagefolder_root, monkeypatch):
    import torchvision.io

    calls = []
    real = torchvision.io.decode_jpeg

    def counted(data, **options):
        calls.append(len(data) if isinstance(data, list) else "one image")
        return real(data, **options)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counted)
    batches = _epoch(_folder(imagefolder_root, "device"), "train", seed=0)
    assert calls == [len(b["ids"]) for b in batches]  # every image of the shared folder is a plain JPEG


def test_the_cache_wins_images_decoded_on_the_device_are_kept_and_not_decoded_again(imagefolder_root):
    data = _folder(imagefolder_root, "device", cache_gb=1.0, workers=2)
    loader = data.split_loader("train")
    first = [data.transfer_batch_to_device(b, CPU, 0) for b in loader]
    raw = list(loader)  # epoch 2, before the transfer: what the workers handed out
    assert all(b["encoded"] == [] and len(b["decoded_at"]) == len(b["ids"]) for b in raw)
    kept = {i: img for b in first for i, img in zip(b["ids"], b["inputs"])}
    again = {i: img for b in raw for i, img in zip(b["ids"], b["decoded"])}
    assert kept.keys() == again.keys() and all(torch.equal(kept[i], again[i]) for i in kept)


def _mixed_folder(imagefolder_root: Path, root: Path) -> dict[str, str]:
    """Two classes of the shared JPEGs, some turned into what the device decoder does not take."""
    made = {}
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for src in sorted((imagefolder_root / "train" / name).iterdir())[:20]:
            shutil.copy(src, root / "train" / name / src.name)
    cats = sorted((root / "train" / "cat").iterdir())
    png = cats[0].with_suffix(".png")
    Image.open(cats[0]).save(png)
    cats[0].unlink()
    made["png"] = str(png)
    exif = Image.Exif()
    exif[device_decode.EXIF_ORIENTATION] = 6  # shown turned a quarter
    Image.open(cats[1]).save(cats[1], exif=exif, quality=95)
    made["rotated"] = str(cats[1])
    Image.open(cats[2]).convert("CMYK").save(cats[2], quality=95)
    made["cmyk"] = str(cats[2])
    Image.open(cats[3]).convert("L").save(cats[3], quality=95)
    made["grey"] = str(cats[3])  # decodable on the device: grey becomes three equal channels there
    return made


def test_png_cmyk_and_rotated_jpegs_are_decoded_in_the_workers_the_rest_on_the_device(imagefolder_root, tmp_path):
    made = _mixed_folder(imagefolder_root, tmp_path)
    device, plain = _folder(tmp_path, "device"), _folder(tmp_path, "workers")
    torch.manual_seed(0)
    raw = [b for b in device.split_loader("train")]
    on_cpu = {b["ids"][i] for b in raw for i in b["decoded_at"]}
    assert on_cpu == {made["png"], made["rotated"], made["cmyk"]}
    for a, b in zip(_epoch(device, "train", seed=5), _epoch(plain, "train", seed=5), strict=True):
        assert a["ids"] == b["ids"] and torch.equal(a["labels"], b["labels"])
        assert_same_images(a["inputs"], b["inputs"])


def _bogus_huffman_table(path: Path) -> None:
    """A JPEG whose header reads and whose end marker is there, but whose decoding fails."""
    data = bytearray(path.read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16  # code counts far over what 8-bit codes can hold
    path.write_bytes(data)


@pytest.mark.slow
def test_fit_decodes_on_the_device_from_the_cli_and_a_corrupt_jpeg_is_a_data_error(
    imagefolder_root, tmp_path, offline_env
):
    made = _mixed_folder(imagefolder_root, tmp_path / "data")

    def fit(*extra: str):
        return run_transfer(
            "fit", "--config", "resnet50-cifar10", "--config", "debug", *TINY_IMAGE_BACKBONE,
            "--data=transfer_cli.data.ImageFolderDataModule", f"--data.init_args.root={tmp_path / 'data'}",
            "--data.init_args.decode_on=device", "--data.init_args.num_workers=1", "--data.init_args.batch_size=64",
            *extra,
            f"--trainer.default_root_dir={tmp_path / 'runs'}", cwd=tmp_path, env=offline_env,
        )  # fmt: skip

    result = fit("--trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr

    bad = Path(sorted((tmp_path / "data" / "train" / "dog").iterdir())[0])
    _bogus_huffman_table(bad)
    assert device_decode.device_decodable(bad)  # passes the header check: fails on the device
    result = fit("--trainer.max_epochs=1")
    assert result.returncode == EXIT_DATA, result.stderr
    assert f"Cannot read image {bad}: Bogus Huffman table definition (decoded on cpu)." in result.stderr
    assert "Remove or replace the file." in result.stderr and "Traceback" not in result.stderr
    assert made["png"] not in result.stderr


@pytest.mark.slow
def test_an_unknown_place_to_decode_is_a_usage_error(imagefolder_root, tmp_path, offline_env):
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", *TINY_IMAGE_BACKBONE,
        "--data=transfer_cli.data.ImageFolderDataModule", f"--data.init_args.root={imagefolder_root}",
        "--data.init_args.decode_on=gpu", cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 2 and "decode_on" in result.stderr and "Traceback" not in result.stderr
