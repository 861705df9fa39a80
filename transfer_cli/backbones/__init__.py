"""Backbones: pretrained networks that map a batch of inputs to pooled features [B, num_features]."""

from transfer_cli.backbones.base import Backbone, ImagePreprocessing
from transfer_cli.backbones.checkpoint import CheckpointBackbone as CheckpointBackbone
from transfer_cli.backbones.torchvision import TorchvisionBackbone

__all__ = ["Backbone", "ImagePreprocessing", "TorchvisionBackbone"]
