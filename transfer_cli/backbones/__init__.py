"""Backbones: pretrained networks that map a batch of inputs to pooled features [B, num_features]."""

from transfer_cli.backbones.base import Backbone, ImagePreprocessing
from transfer_cli.backbones.checkpoint import CheckpointBackbone
from transfer_cli.backbones.huggingface import HuggingFaceBackbone
from transfer_cli.backbones.timm import TimmBackbone
from transfer_cli.backbones.torchvision import TorchvisionBackbone

__all__ = [
    "Backbone",
    "CheckpointBackbone",
    "HuggingFaceBackbone",
    "ImagePreprocessing",
    "TimmBackbone",
    "TorchvisionBackbone",
]
