"""Self-describing checkpoints: what `transfer` stores beside the weights, and how it reads it back.

`checkpoint["transfer"]` holds the model and data config as parsed, the class names, the
preprocessing and the versions, in plain types only, so the file loads with `weights_only=True` and
`transfer predict --ckpt` can rebuild the model without the original config or any download.
"""

import base64
import importlib.util
import json
import lzma
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_cli import lightning_private
from transfer_cli.errors import CheckpointError
from transfer_cli.lightning_private import reads_safely  # noqa: F401 (moved there; importable here as before)

FORMAT_VERSION = 1
ALLOWED_CLASS_PREFIXES = ("transfer_cli.", "torch.", "torchvision.", "lightning.", "transformers.", "timm.")
STORED_SECTIONS = ("model", "data", "backbone_offline_init_args")
# Lightning's own config sections: LightningCLI parses a --ckpt_path's hyper_parameters into the
# model config (its `_class_path` too), so they are judged like ours.
LIGHTNING_SECTIONS = ("hyper_parameters", "datamodule_hyper_parameters")
CLASS_PATH_KEYS = ("class_path", "_class_path")

# What a tokenizer's save_pretrained writes (transformers 5): data only. Any other stored name, a
# `.py` module above all, could be code that transformers imports when it loads the tokenizer.
TOKENIZER_FILE_NAMES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "dict.txt",
        "spiece.model",
        "sentencepiece.model",
        "sentencepiece.bpe.model",
        "spm.model",
        "spm_char.model",
        "source.spm",
        "target.spm",
        "target_vocab.json",
        "tokenizer.model",
        "tiktoken.model",
        "entity_vocab.json",
        "normalizer.json",
        "emoji.json",
        "byte_maps.json",
        "word_shape.json",
        "word_pronunciation.json",
    }
)
# Config keys through which transformers imports code named in them (models "with custom code").
CODE_KEYS = ("auto_map", "custom_pipelines")


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
        datamodule = trainer.datamodule  # a TransferDataModule: the CLI builds no other
        checkpoint["transfer"] = {
            "format_version": FORMAT_VERSION,
            "model": self.model_config,
            "data": self.data_config,
            "class_names": list(getattr(pl_module, "class_names", []) or []),
            "backbone_offline_init_args": pl_module.backbone.offline_init_args(),
            "preprocessing": datamodule.preprocessing_config(),
            "versions": _versions(),
        }


