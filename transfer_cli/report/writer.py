"""The report directory: complete or absent (built under DIR.tmp-XXXX, then renamed), never half-written."""

import csv
import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from transfer_cli.errors import ConfigError, sigterm_as_interrupt
from transfer_cli.report.plots import calibration_png, confusion_matrix_png
from transfer_cli.runs import check_writable

FILES = ("metrics.json", "per_class.csv", "confusion_matrix.png", "calibration.png", "errors.jsonl")


def check_report_target(report: str | None) -> None:
    """Refuse, before any evaluation runs, a --report directory that would mix this report with other files."""
    if report in (None, "-"):
        return
    path = Path(report).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--report {report} is a file; give a directory name for the report (it is created).")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"--report {report} already exists and is not empty; a report would mix with its files. "
            "Give a new directory (it is created) or empty that one."
        )
    # An empty folder given as the report (`--report .` included) is filled in place, so it is what must be writable.
    check_writable(path if path.is_dir() else path.parent)


def versions() -> dict[str, str]:
    found = {}
    for package in ("transfer-cli", "torch", "lightning", "torchmetrics", "transformers", "timm", "torchvision"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def report_document(subcommand: str, checkpoint: str | None, data: Any, figures: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: where the figures came from, then the figures."""
    return {
        "subcommand": subcommand,
        "split": "val" if subcommand == "validate" else "test",
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "data": data,
        **figures,
        "versions": versions(),
    }


def write_json_stdout(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def write_report(directory: str, document: dict[str, Any], errors: list[dict[str, Any]]) -> Path:
    # Normalised, so `.` and `out/..` have a real name and parent.
    target = Path(os.path.abspath(Path(directory).expanduser()))
    target.parent.mkdir(parents=True, exist_ok=True)
    in_place = target.is_dir()  # empty: checked before the evaluation
    with sigterm_as_interrupt("terminated (SIGTERM) while writing the report; no report was written"):
        # Beside a new folder, so it is renamed into place whole; inside an existing one, which stays
        # where it is (a shell may be in it) and which alone needs to be writable.
        where = (target, ".report.tmp-") if in_place else (target.parent, f"{target.name}.tmp-")
        staging = Path(tempfile.mkdtemp(prefix=where[1], dir=where[0]))
        _build(staging, target, document, errors)
    return target


def _build(staging: Path, target: Path, document: dict[str, Any], errors: list[dict[str, Any]]) -> None:
    try:
        _write_files(staging, document, errors)
        _usual_permissions(staging)
        if staging.parent == target:
            _move_into(staging, target)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into(staging: Path, target: Path) -> None:
    """The finished files up into the empty `target`, taken back out if a move fails or is interrupted."""
    moved = []
    try:
        for name in FILES:
            os.rename(staging / name, target / name)
            moved.append(target / name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    staging.rmdir()


def _usual_permissions(directory: Path) -> None:
    # mkdtemp makes the staging folder 0700; renamed as it is, the report would be unreadable by anyone
    # else (a shared results folder, a web server), unlike a folder made with mkdir.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


def _write_files(directory: Path, document: dict[str, Any], errors: list[dict[str, Any]]) -> None:
    (directory / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    with open(directory / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(document["per_class"])
    with open(directory / "errors.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in errors)
    confusion_matrix_png(directory / "confusion_matrix.png", document["confusion_matrix"], document["class_names"])
    calibration_png(directory / "calibration.png", document["calibration"], document["ece"])
