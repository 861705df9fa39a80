"""CLI start-up and time to the first predicted row, measured on the real `transfer` executable.

Each command runs as a fresh subprocess, several times; the median is reported. The first-row
case trains a tiny checkpoint with `transfer fit` on synthetic PNGs first (not timed), then times
`transfer predict` from launch to the first row on stdout, beside a hand-written predict script
(`plain_predict.py`) that reads the same checkpoint and images.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent


def transfer_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "transfer"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "transfer_cli"]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _median_seconds(command: list[str], repeats: int, **env: str) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**offline_env(), **env}
        )
        runs.append(time.perf_counter() - start)
    return {"seconds": statistics.median(runs), "seconds_runs": runs}


def startup_case(spec: dict[str, Any]) -> dict[str, Any]:
    transfer = transfer_command()
    sides = {}
    # Interleave the light commands so drift on a shared machine hits both.
    help_runs, torch_runs = [], []
    for _ in range(spec["repeats"]):
        help_runs += _median_seconds([*transfer, "--help"], 1)["seconds_runs"]
        torch_runs += _median_seconds([sys.executable, "-c", "import torch"], 1)["seconds_runs"]
    sides["transfer_help"] = {"seconds": statistics.median(help_runs), "seconds_runs": help_runs}
    sides["import_torch"] = {"seconds": statistics.median(torch_runs), "seconds_runs": torch_runs}
    fit_help = [*transfer, "fit", "--help"]
    # Built once per installation and source version, then read from the cache (transfer_cli.help_cache).
    sides["transfer_fit_help_built"] = _median_seconds(fit_help, spec["heavy_repeats"], TRANSFER_HELP_CACHE="0")
    with tempfile.TemporaryDirectory(prefix="transfer-bench-cache-") as cache:
        _median_seconds(fit_help, 1, TRANSFER_CACHE_DIR=cache)  # fills the cache; not timed
        sides["transfer_fit_help"] = _median_seconds(fit_help, spec["repeats"], TRANSFER_CACHE_DIR=cache)
    help_s = sides["transfer_help"]["seconds"]
    return {"unit": "s", "sides": sides, "ratio": help_s / sides["import_torch"]["seconds"]}


# Time to the first predicted row -------------------------------------------------------------


def _write_pngs(folder: Path, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def _train_checkpoint(root: Path, spec: dict[str, Any], accelerator: str) -> Path:
    for name in ("cat", "dog"):
        _write_pngs(root / "data" / "train" / name, 16, spec["source_size"], seed=len(name))
    backbone = {
        "class_path": "transfer_cli.backbones.TorchvisionBackbone",
        "init_args": {"name": spec["model"], "weights": None, "image_size": spec["image_size"]},
    }
    data = {
        "class_path": "transfer_cli.data.ImageFolderDataModule",
        "init_args": {"root": str(root / "data"), "batch_size": spec["batch_size"]},
    }
    return fit_checkpoint(root, backbone, data, accelerator)


def fit_checkpoint(root: Path, backbone: dict[str, Any], data: dict[str, Any], accelerator: str) -> Path:
    """A checkpoint from two training steps of `transfer fit` (not timed), written under `root`."""
    config = {
        "seed_everything": 0,
        "model": {"class_path": "transfer_cli.model.TransferModel", "init_args": {"backbone": backbone}},
        "data": data,
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "accelerator": accelerator,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root / "runs"), "name": "bench"},
            },
        },
    }
    config_path = root / "fit.yaml"
    config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [*transfer_command(), "fit", "--config", str(config_path)], capture_output=True, text=True, env=offline_env()
    )
    if done.returncode != 0:
        raise RuntimeError(f"transfer fit failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = sorted((root / "runs").glob("bench/version_*/checkpoints/last*.ckpt"))
    if not found:
        raise RuntimeError(f"transfer fit wrote no last.ckpt under {root / 'runs'}")
    return found[-1]


def _time_rows(command: list[str], expected_rows: int, stdin: Path | None = None) -> dict[str, float]:
    """Seconds from launch to the first line on stdout, and to the end, and the process's peak resident
    memory; checks every row came out."""
    with tempfile.TemporaryFile() as errors, open(stdin or os.devnull, "rb") as source:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdin=source, stdout=subprocess.PIPE, stderr=errors, env=offline_env())
        first_line = process.stdout.readline()
        first = time.perf_counter() - start
        rows = (1 if first_line.strip() else 0) + sum(1 for line in process.stdout if line.strip())
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        total = time.perf_counter() - start
        errors.seek(0)
        message = errors.read().decode(errors="replace")[-3000:]
    if process.returncode != 0 or rows != expected_rows:
        raise RuntimeError(f"{command[:3]} exited {process.returncode} with {rows}/{expected_rows} rows:\n{message}")
    return {"first_row_s": first, "total_s": total, "peak_rss_mb": usage.ru_maxrss / 1024}


def first_row_case(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Time to the first row and to all rows for each input count, beside plain_predict.py; then the
    peak memory of predicting a stdin list of `memory_inputs` paths against one ten times shorter."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    counts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as tmp:
        root = Path(tmp)
        checkpoint = _train_checkpoint(root, spec, accelerator)
        for count in spec["counts"]:
            inputs = root / f"predict-{count}"
            _write_pngs(inputs, count, spec["source_size"], seed=7)
            tool = [*transfer_command(), "predict", "--ckpt", str(checkpoint), "--input", str(inputs)]
            tool += ["--trainer.accelerator", accelerator]
            plain = [sys.executable, str(HERE / "plain_predict.py"), str(checkpoint), str(inputs), "--device", device]
            counts[str(count)] = compare_rows(tool, plain, count, spec["repeats"])
        memory = _predict_memory(root, checkpoint, spec["memory_inputs"], accelerator)
    first = counts[str(spec["counts"][0])]
    return {"unit": "s", "counts": counts, "sides": first["sides"], "ratio": first["ratio"], "memory": memory}


def compare_rows(tool: list[str], plain: list[str], count: int, repeats: int) -> dict[str, Any]:
    """Both commands `repeats` times, interleaved: medians of the seconds to the first and to the last row."""
    runs: dict[str, list[dict[str, float]]] = {"transfer": [], "plain": []}
    for _ in range(repeats):
        runs["transfer"].append(_time_rows(tool, count))
        runs["plain"].append(_time_rows(plain, count))
    sides = {}
    for name, side_runs in runs.items():
        sides[name] = {k: statistics.median(run[k] for run in side_runs) for k in ("first_row_s", "total_s")}
        sides[name]["first_row_s_runs"] = [run["first_row_s"] for run in side_runs]
    return {
        "sides": sides,
        "ratio": sides["transfer"]["first_row_s"] / sides["plain"]["first_row_s"],
        "total_ratio": sides["transfer"]["total_s"] / sides["plain"]["total_s"],
    }


def _predict_memory(root: Path, checkpoint: Path, inputs: int, accelerator: str) -> dict[str, Any]:
    images = root / "memory-images"
    _write_pngs(images, 64, 32, seed=11)
    files = sorted(str(p) for p in images.iterdir())
    peaks = {}
    for count in (inputs // 10, inputs):
        listing = root / f"list-{count}.txt"
        listing.write_text("".join(files[i % len(files)] + "\n" for i in range(count)))
        tool = [*transfer_command(), "predict", "--ckpt", str(checkpoint), "--input", "-"]
        tool += ["--trainer.accelerator", accelerator]
        peaks[str(count)] = _time_rows(tool, count, stdin=listing)["peak_rss_mb"]
    small, large = (peaks[str(c)] for c in (inputs // 10, inputs))
    return {"peak_rss_mb": peaks, "growth": large / small - 1}
