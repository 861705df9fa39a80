"""timm backbones: the backbone contract over the image families, weights from a file or the
HuggingFace cache offline, timm's own preprocessing, the convnext recipe, and `transfer backbones`."""

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from transfer_cli.backbone_list import list_backbones
from transfer_cli.backbone_list import main as backbones_main
from transfer_cli.backbones import TimmBackbone, TorchvisionBackbone
from transfer_cli.data import ImageFolderDataModule
from transfer_cli.data.image_ops import BatchImageTransform, read_image
from transfer_cli.entry import main
from transfer_cli.errors import ConfigError, WeightsUnavailableError

from conftest import REPO, run_transfer

# Tiny instances of the kinds timm holds: a CNN with BatchNorm, a ViT with a class token (built at 32
# px, its position embeddings sized for that), an EfficientNet-family net whose head has a pre-logits
# layer wider than its trunk (head_hidden_size).
TIMM_MODELS = ["resnet10t", "vit_tiny_patch16_224", "mobilenetv3_small_050"]


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt fails at once, as on a machine without a route."""

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _seeded(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with a classifier and non-default BatchNorm statistics, so 'loaded' and
    'unchanged' cannot pass by coincidence with freshly initialised buffers."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _features(model: torch.nn.Module, images: torch.Tensor, layout=torch.channels_last) -> torch.Tensor:
    with torch.no_grad():
        return model(images.contiguous(memory_format=layout))


# The contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_backbones_give_pooled_features_of_num_features(name):
    backbone = TimmBackbone(name, weights=None, image_size=32).eval()
    features = _features(backbone, torch.randn(3, 3, 32, 32))
    assert features.shape == (3, backbone.num_features)
    assert backbone.offline_init_args() == {"weights": None}
    prep = backbone.preprocessing()
    assert prep.crop_size == 32 and prep.resize_size == math.floor(32 / backbone.model.pretrained_cfg["crop_pct"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_file_in_timm_layout_gives_the_seeded_models_features(tmp_path, suffix, no_network):
    seeded = _seeded("resnet10t")
    path = tmp_path / f"resnet10t{suffix}"
    state = seeded.state_dict()
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint's wrapper too
    backbone = TimmBackbone("resnet10t", weights=str(path), image_size=64).eval()
    seeded.reset_classifier(0)
    images = torch.randn(2, 3, 64, 64)
    layout = backbone.memory_format  # bit for bit needs the same kernels: weights and inputs in one layout
    seeded = seeded.to(memory_format=layout)
    assert torch.equal(_features(backbone, images, layout), _features(seeded, images, layout))


def test_a_vit_file_loads_at_another_image_size_with_resampled_position_embeddings(tmp_path):
    seeded = _seeded("vit_tiny_patch16_224")
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(seeded.state_dict(), path)
    backbone = TimmBackbone("vit_tiny_patch16_224", weights=str(path), image_size=64)
    assert backbone.model.pos_embed.shape == (1, 1 + 4 * 4, 192)  # class token + a 4x4 grid
    assert torch.equal(backbone.model.blocks[0].attn.qkv.weight, seeded.blocks[0].attn.qkv.weight)


def test_a_file_for_another_architecture_is_exit_2_naming_the_mismatch(tmp_path, photos, monkeypatch, capsys):
    path = tmp_path / "resnet10t.safetensors"
    safetensors.torch.save_file(_seeded("resnet10t").state_dict(), path)
    monkeypatch.chdir(tmp_path)
    code = main(
        ["fit", "--config", "convnext-imagefolder", "--data.root", str(photos),
         "--model.init_args.backbone.init_args.name=mobilenetv3_small_050",
         f"--model.init_args.backbone.init_args.weights={path}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "do not fit timm model 'mobilenetv3_small_050'" in err
    assert "missing keys conv_stem.weight" in err and "unexpected keys " in err and "size mismatch for" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_unknown_names_and_weights_are_config_errors_with_suggestions():
    with pytest.raises(ConfigError, match="convnext_tiny"):
        TimmBackbone("convnxt_tiny", weights=None)
    with pytest.raises(ConfigError, match="convnext_tiny.fb_in22k"):
        TimmBackbone("convnext_tiny.fb_in22kk", weights=None)
    with pytest.raises(ConfigError, match="pretrained tag goes in the name"):
        TimmBackbone("resnet10t", weights="IMAGENET1K_V1")


# DEFAULT weights through the HuggingFace cache ------------------------------------------------------


def _hub_cache(hf_home: Path, repo: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    for filename, state in files.items():
        target = root / "snapshots" / commit / filename
        if filename.endswith(".safetensors"):
            safetensors.torch.save_file(state, target)
        else:
            torch.save(state, target)


@pytest.fixture()
def hf_home(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the environment at import; these are what it consults at call time.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_default_weights_load_offline_from_the_hf_cache(hf_home, filename, no_network):
    seeded = _seeded("resnet10t")
    # The untagged name means timm's default tag for it, whose repository is timm/<name>.<tag>.
    _hub_cache(hf_home, "timm/resnet10t.c3_in1k", {filename: seeded.state_dict()})
    for name in ("resnet10t", "resnet10t.c3_in1k"):
        backbone = TimmBackbone(name, weights="DEFAULT", image_size=32)
        assert torch.equal(backbone.model.conv1[0].weight, seeded.conv1[0].weight)
        assert torch.equal(backbone.model.bn1.running_var, seeded.bn1.running_var)


def test_default_weights_missing_offline_fail_at_once_naming_what_to_supply(hf_home, no_network):
    with pytest.raises(WeightsUnavailableError) as raised:
        TimmBackbone("convnext_tiny.fb_in22k", weights="DEFAULT")
    message = str(raised.value)
    for fragment in ("HF_HUB_OFFLINE is set", "timm/convnext_tiny.fb_in22k", "model.safetensors", "HF_HOME",
                     str(hf_home / "hub"), "model.backbone.weights"):  # fmt: skip
        assert fragment in message, fragment


def test_default_weights_with_no_route_to_the_hub_fail_at_once(hf_home, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(WeightsUnavailableError, match="the hub cannot be reached"):
        TimmBackbone("resnet10t", weights="DEFAULT")


# Preprocessing: timm's own eval transform for the weights ------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, imagefolder_root) -> Path:
    """Real CIFAR JPEGs (upscaled by the backbones) and larger non-square photos (downscaled)."""
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        for label in ("cat", "ship"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for source in sorted((imagefolder_root / "test" / label).glob("*.jpg"))[:3]:
                shutil.copy(source, folder / source.name)
    generator = torch.Generator().manual_seed(0)
    for i, (height, width) in enumerate([(301, 457), (480, 360), (250, 250)]):
        # Smooth content, as photos are: noise would measure the resampler's rounding, not its kernel.
        small = torch.randint(0, 256, (3, height // 16, width // 16), generator=generator, dtype=torch.uint8)
        image = torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="bilinear")[0]
        pixels = image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / "val" / "cat" / f"photo{i}.png")
    return root


def _reference(backbone: TimmBackbone, paths: list[Path], image_size: int | None) -> torch.Tensor:
    config = resolve_model_data_config(backbone.model)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)  # timm's --img-size: the crop_pct is kept
    transform = create_transform(**config)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def _in_pixel_levels(ours: torch.Tensor, reference: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    return (ours - reference).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255


@pytest.mark.parametrize(
    ("name", "image_size"),
    [("resnet10t.c3_in1k", None), ("resnet10t.c3_in1k", 128), ("vit_tiny_patch16_224.augreg_in21k", 64)],
)
def test_preprocessing_equals_timms_eval_transform(photos, name, image_size):
    backbone = TimmBackbone(name, weights=None, image_size=image_size)
    data = ImageFolderDataModule(root=str(photos), num_workers=0, batch_size=64, augment=False)
    data.connect(backbone)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    ours = data.on_after_batch_transfer(batch, 0)["inputs"]  # what validation, predict and cached training see
    paths = data._splits["val"].paths
    reference = _reference(backbone, paths, image_size)
    assert ours.shape == reference.shape
    _assert_within_rounding(_in_pixel_levels(ours, reference, backbone.preprocessing().std))

    # In-memory images (CIFAR-10) are resized on the device, from the same pixels: alike.
    jpegs = [p for p in paths if p.suffix == ".jpg"]
    raw = torch.stack([read_image(p) for p in jpegs])
    on_device = BatchImageTransform(backbone.preprocessing())(raw, augment=False)
    _assert_within_rounding(
        _in_pixel_levels(on_device, _reference(backbone, jpegs, image_size), backbone.preprocessing().std)
    )


def _assert_within_rounding(levels: torch.Tensor) -> None:
    # torch resamples in float, PIL in fixed point with a rounding between its horizontal and
    # vertical passes: a fraction of a level on average, a few edge pixels some levels apart.
    assert levels.mean() < 0.5 and (levels > 3).float().mean() < 1e-3, (levels.mean(), (levels > 3).float().mean())


# Through the CLI: every image family fits frozen, then predicts from the checkpoint alone ----------


def _weights_file(tmp_path: Path, family: str) -> tuple[str, str, Path]:
    """(class_path, name, weights file) of a family's tiny backbone, seeded with non-default statistics."""
    if family == "torchvision":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
        path = tmp_path / "resnet18.pth"
        torch.save(model.state_dict(), path)
        return "transfer_cli.backbones.TorchvisionBackbone", "resnet18", path
    path = tmp_path / f"{family}.safetensors"
    safetensors.torch.save_file(_seeded(family).state_dict(), path)
    return "transfer_cli.backbones.TimmBackbone", family, path


