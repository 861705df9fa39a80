"""A convolutional autoencoder pretrained by reconstruction; its encoder is a backbone like any other.

The encoder is held as `backbone`, so the CLI connects its preprocessing to the data, checkpoints
record it like every other backbone, and `CheckpointBackbone` can later reuse it, frozen or not, under
a classification head. `transfer predict` on an autoencoder checkpoint emits the representations.
"""

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from transfer_cli import memory_format
from transfer_cli.backbones.base import Backbone, ImagePreprocessing
from transfer_cli.cpu_fit import CpuFitTuning
from transfer_cli.errors import ConfigError
from transfer_cli.model import default_optimizer
from transfer_cli.runs import run_dir
from transfer_cli.schedules import optimizers

# CIFAR-10 training-set channel statistics: the encoder is trained from scratch on CIFAR-10, so
# these (not ImageNet's) are the statistics its inputs are normalised with.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Each of the encoder's stride-2 convolutions halves the image side; the decoder mirrors them.
NUM_DOWNSAMPLES = 3


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    # Kernel 3, padding 1, output_padding 1: exactly doubles the side, mirroring _conv_block.
    return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)


class ConvEncoder(Backbone):
    def __init__(self, num_features: int = 100, width: int = 32, image_size: int = 32):
        """A small convolutional encoder: image -> a `num_features`-dimensional representation.

        Args:
            num_features: Size of the representation (what a classification head receives).
            width: Channels of the first convolution; each further downsampling doubles them.
            image_size: Side of the square input images in pixels; a multiple of 8.
        """
        super().__init__()
        factor = 2**NUM_DOWNSAMPLES
        if image_size % factor != 0:
            raise ConfigError(
                f"ConvEncoder image_size={image_size} is not a multiple of {factor} "
                f"(model.init_args.backbone.init_args.image_size); use 32 for CIFAR-10."
            )
        self.num_features = num_features
        self.width = width
        self.image_size = image_size
        self.channels = [3, *(width * 2**i for i in range(NUM_DOWNSAMPLES))]
        self.features = nn.Sequential(*(_conv_block(a, b) for a, b in zip(self.channels, self.channels[1:])))
        self.map_shape = (self.channels[-1], image_size // factor, image_size // factor)
        self.project = nn.Linear(math.prod(self.map_shape), num_features)
        self.use_memory_format(torch.channels_last)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(self.in_layout(inputs)).flatten(1))

    def preprocessing(self) -> ImagePreprocessing:
        # Native resolution: no resize, no crop; CIFAR-10 normalisation.
        return ImagePreprocessing(
            crop_size=self.image_size, resize_size=self.image_size, mean=CIFAR10_MEAN, std=CIFAR10_STD
        )

    def offline_init_args(self) -> dict[str, Any]:
        return {}  # randomly initialised from its init args alone; nothing to download


class ConvDecoder(nn.Module):
    """The encoder mirrored: a representation -> a normalised image of the encoder's input size."""

    def __init__(self, encoder: ConvEncoder):
        super().__init__()
        self.map_shape = encoder.map_shape
        self.project = nn.Linear(encoder.num_features, math.prod(self.map_shape))
        widest_first = encoder.channels[::-1]
        layers: list[nn.Module] = []
        for a, b in zip(widest_first, widest_first[1:]):
            layers += [_upsample(a, b), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        # No BatchNorm or activation after the last layer: the target is the normalised image.
        self.upsample = nn.Sequential(*layers[:-2])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.project(features)).view(-1, *self.map_shape)
        return self.upsample(maps)


class Autoencoder(CpuFitTuning, L.LightningModule):
    def __init__(
        self,
        backbone: ConvEncoder,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        preview_images: int = 8,
    ):
        """An autoencoder trained to reconstruct its (normalised) input with a mean squared error.

        Args:
            backbone: The encoder; the decoder is built as its mirror image.
            class_names: Set from the data, like for every model the CLI builds. Labels play no
                part in reconstruction; the names are kept so the checkpoint records its data.
            optimizer: Optimizer over the encoder's and the decoder's parameters.
            lr_scheduler: Optional learning-rate schedule for that optimizer.
            preview_images: Validation images shown, with their reconstructions, in the PNG grid
                written to the run directory after each validation epoch (0 writes none).
        """
        super().__init__()
        self.backbone = backbone
        self.decoder = ConvDecoder(backbone)
        self.class_names = list(class_names or [])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.preview_images = preview_images
        self._preview: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(inputs))

    def _step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = batch["inputs"]
        reconstructions = self(inputs)
        loss = F.mse_loss(reconstructions.float(), inputs.float())
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=inputs.shape[0])
        return loss, reconstructions

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, reconstructions = self._step(batch, "val")
        if batch_idx == 0:
            n = self.preview_images
            self._preview = (batch["inputs"][:n].detach().float().cpu(), reconstructions[:n].detach().float().cpu())

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"embedding": self.backbone(batch["inputs"])}

    def on_train_start(self) -> None:
        # The encoder keeps its weights channels_last (checkpoints of earlier versions hold NCHW state).
        memory_format.align_optimizer_state(self.trainer.optimizers)

    def on_validation_epoch_end(self) -> None:
        preview, self._preview = self._preview, None
        trainer = self.trainer
        # Only training runs have a run directory (validate/test leave no files behind).
        if preview is None or self.preview_images <= 0 or trainer.sanity_checking or trainer.logger is None:
            return
        if trainer.is_global_zero and run_dir(trainer) is not None:
            path = Path(run_dir(trainer)) / f"reconstructions-epoch={trainer.current_epoch}.png"
            save_preview(*preview, self.backbone.preprocessing(), path)

    def configure_optimizers(self) -> Any:
        return optimizers(self.optimizer_factory(self.parameters()), self.lr_scheduler_factory, self.trainer)


def save_preview(
    inputs: torch.Tensor, reconstructions: torch.Tensor, preprocessing: ImagePreprocessing, path: Path
) -> None:
    """A PNG grid: the input images in the top row, their reconstructions below."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    images = (torch.cat([inputs, reconstructions]) * std + mean).clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(images, path, nrow=inputs.shape[0], padding=2)
