"""Any timm model as a backbone, by its timm name (pretrained tag included), with its weights' preprocessing.

Weights come from one place per run: a local state-dict file, or timm's pretrained file for the name
(`DEFAULT`), looked up in the HuggingFace cache first and downloaded only when the hub may and can be
reached. Either way the file is read here, safely, and handed to timm, which adapts it the way it
adapts its own downloads (position embeddings resampled to another image size, for example). A
checkpoint rebuilds the architecture with no weights at all (`offline_init_args`) and supplies them
itself, so predicting never downloads.
"""

import difflib
import math
import os
import re
import socket
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from transfer_cli.backbones.base import ImageModelBackbone, ImagePreprocessing, check_image_size
from transfer_cli.backbones.huggingface import _hub_reachable, _offline
from transfer_cli.errors import ConfigError, WeightsUnavailableError

DOWNLOAD_TIMEOUT_S = 30
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class TimmBackbone(ImageModelBackbone):
    def __init__(
        self,
        name: str = "convnext_tiny.fb_in22k_ft_in1k",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
    ):
        """A timm model with its classifier removed (`num_classes=0`), giving its pooled features.

        Args:
            name: A timm model name, optionally with a pretrained tag: `convnext_tiny`,
                `convnext_tiny.fb_in22k`, `tf_efficientnet_lite0.in1k` (`transfer backbones --family timm`
                lists them). The tag picks the weights and their preprocessing.
            weights: `DEFAULT` (timm's pretrained weights for the name, through the HuggingFace cache),
                a path to a local `.safetensors`/`.pth` state dict in timm's layout, or null for
                random initialisation.
            image_size: Input size in pixels; null uses the size the weights were trained at. The
                resize keeps the weights' crop ratio (crop_pct).
        """
        if weights is not None and weights.lower() in ("none", "null"):
            # jsonargparse hands a nested `--...weights null` override over as the string 'None'.
            weights = None
        check_image_size(image_size)
        config = _pretrained_config(name)
        state = None
        if weights == "DEFAULT":
            state = _read_state_file(_default_weights_file(name, config), name)
        elif weights is not None:
            if not _looks_like_path(weights):
                raise ConfigError(
                    f"Unknown weights {weights!r} for timm model {name!r} (model.backbone.weights). Use DEFAULT, "
                    "a path to a local .safetensors/.pth file, or null. A pretrained tag goes in the name: "
                    f"{config.architecture}.<tag> (`transfer backbones --family timm {config.architecture}`)."
                )
            state = _read_state_file(Path(weights).expanduser(), name)
        model = _create(name, config, state, image_size)
        # The width the classifier took: after a pre-logits layer where the model has one (MobileNetV3).
        num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        super().__init__(model, num_features, _preprocessing(model, name, image_size))
        self.name = name
        self.weights = weights


def _pretrained_config(name: str):
    """timm's description of the name's weights (the default tag's without a tag), or a config error."""
    import timm  # here, not at the top: importing timm costs every start-up a few tenths

    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        try:
            config = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError:
            config = None  # a tag this architecture does not have
        if config is not None:
            return config
    names = timm.list_models(pretrained=True) + timm.list_models()
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.6)
    tagged = [n for n in timm.list_models(pretrained=True) if n.startswith(architecture + ".")]
    suggestions = tagged[:8] if tagged and "." in name else close
    hint = f" Closest names: {', '.join(suggestions)}." if suggestions else ""
    raise ConfigError(
        f"Unknown timm model {name!r} (model.backbone.name).{hint} `transfer backbones --family timm PATTERN` "
        "lists the names with pretrained weights."
    )


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors", ".pth.tar"))


def _classifier_names(config) -> tuple[str, ...]:
    names = config.classifier or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _read_state_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    import timm  # here, not at the top: importing timm costs every start-up a few tenths

    if not path.is_file():
        raise ConfigError(f"Backbone weights file not found: {path} (model.backbone.weights).")
    try:
        # timm's reader: safetensors or torch.load(weights_only=True), training wrappers
        # (state_dict, model, EMA) and DDP's `module.` prefix unwrapped.
        return timm.models.load_state_dict(str(path))
    except Exception as err:  # torch, pickle and safetensors raise many types for unreadable files
        raise ConfigError(
            f"Could not read backbone weights from {path} for timm model {name!r}: {type(err).__name__}: {err}. "
            "Give a .safetensors or .pth state dict (plain tensors) in timm's layout."
        ) from err


def _create(name: str, config, state: dict[str, torch.Tensor] | None, image_size: int | None) -> torch.nn.Module:
    import timm  # here, not at the top: importing timm costs every start-up a few tenths

    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None and config.fixed_input_size:
        # Transformers build their position embeddings for one size; timm resamples pretrained ones.
        kwargs["img_size"] = image_size
    if state is not None:
        # The classifier is dropped here, whatever its size, and timm is told there is none: it then
        # loads strictly, so a file for another architecture fails naming the keys instead of leaving
        # layers at random initialisation.
        classifier = tuple(f"{c}.{p}" for c in _classifier_names(config) for p in ("weight", "bias"))
        state = {k: v for k, v in state.items() if k not in classifier}
        kwargs["pretrained_cfg_overlay"] = {"state_dict": state, "classifier": None}
    try:
        model = timm.create_model(name, pretrained=state is not None, **kwargs)
    except RuntimeError as err:
        if "loading state_dict" in str(err):
            raise ConfigError(
                f"Backbone weights do not fit timm model {name!r}: {_load_mismatch(err)}. Check "
                "model.backbone.name and model.backbone.weights (a state dict of that architecture)."
            ) from err
        raise ConfigError(f"timm cannot build {name!r}: {err}") from err
    except (TypeError, ValueError, AssertionError) as err:  # sizes the architecture cannot take
        size = f" at image_size {image_size}" if image_size is not None else ""
        raise ConfigError(f"timm cannot build {name!r}{size}: {err}. Check model.backbone.image_size.") from err
    # The overlay's state dict would otherwise stay referenced by the model for its whole life.
    model.pretrained_cfg.pop("state_dict", None)
    return model


def _load_mismatch(err: RuntimeError) -> str:
    """torch lists every key; keep the kinds, counts and first few, enough to see what went wrong."""
    parts = []
    for line in str(err).splitlines()[1:]:
        line = line.strip()
        keys = re.findall(r'"([^"]+)"', line)
        if line.startswith(("Missing key", "Unexpected key")) and keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
            kind = "missing" if line.startswith("Missing") else "unexpected"
            parts.append(f"{kind} keys {', '.join(keys[:3])}{more}")
        elif line.startswith("size mismatch") and sum(p.startswith("size mismatch") for p in parts) < 2:
            parts.append(line.rstrip("."))
    return "; ".join(parts) or str(err).splitlines()[0]


def _default_weights_file(name: str, config) -> Path:
    if config.hf_hub_id:
        return _hub_weights_file(name, config)
    if config.url:
        return _url_weights_file(name, config.url)
    raise ConfigError(
        f"timm has no pretrained weights for {name!r} (model.backbone.weights DEFAULT). Pick a tagged name "
        "(`transfer backbones --family timm PATTERN`), a local weights file, or weights null."
    )


def _hub_weights_file(name: str, config) -> Path:
    """timm's own choice of file (model.safetensors before pytorch_model.bin), from the cache if it is there."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models._hub import _get_safe_alternatives

    repo, _, revision = config.hf_hub_id.partition("@")
    revision = revision or None
    filename = config.hf_hub_filename or "pytorch_model.bin"
    filenames = [*_get_safe_alternatives(filename), filename]
    for candidate in filenames:
        try:
            return Path(hf_hub_download(repo, candidate, revision=revision, local_files_only=True))
        except EntryNotFoundError:  # not cached (local) or known missing upstream
            continue
    reason = "HF_HUB_OFFLINE is set" if _offline() else None if _hub_reachable() else "the hub cannot be reached"
    where = f"{repo}" + (f" (revision {revision})" if revision else "")
    remedy = (
        f"They are {' or '.join(filenames)} of the HuggingFace hub repository {where}. On a machine with internet, "
        f"run `hf download {repo} {filenames[0]}` (or this command once) and copy its HuggingFace cache here "
        f"(HF_HOME; this machine looks in {constants.HF_HUB_CACHE}); or download "
        f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{filenames[0]} and set model.backbone.weights "
        "to that file; or set it to null for random initialisation."
    )
    if reason is not None:
        raise WeightsUnavailableError(f"Weights for timm model {name!r} are not cached and {reason}. {remedy}")
    for candidate in filenames:
        try:
            return Path(hf_hub_download(repo, candidate, revision=revision))
        except LocalEntryNotFoundError as err:  # the connection failed on the way
            raise WeightsUnavailableError(f"Could not download weights for {name!r}: {err}. {remedy}") from err
        except EntryNotFoundError:  # the repository has the other file only
            continue
        except OSError as err:  # HTTP errors, timeouts, a full disk
            raise WeightsUnavailableError(f"Could not download weights for {name!r}: {err}. {remedy}") from err
    raise WeightsUnavailableError(f"The hub repository {where} holds none of {', '.join(filenames)}. {remedy}")


def _url_weights_file(name: str, url: str) -> Path:
    """Older timm weights published at a URL only, through torch's cache as timm itself does."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return cached
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise WeightsUnavailableError(
            f"Pretrained weights for timm model {name!r} are not in the torch cache and could not be downloaded "
            f"({err}). Missing file: {cached}. On a machine with internet, download {url} and copy it to that path "
            "(or set TORCH_HOME to a directory holding hub/checkpoints/ with it); or set model.backbone.weights "
            "to a local file, or to null for random initialisation."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def _preprocessing(model: torch.nn.Module, name: str, image_size: int | None) -> ImagePreprocessing:
    """timm's eval transform for the weights: resize to size / crop_pct, centre crop, normalise."""
    from timm.data import resolve_model_data_config  # not at the top: see _create

    config = resolve_model_data_config(model)
    _, height, width = config["input_size"]
    if image_size is None and height != width:
        raise ConfigError(
            f"timm model {name!r} takes {height}x{width} inputs; transfer crops squares. Set model.backbone.image_size."
        )
    if config["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(
            f"timm model {name!r} resizes with {config['interpolation']!r} interpolation, which transfer does not "
            f"implement ({', '.join(INTERPOLATIONS)})."
        )
    crop = image_size or height
    return ImagePreprocessing(
        crop_size=crop,
        # timm's transforms_imagenet_eval: the shorter side to floor(size / crop_pct), then the crop.
        resize_size=math.floor(crop / config["crop_pct"]),
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
        interpolation=config["interpolation"],
    )
