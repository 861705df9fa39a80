"""Facts about runs and where they write: resuming, output locations, precision, class lists."""

import tempfile
from pathlib import Path
from typing import Any

import torch

from transfer_cli.errors import CheckpointError, ConfigError, ResourceError


def check_same_classes(expected: list[str], datamodule: Any, ckpt: str) -> None:
    found = datamodule.data_class_names() if hasattr(datamodule, "data_class_names") else None
    if found is None or list(found) == list(expected):
        return
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    detail = (
        f"missing from the data: {missing}; not in the checkpoint: {extra}"
        if missing or extra
        else (f"same classes in another order: checkpoint {expected}, data {found}")
    )
    raise CheckpointError(f"The data's classes differ from those {ckpt} was trained on ({detail}).")


def check_writable(directory: Any) -> None:
    """Fail before any work when the output location cannot be written (exit 6).

    A real write probe, not os.access: root passes os.access everywhere, read-only mounts included.
    """
    path = Path(directory).resolve()
    while not path.exists():
        path = path.parent
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ResourceError(f"Cannot write to {directory}: {err.strerror or err}. Choose a writable location.") from err


def default_precision(accelerator: Any) -> str:
    """bf16 mixed precision where the accelerator has it, full precision elsewhere."""
    wants_cuda = str(accelerator) in ("auto", "gpu", "cuda")
    if wants_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_last(logger: Any) -> str:
    """`--ckpt_path last`: the newest last.ckpt among this recipe's earlier runs."""
    init_args = getattr(logger, "init_args", None) or {}
    root = Path(init_args.get("save_dir", "runs")) / str(init_args.get("name", "transfer"))
    found = sorted(root.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints to resume from.")
    return str(found[-1])


def keep_metrics(run_dir: Path) -> None:
    """Lightning's CSV logger deletes metrics.csv when it reopens a run; keep the earlier segment."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        segment = 1
        while (run_dir / f"metrics-segment{segment}.csv").exists():
            segment += 1
        metrics.rename(run_dir / f"metrics-segment{segment}.csv")
