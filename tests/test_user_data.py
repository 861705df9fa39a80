"""Images and text as users have them: phone photos with EXIF orientation, oversized images, hidden
files beside the data, a single class, evaluation folders without train/, and long CSV/TSV fields
with Windows line endings and a BOM."""

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_huggingface import make_tiny_bert

from transfer_cli.backbones import ImagePreprocessing
from transfer_cli.data import CIFAR10DataModule, ImageFolderDataModule, TextClassificationDataModule
from transfer_cli.data.image_ops import read_image, resize_center_crop
from transfer_cli.data.images import list_image_inputs
from transfer_cli.errors import ConfigError, DataError

from conftest import TINY_IMAGE_BACKBONE, run_transfer

PREP = ImagePreprocessing(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
ORIENTATION = 0x0112  # the EXIF tag that phones set instead of rotating the pixels


def _assert_clean_failure(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def _image_folder(root: Path, source: Path, splits=("train",), classes=("cat", "dog"), per_class: int = 6) -> Path:
    """root/<split>/<class>/*.jpg with real CIFAR-10 JPEGs copied from the shared folder."""
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for jpg in sorted((source / "train" / name).glob("*.jpg"))[:per_class]:
                shutil.copy(jpg, root / split / name / jpg.name)
    return root


def _sideways_photo(source: Path, target: Path, orientation: int = 6) -> np.ndarray:
    """A real image saved as a phone does: pixels as the sensor saw them, plus an EXIF Orientation
    tag. Returns the RGB array a viewer shows (the tag applied)."""
    real = Image.open(source / "train" / "cat" / "0003.jpg").convert("RGB").crop((0, 0, 32, 20))  # not square
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    real.save(target, exif=exif.tobytes(), quality=95)
    with Image.open(target) as saved:
        shown = np.array(ImageOps.exif_transpose(saved).convert("RGB"))
    assert shown.shape == (32, 20, 3)  # rotated: a 32 wide, 20 high picture stands upright
    return shown


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A complete, valid 1-bit PNG of side x side pixels: beyond PIL's decompression-bomb limit, yet
    only a few kilobytes on disk, as a hostile or broken upload would be."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * (side // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    assert path.stat().st_size < 200_000
    return path


def _fit_images(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={root}", *TINY_IMAGE_BACKBONE,
        "--finetuning.strategy=frozen", "--data=transfer_cli.data.ImageFolderDataModule",
        "--data.init_args.num_workers=0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, imagefolder_root, env):
    """A tiny cat/dog checkpoint trained through the CLI, shared by the predict and evaluate tests."""
    cwd = tmp_path_factory.mktemp("trained")
    root = _image_folder(cwd / "images", imagefolder_root)
    result = run_transfer(*_fit_images(root), cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    return {
        **os.environ,
        "TORCH_HOME": str(home / "torch_home"),
        "HF_HOME": str(home / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# 1. EXIF orientation ---------------------------------------------------------------------------


def test_exif_orientation_is_applied_when_decoding_for_training(tmp_path, imagefolder_root):
    root = _image_folder(tmp_path / "images", imagefolder_root, per_class=3)
    photo = root / "train" / "cat" / "phone.jpg"
    shown = _sideways_photo(imagefolder_root, photo)
    decoded = read_image(photo)
    assert decoded.shape == (3, 32, 20)
    torch.testing.assert_close(decoded, torch.from_numpy(shown).permute(2, 0, 1), rtol=0, atol=0)

    data = ImageFolderDataModule(str(root), val_fraction=0.0001, num_workers=0)  # at least one image validates
    data.use_preprocessing(PREP)
    data.setup("fit")
    train = data._splits["train"]
    item = train[train.paths.index(photo)]["inputs"]
    expected = resize_center_crop(torch.from_numpy(shown).permute(2, 0, 1).contiguous(), 32, 32, "bilinear")
    torch.testing.assert_close(item, expected, rtol=0, atol=0)


def test_exif_orientation_is_applied_in_predict(tmp_path, trained, imagefolder_root, env):
    photos = tmp_path / "photos"
    photos.mkdir()
    shown = _sideways_photo(imagefolder_root, photos / "a-phone.jpg", orientation=8)
    Image.fromarray(shown).save(photos / "b-upright.png")  # lossless: exactly what a viewer shows
    result = run_transfer("predict", "--ckpt", trained, "--input", photos, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    phone, upright = _rows(result.stdout)
    assert phone["input"].endswith("a-phone.jpg") and upright["input"].endswith("b-upright.png")
    assert phone["topk"] == upright["topk"]  # the same picture, so the same scores


# 2. Decompression bombs ------------------------------------------------------------------------


def test_an_oversized_image_is_a_data_error_in_fit(tmp_path, imagefolder_root, env):
    root = _image_folder(tmp_path / "images", imagefolder_root)
    bomb = _bomb_png(root / "train" / "dog" / "huge.png")
    result = run_transfer(*_fit_images(root), cwd=tmp_path, env=env)
    _assert_clean_failure(result, 3, str(bomb), "pixels")
    assert not (tmp_path / "runs").exists()


def test_an_oversized_image_is_a_data_error_in_predict(tmp_path, trained, imagefolder_root, env):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(imagefolder_root / "test" / "cat" / "0000.jpg", photos / "a.jpg")
    bomb = _bomb_png(photos / "b.png")
    with pytest.raises(DataError, match="b.png"):
        read_image(bomb)
    result = run_transfer("predict", "--ckpt", trained, "--input", photos, cwd=tmp_path, env=env)
    _assert_clean_failure(result, 3, "b.png", "pixels")


# 3. Hidden folders and files -------------------------------------------------------------------


def _litter(root: Path) -> None:
    """What notebooks, git, macOS and editors leave beside images, at every depth."""
    junk = b"\x00\x05\x16\x07 not an image"
    for folder in (root / ".ipynb_checkpoints", root / ".git" / "objects", root / "cat" / ".thumbs"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "x.jpg").write_bytes(junk)
    (root / ".DS_Store").write_bytes(junk)
    (root / "cat" / ".DS_Store").write_bytes(junk)
    (root / "cat" / "._0000.jpg").write_bytes(junk)  # AppleDouble resource fork, with the photo's suffix
    shutil.copy(next((root / "cat").glob("0*.jpg")), root / "cat" / ".hidden-copy.jpg")


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path, imagefolder_root):
    root = _image_folder(tmp_path / "images", imagefolder_root, splits=("train", "test"), per_class=3)
    _litter(root / "train")
    _litter(root / "test")
    data = ImageFolderDataModule(str(root), num_workers=0)
    assert data.class_names == ["cat", "dog"]
    assert data.data_class_names() == ["cat", "dog"]
    data.use_preprocessing(PREP)
    data.setup("fit")
    data.setup("test")
    for split in ("train", "val", "test"):
        for path in data._splits[split].paths:
            assert not any(part.startswith(".") for part in path.relative_to(root).parts), path
    assert sum(len(data._splits[s]) for s in ("train", "val")) == 6

    predicted = list_image_inputs(str(root / "test"))
    assert [p.relative_to(root / "test").as_posix() for p in predicted] == [
        f"{c}/{p.name}" for c in ("cat", "dog") for p in sorted((root / "test" / c).glob("0*.jpg"))
    ]


def test_a_hidden_file_given_by_name_is_still_predicted(tmp_path, imagefolder_root):
    hidden = tmp_path / ".photo.jpg"
    shutil.copy(imagefolder_root / "test" / "cat" / "0000.jpg", hidden)
    assert list_image_inputs(str(hidden)) == [hidden]


# 4. A single class -----------------------------------------------------------------------------


def test_a_single_image_class_exits_3(tmp_path, imagefolder_root, env):
    root = _image_folder(tmp_path / "images", imagefolder_root, classes=("cat",))
    result = run_transfer(*_fit_images(root), cwd=tmp_path, env=env)
    _assert_clean_failure(result, 3, "one class", "cat", str(root / "train"))
    assert not (tmp_path / "runs").exists()


def test_a_single_text_label_is_a_data_error(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nfine,pos\ngreat,pos\n")
    with pytest.raises(DataError, match=r"one class.*'pos'"):
        TextClassificationDataModule(str(tmp_path))


def test_a_single_class_given_by_name_is_a_config_error():
    with pytest.raises(ConfigError, match="at least two classes"):
        TextClassificationDataModule(class_names=["pos"])
    with pytest.raises(ConfigError, match="at least two classes"):
        ImageFolderDataModule(class_names=["cat"])


# 5. Evaluating on a folder with only the split it needs ----------------------------------------


def test_test_reads_only_the_test_split(tmp_path, trained, imagefolder_root, env):
    root = _image_folder(tmp_path / "only-test", imagefolder_root, splits=("test",))
    _litter(root / "test")
    result = run_transfer(
        "test", "--ckpt", trained, "--data=transfer_cli.data.ImageFolderDataModule", f"--data.root={root}",
        "--data.init_args.num_workers=0", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_acc" in result.stderr


def test_validate_on_a_val_folder_with_a_subset_of_the_classes(tmp_path, trained, imagefolder_root, env):
    root = _image_folder(tmp_path / "only-val", imagefolder_root, splits=("val",), classes=("dog",))
    result = run_transfer(
        "validate", "--ckpt", trained, "--data=transfer_cli.data.ImageFolderDataModule", f"--data.root={root}",
        "--data.init_args.num_workers=0", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_acc" in result.stderr


def test_an_evaluation_class_the_checkpoint_does_not_know_exits_4(tmp_path, trained, imagefolder_root, env):
    root = _image_folder(tmp_path / "other", imagefolder_root, splits=("test",), classes=("cat", "frog"))
    result = run_transfer(
        "test", "--ckpt", trained, "--data=transfer_cli.data.ImageFolderDataModule", f"--data.root={root}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    _assert_clean_failure(result, 4, "classes differ", "frog")


def test_each_stage_reads_only_its_splits(tmp_path, imagefolder_root):
    only_test = _image_folder(tmp_path / "t", imagefolder_root, splits=("test",), per_class=2)
    data = ImageFolderDataModule(str(only_test), class_names=["cat", "dog"], num_workers=0)
    data.use_preprocessing(PREP)
    data.setup("test")
    assert len(data._splits["test"]) == 4 and "train" not in data._splits
    with pytest.raises(DataError, match="train"):
        data.setup("fit")
    with pytest.raises(DataError, match="val"):
        data.setup("validate")

    full = _image_folder(tmp_path / "f", imagefolder_root, per_class=5)
    fitted = ImageFolderDataModule(str(full), val_fraction=0.3, seed=3, num_workers=0)
    fitted.use_preprocessing(PREP)
    fitted.setup("fit")
    validated = ImageFolderDataModule(str(full), class_names=["cat", "dog"], val_fraction=0.3, seed=3, num_workers=0)
    validated.use_preprocessing(PREP)
    validated.setup("validate")
    assert validated._splits["val"].paths == fitted._splits["val"].paths  # the same held-out images as in fit
    assert "train" not in validated._splits
    with pytest.raises(DataError, match="test"):
        validated.setup("test")


def test_cifar_test_needs_only_the_test_batch(tmp_path, cifar_root):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in ("batches.meta", "test_batch"):
        (batches / name).symlink_to(cifar_root / "cifar-10-batches-py" / name)
    data = CIFAR10DataModule(str(tmp_path))
    data.setup("test")
    assert len(data._splits["test"]) == 1000 and "train" not in data._splits
    with pytest.raises(DataError, match="data_batch_1"):
        data.setup("validate")


# 6. Text as users have it ----------------------------------------------------------------------

LONG = 200_000


def _long_text(seed: int) -> str:
    words = ["the", "cat", "is", "not", "a", "dog", "and", "it", "was", "there"]
    rng = np.random.default_rng(seed)
    text = " ".join(words[i] for i in rng.integers(0, len(words), LONG // 3))
    return text[:LONG]


def _write_table(path: Path, rows: list[tuple[str, str, str]], sep: str) -> None:
    """Windows line endings and a UTF-8 BOM, as Excel writes them."""
    lines = [sep.join(("id", "review", "sentiment"))] + [sep.join(r) for r in rows]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_fields_longer_than_the_csv_limit_are_read_and_truncated(tmp_path, env, suffix, sep):
    model = make_tiny_bert(tmp_path / "tiny-bert")
    data = tmp_path / "reviews"
    data.mkdir()
    train = [("t1", _long_text(1), "pos"), ("t2", "loved it", "pos"), ("t3", "a joy", "pos")]
    train += [("t4", _long_text(2), "neg"), ("t5", "boring plot", "neg"), ("t6", "never again", "neg")]
    _write_table(data / f"train{suffix}", train, sep)
    _write_table(data / f"val{suffix}", [("v1", "great", "pos"), ("v2", _long_text(3), "neg")], sep)
    assert len(_long_text(1)) == LONG > 131072  # Python's csv module refuses fields over 131072 by default

    fit = run_transfer(
        "fit", "--config", "bert-mnli", "--config", "debug", "--data=transfer_cli.data.TextClassificationDataModule",
        f"--data.root={data}", "--data.init_args.text_columns=[review]", "--data.init_args.label_column=sentiment",
        f"--model.init_args.backbone.init_args.model={model}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "train: 6 examples, 2 truncated to max_length 128" in fit.stderr
    assert "val: 2 examples, 1 truncated to max_length 128" in fit.stderr
    ckpt = tmp_path / "runs" / "bert-mnli" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["transfer"]["class_names"] == ["neg", "pos"]  # no "\r", no BOM

    predicted = run_transfer("predict", "--ckpt", ckpt, "--input", data / f"train{suffix}", cwd=tmp_path, env=env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert [r["input"] for r in _rows(predicted.stdout)] == ["t1", "t2", "t3", "t4", "t5", "t6"]


def test_jsonl_with_integer_labels_crlf_and_bom(tmp_path):
    lines = [json.dumps({"text": t, "label": y}) for t, y in [("good", 1), ("bad", 0), ("fine", 1), ("awful", 0)]]
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    data = TextClassificationDataModule(str(tmp_path), val_fraction=0.25)
    assert data.class_names == ["0", "1"]
    rows = data.split_rows("train")  # three of the four: one is held out for validation
    labelled = {texts[0]: label for texts, label in zip(rows.texts, rows.labels)}
    assert len(labelled) == 3
    assert all(labelled[t] == {"good": 1, "fine": 1, "bad": 0, "awful": 0}[t] for t in labelled)


def test_a_jsonl_text_that_is_not_a_string_names_the_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": ["x", "y"], "label": "b"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2.*'text'"):
        TextClassificationDataModule(str(tmp_path))
