"""The callbacks moved to transfer_cli/callbacks/ (and the checkpoint I/O to checkpoint_io.py); configs and
checkpoints written before name them by their old paths, which must keep resolving to the same classes,
and the callback states saved in checkpoints are keyed by names that must not change."""

import pytest
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser

from transfer_cli.callbacks.checkpoint_policy import RunCheckpoint
from transfer_cli.callbacks.interrupt import InterruptCheckpoint
from transfer_cli.callbacks.nonfinite import NonFiniteLossGuard
from transfer_cli.callbacks.prediction_writer import PredictionWriter
from transfer_cli.callbacks.progress import LineProgressBar, TerminalProgressBar
from transfer_cli.callbacks.rng_state import RandomState
from transfer_cli.checkpoint_io import AtomicCheckpointIO

OLD_PATHS = [
    ("transfer_cli.safety.RunCheckpoint", RunCheckpoint, Callback),
    ("transfer_cli.safety.InterruptCheckpoint", InterruptCheckpoint, Callback),
    ("transfer_cli.safety.NonFiniteLossGuard", NonFiniteLossGuard, Callback),
    ("transfer_cli.safety.RandomState", RandomState, Callback),
    ("transfer_cli.safety.AtomicCheckpointIO", AtomicCheckpointIO, CheckpointIO),
    ("transfer_cli.progress.LineProgressBar", LineProgressBar, Callback),
    ("transfer_cli.progress.TerminalProgressBar", TerminalProgressBar, Callback),
    ("transfer_cli.writer.PredictionWriter", PredictionWriter, Callback),
]


@pytest.mark.parametrize(("class_path", "moved", "base"), OLD_PATHS, ids=[p for p, _, _ in OLD_PATHS])
def test_an_old_class_path_in_a_config_builds_the_moved_class(class_path, moved, base):
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=base)
    built = parser.instantiate_classes(parser.parse_args(["--x", class_path])).x
    assert type(built) is moved


def test_callback_states_in_checkpoints_keep_their_keys():
    # Lightning files each callback's state under its state_key, made from the class's own name.
    assert RandomState().state_key == "RandomState"
    assert RunCheckpoint(monitor="val_acc", mode="max").state_key.startswith("RunCheckpoint{")


def test_old_module_paths_keep_their_functions():
    from transfer_cli.checkpoint import install_safe_loaders, reads_safely
    from transfer_cli.progress import print_metrics, progress_bar, progress_interval
    from transfer_cli.writer import StreamingPredictionLoop, output_format

    assert all(map(callable, [install_safe_loaders, reads_safely, print_metrics, progress_bar, progress_interval]))
    assert callable(output_format) and StreamingPredictionLoop.__name__ == "StreamingPredictionLoop"