def _fit(tmp_path: Path, photos: Path, backbone_args: list[str]) -> Path:
    code = main(
        ["fit", "--config", "convnext-imagefolder", "--config", "debug", f"--data.root={photos}",
         *backbone_args, "--data.init_args.num_workers=0", "--data.init_args.augment=false",
         "--finetuning.strategy=frozen", "--finetuning.cache_features=false",  # the backbone runs every step
         "--trainer.callbacks+=faults.RequireFrozenBackboneInEvalMode", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    assert code == 0
    (ckpt,) = (tmp_path / "runs" / "convnext-imagefolder").glob("version_*/checkpoints/last.ckpt")
    return ckpt


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _predict_offline(ckpt: Path, photos: Path, tmp_path: Path, monkeypatch, capsys) -> list[dict]:
    """Predict with the torch and HuggingFace caches empty and the hub off (the caller blocks the network)."""
    for key, folder in (("TORCH_HOME", "empty_torch"), ("HF_HOME", "empty_hf")):
        monkeypatch.setenv(key, str(tmp_path / folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    code = main(["predict", "--ckpt", str(ckpt), "--input", str(photos / "val"), "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return [json.loads(line) for line in out.out.splitlines()]


@pytest.mark.parametrize("family", ["torchvision", *TIMM_MODELS, "checkpoint"])
def test_every_image_family_freezes_bit_identically_and_predicts_from_the_checkpoint_alone(
    tmp_path, photos, family, monkeypatch, capsys, no_network
):
    monkeypatch.chdir(tmp_path)
    size = "--model.init_args.backbone.init_args.image_size=32"
    if family == "checkpoint":
        # A model trained on a timm backbone is itself a backbone; its own file goes away afterwards.
        class_path, name, weights = _weights_file(tmp_path, "resnet10t")
        source = _fit(tmp_path, photos, [f"--model.init_args.backbone={class_path}",
                                         f"--model.init_args.backbone.init_args.name={name}",
                                         f"--model.init_args.backbone.init_args.weights={weights}", size])  # fmt: skip
        moved = tmp_path / "source.ckpt"
        shutil.move(source, moved)
        shutil.rmtree(tmp_path / "runs")
        args = ["--model.init_args.backbone=transfer_cli.backbones.CheckpointBackbone",
                f"--model.init_args.backbone.init_args.checkpoint={moved}"]  # fmt: skip
        initial = _prefixed(torch.load(moved, weights_only=True)["state_dict"], "backbone.")
        prefix = "backbone.encoder."  # CheckpointBackbone holds the stored backbone as `encoder`
    else:
        class_path, name, weights = _weights_file(tmp_path, family)
        args = [f"--model.init_args.backbone={class_path}", f"--model.init_args.backbone.init_args.name={name}",
                f"--model.init_args.backbone.init_args.weights={weights}", size]  # fmt: skip
        # As loaded: a ViT's position embeddings are resampled to the image size on the way in.
        backbone_class = TimmBackbone if class_path.endswith("TimmBackbone") else TorchvisionBackbone
        initial = backbone_class(name=name, weights=str(weights), image_size=32).state_dict()
        prefix = "backbone."
    ckpt = _fit(tmp_path, photos, args)

    saved = torch.load(ckpt, weights_only=True)
    after = _prefixed(saved["state_dict"], prefix)
    assert after and set(after) == set(initial)
    for key, tensor in after.items():  # parameters and buffers (running statistics) alike
        assert torch.equal(tensor, initial[key]), key
    assert saved["transfer"]["versions"]["timm"] == timm.__version__

    (moved if family == "checkpoint" else weights).unlink()
    rows = _predict_offline(ckpt, photos, tmp_path, monkeypatch, capsys)
    assert len(rows) == len(list((photos / "val").rglob("*.*")))
    assert {row["label"] for row in rows} <= {"cat", "ship"}


# The recipe, the listing --------------------------------------------------------------------------


def test_convnext_recipe_builds_its_own_backbone_and_trains_a_step(tmp_path, photos, monkeypatch, capsys):
    # Its real architecture and preprocessing, random weights (the pretrained file is 110 MB), small images.
    monkeypatch.chdir(tmp_path)
    code = main(
        ["fit", "--config", "convnext-imagefolder", "--config", "debug", f"--data.root={photos}",
         "--model.init_args.backbone.init_args.weights=null", "--model.init_args.backbone.init_args.image_size=32",
         "--data.init_args.num_workers=0", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (ckpt,) = (tmp_path / "runs" / "convnext-imagefolder").glob("version_0/checkpoints/last.ckpt")
    meta = torch.load(ckpt, weights_only=True)["transfer"]
    assert meta["model"]["init_args"]["backbone"]["init_args"]["name"] == "convnext_tiny.fb_in22k_ft_in1k"
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["preprocessing"]["resize_size"] == 36


def test_backbones_lists_names_per_family_and_filters(tmp_path, monkeypatch, capsys):
    timm_names = list_backbones("timm", "convnext_tiny*")
    assert "convnext_tiny.fb_in22k" in timm_names and all(n.startswith("convnext_tiny") for n in timm_names)
    assert "resnet50" in list_backbones("torchvision", "resnet") and "maskrcnn" not in " ".join(
        list_backbones("torchvision")
    )
    # HuggingFace: the models in the local cache that AutoModel loads (not timm's repositories).
    hub = tmp_path / "hf" / "hub"
    for repo, config in (("models--org--bert-mini", {"model_type": "bert"}), ("models--timm--x.y", {"arch": "x"})):
        (hub / repo / "snapshots" / "c").mkdir(parents=True)
        (hub / repo / "snapshots" / "c" / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert list_backbones("huggingface") == ["org/bert-mini"]
    everything = list_backbones(None, "bert-mini")
    assert everything == ["huggingface\torg/bert-mini"]

    assert backbones_main(["--family", "timm", "resnet10t"]) == 0
    assert capsys.readouterr().out.splitlines() == ["resnet10t.c3_in1k"]
    assert backbones_main(["--family", "nope"]) == 2
    assert "--family" in capsys.readouterr().err


def test_every_shipped_recipe_parses_with_the_new_one(tmp_path):
    recipes = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert "convnext-imagefolder" in recipes
    result = run_transfer("fit", "--config", "convnext-imagefolder", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "transfer_cli.backbones.TimmBackbone" in result.stdout


# As a new user would: offline, a timm state-dict file on disk, the shell contract ---------------------


@pytest.mark.slow
def test_fit_test_predict_with_a_timm_file_through_the_shell(tmp_path, cifar_root, imagefolder_root, offline_env):
    path = tmp_path / "resnet10t.safetensors"
    safetensors.torch.save_file(_seeded("resnet10t").state_dict(), path)
    blocker = tmp_path / "no_network"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n    raise OSError('network blocked by the test')\n"
        "socket.socket.connect = _refuse\nsocket.create_connection = _refuse\n"
    )
    env = {**offline_env, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    fit = run_transfer(
        "fit", "--config", "resnet50-cifar10", f"--data.root={cifar_root}",
        "--model.init_args.backbone", "transfer_cli.backbones.TimmBackbone",
        "--model.init_args.backbone.init_args.name", "resnet10t",
        "--model.init_args.backbone.init_args.weights", path,
        "--model.init_args.backbone.init_args.image_size", "64",
        "--finetuning.strategy", "frozen", "--data.init_args.augment", "false",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert "cached frozen features of" in fit.stderr
    ckpt = next((tmp_path / "runs" / "resnet50-cifar10").glob("version_0/checkpoints/last.ckpt"))
    path.unlink()

    test = run_transfer("test", "--ckpt", ckpt, "--trainer.limit_test_batches=4", cwd=tmp_path, env=env)
    assert test.returncode == 0, test.stderr
    assert "test_acc" in test.stderr and test.stdout == ""

    folder = imagefolder_root / "test"
    predict = run_transfer("predict", "--ckpt", ckpt, "--input", folder, cwd=tmp_path, env=env)
    assert predict.returncode == 0, predict.stderr
    rows = [json.loads(line) for line in predict.stdout.splitlines()]
    assert [r["input"] for r in rows] == sorted(str(p) for p in folder.rglob("*.jpg"))
    classes = {p.name for p in folder.iterdir()}
    assert all(r["label"] in classes and r["topk"][0] == [r["label"], r["score"]] for r in rows)


def test_timm_class_paths_pass_the_checkpoint_allowlist():
    from transfer_cli.checkpoint import check_class_paths

    # A timm optimizer is a natural choice in a config, so a checkpoint may name one.
    check_class_paths({"optimizer": {"class_path": "timm.optim.Lamb", "init_args": {"lr": 0.001}}}, "model.ckpt")
