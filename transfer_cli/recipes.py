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


def check_config_files(args: list[str]) -> None:
    """Every --config file exists and is valid YAML, reported with its path and line."""
    import yaml

    from transfer_cli.errors import ConfigError

    for i, arg in enumerate(args):
        value = arg[len("--config=") :] if arg.startswith("--config=") else None
        if arg in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        if value is None or "\n" in value:
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Config not found: {value} (--config). Give a YAML file or a recipe name: {', '.join(recipe_names())}."
            )
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"Malformed YAML in {where}: {problem}. Fix the file's syntax.") from None


def summarize_parser_error(message: str) -> str:
    """jsonargparse explains a wrong value by listing every type it tried; keep what a user needs."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    keep = [lines[0]] + [line for line in lines[1:] if line.startswith(("Given value:", "- Expected", "Expected"))]
    return "\n".join(dict.fromkeys(keep))
