"""`transfer backbones [--family F] [PATTERN]`: the backbone names that can be used, one per line on stdout.

Names come from the upstream registries, read without building any model: torchvision's
classification models, timm's models with pretrained weights (tag included), and the HuggingFace
models already in the local cache (the hub itself is not listed: any hub name works online).
"""

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path

from transfer_cli.errors import EXIT_USAGE, ConfigError

FAMILIES = ("torchvision", "timm", "huggingface")


def list_backbones(family: str | None = None, pattern: str | None = None) -> list[str]:
    """Usable names, sorted; with no family, every family's as `family<TAB>name`.

    PATTERN is a shell-style wildcard (`convnext*`, `*in22k*`), matched without regard to case; a
    pattern without wildcards matches anywhere in the name.
    """
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"Unknown backbone family {family!r} (--family). Use one of: {', '.join(FAMILIES)}.")
    rows = []
    for name in (family,) if family else FAMILIES:
        names = [n for n in _LISTERS[name]() if _matches(n, pattern)]
        rows += names if family else [f"{name}\t{n}" for n in names]
    return rows


def _matches(name: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    pattern = pattern.lower()
    if not any(c in pattern for c in "*?["):
        return pattern in name.lower()
    return fnmatch.fnmatchcase(name.lower(), pattern)


def _torchvision() -> list[str]:
    import torchvision

    # The package's own module: classification models only (no detection or segmentation).
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm() -> list[str]:
    import timm

    return sorted(timm.list_models(pretrained=True))


def _huggingface() -> list[str]:
    """Cached hub repositories that AutoModel can load (a config.json naming a model_type)."""
    from huggingface_hub import constants

    # The environment first: huggingface_hub reads it once, at import.
    if os.environ.get("HF_HUB_CACHE"):
        cache = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        cache = Path(os.environ["HF_HOME"]) / "hub"
    else:
        cache = Path(constants.HF_HUB_CACHE)
    if not cache.is_dir():
        return []
    names = []
    for repo in cache.glob("models--*"):
        configs = repo.glob("snapshots/*/config.json")
        if any(_names_model_type(c) for c in configs):
            names.append(repo.name[len("models--") :].replace("--", "/"))
    return sorted(names)


def _names_model_type(config: Path) -> bool:
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


_LISTERS = {"torchvision": _torchvision, "timm": _timm, "huggingface": _huggingface}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer backbones",
        description="List backbone names for --model.init_args.backbone.init_args.name (or .model for "
        "huggingface), one per line. Without --family: every family, as FAMILY<TAB>NAME.",
        exit_on_error=False,
    )
    parser.add_argument("--family", choices=FAMILIES, help="only this family's names, bare")
    parser.add_argument("pattern", nargs="?", help="wildcard (convnext*, *in22k*) or a word anywhere in the name")
    return parser


def main(args: list[str]) -> int:
    """Print the names; returns the exit code (0, or 2 for a usage error)."""
    try:
        options = _parser().parse_args(args)
        rows = list_backbones(options.family, options.pattern)
    except SystemExit as exit_:  # --help, and argparse errors it reports itself
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except (argparse.ArgumentError, ConfigError) as err:
        print(f"transfer: error: {err}\nSee `transfer backbones --help`.", file=sys.stderr)
        return EXIT_USAGE
    if not rows:
        family = f"{options.family} " if options.family else ""
        matching = f" match {options.pattern!r}" if options.pattern else " are available here"
        print(f"transfer: no {family}backbone names{matching}.", file=sys.stderr)
        return 0
    try:
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
