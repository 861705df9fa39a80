"""restore(): a checkpoint path in, the model with its weights, the data config without the values that
belong to the training machine, class names and preprocessing out, read once and never downloading."""

import shutil
from pathlib import Path

import pytest
import torch
from test_huggingface import make_tiny_bert

from transfer_cli.checkpoint import config_from_checkpoint, read_checkpoint
from transfer_cli.data import CIFAR10DataModule, MNLIDataModule
from transfer_cli.errors import CheckpointError
from transfer_cli.restore import restore

from conftest import TINY_IMAGE_BACKBONE

TRANSFER_MODEL = "transfer_cli.model.TransferModel"


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory, cifar_root) -> Path:
    """A checkpoint written by the real CLI, fitted in this process (one batch) to spare a start-up."""
    from transfer_cli.cli import run

    cwd = tmp_path_factory.mktemp("image")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        run(["fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
             "--finetuning.strategy=frozen", *TINY_IMAGE_BACKBONE, "--trainer.limit_train_batches=1",
             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])  # fmt: skip
    return cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory, mnli_root) -> Path:
    """A text checkpoint as CheckpointMetadata writes it, built in-process from a tiny BERT directory
    that is deleted afterwards: the checkpoint alone must rebuild model and tokenizer."""
    from transfer_cli.backbones import HuggingFaceBackbone
    from transfer_cli.model import TransferModel

    where = tmp_path_factory.mktemp("bert")
    model_dir = make_tiny_bert(where / "tiny-bert")
    backbone_config = {
        "class_path": "transfer_cli.backbones.HuggingFaceBackbone",
        "init_args": {"model": str(model_dir)},
    }
    model = TransferModel(HuggingFaceBackbone(str(model_dir)), ["entailment", "neutral", "contradiction"])
    checkpoint = {
        "state_dict": model.state_dict(),
        "transfer": {
            "format_version": 1,
            "model": {"class_path": TRANSFER_MODEL, "init_args": {"backbone": backbone_config}},
            "data": {
                "class_path": "transfer_cli.data.MNLIDataModule",
                "init_args": {"root": str(mnli_root), "download": False, "max_length": 64, "batch_size": 4},
            },
            "class_names": model.class_names,
            "backbone_offline_init_args": model.backbone.offline_init_args(),
            "preprocessing": None,
        },
    }
    path = where / "bert.ckpt"
    torch.save(checkpoint, path)
    shutil.rmtree(model_dir)
    return path


def test_an_image_checkpoint_restores_model_weights_classes_and_preprocessing(image_ckpt, offline_env):
    restored = restore(image_ckpt)
    stored = restored.checkpoint["transfer"]
    assert restored.class_names == stored["class_names"] and len(restored.class_names) == 10
    assert restored.preprocessing.crop_size == stored["preprocessing"]["crop_size"] == 32
    # Datamodules declare root and download machine-specific: kept aside, not in the config.
    assert restored.machine_specific == {"root": stored["data"]["init_args"]["root"], "download": False}
    assert "root" not in restored.data_config["init_args"] and "download" not in restored.data_config["init_args"]

    model = restored.build_model()
    assert not model.training and {p.device.type for p in model.parameters()} == {"cpu"}
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in restored.checkpoint["state_dict"].items())

    data = restored.build_datamodule(predict_input="-", batch_size=3)
    restored.connect(data, model)
    assert isinstance(data, CIFAR10DataModule) and data.root is None and data.batch_size == 3
    assert data.class_names == restored.class_names and data.preprocessing == restored.preprocessing


def test_rebuilding_never_reaches_for_pretrained_weights(image_ckpt, tmp_path, offline_env):
    # A recipe asks for ImageNet weights; the checkpoint has its own, so none may be looked for.
    checkpoint = torch.load(image_ckpt, weights_only=True)
    checkpoint["transfer"]["model"]["init_args"]["backbone"]["init_args"]["weights"] = "DEFAULT"
    torch.save(checkpoint, tmp_path / "default-weights.ckpt")

    model = restore(tmp_path / "default-weights.ckpt").build_model()
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in checkpoint["state_dict"].items())
    assert not any(Path(offline_env["TORCH_HOME"]).rglob("*.pth"))


