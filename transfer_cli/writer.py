"""Old home of the prediction writer, kept because saved configs name `transfer_cli.writer.<Class>` in their
class_paths. New code imports from transfer_cli.callbacks.prediction_writer (the writer) and
transfer_cli.lightning_private (the predict loop without look-ahead)."""

from transfer_cli.callbacks.prediction_writer import PredictionWriter, output_format
from transfer_cli.lightning_private import StreamingPredictionLoop

__all__ = ["PredictionWriter", "StreamingPredictionLoop", "output_format"]
