"""The backbone contract shared by every backbone family."""

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from transfer_cli.errors import ConfigError


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images must look when they reach an image backbone (what its weights were trained on)."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImagePreprocessing":
        return cls(
            crop_size=int(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data["interpolation"]),
        )


def check_image_size(image_size: int | None) -> None:
    """A size that resizing can produce; torch would otherwise fail mid-run with a bare RuntimeError."""
    if image_size is not None and image_size < 1:
        raise ConfigError(f"model.backbone.image_size must be a positive number of pixels, got {image_size}.")


class Backbone(nn.Module):
    """A feature extractor: `forward(inputs)` returns pooled features of shape [B, num_features].

    Subclasses set `num_features` in `__init__`, return their preprocessing from `preprocessing()`,
    and say in `offline_init_args()` how to rebuild the same architecture without downloading
    anything (a checkpoint restores the weights afterwards).
    """

    num_features: int
    # The layout of a convolutional image backbone's weights and inputs (settled per run, memory_format.py);
    # None for backbones it does not apply to (text).
    memory_format: torch.memory_format | None = None

    def use_memory_format(self, layout: torch.memory_format) -> None:
        self.to(memory_format=layout)
        self.memory_format = layout

    def in_layout(self, inputs: torch.Tensor) -> torch.Tensor:
        """The image batch in this backbone's layout: the transforms hand over NCHW, as torch makes it."""
        if self.memory_format is None or inputs.is_contiguous(memory_format=self.memory_format):
            return inputs
        return inputs.contiguous(memory_format=self.memory_format)

    def preprocessing(self) -> Any:
        raise NotImplementedError

    def offline_init_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def former_parameter_names(self) -> list[str] | None:
        """The names of `parameters()` in order as training checkpoints of earlier versions listed them,
        where this backbone now holds some of those tensors as buffers; None when nothing changed."""
        return None


class ImageModelBackbone(Backbone):
    """An image classifier with its classifier removed, held as `self.model`: what the torchvision and
    timm families share. Subclasses build `model` and the preprocessing its weights expect."""

    def __init__(self, model: nn.Module, num_features: int, preprocessing: ImagePreprocessing):
        super().__init__()
        self.model = model
        # As torch builds it (NCHW): memory_format.settle gives every run its layout before it runs
        # (channels_last on GPUs, the faster one on the CPU), so no copy of the weights is made here that a
        # CPU run settling on NCHW would copy back (a ResNet50: 100 MB, twice).
        self.memory_format = torch.contiguous_format
        self.num_features = num_features
        self._preprocessing = preprocessing

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(self.in_layout(inputs))

    def preprocessing(self) -> ImagePreprocessing:
        return self._preprocessing

    def offline_init_args(self) -> dict[str, Any]:
        # The checkpoint carries the weights; rebuilding must never reach for the network.
        return {"weights": None}
