"""Self-describing checkpoints: what `transfer` stores beside the weights, and how it reads it back.

`checkpoint["transfer"]` holds the model and data config as parsed, the class names, the
preprocessing and the versions, in plain types only, so the file loads with `weights_only=True` and
`transfer predict --ckpt` can rebuild the model without the original config or any download.
"""

import platform
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_cli.errors import CheckpointError

FORMAT_VERSION = 1
ALLOWED_CLASS_PREFIXES = ("transfer_cli.", "torch.", "torchvision.", "lightning.", "transformers.", "timm.")


def _versions() -> dict[str, str]:
    # Package metadata, not imports: importing transformers only to read its version costs seconds.
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("transfer-cli", "torch", "torchvision", "lightning", "transformers", "timm"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class CheckpointMetadata(Callback):
    """Writes the `transfer` section into every checkpoint the trainer saves."""

    def __init__(self, model_config: dict[str, Any], data_config: dict[str, Any]):
        self.model_config = model_config
        self.data_config = data_config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        preprocessing = getattr(datamodule, "preprocessing", None)
        checkpoint["transfer"] = {
            "format_version": FORMAT_VERSION,
            "model": self.model_config,
            "data": self.data_config,
            "class_names": list(getattr(pl_module, "class_names", []) or []),
            "backbone_offline_init_args": pl_module.backbone.offline_init_args(),
            "preprocessing": preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else None,
            "versions": _versions(),
        }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`, always explicit) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path} (--ckpt).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated, foreign or unsafe files
        raise CheckpointError(f"Cannot load checkpoint {path}: {_load_failure(err)}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict).")
    meta = checkpoint.get("transfer")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(
            f"{path} was not written by transfer (no 'transfer' section), so it cannot describe its model. "
            "Use a checkpoint from `transfer fit`."
        )
    for section in ("model", "data", "backbone_offline_init_args"):
        check_class_paths(meta.get(section), path)
    return checkpoint


def _load_failure(err: Exception) -> str:
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if unsafe:
        return (
            f"it holds a {unsafe.group(1)} object, which would need code to load; refused for safety. "
            "Only checkpoints written by `transfer fit` are accepted."
        )
    if "Weights only load failed" in str(err):
        return "it is not plain data (loading it could run code); refused for safety."
    return f"{type(err).__name__}: the file is truncated, corrupt, or not a checkpoint."


# Keys whose value jsonargparse imports: class paths, and callables given as a plain dotted name.
IMPORTED_KEYS = ("class_path", "head", "optimizer", "lr_scheduler")


def check_class_paths(node: Any, where: str | Path) -> None:
    """Refuse configs that would import code from outside the trusted packages (before anything is)."""
    if isinstance(node, dict):
        for key in IMPORTED_KEYS:
            name = node.get(key)
            named_elsewhere = isinstance(name, str) and not name.startswith(ALLOWED_CLASS_PREFIXES)
            if named_elsewhere or (key == "class_path" and name is not None and not isinstance(name, str)):
                raise CheckpointError(
                    f"Checkpoint {where} names {name!r} ({key}), outside the trusted packages "
                    f"({', '.join(p.rstrip('.') for p in ALLOWED_CLASS_PREFIXES)}); refusing to load it."
                )
        for value in node.values():
            check_class_paths(value, where)
    elif isinstance(node, list):
        for value in node:
            check_class_paths(value, where)


def config_from_checkpoint(checkpoint: dict[str, Any], keep_data_root: bool) -> dict[str, Any]:
    """The model and data config to rebuild a checkpoint's model offline, ready for the parser."""
    meta = checkpoint["transfer"]
    model = _deep_copy(meta["model"])
    backbone = model.setdefault("init_args", {}).setdefault("backbone", {})
    backbone_args = backbone.setdefault("init_args", {})
    backbone_args.update(meta.get("backbone_offline_init_args") or {})
    if "trust_remote_code" in backbone_args:
        # Never implied by a checkpoint: running code from a hub repository takes the user's own flag.
        backbone_args["trust_remote_code"] = False
    data = _deep_copy(meta["data"])
    data_args = data.setdefault("init_args", {})
    data_args["class_names"] = list(meta["class_names"])
    if not keep_data_root:
        # Prediction reads --input; the training data need not exist on this machine.
        for key in ("root", "download"):
            data_args.pop(key, None)
    return {"model": model, "data": data}


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def load_weights(model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"The weights in {path} do not fit the model built from its own config: {str(err).splitlines()[0]}"
        ) from err
