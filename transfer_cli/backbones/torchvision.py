"""Any torchvision classification model as a backbone, by name (torchvision's own registry)."""

import os
import socket
import sys
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from transfer_cli.backbones.base import ImageModelBackbone, ImagePreprocessing, check_image_size
from transfer_cli.errors import ConfigError, WeightsUnavailableError

DOWNLOAD_TIMEOUT_S = 30


class TorchvisionBackbone(ImageModelBackbone):
    def __init__(self, name: str = "resnet50", weights: str | None = "DEFAULT", image_size: int | None = None):
        """A torchvision classification model with its classifier removed.

        Args:
            name: Model name in torchvision's registry (resnet50, efficientnet_b0, vit_b_16, ...).
            weights: `DEFAULT`, a weights enum name such as `IMAGENET1K_V1`, a path to a local
                state-dict file, or null for random initialisation.
            image_size: Input size in pixels; null uses the size the weights were trained at.
        """
        if weights is not None and weights.lower() in ("none", "null"):
            # jsonargparse hands a nested `--...weights null` override over as the string 'None'.
            weights = None
        check_image_size(image_size)
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as err:
            raise ConfigError(_unknown_model_message(name)) from err
        weights_enum = _weights_enum(name, weights)
        if weights_enum is not None and hasattr(model, "transform_input"):
            # torchvision's builder switches on an input transform for these weights, which a
            # checkpoint rebuilt without the weights would not have: refuse instead of mispredicting.
            raise ConfigError(
                f"Pretrained {name} weights are not supported yet (their builder changes the input "
                "transform). Use resnet50, efficientnet_b0, convnext_tiny, vit_b_16 or similar."
            )
        in_features, classifier_name = _strip_classifier(model, name)
        if weights_enum is not None:
            _load_state(model, _download_state(weights_enum), classifier_name)
        elif weights is not None:
            _load_state(model, _read_state_file(Path(weights).expanduser()), classifier_name)
        super().__init__(model, in_features, _preprocessing(name, weights_enum, image_size))
        self.name = name
        self.weights = weights


def _weights_enum(name: str, weights: str | None):
    if weights is None or _looks_like_path(weights):
        return None
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as err:
        raise ConfigError(_unknown_model_message(name)) from err
    try:
        return enum[weights]
    except KeyError:
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ConfigError(
            f"Unknown weights {weights!r} for torchvision model {name!r}. "
            f"Use one of: {names}; a path to a local .pth file; or null for random initialisation."
        ) from None


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))


def _unknown_model_message(name: str) -> str:
    models = ", ".join(torchvision.models.list_models(module=torchvision.models))
    return f"Unknown torchvision model {name!r} (model.backbone.name). Classification models: {models}."


def _strip_classifier(model: nn.Module, name: str) -> tuple[int, str]:
    """Replace the final classification layer with an identity and return its input width.

    The classifier is the last Linear layer in registration order; this holds for every torchvision
    classification family (fc, classifier[-1], heads.head, head) without per-architecture tables.
    """
    if getattr(model, "aux_logits", False):
        # Inception and GoogLeNet return a tuple in training mode while their auxiliary heads live.
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"torchvision model {name!r} has no linear classifier to remove, so transfer cannot use it "
            "as a backbone. Pick a model whose classifier is a Linear layer (resnet, efficientnet, vit, ...)."
        )
    classifier_name, classifier = linears[-1]
    model.set_submodule(classifier_name, nn.Identity())
    return classifier.in_features, classifier_name


def _download_state(weights_enum) -> dict[str, torch.Tensor]:
    filename = os.path.basename(urlparse(weights_enum.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        if not cached.is_file():
            # Instead of torch hub's "Downloading: ..." line: one of ours, naming the file and where it goes.
            print(f"transfer: downloading {weights_enum.url} to {cached.parent}", file=sys.stderr, flush=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights_enum.url, str(cached), progress=False)
        return torch.hub.load_state_dict_from_url(weights_enum.url, progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise WeightsUnavailableError(
            f"Pretrained weights {weights_enum} are not in the torch cache and could not be downloaded "
            f"({err}). Missing file: {cached}. On a machine with internet, download {weights_enum.url} and "
            f"copy it to that path (or set TORCH_HOME to a directory holding hub/checkpoints/{filename}); "
            "or set model.backbone.weights to a local .pth file, or to null for random initialisation."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"Backbone weights file not found: {path} (model.backbone.weights).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"Could not read backbone weights from {path}: {err}") from err
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], classifier_name: str) -> None:
    # The classifier was removed on purpose, so its keys are the only ones allowed to go unused.
    state = {k: v for k, v in state.items() if not k.startswith(classifier_name + ".")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ, e.g. weights trained at another image size
        raise ConfigError(
            f"Backbone weights do not fit the architecture: {str(err).splitlines()[-1].strip()} "
            "Check model.backbone.name, weights and image_size."
        ) from err
    unexpected = [k for k in unexpected if not k.startswith(("AuxLogits.", "aux1.", "aux2."))]
    if missing or unexpected:
        raise ConfigError(
            f"Backbone weights do not fit the architecture: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}. Check model.backbone.name and model.backbone.weights."
        )


def _preprocessing(name: str, weights_enum, image_size: int | None) -> ImagePreprocessing:
    # Without weights, the family's default weights still describe the input it was designed for.
    reference = weights_enum or torchvision.models.get_model_weights(name).DEFAULT
    transform = reference.transforms()
    crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
    if image_size is not None:
        resize, crop = round(image_size * resize / crop), image_size
    return ImagePreprocessing(
        crop_size=crop,
        resize_size=resize,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )
