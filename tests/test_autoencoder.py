"""The autoencoder recipes: pretrain by reconstruction, reuse the encoder frozen under a linear head,
and predict from the classifier's checkpoint alone. Real CIFAR-10 subset, the real CLI, CPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from transfer_cli.autoencoder import Autoencoder, ConvEncoder
from transfer_cli.backbones import CheckpointBackbone
from transfer_cli.entry import main
from transfer_cli.errors import CheckpointError, ConfigError

from conftest import run_transfer

DEBUG = ("--config", "debug")
CHECKPOINT_OPTION = "--model.init_args.backbone.init_args.checkpoint"


def _ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _last_ckpt(cwd: Path, recipe: str) -> Path:
    (path,) = (cwd / "runs" / recipe).glob("version_*/checkpoints/last.ckpt")
    return path


def _state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_pretrain_then_frozen_classifier_then_predict_without_the_autoencoder(tmp_path, cifar_root, offline_env):
    data = ("--data.root", cifar_root)
    _ok(run_transfer("fit", "--config", "autoencoder-cifar10", *DEBUG, *data, cwd=tmp_path, env=offline_env))
    autoencoder_ckpt = _last_ckpt(tmp_path, "autoencoder-cifar10")
    assert list(autoencoder_ckpt.parent.parent.glob("reconstructions-epoch=*.png")), "no reconstruction grid"

    # The autoencoder checkpoint predicts embeddings: 100 numbers per image, the same for the same image.
    image = sorted((cifar_root / "imagefolder_jpg" / "test" / "cat").iterdir())[0]
    other = sorted((cifar_root / "imagefolder_jpg" / "test" / "ship").iterdir())[0]
    result = run_transfer(
        "predict",
        "--ckpt",
        autoencoder_ckpt,
        "--input",
        "-",
        cwd=tmp_path,
        env=offline_env,
        stdin=f"{image}\n{other}\n{image}\n",
    )
    _ok(result)
    rows = _rows(result.stdout)
    assert [r["input"] for r in rows] == [str(image), str(other), str(image)]
    assert all(len(r["embedding"]) == 100 for r in rows)
    same, different = torch.tensor([rows[0]["embedding"], rows[2]["embedding"], rows[1]["embedding"]]).split(2)
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-5)  # float order within a batch aside
    assert not torch.allclose(same[0], different[0])

    # A linear head on the frozen encoder, pointed at the autoencoder checkpoint with one option.
    # Augmentation on: the encoder then runs in every training step (no cached features), so the
    # check below proves the freezing itself, BatchNorm statistics included.
    result = run_transfer(
        "fit",
        "--config",
        "autoencoder-classifier-cifar10",
        *DEBUG,
        *data,
        "--data.init_args.augment=true",
        CHECKPOINT_OPTION,
        autoencoder_ckpt,
        cwd=tmp_path,
        env=offline_env,
    )
    _ok(result)
    classifier_ckpt = _last_ckpt(tmp_path, "autoencoder-classifier-cifar10")
    encoder = _state(autoencoder_ckpt, "backbone.")
    frozen = _state(classifier_ckpt, "backbone.encoder.")
    assert frozen.keys() == encoder.keys()
    assert any(k.endswith("running_mean") for k in encoder), "the encoder should have BatchNorm buffers to check"
    changed = [k for k in encoder if not torch.equal(encoder[k], frozen[k])]
    assert not changed, f"frozen encoder tensors changed: {changed}"

    # The classifier's checkpoint is enough on its own.
    shutil.rmtree(tmp_path / "runs" / "autoencoder-cifar10")
    folder = cifar_root / "imagefolder_jpg" / "test" / "horse"
    result = run_transfer("predict", "--ckpt", classifier_ckpt, "--input", folder, cwd=tmp_path, env=offline_env)
    _ok(result)
    rows = _rows(result.stdout)
    classes = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert len(rows) == len([p for p in folder.iterdir() if p.is_file()])
    assert all(r["label"] in classes and 0.0 <= r["score"] <= 1.0 for r in rows)


@pytest.mark.parametrize(
    ("recipe", "class_path"),
    [
        ("autoencoder-cifar10", "transfer_cli.autoencoder.Autoencoder"),
        ("autoencoder-classifier-cifar10", "transfer_cli.backbones.CheckpointBackbone"),
    ],
)
def test_recipe_parses(recipe, class_path, capsys):
    # In-process (a subprocess costs seconds of imports); the chain test above runs both recipes.
    assert main(["fit", "--config", recipe, "--print_config"]) == 0
    assert class_path in capsys.readouterr().out


def test_embeddings_have_num_features_and_are_deterministic():
    torch.manual_seed(0)
    model = Autoencoder(ConvEncoder(num_features=100), class_names=None).eval()
    images = torch.randn(4, 3, 32, 32)
    batch = {"inputs": torch.cat([images, images[:1]]), "ids": [str(i) for i in range(5)]}
    with torch.no_grad():
        embedding = model.predict_step(batch, 0)["embedding"]
        again = model.predict_step(batch, 0)["embedding"]
        reconstruction = model(images)
    assert embedding.shape == (5, 100)
    assert torch.equal(embedding, again)
    # The same image elsewhere in the batch: equal up to the order of float operations in the GEMM.
    torch.testing.assert_close(embedding[0], embedding[4], rtol=0, atol=1e-6)
    assert reconstruction.shape == images.shape


def test_encoder_preprocessing_is_native_cifar_size():
    preprocessing = ConvEncoder().preprocessing()
    assert (preprocessing.crop_size, preprocessing.resize_size) == (32, 32)
    with pytest.raises(ConfigError, match="multiple of 8"):
        ConvEncoder(image_size=30)


def test_checkpoint_backbone_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        CheckpointBackbone()
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointBackbone(checkpoint=str(tmp_path / "missing.ckpt"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not written by transfer"):
        CheckpointBackbone(checkpoint=str(foreign))


def test_checkpoint_backbone_refuses_untrusted_classes(tmp_path):
    path = tmp_path / "evil.ckpt"
    backbone = {"class_path": "os.system", "init_args": {}}
    meta = {"model": {"init_args": {"backbone": {"class_path": "transfer_cli.autoencoder.ConvEncoder"}}}, "data": {}}
    # The untrusted name hides in the offline args, which are merged over the checked config.
    meta["backbone_offline_init_args"] = {"source": backbone}
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "transfer": meta}, path)
    with pytest.raises(CheckpointError, match="outside the trusted packages"):
        CheckpointBackbone(checkpoint=str(path))
