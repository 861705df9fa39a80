"""Lines other libraries print that tell a `transfer` user nothing they can act on, and a stderr that
cannot stop a run."""

import logging
import os
import sys
from typing import TextIO

# Lightning logs its advertising through rank_zero_info on these loggers (which one depends on the
# entry point that imported lightning first), at INFO, beside messages worth keeping.
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_ADVERTS = ("litlogger", "litmodels", "lightning.ai/", "Lightning Experiments platform")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and any(advert in message for advert in _ADVERTS))


def drop_lightning_tips() -> None:
    """Drops Lightning's "Tip: ... install litlogger/litmodels" lines; idempotent."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())


class _ForgivingStderr:
    """sys.stderr that turns into /dev/null once nobody reads it.

    Logs and progress are a courtesy: a log pipe that closes (`2>&1 >out.jsonl | head -1`) must not
    stop a run half-way or make it exit early with its predictions unwritten.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed under us
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._silence()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def _silence(self) -> None:
        # Also at the descriptor, so writes from native code and the final flush at exit go nowhere quietly.
        _devnull_on_fd(2)
        self._stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def forgiving_stderr() -> None:
    """Makes stderr safe to write to whatever the caller did with it: closed (`2>&-`) or a pipe that breaks."""
    if isinstance(sys.stderr, _ForgivingStderr):
        return
    if sys.stderr is None:
        # Closed at start (`2>&-`): print(file=None) would write logs into the data on stdout, and the next
        # file opened would get descriptor 2 and receive native code's messages. (An import on the way
        # here may already have patched this; we do not rely on it.)
        _devnull_on_fd(2)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = _ForgivingStderr(sys.stderr)


def _devnull_on_fd(fd: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)
