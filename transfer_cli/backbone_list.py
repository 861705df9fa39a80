"""`transfer backbones [--family F] [PATTERN]`: the backbone names that can be used, one per line on stdout.

Names come from the upstream registries, read without building any model: torchvision's
classification models, timm's models with pretrained weights (tag included), and the HuggingFace
models already in the local cache (the hub itself is not listed: any hub name works online).
"""

import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Literal, get_args

from transfer_cli.errors import ConfigError

Family = Literal["torchvision", "timm", "huggingface"]
FAMILIES = get_args(Family)


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


def backbones(pattern: str | None = None, /, *, family: Family | None = None) -> None:
    """List the backbone names that can be used, one per line on stdout.

    Names for --model.init_args.backbone.init_args.name (or .model for huggingface). Without --family:
    every family's, as FAMILY<TAB>NAME.

    Args:
        pattern: A wildcard (convnext*, *in22k*) or a word anywhere in the name; case is ignored.
        family: Only this family's names, bare.
    """
    rows = list_backbones(family, pattern)
    if not rows:
        which = f"{family} " if family else ""
        matching = f" match {pattern!r}" if pattern else " are available here"
        print(f"transfer: no {which}backbone names{matching}.", file=sys.stderr)
        return
    sys.stdout.write("\n".join(rows) + "\n")
    sys.stdout.flush()  # a closed pipe (`| head`) surfaces here, where the entry point stops quietly


def main(args: list[str]) -> int:
    """`transfer backbones ARGS` from Python, with the console script's exit codes and messages."""
    from transfer_cli.entry import main as transfer

    return transfer(["backbones", *args])
