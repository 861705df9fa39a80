"""Errors a user can act on, each with the exit code documented in the README.

The message is the whole user-facing story: what is wrong, where, how to fix it. The entry point
prints it without a traceback (unless --debug) and exits with `exit_code`.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_RESOURCE = 6
EXIT_EXPORT_PARITY = 7
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class TransferError(Exception):
    exit_code = 1


class ConfigError(TransferError):
    exit_code = EXIT_USAGE


class DataError(TransferError):
    exit_code = EXIT_DATA


class CheckpointError(TransferError):
    exit_code = EXIT_CHECKPOINT


class NonFiniteLossError(TransferError):
    exit_code = EXIT_NONFINITE


class ResourceError(TransferError):
    exit_code = EXIT_RESOURCE


class ExportParityError(TransferError):
    """An exported model does not compute what its checkpoint computes (transfer export)."""

    exit_code = EXIT_EXPORT_PARITY


class WeightsUnavailableError(ConfigError):
    """Pretrained weights could not be found locally nor downloaded."""


class Interrupted(TransferError):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_RESOURCE_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EROFS", "EPERM", "EFBIG"}


def as_transfer_error(err: BaseException) -> BaseException | None:
    """Our error behind whatever wrapped it, or a resource failure recognised as one (exit 6)."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (TransferError, BrokenPipeError)):
            return err
        if isinstance(err, OSError) and errno.errorcode.get(err.errno) in _RESOURCE_ERRNOS:
            where = f" ({err.filename})" if err.filename else ""
            return ResourceError(f"{err.strerror}{where}. Free disk space or choose a writable location.")
        if type(err).__name__ == "MisconfigurationException":  # Lightning's word for a bad setting
            return ConfigError(f"{err} Check the --trainer.* and --checkpoint.* settings.")
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            return ResourceError(
                "Out of memory. Lower --data.init_args.batch_size, use --trainer.precision bf16-mixed, "
                "or --trainer.accumulate_grad_batches to keep the effective batch size."
            )
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def sigterm_as_interrupt(message: str) -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted (exit 143) like Ctrl-C, so `with` blocks and `finally`
    clean up what they staged; outside a Lightning run SIGTERM's default would end the process on the spot.
    Handlers can only be set from the main thread: elsewhere (an in-process caller's choice) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(message, EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
