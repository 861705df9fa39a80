"""Shipped recipes (configs/*.yaml, packaged as transfer_cli.configs): `--config NAME` finds them."""

import difflib
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterable, Iterator
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
    """A config file as given, or the packaged recipe of that name (with or without .yaml).

    Only a file shadows a recipe: a directory is never a config, and run folders are commonly named
    after their recipe (`runs/` saved to `.` gives `./resnet50-cifar10/`).
    """
    if Path(value).expanduser().is_file() or "\n" in value:
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
        if path.is_dir():
            raise ConfigError(
                f"Config {value} (--config) is a directory, and no recipe has that name. Give a YAML file "
                f"or a recipe name: {', '.join(recipe_names())}."
            )
        if not path.is_file():
            raise ConfigError(
                f"Config not found: {value} (--config). Give a YAML file or a recipe name: {', '.join(recipe_names())}."
            )
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"Malformed YAML in {where}: {problem}. Fix the file's syntax.") from None
        if not isinstance(content, dict):
            found = "nothing (the file is empty)" if content is None else f"a {type(content).__name__}"
            raise ConfigError(
                f"Config {path} (--config) holds {found}; a config is a mapping of settings such as "
                "`trainer:` / `model:` / `data:` (see `transfer fit --config NAME --print_config`)."
            )


def summarize_parser_error(message: str) -> str:
    """jsonargparse explains a wrong value by listing every type it tried; keep what a user needs."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    keep = [lines[0]] + [line for line in lines[1:] if line.startswith(("Given value:", "- Expected", "Expected"))]
    return "\n".join(dict.fromkeys(keep))


# What jsonargparse writes at each level of a failure (jsonargparse/_typehints.py, _core.py); each level
# is raised `from` the one below, so the chain of exceptions is the path from the root to the cause.
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')
_CLASS_PROBLEM = re.compile(r"^Problem with given class_path '([^']+)'")
_CALLABLE_PROBLEM = re.compile(r"expects a function or a callable class: ")
_CALLABLE_CLASS = re.compile(r"class_path='([^']+)'")
_CALLABLE_VALUE = re.compile(r"Got value: ([\w.]+)$")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_SUBCOMMAND_KEY = re.compile(r"does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)")
_BASE_CLASSES = ("lightning.LightningModule", "lightning.LightningDataModule")


def explain_parser_error(err: BaseException, options: Iterable[str] = ()) -> str:
    """The one failure behind a jsonargparse error: its full dotted key, the cause, the closest valid name.

    jsonargparse reports a bad value under a Union by listing what every subtype said (the class's real
    complaint next to "Expected a <class 'NoneType'>"), but it raises each level from the level below and
    a Union from its first subtype, so walking the chain of causes finds the real failure and its path.
    `options` are the subcommand's keys, for suggestions at the top level.
    """
    path, owner, given, nested, factory = [], None, None, False, False
    leaf = None
    for cause in _chain(err):
        text = str(cause).strip()
        if match := _PARSER_KEY.match(text):
            if nested:
                path.append("init_args")
            if nested or not path or path[-1] != match.group(1):
                path.append(match.group(1))
            nested = False
        elif match := _CLASS_PROBLEM.match(text):
            owner = given = match.group(1)
            nested, factory = True, False
        elif _CALLABLE_PROBLEM.search(text):
            # A factory (optimizer, scheduler, head): its class only appears in the value jsonargparse got.
            named = _CALLABLE_CLASS.search(text)
            owner = named.group(1) if named else owner
            value = _CALLABLE_VALUE.search(text)
            given = value.group(1) if value else given
            nested = factory = named is not None
        if leaf is None and isinstance(cause, (KeyError, AttributeError, ImportError)):
            leaf = cause
    leaf = leaf or _last(err)
    text = str(leaf).strip()
    if match := _NOT_ACCEPTED.match(text):
        return _unknown_key([*path, *(["init_args"] if nested else [])], match.group(1), owner, factory)
    if match := _SUBCOMMAND_KEY.search(text):
        return _unknown_option(match.group(1), [o.lstrip("-") for o in options])
    if match := _UNRECOGNIZED.match(text):
        return _unrecognized(match.group(1).split(), options)
    if isinstance(leaf, (AttributeError, ImportError)) and path:
        return _class_not_found(".".join(path), given, leaf)
    if path and "NoneType" not in text:
        return f"Invalid value for {'.'.join(path)}: {text.splitlines()[0]}"
    return summarize_parser_error(str(err))


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _last(err: BaseException) -> BaseException:
    *_, last = _chain(err)
    return last


def _unknown_key(path: list[str], key: str, owner: str | None, factory: bool) -> str:
    where = ".".join([*path, key])
    section = ".".join(path[:-1]) if path and path[-1] == "init_args" else ".".join(path)
    if owner in _BASE_CLASSES:
        # The value had init_args but nothing before it chose a class: an overlay given on its own.
        return (
            f"{where} is set, but no class was chosen for {section} ({section}.class_path). A config such as "
            f"`debug` is an overlay: stack it on a recipe (--config resnet50-cifar10 --config debug), or "
            f"give --{section} CLASS."
        )
    accepted = _parameters(owner, factory) if owner else []
    message = f"Unknown key {where}" + (f": {owner} does not take '{key}'." if owner else ".")
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    if close:
        message += f" Did you mean {'.'.join([*path, close[0]])}?"
    if accepted:
        message += f" Valid keys under {'.'.join(path)}: {', '.join(accepted)}."
    return message


def _parameters(class_path: str, factory: bool) -> list[str]:
    """The keys a class takes in init_args: its constructor's parameters, less the leading required ones
    when it is a factory, because the call supplies those (an optimizer's params, a head's sizes)."""
    try:
        module, name = class_path.rsplit(".", 1)
        signature = inspect.signature(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    parameters = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    while factory and parameters and parameters[0].default is inspect.Parameter.empty:
        parameters.pop(0)
    return [p.name for p in parameters]


def _unknown_option(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"Unknown key {key}.{hint}"


def _unrecognized(tokens: list[str], options: Iterable[str]) -> str:
    flags = [t.split("=", 1)[0] for t in tokens if t.startswith("-")]
    if not flags:
        return f"Unexpected argument(s): {' '.join(tokens)}. Options take the form --key value."
    known = [o for o in options if o.startswith("--")]
    lines = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        lines.append(f"Unknown option {flag}." + (f" Did you mean {close[0]}?" if close else ""))
    return " ".join(lines)


def _class_not_found(where: str, given: str | None, err: BaseException) -> str:
    module = getattr(err, "obj", None)
    missing = getattr(err, "name", None)
    if not inspect.ismodule(module) or not missing:
        return f"Class not found for {where}: {given or ''} ({err})."
    # A capitalised name was meant to be a class; a lower-case one may be a misspelt module on the way.
    names = [n for n in dir(module) if not n.startswith("_") and inspect.isclass(getattr(module, n, None))]
    if not missing[:1].isupper() and hasattr(module, "__path__"):
        names += [m.name for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]
    names = sorted(set(names))
    close = difflib.get_close_matches(missing, names, n=3, cutoff=0.6)
    message = f"Class not found for {where}: {given or missing} ({module.__name__} has no '{missing}')."
    if close:
        message += f" Did you mean {' or '.join(f'{module.__name__}.{n}' for n in close)}?"
    else:
        message += f" {module.__name__} has: {', '.join(names[:20])}."
    return message