def test_a_text_checkpoint_restores_its_tokenizer_without_the_model_directory(bert_ckpt, mnli_root, offline_env):
    restored = restore(bert_ckpt)
    assert restored.machine_specific == {"root": str(mnli_root), "download": False}
    assert restored.preprocessing is None
    model = restored.build_model()
    data = restored.build_datamodule(predict_input=str(mnli_root / "fastnlp_fixture" / "dev_matched.tsv"))
    restored.connect(data, model)
    assert isinstance(data, MNLIDataModule) and data.max_length == 64 and data.root is None
    tokens = model.backbone.tokenizer(["the cat is here"], return_tensors="pt")
    assert model(dict(tokens)).shape == (1, 3)


def test_the_machine_specific_values_are_the_ones_the_datamodule_declares(bert_ckpt, mnli_root, monkeypatch):
    # Another declaration: `max_length` belongs to this machine, `root` and `download` no longer do.
    monkeypatch.setattr(MNLIDataModule, "machine_specific", ("max_length",))
    restored = restore(bert_ckpt)
    assert restored.machine_specific == {"max_length": 64}
    assert restored.data_config["init_args"]["root"] == str(mnli_root)

    config = config_from_checkpoint(read_checkpoint(bert_ckpt), keep_data_root=False)
    assert "max_length" not in config["data"]["init_args"] and config["data"]["init_args"]["root"] == str(mnli_root)
    config = config_from_checkpoint(read_checkpoint(bert_ckpt), keep_data_root=True)
    assert config["data"]["init_args"]["max_length"] == 64


def test_a_stored_config_this_installation_cannot_build_is_a_checkpoint_error(image_ckpt, tmp_path):
    checkpoint = torch.load(image_ckpt, weights_only=True)
    checkpoint["transfer"]["model"]["init_args"]["head_size"] = 7  # not a parameter of TransferModel
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    restored = restore(tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match=r"Cannot rebuild the model 'transfer_cli.model.TransferModel' .*foreign"):
        restored.build_model()


def _loads_during(args: list[str], cwd: Path, monkeypatch) -> list[str]:
    """The files torch.load opens while the CLI runs `args` in this process."""
    from transfer_cli.cli import run

    opened, load = [], torch.load

    def counting(f, *args, **kwargs):
        opened.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    monkeypatch.chdir(cwd)
    run(args)
    return opened


def test_predict_reads_the_checkpoint_once_and_not_the_training_data(
    image_ckpt, imagefolder_root, tmp_path, monkeypatch, capfd
):
    # The training data is gone on this machine: the stored root must not be looked at.
    checkpoint = torch.load(image_ckpt, weights_only=True)
    checkpoint["transfer"]["data"]["init_args"]["root"] = str(tmp_path / "gone")
    moved = tmp_path / "model.ckpt"
    torch.save(checkpoint, moved)
    image = next((imagefolder_root / "test").glob("*/*.jpg"))
    opened = _loads_during(["predict", "--ckpt", str(moved), "--input", str(image)], tmp_path, monkeypatch)
    assert opened == [str(moved)]
    assert capfd.readouterr().out.count("\n") == 1


def test_evaluating_from_a_ckpt_path_reads_it_once_before_the_trainer_does(
    image_ckpt, cifar_root, tmp_path, monkeypatch
):
    args = ["validate", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
            *TINY_IMAGE_BACKBONE, "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--ckpt_path", str(image_ckpt)]  # fmt: skip
    # Once to refuse an unsafe file before anything is built, once by the trainer to restore it.
    assert _loads_during(args, tmp_path, monkeypatch) == [str(image_ckpt)] * 2
