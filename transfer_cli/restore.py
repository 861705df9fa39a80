"""One way back from a checkpoint: a path in, everything a verb needs out, read once and safely.

`restore(path)` reads the file through `read_checkpoint` (weights_only, and the walk of the stored
config that refuses any class or callable outside the trusted packages before anything is imported)
and returns a `Restored`: the stored model config with the backbone's offline arguments merged in
(so rebuilding never downloads), the data config without the values that only make sense on the
machine that trained (a data root, a download flag), the class names and the stored preprocessing.

Which values are machine-specific is declared by the class that owns them, as a class attribute
`machine_specific = ("root", "download")`; nothing here lists parameter names. Models and
datamodules are built with jsonargparse from their signatures, exactly as the CLI would, so a
stored config this installation cannot rebuild fails with the same explanation.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.checkpoint import ALLOWED_CLASS_PREFIXES, disable_remote_code, load_weights, read_checkpoint
from transfer_cli.errors import CheckpointError, TransferError


@dataclass
class Restored:
    """A checkpoint as read once: its parts, and how to rebuild its model and data from them."""

    path: Path
    checkpoint: dict[str, Any]
    class_names: list[str]
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    machine_specific: dict[str, Any] = field(default_factory=dict)
    preprocessing: ImagePreprocessing | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: str | Path) -> "Restored":
        """Split a checkpoint that read_checkpoint has already accepted (nothing is read again)."""
        meta = checkpoint["transfer"]
        data_config, removed = split_machine_specific(_deep_copy(meta.get("data") or {}))
        stored = meta.get("preprocessing")
        return cls(
            path=Path(path),
            checkpoint=checkpoint,
            class_names=list(meta.get("class_names") or []),
            model_config=_offline_model_config(meta),
            data_config=data_config,
            machine_specific=removed,
            preprocessing=ImagePreprocessing.from_dict(stored) if stored is not None else None,
        )

    def cli_config(self, keep_machine_specific: bool) -> dict[str, Any]:
        """The `model` and `data` config for the CLI's parser (class names go to the data, which the
        CLI links to the model). Evaluating may read the stored data root; predicting never does."""
        data = _deep_copy(self.data_config)
        init_args = data.setdefault("init_args", {})
        if keep_machine_specific:
            init_args.update(_deep_copy(self.machine_specific))
        init_args["class_names"] = list(self.class_names)
        return {"model": _deep_copy(self.model_config), "data": data}

    def build_model(self) -> LightningModule:
        """The stored model with its weights (strictly), in eval mode, on the CPU; never downloads."""
        config = _deep_copy(self.model_config)
        config.setdefault("init_args", {})["class_names"] = list(self.class_names)
        model = build_stored(LightningModule, "model", config, self.path)
        self.load_weights(model)
        return model.eval()

    def build_datamodule(self, **overrides: Any) -> LightningDataModule:
        """The stored datamodule with `overrides` applied to its init args (root=..., predict_input=...).

        The machine-specific values are not used unless given again here. Connect it to a model with
        `connect` before use: the preprocessing comes from the backbone and the checkpoint.
        """
        config = _deep_copy(self.data_config)
        config.setdefault("init_args", {}).update({"class_names": list(self.class_names), **overrides})
        return build_stored(LightningDataModule, "data", config, self.path)

    def load_weights(self, model: LightningModule) -> None:
        load_weights(model, self.checkpoint, self.path)

    def connect(self, datamodule: LightningDataModule, model: LightningModule) -> None:
        """Give the data what the model was trained with: the backbone's tokenizer or transform, then
        the stored image preprocessing, even if a newer torchvision describes the weights anew."""
        datamodule.connect(model.backbone)
        datamodule.use_stored_preprocessing(None if self.preprocessing is None else self.preprocessing.to_dict())


def restore(path: str | Path, option: str = "--ckpt") -> Restored:
    """Read a checkpoint written by `transfer fit` (once, safely) and split it into what verbs need."""
    path = Path(path).expanduser()
    return Restored.from_checkpoint(read_checkpoint(path, option=option), path)


def declared_machine_specific(class_path: str) -> tuple[str, ...]:
    """The init args a class declares machine-specific (`machine_specific` class attribute)."""
    if not class_path.startswith(ALLOWED_CLASS_PREFIXES):
        return ()  # never imported: read_checkpoint refuses such a checkpoint anyway
    module, _, name = class_path.rpartition(".")
    try:
        owner = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        # Building will say the class is unknown, with the parser's own explanation.
        return ()
    return tuple(getattr(owner, "machine_specific", ()))


def split_machine_specific(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config without its class's machine-specific init args, the removed values). Only called on
    configs that read_checkpoint has walked, so importing the class imports trusted code only."""
    class_path = config.get("class_path")
    init_args = config.get("init_args")
    if not isinstance(class_path, str) or not isinstance(init_args, dict):
        return config, {}
    removed = {key: init_args.pop(key) for key in declared_machine_specific(class_path) if key in init_args}
    return config, removed


def _offline_model_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The stored model config with the backbone's offline init args merged in: the weights come from
    the checkpoint, so rebuilding must not reach for a hub, a cache or the backbone's source file."""
    model = _deep_copy(meta["model"])
    offline = meta.get("backbone_offline_init_args")
    if offline:
        backbone = model.setdefault("init_args", {}).setdefault("backbone", {})
        backbone.setdefault("init_args", {}).update(_deep_copy(offline))
    disable_remote_code(model)  # also for a checkpoint dict that did not come through read_checkpoint
    return model


def build_stored(base: type, key: str, config: dict[str, Any], path: Path | str) -> Any:
    """Build a config stored in checkpoint `path` as the CLI would: jsonargparse validates it against the
    class's signature. Anything it cannot build (a class or argument this installation lacks, a missing
    file) is a CheckpointError (exit 4) naming the class and the checkpoint."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key, required=True)
    # jsonargparse 4.49 renamed instantiate_classes to instantiate; the oldest supported has only the former.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    try:
        return instantiate(parser.parse_object({key: config}))[key]
    except Exception as err:  # jsonargparse raises (and wraps) its own error types
        cause = _transfer_error(err)
        if isinstance(cause, CheckpointError):
            raise cause from err
        detail = str(cause) if cause is not None else " ".join(line.strip() for line in str(err).splitlines())
        raise CheckpointError(
            f"Cannot rebuild the {key} {config.get('class_path')!r} stored in {path}: {detail} "
            "Rebuild it with the transfer version that wrote the checkpoint, or train it again."
        ) from err


def _transfer_error(err: BaseException | None) -> TransferError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, TransferError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node
