"""Rows of text from CSV, TSV and JSONL files, by column name, each with its `file:line`."""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer_cli.errors import DataError

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, row by column name) for each row of a TSV, CSV or JSONL file.

    TSV is read as GLUE writes it: no quoting, so quote characters are literal text. CSV uses the
    usual double-quote quoting.
    """
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(TABLE_SUFFIXES)}.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix == ".jsonl":
                yield from _jsonl_records(f, path)
            else:
                yield from _table_records(f, path, suffix == ".tsv")
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"Cannot read {path}: {err}.") from err


def _jsonl_records(f, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line.")
        yield f"{path}:{line_no}", record


# Python's csv module refuses fields over 131072 characters, yet a review or an article is often
# longer: every field is read whole (it is in memory either way) and the tokenizer truncates it at
# max_length, counted. 2**31 - 1 is the largest limit that every platform's C long accepts.
FIELD_SIZE_LIMIT = 2**31 - 1


def _table_records(f, path: Path, tsv: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    csv.field_size_limit(FIELD_SIZE_LIMIT)
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path} is empty: expected a header row naming the columns.")
    start = reader.line_num + 1
    for values in reader:
        where, start = f"{path}:{start}", reader.line_num + 1  # a quoted CSV field may span lines
        if not values:
            continue
        if len(values) != len(header):
            raise DataError(f"{where}: {len(values)} fields, but the header has {len(header)}.")
        yield where, dict(zip(header, values))


def field_text(record: dict[str, Any], column: str, where: str) -> str:
    if column not in record:
        raise DataError(f"{where}: no {column!r} column (found: {', '.join(map(str, record))}).")
    value = record[column]
    if isinstance(value, (dict, list)):
        # str() would turn a JSON list or object into Python syntax and train on that, silently.
        raise DataError(f"{where}: the {column!r} value is a JSON {type(value).__name__}; expected text or a number.")
    return "" if value is None else str(value)


@dataclass
class Rows:
    """Examples of one split: one tuple of texts (one sentence or a pair) per row."""

    texts: list[tuple[str, ...]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def subset(self, indices: list[int]) -> "Rows":
        return Rows([self.texts[i] for i in indices], [self.labels[i] for i in indices], [self.ids[i] for i in indices])
