"""Datamodules. Each one states the class names once; the model's head is sized from them.
All derive from TransferDataModule (transfer_cli.data.base), the contract the CLI relies on."""

from transfer_cli.data.base import TransferDataModule
from transfer_cli.data.cifar10 import CIFAR10DataModule
from transfer_cli.data.image_folder import ImageFolderDataModule
from transfer_cli.data.mnli import MNLIDataModule
from transfer_cli.data.text_files import TextClassificationDataModule

__all__ = [
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "MNLIDataModule",
    "TextClassificationDataModule",
    "TransferDataModule",
]
