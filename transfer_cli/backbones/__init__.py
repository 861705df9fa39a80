"""Backbones: pretrained networks that map a batch of inputs to pooled features [B, num_features].

The classes are imported on first use (PEP 562): a torchvision checkpoint then never imports
transformers or timm, which would add about a second to every start-up.
"""

import importlib
from typing import Any

_WHERE = {
    "Backbone": "base",
    "ImagePreprocessing": "base",
    "CheckpointBackbone": "checkpoint",
    "HuggingFaceBackbone": "huggingface",
    "TimmBackbone": "timm",
    "TorchvisionBackbone": "torchvision",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
