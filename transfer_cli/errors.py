"""Errors a user can act on, each with the exit code documented in the README.

The message is the whole user-facing story: what is wrong, where, how to fix it. The entry point
prints it without a traceback (unless --debug) and exits with `exit_code`.
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_RESOURCE = 6
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


class WeightsUnavailableError(ConfigError):
    """Pretrained weights could not be found locally nor downloaded."""