def read_checkpoint(path: str | Path, option: str = "--ckpt") -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`, always explicit) and check it is one of ours."""
    path = Path(path).expanduser()  # `--ckpt=~/x.ckpt`: the shell expands no tilde after `=`
    if path.is_dir():
        found = sorted(path.glob("**/checkpoints/last.ckpt")) or sorted(path.glob("**/*.ckpt"))
        hint = f" Did you mean {found[0]}?" if found else ""
        raise CheckpointError(
            f"{path} ({option}) is a directory; give a checkpoint file written by `transfer fit`, such as "
            f"runs/<recipe>/version_N/checkpoints/last.ckpt.{hint} (Sharded checkpoint directories are not "
            "loaded: only single files can be checked to hold plain data.)"
        )
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path} ({option}).")
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
    for section in LIGHTNING_SECTIONS:
        check_class_paths(checkpoint.get(section), path)
    for section in STORED_SECTIONS:
        check_class_paths(meta.get(section), path)
        check_no_stored_code(meta.get(section), path)
        disable_remote_code(meta.get(section))
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


def check_class_paths(node: Any, where: str | Path, key: str | None = None) -> None:
    """Refuse configs that could make jsonargparse import code from outside the trusted packages.

    jsonargparse imports every `class_path`, and any string shaped like an import path (`a.b`,
    `a.b.C`) given to a parameter typed as a class or a callable, at any depth, in lists too. Those
    types live in signatures that cannot be read without importing, so every string is judged by its
    shape instead, before anything is imported.
    """
    if isinstance(node, dict):
        for class_key in CLASS_PATH_KEYS:
            if class_key in node and not isinstance(node[class_key], str):
                _refuse_import(node[class_key], class_key, where)
        for child_key, value in node.items():
            check_class_paths(value, where, str(child_key))
    elif isinstance(node, list):
        for value in node:
            check_class_paths(value, where, key)
    elif isinstance(node, str) and _imports_untrusted(node, strict=key in CLASS_PATH_KEYS):
        _refuse_import(node, key, where)


def _imports_untrusted(value: str, strict: bool) -> bool:
    if value.startswith(ALLOWED_CLASS_PREFIXES):
        return False
    if strict:
        return True  # a class_path outside the trusted packages, whatever it looks like
    if "." not in value or not all(part.isidentifier() for part in value.split(".")):
        return False  # jsonargparse's own test: paths, hub names, floats and versions never import
    # A file name such as `model.ckpt` has the same shape; it imports nothing unless its first part
    # names a module Python can find, and finding a top-level module runs none of its code.
    return _findable(value.split(".")[0])


def _findable(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return True  # unsure means refuse


def _refuse_import(name: Any, key: str | None, where: str | Path) -> None:
    raise CheckpointError(
        f"Checkpoint {where} names {name!r}" + (f" ({key})" if key else "") + ", which would import code "
        f"outside the trusted packages ({', '.join(p.rstrip('.') for p in ALLOWED_CLASS_PREFIXES)}); "
        "refusing to load it. Only checkpoints written by `transfer fit` are accepted."
    )


def check_no_stored_code(node: Any, where: str | Path) -> None:
    """Refuse a stored config that carries code for transformers to import: an `auto_map` (or a
    similar key) anywhere, tokenizer files other than the data files tokenizers write, or a stored
    tokenizer_config.json that names code."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CODE_KEYS:
                _refuse_code(f"a {key!r} entry, which makes transformers import code", where)
            if key == "tokenizer_files" and value is not None:
                _check_tokenizer_files(value, where)
            check_no_stored_code(value, where)
    elif isinstance(node, list):
        for value in node:
            check_no_stored_code(value, where)


def _check_tokenizer_files(files: Any, where: str | Path) -> None:
    if not isinstance(files, dict):
        _refuse_code("tokenizer_files that are not a mapping of file names", where)
    for name, encoded in files.items():
        if not is_tokenizer_file_name(name):
            _refuse_code(f"the tokenizer file {name!r}, which is not one a tokenizer writes", where)
        if name == "tokenizer_config.json":
            try:
                stored = json.loads(decode_stored_file(encoded))
            except (ValueError, TypeError, lzma.LZMAError):
                _refuse_code("a corrupt tokenizer_config.json", where)
            for key in CODE_KEYS:
                if isinstance(stored, dict) and key in stored:
                    _refuse_code(f"a tokenizer_config.json with {key!r}, which makes transformers import code", where)


def is_tokenizer_file_name(name: Any) -> bool:
    # Extra chat templates live in a folder of their own, as Jinja text that nothing here renders.
    folder, _, file = str(name).rpartition("/")
    if folder == "additional_chat_templates":
        return file.endswith(".jinja") and file[: -len(".jinja")].isidentifier()
    return name in TOKENIZER_FILE_NAMES


def decode_stored_file(encoded: str) -> bytes:
    """A file as `HuggingFaceBackbone.offline_init_args` stores it: base64 of its xz-compressed bytes."""
    return lzma.decompress(base64.b64decode(encoded, validate=True))


def _refuse_code(what: str, where: str | Path) -> None:
    raise CheckpointError(
        f"Checkpoint {where} holds {what}; a checkpoint never runs code, so it is refused. "
        "Only checkpoints written by `transfer fit` from models without custom code are accepted."
    )


def disable_remote_code(node: Any) -> None:
    """Set every `trust_remote_code` in a stored config, at any depth, to False (in place).

    Running code from a hub repository takes the user's own flag; a checkpoint never implies it.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "trust_remote_code":
                node[key] = False
            else:
                disable_remote_code(value)
    elif isinstance(node, list):
        for value in node:
            disable_remote_code(value)


def config_from_checkpoint(checkpoint: dict[str, Any], keep_data_root: bool) -> dict[str, Any]:
    """The model and data config to rebuild a checkpoint's model offline, ready for the parser.

    Without `keep_data_root`, the values the datamodule declares machine-specific (its
    `machine_specific` attribute: a data root, a download flag) are left out.
    """
    from transfer_cli.restore import Restored  # restore builds on this module

    return Restored.from_checkpoint(checkpoint, "<checkpoint>").cli_config(keep_machine_specific=keep_data_root)


def load_weights(model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"The weights in {path} do not fit the model built from its own config: {str(err).splitlines()[0]}"
        ) from err


def install_safe_loaders() -> None:
    """Make read_checkpoint the only way a trainer loads a checkpoint, whatever the strategy.

    Strategies that shard (FSDP, ModelParallel, DeepSpeed) read the file past the trainer's
    checkpoint_io, FSDP through an Unpickler of its own that runs any code a pickle names; every such
    loader is wrapped once, before any trainer exists (how: lightning_private.install_safe_loaders).
    """
    lightning_private.install_safe_loaders(read_checkpoint)
