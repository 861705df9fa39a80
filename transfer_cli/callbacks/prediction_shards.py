"""Predictions from several processes, put back into the one-process output.

Rank r predicts the batches r, r + W, r + 2W, ... of the input (data.base.owns_batch) and appends
them, one JSON line per batch, to its own file in a parts directory that rank 0 made (beside
--output, or in the temporary folder for stdout). Rank 0 waits until every rank has finished its
file, then reads the ranks' batches in turn, which is input order, one batch per rank in memory.

Processes meet through files, not collectives: rank 0 must stay able to answer a SIGTERM (or notice
Ctrl-C) while it waits, and Lightning's SIGTERM handler broadcasts to every rank, so the other ranks
stay alive, waiting for rank 0 to remove the parts directory, until the output is complete.

A rank that fails leaves a marker naming its error (`fail`) and stays alive until rank 0 has seen
it, removed the parts and ended with that error: Lightning's launcher SIGKILLs rank 0 as soon as
another rank ends with an error, which would leave the parts behind and the run exit 137.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import lightning as L

from transfer_cli import errors
from transfer_cli.errors import EXIT_RESOURCE, EXIT_TERMINATED, Interrupted, ResourceError, TransferError

POLL_S = 0.05
REMOVE_ROUNDS = 50  # rank 0's attempts at removing the parts while other ranks may still be renaming
# How long a failed rank outlives the parts directory, for rank 0 to end first (under torchrun its
# parent is the agent, which stops it once rank 0 has ended).
FAILED_GRACE_S = 60.0
# How long a failed rank waits at most for rank 0 to see its marker (rank 0 looks after every batch it
# writes); past that it ends, as it would have without a marker.
FAILED_WAIT_S = 600.0


class RankFailed(TransferError):
    """Another process of the prediction failed; its exit code (its error class's) becomes the run's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PredictionShards:
    def __init__(self, directory: Path, rank: int, world_size: int):
        self.directory, self.rank, self.world_size = directory, rank, world_size
        self._parent = os.getppid()  # a rank whose launcher died must not wait forever
        try:
            self._file: TextIO | None = open(self._part(rank), "w", encoding="ascii")  # noqa: SIM115 (closed in finish)
        except OSError as err:
            raise ResourceError(f"Cannot write predictions to {directory}: {err.strerror}.") from err

    @classmethod
    def open(cls, trainer: L.Trainer, output: Path | None) -> "PredictionShards":
        """Every rank calls this at once (it broadcasts the directory rank 0 made)."""
        directory = None
        if trainer.global_rank == 0:
            try:
                if output is None:
                    directory = tempfile.mkdtemp(prefix="transfer-predict-", suffix=".parts")
                else:
                    output.parent.mkdir(parents=True, exist_ok=True)
                    directory = tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".parts", dir=output.parent)
            except OSError as err:
                raise ResourceError(f"Cannot write predictions beside {output or 'stdout'}: {err.strerror}.") from err
        directory = trainer.strategy.broadcast(directory, src=0)
        return cls(Path(directory), trainer.global_rank, trainer.world_size)

    def _part(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.jsonl.part"

    def _done(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.jsonl"

    def _failed(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.failed"

    def add(self, rows: list[dict[str, Any]], errors: list[str | None]) -> None:
        # ASCII: a file name that is not valid UTF-8 (surrogate escapes) survives the round trip.
        try:
            self._file.write(json.dumps([rows, errors], ensure_ascii=True) + "\n")
        except OSError as err:
            self._raise_failed(ResourceError(f"Cannot write predictions to {self.directory}: {err.strerror}."), err)

    def finish(self) -> None:
        """This rank has predicted all its batches: its file takes its final name, which rank 0 waits for."""
        try:
            self._file.close()
            self._part(self.rank).rename(self._done(self.rank))
        except FileNotFoundError:
            pass  # rank 0 gave up and removed the directory; it reports why
        except OSError as err:
            self._raise_failed(ResourceError(f"Cannot write predictions to {self.directory}: {err.strerror}."), err)

    def _raise_failed(self, error: TransferError, cause: BaseException) -> None:
        self.fail(error)
        raise error from cause

    def fail(self, error: BaseException) -> None:
        """This rank cannot finish: tell rank 0, which gives up, removes the parts and ends with `error`'s
        exit code, and return once it has (then after FAILED_GRACE_S, or as soon as rank 0 has ended), or
        after FAILED_WAIT_S, or at once if no marker could be left. Rank 0's own failure needs no marker:
        it removes the directory, which ends the other ranks' wait.

        Only for failures inside the predict loop: before it, rank 0 may be in one of Lightning's
        barriers, where it reads no marker and would wait for this rank as this rank waits for it."""
        if self.rank == 0 or not self.directory.exists():
            return
        error = errors.as_transfer_error(error) or error  # a full disk's OSError is a ResourceError (exit 6)
        code = error.exit_code if isinstance(error, TransferError) else 1
        record = json.dumps({"error": type(error).__name__, "exit_code": code, "message": str(error)})
        marker = self._failed(self.rank)
        try:
            staged = marker.with_suffix(".tmp")
            staged.write_text(record, encoding="utf-8")
            staged.rename(marker)  # rank 0 never reads half a record
        except OSError:
            # A full disk may not take even the record; a rename needs no space, and says enough.
            try:
                self._part(self.rank).rename(marker)
            except OSError:
                return  # rank 0 cannot learn of it: nothing to wait for
        deadline = time.monotonic() + FAILED_WAIT_S
        while os.getppid() == self._parent and time.monotonic() < deadline:
            if not self.directory.exists():  # rank 0 has seen it and cleaned up: give it time to end first
                deadline = min(deadline, time.monotonic() + FAILED_GRACE_S)
            time.sleep(POLL_S)

    def check_failed(self) -> None:
        """Rank 0: raise the error of another rank that failed, if one did (a stat per rank)."""
        for rank in range(1, self.world_size):
            marker = self._failed(rank)
            if not marker.is_file():
                continue
            try:
                record = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = None
            if not isinstance(record, dict):  # its part file, renamed: it could not write more
                record = {"error": "ResourceError", "exit_code": EXIT_RESOURCE, "message": "it could not write."}
            message = f"Process {rank} of {self.world_size} failed, so nothing was written: {record['message']}"
            kind = getattr(errors, record["error"], None)
            if isinstance(kind, type) and issubclass(kind, TransferError) and kind.exit_code == record["exit_code"]:
                raise kind(message)  # the same class, and so the same exit code, as on that process
            raise RankFailed(message, record["exit_code"])

    def wait_for_ranks(self, stopped: Callable[[], bool]) -> None:
        """Rank 0: until every rank's file is complete; the error of one that failed instead."""

        def ready() -> bool:
            self.check_failed()
            return all(self._done(r).is_file() for r in range(self.world_size))

        self._wait(ready, stopped)

    def wait_for_merge(self, stopped: Callable[[], bool]) -> None:
        """Other ranks: until rank 0 has written the output (or given up) and removed the directory."""
        self._wait(lambda: not self.directory.exists(), stopped)

    def _wait(self, ready: Callable[[], bool], stopped: Callable[[], bool]) -> None:
        while not ready():
            if stopped():
                raise Interrupted("terminated (SIGTERM)", EXIT_TERMINATED)
            if os.getppid() != self._parent:
                raise ResourceError("The process that started this prediction is gone; nothing was written.")
            time.sleep(POLL_S)

    def batches(self) -> Iterator[tuple[list[dict[str, Any]], list[str | None]]]:
        """Rank 0: (rows, errors) of every batch, in input order: batch b is rank b % W's (b // W)-th."""
        files = [open(self._done(r), encoding="ascii") for r in range(self.world_size)]  # noqa: SIM115
        try:
            for batch in _round_robin(files):
                yield tuple(json.loads(batch))
        finally:
            for f in files:
                f.close()

    def remove(self) -> None:
        """Rank 0: the whole directory (also the other ranks' files); others: their own file."""
        if self._file is not None and not self._file.closed:
            with contextlib.suppress(OSError):  # a full disk fails the flush again; the file goes anyway
                self._file.close()
        if self.rank == 0:
            # Another rank may rename its file (finish) between rmtree listing the directory and removing
            # that name, which leaves the renamed file and so the directory: list and remove again.
            for _ in range(REMOVE_ROUNDS):
                shutil.rmtree(self.directory, ignore_errors=True)
                if not self.directory.exists():
                    break
                time.sleep(POLL_S)
        else:
            self._part(self.rank).unlink(missing_ok=True)


def _round_robin(files: list[TextIO]) -> Iterator[str]:
    """Lines taken from each file in turn, until one runs out. Batches are numbered without gaps, so
    once rank b % W has no batch b, no rank has a later one."""
    while True:
        for f in files:
            line = f.readline()
            if not line:
                return
            yield line
