"""Lines read from a stream as they arrive, batched: stdin inputs to predict on, for images and text."""

import os
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

from transfer_cli.errors import EXIT_TERMINATED, Interrupted


def read_line_batches(
    stream: Any, batch_size: int, stopped: Callable[[], bool], idle_s: float = 0.05
) -> Iterator[list[tuple[int, bytes]]]:
    """The non-blank lines of `stream` as (line number, bytes), in batches of up to `batch_size`.

    A batch goes out when it is full or as soon as the producer pauses for `idle_s`, so rows flow
    while the producer still writes (a line at a time, or a request waiting for its answer) and
    full batches form when input comes fast. Reading the raw descriptor, not Python's buffered
    lines, is what lets select() tell "nothing more yet" from "more already here".
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream: everything is already here
        yield from _batched(enumerate((line.encode() for line in stream), start=1), batch_size)
        return
    batch: list[tuple[int, bytes]] = []
    rest, line_no = b"", 0
    while True:
        if batch and not _wait_readable(fd, stopped, idle_s):
            yield batch
            batch = []
        _wait_readable(fd, stopped, None)
        chunk = os.read(fd, 1 << 16)
        *lines, rest = (rest + chunk).split(b"\n") if chunk else [rest, b""]
        for line in lines:
            line_no += 1
            if line.strip():
                batch.append((line_no, line.rstrip(b"\r")))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if not chunk:
            break
    if batch:
        yield batch


def _batched(numbered: Iterator[tuple[int, bytes]], batch_size: int) -> Iterator[list[tuple[int, bytes]]]:
    batch = []
    for line_no, line in numbered:
        line = line.rstrip(b"\r\n")
        if line.strip():
            batch.append((line_no, line))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _wait_readable(fd: int, stopped: Callable[[], bool], timeout: float | None) -> bool:
    """Whether `fd` has data (or EOF) within `timeout` seconds (None: wait for it). Waits in short
    slices: Lightning only notes a SIGTERM, and a run blocked on a silent producer must still end."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if stopped():
            raise Interrupted("terminated (SIGTERM)", EXIT_TERMINATED)
        left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if select.select([fd], [], [], max(0.0, left))[0]:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
