"""Every datamodule keeps the one contract the CLI relies on (transfer_cli.data.base.TransferDataModule):
building it reads nothing but what states the class names, each stage reads only its own files, the
seeded train/val split is the one earlier versions made, and cached features are served by the data."""

import builtins
import hashlib
import inspect
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from test_huggingface import make_tiny_bert

import transfer_cli.data as data_package
from transfer_cli.backbones import HuggingFaceBackbone, ImagePreprocessing, TorchvisionBackbone
from transfer_cli.callbacks.finetuning import FinetuningPolicy
from transfer_cli.data import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    MNLIDataModule,
    TextClassificationDataModule,
    TransferDataModule,
)
from transfer_cli.feature_cache import FeatureBatches
from transfer_cli.model import TransferModel

from conftest import two_class_folder

PREP = ImagePreprocessing(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
ALL = [CIFAR10DataModule, ImageFolderDataModule, MNLIDataModule, TextClassificationDataModule]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> HuggingFaceBackbone:
    return HuggingFaceBackbone(str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))))


def test_every_exported_datamodule_is_under_contract():
    exported = {c for c in vars(data_package).values() if inspect.isclass(c) and issubclass(c, L.LightningDataModule)}
    assert exported - {TransferDataModule} == set(ALL)  # a new datamodule joins the parametrized tests below


@pytest.mark.parametrize("cls", ALL)
def test_machine_specific_parameters_are_declared_by_each_datamodule(cls):
    assert issubclass(cls, TransferDataModule)
    parameters = inspect.signature(cls.__init__).parameters
    assert "root" in cls.machine_specific and set(cls.machine_specific) <= set(parameters)
    assert ("download" in cls.machine_specific) == ("download" in parameters)


