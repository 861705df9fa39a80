"""ResNet on CIFAR-shaped images: training steps and the frozen linear probe, `transfer` vs plain loop.

Both sides feed the same uint8 batches through the same image functions of the library
(`random_crop_flip`, `resize_center_crop`, normalisation), so preprocessing costs the same on both; the
plain side writes the steps out by hand instead of using `BatchImageTransform`, `TransferModel` and
Lightning, in the layout a hand-written loop uses: torch's default NCHW on the CPU, channels_last (model
and input) on CUDA. `transfer` picks its own (channels_last on CUDA, the faster one it times on the CPU).
"""

from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from common import (
    ClockCallback,
    PeakMemory,
    StepClock,
    SyntheticImages,
    autocast,
    compare,
    interleaved,
    summarise,
    trainer,
)
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.backbones import TorchvisionBackbone
from transfer_cli.data.image_ops import random_crop_flip, resize_center_crop
from transfer_cli.data.images import ImageDataModule
from transfer_cli.finetuning import BackboneFinetuning
from transfer_cli.heads import LinearHead
from transfer_cli.model import TransferModel

CLASSES = [f"class_{i}" for i in range(10)]


class SyntheticImageData(ImageDataModule):
    """The library's image datamodule path (loader settings, on-device batch transform) on synthetic data.

    Like the real image datamodules it has a validation split (used only where validation is on).
    """

    def __init__(self, count: int, batch_size: int, augment: bool, val_count: int | None = None):
        super().__init__(batch_size=batch_size, num_workers=0, augment=augment, predict_input=None)
        self.class_names = list(CLASSES)
        # Made here, before any timer starts, as the plain loops make theirs: what a case times is the
        # work on the images, not drawing them.
        self.made = {
            "train": SyntheticImages(count, num_classes=len(CLASSES)),
            "val": SyntheticImages(val_count or batch_size, num_classes=len(CLASSES), seed=1),
        }

    def load_split(self, split: str) -> SyntheticImages:
        return self.made["train" if split == "train" else "val"]


# The transfer side ---------------------------------------------------------------------------


def tool_model(spec: dict[str, Any]) -> tuple[TransferModel, SyntheticImageData]:
    torch.manual_seed(0)
    backbone = TorchvisionBackbone(spec["model"], weights=None, image_size=spec["image_size"])
    model = TransferModel(backbone, class_names=CLASSES, head=LinearHead)  # default optimizer: AdamW
    return model, backbone


def tool_train(spec: dict[str, Any], device: torch.device, build=None) -> dict[str, Any]:
    model, backbone = (build or tool_model)(spec)
    clock = StepClock(spec["warmup"], spec["steps"], device)
    data = SyntheticImageData(clock.total * spec["batch_size"], spec["batch_size"], augment=spec["augment"])
    data.connect(backbone)
    callbacks = [BackboneFinetuning(strategy="full"), ClockCallback(clock)]
    fit = trainer(device, spec["precision"], callbacks, max_steps=clock.total, max_epochs=1)
    with PeakMemory(device) as memory:
        fit.fit(model, datamodule=data)
    return {**clock.result(spec["batch_size"]), "memory": memory.report()}


# The plain side ------------------------------------------------------------------------------


def plain_layout(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


class PlainPreprocess:
    """The library's preprocessing numbers, derived by hand from torchvision's weights metadata."""

    def __init__(self, spec: dict[str, Any], device: torch.device):
        reference = torchvision.models.get_model_weights(spec["model"]).DEFAULT.transforms()
        self.crop = spec["image_size"]
        self.resize = round(self.crop * reference.resize_size[0] / reference.crop_size[0])
        self.mean = torch.tensor(reference.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(reference.std, device=device).view(1, 3, 1, 1) * 255.0
        self.interpolation = reference.interpolation.value
        self.layout = plain_layout(device)

    def __call__(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        images = images.float()
        if augment:
            images = random_crop_flip(images, padding=max(1, images.shape[-1] // 8))
        images = resize_center_crop(images, self.resize, self.crop, self.interpolation)
        return ((images - self.mean) / self.std).contiguous(memory_format=self.layout)

    def check_same_as(self, backbone: TorchvisionBackbone) -> None:
        p = backbone.preprocessing()
        mine = (self.crop, self.resize, self.interpolation)
        if mine != (p.crop_size, p.resize_size, p.interpolation):
            raise AssertionError(f"plain preprocessing {mine} differs from the library's {p}")


def plain_model(spec: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(spec["model"], weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(CLASSES))
    return model


def plain_loader(dataset, spec: dict[str, Any], shuffle: bool = True) -> DataLoader:
    pin = torch.cuda.is_available()  # as the library's loaders do
    return DataLoader(dataset, batch_size=spec["batch_size"], shuffle=shuffle, num_workers=0, pin_memory=pin)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["inputs"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)


def plain_train(spec: dict[str, Any], device: torch.device, build=None) -> dict[str, Any]:
    model = (build or plain_model)(spec)
    preprocess = PlainPreprocess(spec, device)
    clock = StepClock(spec["warmup"], spec["steps"], device)
    loader = plain_loader(SyntheticImages(clock.total * spec["batch_size"]), spec)
    with PeakMemory(device) as memory:
        model.to(device).to(memory_format=preprocess.layout).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        for batch in loader:
            images, labels = to_device(batch, device)
            images = preprocess(images, augment=spec["augment"])
            with autocast(device, spec["precision"]):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.tick()
    return {**clock.result(spec["batch_size"]), "memory": memory.report()}


# Cases ---------------------------------------------------------------------------------------


def train_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    PlainPreprocess(spec, device).check_same_as(tool_model(spec)[1])
    runs = interleaved(
        {"transfer": lambda: tool_train(spec, device), "plain": lambda: plain_train(spec, device)}, spec["repeats"]
    )
    return compare("images/s", {name: summarise(side_runs, "throughput") for name, side_runs in runs.items()})
