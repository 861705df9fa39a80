"""Old home of the training-safety callbacks and the checkpoint I/O, kept because saved configs and
checkpoints name `transfer_cli.safety.<Class>` in their class_paths. New code imports from
transfer_cli.callbacks.* and transfer_cli.checkpoint_io."""

from transfer_cli.callbacks.checkpoint_policy import RunCheckpoint
from transfer_cli.callbacks.interrupt import InterruptCheckpoint
from transfer_cli.callbacks.nonfinite import NonFiniteLossGuard
from transfer_cli.callbacks.rng_state import RandomState
from transfer_cli.checkpoint_io import AtomicCheckpointIO

__all__ = ["AtomicCheckpointIO", "InterruptCheckpoint", "NonFiniteLossGuard", "RandomState", "RunCheckpoint"]
