"""Facts about runs and where they write: resuming, output locations, precision, class lists."""

import tempfile
from pathlib import Path
from typing import Any

import torch

from transfer_cli.checkpoint import read_checkpoint
from transfer_cli.errors import CheckpointError, ConfigError, ResourceError


def check_same_classes(expected: list[str], datamodule: Any, ckpt: str) -> None:
    """`datamodule` is a TransferDataModule: its files name the classes, or it returns None."""
    found = datamodule.data_class_names()
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


DEFAULT_RUNS_DIR = "runs"


def _logger_args(logger: Any) -> Any:
    """The init_args of the first logger (the one Lightning places checkpoints by), if it has any."""
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return getattr(logger, "init_args", None)


def recipe_name(configs: Any) -> str:
    """The run name a recipe gives: the stem of the first --config file."""
    for config in configs or []:
        path = Path(str(getattr(config, "relative", config)))
        if "\n" not in str(path) and path.suffix in (".yaml", ".yml", ".json"):
            return path.stem
    return "transfer"


def fill_logger_defaults(logger: Any, default_root_dir: Any, configs: Any) -> None:
    """Runs go under --trainer.default_root_dir (./runs without it), named after the recipe.

    The CLI's default logger leaves save_dir empty and name unset so that these two facts are stated
    once, here, and a value the user gives always wins.
    """
    init_args = _logger_args(logger)
    if init_args is None:
        return
    if init_args.get("save_dir", None) == "":
        init_args.save_dir = str(default_root_dir or DEFAULT_RUNS_DIR)
    if "name" in init_args and init_args.get("name") is None:
        init_args.name = recipe_name(configs)


def _version_dir(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def run_directory(trainer_config: Any) -> Path | None:
    """The directory this run writes into, when it can be known before the logger picks a version."""
    logger = trainer_config.logger
    if logger is False or logger is None:
        return Path(trainer_config.default_root_dir or ".")
    init_args = _logger_args(logger)
    if init_args is None or init_args.get("version") is None or init_args.get("save_dir") is None:
        return None
    return Path(init_args.save_dir) / str(init_args.get("name") or "") / _version_dir(init_args.version)


def checkpoint_directory(config: Any) -> Path | None:
    if config.checkpoint.dirpath:
        return Path(config.checkpoint.dirpath)
    run_dir = run_directory(config.trainer)
    return None if run_dir is None else run_dir / "checkpoints"


def resolve_last(config: Any) -> str:
    """`--ckpt_path last`: the newest last.ckpt among the earlier runs in the place this run writes to."""
    where = checkpoint_directory(config)
    init_args = _logger_args(config.trainer.logger)
    if where is not None:
        found = list(where.glob("last*.ckpt"))
        searched = where
    elif init_args is not None and init_args.get("save_dir"):
        root = Path(init_args.save_dir) / str(init_args.get("name") or "")
        found = list(root.glob("version_*/checkpoints/last*.ckpt"))
        searched = root / "version_*" / "checkpoints"
    else:
        raise ConfigError("--ckpt_path last: this logger does not say where runs are; give the checkpoint file.")
    if not found:
        raise ConfigError(
            f"--ckpt_path last: no last.ckpt under {searched} to resume from. Check --trainer.default_root_dir, "
            "--trainer.logger.init_args.name/version, or give the checkpoint file to --ckpt_path."
        )
    return str(max(found, key=lambda p: p.stat().st_mtime))


def continue_in_run(config: Any, ckpt_path: str) -> None:
    """A checkpoint from one of this recipe's runs is resumed in that run's directory, not a new version,
    so the run keeps one last.ckpt and one metrics history."""
    init_args = _logger_args(config.trainer.logger)
    if config.checkpoint.dirpath or init_args is None or init_args.get("version") is not None:
        return
    if not init_args.get("save_dir"):
        return
    ckpt = Path(ckpt_path).resolve()
    root = (Path(init_args.save_dir) / str(init_args.get("name") or "")).resolve()
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == root:
        init_args.version = ckpt.parent.parent.name


def check_new_or_resumed(config: Any) -> Path | None:
    """Refuse to start a run where an earlier run already wrote, unless this run resumes it.

    Lightning would silently overwrite its last.ckpt and delete its metrics.csv. Returns the run
    directory when this run continues an earlier one there.
    """
    ckpt_dir = checkpoint_directory(config)
    if ckpt_dir is None:
        return None  # a new version directory of its own
    run_dir = ckpt_dir.parent
    logged = config.trainer.logger not in (False, None) and (run_dir / "metrics.csv").is_file()
    earlier = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not earlier and not logged:
        return None
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and Path(ckpt_path).resolve().parent == ckpt_dir.resolve():
        return run_dir
    other = (
        "--trainer.default_root_dir"
        if config.trainer.logger in (False, None)
        else "--trainer.logger.init_args.version (or leave it out for a new version_N)"
    )
    shown = "last.ckpt" if (ckpt_dir / "last.ckpt").is_file() else earlier[0].name if earlier else "metrics.csv"
    raise ConfigError(
        f"{run_dir} already holds an earlier run ({shown}); a new run "
        f"would overwrite its checkpoints and metrics. To continue it, add --ckpt_path last (or --ckpt_path "
        f"{ckpt_dir / 'last.ckpt'}); to start another, choose another {other}."
    )


def check_resumable(ckpt_path: str, model: Any, datamodule: Any) -> None:
    """A checkpoint given to --ckpt_path must be one of this recipe's: same model, same classes.

    Checked before Lightning opens the run directory, so a wrong file leaves nothing behind.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file() and not path.is_dir():
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such checkpoint file.")
    checkpoint = read_checkpoint(path, option="--ckpt_path")
    meta = checkpoint["transfer"]
    if meta.get("class_names"):  # an autoencoder has none
        check_same_classes(meta["class_names"], datamodule, ckpt_path)
    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored_class = (meta.get("model") or {}).get("class_path")
    if theirs != ours or stored_class != f"{type(model).__module__}.{type(model).__qualname__}":
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} is a checkpoint of another recipe ({stored_class}, "
            f"{len(differ)} weights differ, e.g. {differ[:2]}); it cannot be resumed with this config. "
            "Resume with the config it was trained with, or start a new run without --ckpt_path."
        )


def keep_metrics(run_dir: Path) -> None:
    """Lightning's CSV logger deletes metrics.csv when it reopens a run; keep the earlier segment."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        segment = 1
        while (run_dir / f"metrics-segment{segment}.csv").exists():
            segment += 1
        metrics.rename(run_dir / f"metrics-segment{segment}.csv")


def remove_empty_run(run_dir: Any) -> None:
    """Remove a run directory that a failed fit made before it trained a step: it holds only the config
    (no checkpoint, no metrics of a step), and would otherwise look like a run worth resuming."""
    if run_dir is None:
        return
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(run_dir.rglob("*.ckpt")):
        return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def run_dir(trainer: Any) -> str | None:
    """The directory a run writes its files to, as `trainer.log_dir` names it, without its broadcast.

    `trainer.log_dir` is a collective under DDP: asked on rank zero alone (to write a file only there),
    it waits for processes that have moved on or exited, and fails ("Connection closed by peer").
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    return getattr(logger, "log_dir", None) or logger.save_dir
