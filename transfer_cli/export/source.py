"""The checkpoint to export, rebuilt as predict rebuilds it: model, datamodule, preprocessing, classes.

`transfer_cli.restore` is the one way back from a checkpoint; until it is present this module builds
the same objects from the checkpoint's stored config through jsonargparse (data only, no code run).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.checkpoint import config_from_checkpoint, load_weights, read_checkpoint
from transfer_cli.errors import CheckpointError

Kind = Literal["image", "text"]


@dataclass
class Source:
    """What an export needs from a checkpoint, whichever way it was rebuilt."""

    path: Path
    model: LightningModule  # weights loaded, eval mode, on the CPU
    datamodule: LightningDataModule  # connected to the model's backbone, root kept (for validation samples)
    class_names: list[str]
    preprocessing: ImagePreprocessing | None  # None for text: the tokenizer is the preprocessing
    model_config: dict[str, Any]  # the config that rebuilds the model offline (class names included)
    data_config: dict[str, Any]
    versions: dict[str, str]

    @property
    def kind(self) -> Kind:
        return "image" if self.preprocessing is not None else "text"

    @property
    def embeds(self) -> bool:
        """An autoencoder: it predicts representations, not classes."""
        return not hasattr(self.model, "head")

    @property
    def tokenizer(self) -> Any:
        return self.model.backbone.preprocessing() if self.kind == "text" else None


def load_source(ckpt: str | Path) -> Source:
    checkpoint = read_checkpoint(ckpt)
    meta = checkpoint["transfer"]
    config = config_from_checkpoint(checkpoint, keep_data_root=True)
    config["model"].setdefault("init_args", {})["class_names"] = list(meta["class_names"])
    model, datamodule = build(config["model"], config["data"], f"{ckpt} (--ckpt)")
    load_weights(model, checkpoint, ckpt)
    stored = meta.get("preprocessing")
    preprocessing = ImagePreprocessing.from_dict(stored) if stored is not None else None
    if preprocessing is not None and hasattr(datamodule, "use_preprocessing"):
        # What the model was trained with, even if a newer torchvision describes the weights anew.
        datamodule.use_preprocessing(preprocessing)
    return Source(
        path=Path(ckpt),
        model=model.eval().to(torch.float32),
        datamodule=datamodule,
        class_names=list(meta["class_names"]),
        preprocessing=preprocessing,
        model_config=config["model"],
        data_config=config["data"],
        versions=dict(meta.get("versions") or {}),
    )


def build(model_config: dict[str, Any], data_config: dict[str, Any], where: str) -> tuple[Any, Any]:
    """A model and its datamodule from stored configs, connected as the CLI connects them."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model", required=True)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        parsed = parser.parse_object({"model": model_config, "data": data_config})
        objects = parser.instantiate_classes(parsed)
    except Exception as err:  # jsonargparse raises several types for configs it cannot take
        if hasattr(err, "exit_code"):
            raise
        raise CheckpointError(f"Cannot rebuild the model stored in {where}: {str(err).splitlines()[0]}") from err
    model, datamodule = objects.model, objects.data
    datamodule.connect(model.backbone)
    return model, datamodule