def _file_system_uses(build, monkeypatch) -> tuple[object, list]:
    """What `build()` returns, and the file-system calls (stat, listing, opening) it made."""
    uses = []
    with monkeypatch.context() as patch:
        for module, name in [(os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (builtins, "open")]:
            real = getattr(module, name)
            patch.setattr(
                module, name, lambda *a, _real=real, _name=name, **k: uses.append((_name, a[:1])) or _real(*a, **k)
            )
        built = build()
    return built, uses


@pytest.mark.parametrize("cls", ALL)
def test_building_a_datamodule_with_its_classes_stated_touches_no_file(cls, tmp_path, monkeypatch):
    # A root that does not exist: a checkpoint restored elsewhere, or data that prepare_data will download.
    data, uses = _file_system_uses(lambda: cls(root=str(tmp_path / "absent"), class_names=["a", "b"]), monkeypatch)
    assert uses == [] and data.class_names == ["a", "b"]


def test_cifar_states_its_ten_classes_without_reading_the_data(cifar_root, monkeypatch):
    data, uses = _file_system_uses(lambda: CIFAR10DataModule(str(cifar_root)), monkeypatch)
    assert uses == []
    assert data.class_names == data.data_class_names()  # what batches.meta says, read only when asked
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10


# Each builds a datamodule on real data (`roots`: the test data fixtures), ready for setup.


def _cifar(roots, tmp_path, tiny):
    return CIFAR10DataModule(str(roots["cifar"]))


def _image_folder(roots, tmp_path, tiny):
    data = ImageFolderDataModule(str(roots["cifar"] / "imagefolder_jpg"), num_workers=0)
    data.use_preprocessing(PREP)
    return data


def _mnli(roots, tmp_path, tiny):
    data = MNLIDataModule(str(roots["mnli"] / "fastnlp_fixture"))
    data.connect(tiny)
    return data


def _text_files(roots, tmp_path, tiny):
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        rows = "".join(f"row {i} of {split},{'xy'[i % 2]}\n" for i in range(count))
        (tmp_path / f"{split}.csv").write_text("text,label\n" + rows)
    data = TextClassificationDataModule(str(tmp_path), class_names=["x", "y"])
    data.connect(tiny)
    return data


# The files each stage may open, by the last part of their path.
STAGE_FILES = {
    _cifar: {"fit": {"data_batch_"}, "validate": {"data_batch_"}, "test": {"test_batch"}},
    _image_folder: {"fit": {"train"}, "validate": {"train"}, "test": {"test"}},  # no val/: part of train validates
    _mnli: {"fit": {"train.tsv", "dev_matched.tsv"}, "validate": {"dev_matched.tsv"}, "test": {"dev_mismatched.tsv"}},
    _text_files: {"fit": {"train.csv", "val.csv"}, "validate": {"val.csv"}, "test": {"test.csv"}},
}


def _opened_in(stage_setup, monkeypatch) -> set[Path]:
    opened: set[Path] = set()
    real_open = builtins.open

    def recording_open(path, *args, **kwargs):
        if isinstance(path, (str, Path)):
            opened.add(Path(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", recording_open)
        stage_setup()
    return opened


def _matches(path: Path, allowed: set[str]) -> bool:
    return any(part.startswith(name) for part in path.parts[-3:] for name in allowed)


@pytest.mark.parametrize("make", list(STAGE_FILES), ids=lambda m: m.__name__.strip("_"))
@pytest.mark.parametrize("stage", ["predict", "test", "validate", "fit"])
def test_each_stage_opens_only_its_own_files(make, stage, cifar_root, mnli_root, tmp_path, tiny, monkeypatch):
    data = make({"cifar": cifar_root, "mnli": mnli_root}, tmp_path, tiny)
    opened = _opened_in(lambda: data.setup(stage), monkeypatch)
    allowed = STAGE_FILES[make].get(stage, set())
    assert all(_matches(path, allowed) for path in opened), sorted(opened)
    assert bool(opened) == bool(allowed)  # predict reads its --input later, as it streams


def test_the_seeded_split_is_the_one_earlier_versions_made(cifar_root, tmp_path):
    # Recorded with the code before the datamodules shared one base: a checkpoint's validation
    # images must stay the ones it was validated on.
    cifar = CIFAR10DataModule(str(cifar_root), val_fraction=0.1, seed=7)
    cifar.setup("validate")
    val = cifar._splits["val"]
    assert len(val) == 250 and val.labels[:12].tolist() == [3, 5, 4, 0, 7, 8, 5, 3, 1, 6, 6, 4]
    assert hashlib.sha256(val.images.numpy().tobytes()).hexdigest()[:16] == "0b5f9e3e99324eb1"

    folder = ImageFolderDataModule(str(cifar_root / "imagefolder_jpg"), val_fraction=0.1, seed=42, num_workers=0)
    folder.setup("validate")
    held_out = [str(p.relative_to(cifar_root / "imagefolder_jpg" / "train")) for p in folder._splits["val"].paths]
    assert held_out[:6] == ["automobile/0012.jpg", "bird/0001.jpg", "truck/0016.jpg", "dog/0010.jpg",
                            "automobile/0000.jpg", "ship/0025.jpg"]  # fmt: skip
    assert len(held_out) == 30 and held_out[-1] == "automobile/0026.jpg"

    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    text = TextClassificationDataModule(str(tmp_path), val_fraction=0.25, seed=3)
    assert [t for (t,) in text.split_rows("val").texts] == ["row 6", "row 12", "row 3", "row 7", "row 1"]


class _SeesTheLoader(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.loader = trainer.train_dataloader


def test_the_datamodule_serves_cached_features_and_drops_them_after_fit(imagefolder_root, tmp_path):
    root = two_class_folder(imagefolder_root, tmp_path / "images", per_class=8)
    data = ImageFolderDataModule(str(root), augment=False, num_workers=0, batch_size=4)
    model = TransferModel(TorchvisionBackbone("resnet18", weights=None, image_size=32), data.class_names)
    data.connect(model.backbone)
    seen = _SeesTheLoader()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[FinetuningPolicy(strategy="frozen"), seen],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert isinstance(seen.loader, FeatureBatches) and seen.loader.features.shape == (14, 512)
    # The datamodule's own methods served them: none was replaced on the instance.
    assert not {"train_dataloader", "val_dataloader"} & set(vars(data))
    assert isinstance(data.train_dataloader(), torch.utils.data.DataLoader)  # cache released at teardown


def test_the_finetuning_callback_keeps_its_old_import_path():
    from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning

    from transfer_cli.finetuning import BackboneFinetuning

    assert BackboneFinetuning is FinetuningPolicy and FinetuningPolicy is not LightningBackboneFinetuning
