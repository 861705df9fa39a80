"""Streams predictions out as rows, batch by batch: JSON lines or CSV, to stdout or a file.

A file is written under a temporary name beside its final name and renamed only when prediction
finishes, so a killed or failed run never leaves a partial file under the final name.

On several processes each rank keeps its batches in a file of its own (prediction_shards.py) and
rank 0 writes them out, in input order, once all are done: the same bytes as one process writes.
"""

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from transfer_cli.callbacks.prediction_shards import PredictionShards
from transfer_cli.errors import (
    EXIT_TERMINATED,
    ConfigError,
    DataError,
    Interrupted,
    ResourceError,
    sigterm_as_interrupt,
)


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output: str | None = None, topk: int = 3, skip_bad_inputs: bool = False):
        super().__init__(write_interval="batch")
        if topk < 1:
            raise ConfigError(f"--topk {topk}: give 1 or more.")
        self.output = None if output in (None, "-") else Path(output)
        self.topk = topk
        self.skip_bad_inputs = skip_bad_inputs
        self.format = output_format(self.output)
        self.skipped = 0
        self._stream: io.TextIOBase | None = None
        self._tmp: Path | None = None
        self._csv: csv.writer | None = None
        self._columns: list[str] | None = None  # fixed by the first batch, so error rows fit the CSV header
        self._header_written = False
        self._shards: PredictionShards | None = None  # several processes: this rank's batches until the end
        self._predicting = False  # past Lightning's last barrier before the predict loop (see PredictionShards.fail)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # setup and teardown run on every rank, also on one whose share of the input is empty (Lightning
        # then skips its predict loop and the on_predict_* hooks).
        self._predicting = False
        if stage == "predict" and trainer.world_size > 1:
            self._shards = PredictionShards.open(trainer, self.output)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predicting = True
        if self._shards is None:
            self._open()

    def _open(self) -> None:
        if self.output is None:
            self._stream = sys.stdout
        else:
            self._tmp = self.output.with_name(f".{self.output.name}.{os.getpid()}.tmp")
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
                # surrogateescape: a file name that is not valid UTF-8 is written as its own bytes.
                self._stream = open(self._tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 (closed in on_predict_end)
            except OSError as err:
                raise ResourceError(f"Cannot write predictions to {self.output}: {err.strerror}.") from err
        if self.format == "csv":
            self._csv = csv.writer(self._stream)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if trainer.received_sigterm:  # Lightning's predict loop, unlike fit's, carries on after SIGTERM
            raise Interrupted("terminated (SIGTERM)", EXIT_TERMINATED)
        rows = self._rows(batch["ids"], prediction, pl_module)
        errors = batch.get("errors") or [None] * len(rows)
        if self._shards is not None:
            if trainer.global_rank == 0:
                self._shards.check_failed()  # another rank's failure ends the run now, not after rank 0's share
            self._shards.add(rows, errors)  # rank 0 decides about errors when it writes them out, in order
        else:
            self._emit(rows, errors)

    def _emit(self, rows: list[dict[str, Any]], errors: list[str | None]) -> None:
        """Write a batch's rows; at an unreadable input, the rows before it, then stop (or an error row)."""
        if self._columns is None:
            self._columns = [*rows[0], *(["error"] if self.skip_bad_inputs else [])]
        written = []
        for row, error in zip(rows, errors):
            if error is not None and not self.skip_bad_inputs:
                self._write(written)  # the rows before the bad input are kept
                raise DataError(f"{error} Or pass --skip_bad_inputs true to write an error row for it and go on.")
            if error is not None:
                self.skipped += 1
                row = {"input": row["input"], "error": error}
            written.append(row)
        self._write(written)

    def _rows(self, ids: list[str], prediction: dict[str, torch.Tensor], pl_module: Any) -> list[dict[str, Any]]:
        if "embedding" in prediction:
            vectors = prediction["embedding"].float().cpu().tolist()
            return [{"input": i, "embedding": [round(v, 6) for v in vec]} for i, vec in zip(ids, vectors)]
        probs = prediction["probs"].float().cpu()
        names = pl_module.class_names
        k = min(self.topk, probs.shape[1])
        scores, indices = probs.topk(k, dim=1)
        rows = []
        for input_id, row_scores, row_indices in zip(ids, scores.tolist(), indices.tolist()):
            topk = [[names[c], round(s, 6)] for c, s in zip(row_indices, row_scores)]
            rows.append({"input": input_id, "label": topk[0][0], "score": topk[0][1], "topk": topk})
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            if self.format == "jsonl":
                self._stream.write("".join(_json_line(r) for r in rows))
            else:
                if not self._header_written:
                    self._csv.writerow(self._columns)
                    self._header_written = True
                for r in rows:
                    self._csv.writerow([_csv_cell(r.get(c, "")) for c in self._columns])
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as err:
            raise ResourceError(f"Cannot write predictions to {self.output}: {err.strerror}.") from err

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shards is None:
            self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" or self._shards is None:
            return
        # Lightning has put SIGTERM's default handler back before callbacks' teardown, so waiting for the
        # other ranks and merging their rows would die on the spot, leaving the parts behind: here SIGTERM
        # raises Interrupted (exit 143) and this cleans up as on_exception does during the run.
        try:
            with sigterm_as_interrupt("terminated (SIGTERM)"):
                self._gather(trainer)
        except BaseException:
            self._discard()
            if self._shards is not None and trainer.global_rank == 0:
                self._shards.remove()
            self._shards = None
            raise

    def _gather(self, trainer: L.Trainer) -> None:
        stopped = lambda: trainer.received_sigterm  # noqa: E731
        self._shards.finish()
        if trainer.global_rank != 0:
            self._shards.wait_for_merge(stopped)
            self._shards = None
            return
        self._shards.wait_for_ranks(stopped)
        self._open()
        for rows, errors in self._shards.batches():
            if stopped():
                raise Interrupted("terminated (SIGTERM)", EXIT_TERMINATED)
            self._emit(rows, errors)
        self._close()
        self._shards.remove()
        self._shards = None

    def _close(self) -> None:
        if self.skip_bad_inputs:
            print(
                f"transfer: predict: {self.skipped} unreadable input(s) skipped (rows with an error)", file=sys.stderr
            )
        if self._tmp is None:
            return
        try:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            os.replace(self._tmp, self.output)
        except OSError as err:
            self._discard()
            raise ResourceError(f"Cannot write predictions to {self.output}: {err.strerror}.") from err
        self._tmp = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._discard()
        if self._shards is not None:
            # Any failure of a rank other than 0 in the loop (a bad batch, out of memory): rank 0 hears of it
            # and ends with its error, instead of waiting until the launcher kills it with the parts left.
            if self._predicting:
                self._shards.fail(exception)
            self._shards.remove()
            self._shards = None

    def _discard(self) -> None:
        if self._tmp is None:
            return
        try:
            if self._stream is not None and not self._stream.closed:
                # Closing flushes what is buffered, which fails again on a full disk.
                self._stream.close()
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def output_format(output: Path | None) -> str:
    """`jsonl` or `csv`, from the --output file name (JSON lines on stdout without one)."""
    if output is None or output.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if output.suffix.lower() == ".csv":
        return "csv"
    raise ConfigError(f"--output {output}: use a .jsonl or .csv file name, or - for JSON lines on stdout.")


def _json_line(row: dict[str, Any]) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # A file name that is not valid UTF-8 (its bytes decoded with surrogateescape): \udcXX escapes
        # keep the line valid JSON in ASCII, and os.fsencode() of the parsed string gives the bytes back.
        line = json.dumps(row, ensure_ascii=True)
    return line + "\n"


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False)
    return value
