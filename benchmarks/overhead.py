"""The fixed cost per training step: the image path of the ResNet cases with a backbone so small
(one linear layer) that what is left is the host's per-step work, the library's and Lightning's
on one side, a hand-written loop's on the other. On a GPU this is the time the host must hide
behind the device's work; a host-device sync per step would stop it from hiding."""

from typing import Any

import images
import torch
import torchvision
from common import compare, interleaved, summarise
from torch import nn

from transfer_cli.backbones.base import Backbone, ImagePreprocessing
from transfer_cli.model import TransferModel


class LinearBackbone(Backbone):
    """One linear layer over the flattened image, with ResNet50's preprocessing."""

    def __init__(self, image_size: int, features: int = 64):
        super().__init__()
        self.linear = nn.Linear(3 * image_size * image_size, features)
        self.num_features = features
        ref = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
        resize = round(image_size * ref.resize_size[0] / ref.crop_size[0])
        self._preprocessing = ImagePreprocessing(
            image_size, resize, tuple(ref.mean), tuple(ref.std), ref.interpolation.value
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs.flatten(1))

    def preprocessing(self):
        return self._preprocessing

    def offline_init_args(self) -> dict[str, Any]:
        return {}


class PlainLinear(nn.Module):
    def __init__(self, image_size: int, features: int = 64):
        super().__init__()
        self.linear = nn.Linear(3 * image_size * image_size, features)
        self.fc = nn.Linear(features, len(images.CLASSES))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.linear(inputs.flatten(1)))


def _tool(spec: dict[str, Any]):
    torch.manual_seed(0)
    backbone = LinearBackbone(spec["image_size"])
    return TransferModel(backbone, class_names=images.CLASSES), backbone


def _plain(spec: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return PlainLinear(spec["image_size"])


def overhead_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    spec = {**spec, "model": "resnet50"}  # the preprocessing numbers the plain side derives
    runs = interleaved(
        {
            "transfer": lambda: images.tool_train(spec, device, build=_tool),
            "plain": lambda: images.plain_train(spec, device, build=_plain),
        },
        spec["repeats"],
    )
    result = compare("images/s", {name: summarise(side_runs, "throughput") for name, side_runs in runs.items()})
    for side in result["sides"].values():
        side["ms_per_step"] = 1000 * spec["batch_size"] / side["throughput"]
        side["cpu_ms_per_step"] = 1000 * spec["batch_size"] / side["throughput_cpu"]
    return result
