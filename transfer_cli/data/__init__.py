"""Datamodules. Each one states the class names once; the model's head is sized from them.
All derive from TransferDataModule (transfer_cli.data.base), the contract the CLI relies on.

The classes are imported on first use (PEP 562): image data never imports transformers, which the
text datamodules need and which would add about a second to every start-up.
"""

import importlib
from typing import Any

_WHERE = {
    "TransferDataModule": "base",
    "CIFAR10DataModule": "cifar10",
    "ImageFolderDataModule": "image_folder",
    "MNLIDataModule": "mnli",
    "TextClassificationDataModule": "text_files",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
