"""Shipped recipes (configs/*.yaml, packaged as transfer_cli.configs): `--config NAME` finds them."""

from importlib.resources import files
from pathlib import Path


def recipes_dir() -> Path:
    try:
        return Path(str(files("transfer_cli.configs")))
    except ModuleNotFoundError:
        # An editable install runs from the source tree, where configs/ sits beside the package.
        return Path(__file__).resolve().parent.parent / "configs"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if not p.stem.startswith("_"))


def resolve_config(value: str) -> str:
    """A config path as given, or the packaged recipe of that name (with or without .yaml)."""
    if Path(value).expanduser().exists() or "\n" in value:
        return value
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    candidate = recipes_dir() / f"{name}.yaml"
    return str(candidate) if candidate.is_file() else value


def resolve_config_args(args: list[str]) -> list[str]:
    """Replace recipe names after --config/-c with their packaged paths."""
    out = []
    expect_value = False
    for arg in args:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg[len("--config=") :]))
        else:
            out.append(arg)
    return out
