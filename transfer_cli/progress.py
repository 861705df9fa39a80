"""Old home of the progress bars, kept because saved configs name `transfer_cli.progress.<Class>` in their
class_paths. New code imports from transfer_cli.callbacks.progress."""

from transfer_cli.callbacks.progress import (
    DEFAULT_INTERVAL_S,
    INTERVAL_ENV,
    LineProgressBar,
    TerminalProgressBar,
    print_metrics,
    progress_bar,
    progress_interval,
)

__all__ = [
    "DEFAULT_INTERVAL_S",
    "INTERVAL_ENV",
    "LineProgressBar",
    "TerminalProgressBar",
    "print_metrics",
    "progress_bar",
    "progress_interval",
]
