"""The checkpoint to export, rebuilt through `transfer_cli.restore` as predict rebuilds it."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.errors import TransferError
from transfer_cli.restore import Restored, restore

Kind = Literal["image", "text"]


@dataclass
class Source:
    """A restored checkpoint with its model built and its datamodule connected."""

    restored: Restored
    model: LightningModule  # weights loaded, eval mode, fp32, on the CPU
    datamodule: LightningDataModule  # the stored data root kept, for validation samples

    @property
    def preprocessing(self) -> ImagePreprocessing | None:
        return self.restored.preprocessing

    @property
    def class_names(self) -> list[str]:
        return self.restored.class_names

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
    return from_restored(restore(ckpt))


def from_restored(restored: Restored) -> Source:
    model = restored.build_model().to(torch.float32)
    datamodule = _datamodule(restored)
    restored.connect(datamodule, model)
    return Source(restored=restored, model=model, datamodule=datamodule)


def _datamodule(restored: Restored) -> LightningDataModule:
    """With the training machine's values (its data root) when they still work here, for validation
    samples; else as predict builds it, for exporting on a machine without the training data."""
    if restored.machine_specific:
        # Never fetch anything: an export only reads what is already here.
        local = {
            **restored.machine_specific,
            **({"download": False} if "download" in restored.machine_specific else {}),
        }
        try:
            return restored.build_datamodule(**local)
        except TransferError:
            pass
    return restored.build_datamodule()
