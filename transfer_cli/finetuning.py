"""Old import path of the finetuning callback, kept because saved configs and checkpoints name it."""

from transfer_cli.callbacks.finetuning import BackboneFinetuning, FinetuningPolicy  # noqa: F401
