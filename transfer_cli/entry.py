"""The `transfer` console script: cheap answers first, the CLI second, exit codes always.

`transfer --help` and `--version` are answered without importing torch or lightning; Lightning's
verbs go to the LightningCLI in transfer_cli.cli, the others to their own functions (VERBS).

Adding a verb is one function and one table entry. Write a plain function whose signature is its
command line, with a docstring (its first paragraph is the `--help` description, its `Args:` section
the help of each option), and add `"name": ("one-line summary", "module:function")` to VERBS:

    def backbones(pattern: str | None = None, /, *, family: Literal["timm", ...] | None = None) -> int:

Parameters before `/` are positional arguments (optional when they have a default), the others are
`--options`; jsonargparse parses and checks them from the annotations, as the LightningCLI does for
fit's. The function prints data to stdout and everything else to stderr, raises a TransferError
subclass for a failure (its exit code and one-paragraph message are handled here, as for every verb),
and returns an exit code or None for 0. A verb that parses fit's flags itself (through the
LightningCLI) takes one parameter, `args: list[str]`, and gets the remaining arguments as given.
"""

import contextlib
import difflib
import inspect
import os
import re
import sys
import traceback
from typing import Any

from transfer_cli import __version__
from transfer_cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, as_transfer_error
from transfer_cli.help_cache import cached_help, is_plain_help

# One table of verbs: the usage text, the unknown-verb hint and the dispatch all come from it. A verb
# without a target is Lightning's and goes to the LightningCLI; the others are plain functions
# (`module:function`, see the module docstring), imported only when used.
VERBS: dict[str, tuple[str, str | None]] = {
    "fit": ("Train a head (and optionally the backbone) on a recipe: --config NAME|FILE", None),
    "validate": ("Evaluate on the validation split: --ckpt model.ckpt", None),
    "test": ("Evaluate on the test split: --ckpt model.ckpt", None),
    "predict": ("Predict from a checkpoint alone: --ckpt model.ckpt --input PATH|-", None),
    "backbones": (
        "List usable backbone names: [--family torchvision|timm|huggingface] [PATTERN]",
        "transfer_cli.backbone_list:backbones",
    ),
    "export": (
        "Export a checkpoint (onnx, pt2, safetensors) with a parity check: --ckpt C --output PATH",
        "transfer_cli.export:main",
    ),
    "check": (
        "Resolve a fit without training: data, model, one measured step, every problem: fit's flags [--json]",
        "transfer_cli.check:main",
    ),
    "fetch": (
        "Download the weights and data a config names, or list what is missing offline: fit's flags",
        "transfer_cli.fetch:main",
    ),
}
SUBCOMMANDS = tuple(verb for verb, (_, target) in VERBS.items() if target is None)
# Verbs that never import Lightning (nor torch, for the listing of local names): torchmetrics stays unloaded.
WITHOUT_LIGHTNING = ("backbones",)

USAGE = """\
usage: transfer [-h] [--version] {{{verbs}}} ...

Finetune pretrained backbones (torchvision, timm, HuggingFace, your own checkpoints) on your data.

subcommands:
{table}

recipes (for --config): {recipes}

Run `transfer SUBCOMMAND --help` for every option, `transfer fit --config NAME --print_config` for a
recipe in full. --debug (or TRANSFER_DEBUG=1) shows tracebacks. Exit codes: 0 ok, 2 usage/config,
3 data, 4 checkpoint, 5 non-finite loss, 6 resources, 7 export parity failed, 130 interrupted, 143 terminated.
"""


def _usage() -> str:
    from transfer_cli.recipes import recipe_names

    width = max(map(len, VERBS)) + 2
    table = "\n".join(f"  {verb:<{width}}{summary}" for verb, (summary, _) in VERBS.items())
    return USAGE.format(verbs=",".join(VERBS), table=table, recipes=", ".join(recipe_names()))


def _dispatch(args: list[str]) -> int:
    import importlib

    target = VERBS.get(args[0], (None, None))[1]
    module, function = target.split(":") if target else ("transfer_cli.cli", "run")
    if args[0] in WITHOUT_LIGHTNING:
        verb = getattr(importlib.import_module(module), function)
    else:
        from transfer_cli.deferred_dynamo import deferred
        from transfer_cli.lean_imports import torchmetrics_without_extras

        # Before anything imports lightning: seconds off every verb's start (see both modules).
        with deferred():
            torchmetrics_without_extras()
            verb = getattr(importlib.import_module(module), function)
    if target is None:
        verb(args)
        return 0
    return call_verb(args[0], verb, args[1:])


def call_verb(verb: str, function: Any, args: list[str]) -> int:
    """Parse `args` against the function's signature and call it; returns its exit code."""
    if list(inspect.signature(function).parameters) == ["args"]:
        result = function(args)  # a verb that parses fit's flags through the LightningCLI itself
    else:
        positional, options = _parse_signature(verb, function, args)
        result = function(*positional, **options)
    return 0 if result is None else int(result)


def _parse_signature(verb: str, function: Any, args: list[str]) -> tuple[list[Any], dict[str, Any]]:
    from argparse import ArgumentError

    from transfer_cli.recipes import explain_parser_error

    parser, positional = _function_parser(verb, function)
    try:
        parsed = parser.parse_args(args)
        # jsonargparse 4.49 renamed instantiate_classes to instantiate; the oldest supported has only the former.
        parsed = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(parsed).as_dict()
    except ArgumentError as err:
        options = [o for action in getattr(parser, "_actions", []) for o in action.option_strings]
        message = explain_parser_error(err, options)
        # The parser names an option by its key; the user typed it as --key.
        key = re.match(r"Invalid value for (\w+):", message)
        if key and f"--{key.group(1)}" in options:
            message = f"Invalid value for --{key.group(1)}:{message[key.end() :]}"
        raise ConfigError(f"{message}\nSee `transfer {verb} --help`.") from None
    return [parsed.pop(name) for name in positional], parsed


def _function_parser(verb: str, function: Any) -> tuple[Any, list[str]]:
    """The function's own command line: positional-only parameters as positional arguments."""
    from jsonargparse import ArgumentParser

    description, helps = _read_docstring(function)
    parser = ArgumentParser(prog=f"transfer {verb}", description=description, exit_on_error=False)
    positional = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is not inspect.Parameter.POSITIONAL_ONLY:
            continue
        optional = parameter.default is not inspect.Parameter.empty
        extra = {"nargs": "?", "default": parameter.default} if optional else {}
        parser.add_argument(parameter.name, type=parameter.annotation, help=helps.get(parameter.name), **extra)
        positional.append(parameter.name)
    parser.add_function_arguments(function, skip=set(positional), fail_untyped=True)
    return parser, positional


def _read_docstring(function: Any) -> tuple[str | None, dict[str, str]]:
    """The description (the text before `Args:`) and each parameter's help."""
    import docstring_parser  # what jsonargparse reads the options' help with

    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    description = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    return description or None, {p.arg_name: p.description for p in doc.params}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("TRANSFER_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if not args:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    if args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(f"transfer {__version__}")
        return 0
    if not args[0].startswith("-") and args[0] not in VERBS:
        print(f"transfer: error: {_unknown_subcommand(args[0])}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if is_plain_help(args):
            return cached_help(args, lambda: _run_verb(args, debug))
        code = _run_verb(args, debug)
    finally:
        _leave_process_group()
    if argv is None and args[0] == "predict":  # the console script, not a caller in this process
        _exit_skipping_teardown(code)
    return code


def _exit_skipping_teardown(code: int) -> None:
    """End the process now, with `code`, once the atexit handlers have run and stdout and stderr are flushed.

    Python would then free every module and object one by one: with torch and Lightning loaded that is
    over a second after the last row is out (`python -c "import torch, torchvision, lightning"` ends
    about 20 times sooner this way), a second every `transfer predict` in a script waits for. What it
    would free goes with the process anyway; what must happen at exit (logs flushed, temporaries
    removed, child processes ended) is done by the atexit handlers, which still run.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone away, a stream already closed
            stream.flush()
    os._exit(code)


def _leave_process_group() -> None:
    """End this process's part in a distributed run before the interpreter does.

    Left to interpreter exit, gloo's threads can be torn down in the wrong order and abort the process
    (SIGABRT, "terminate called without an active exception"), hiding the exit code we meant to give.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    # The other processes may be gone already; the exit code matters more than a clean goodbye.
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _run_verb(args: list[str], debug: bool) -> int:
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("transfer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    except Exception as err:
        cause = as_transfer_error(err)
        if cause is None:
            if debug:
                raise
            print(f"transfer: internal error: {type(err).__name__}: {err}", file=sys.stderr)
            print("transfer: rerun with --debug for the traceback, and report it.", file=sys.stderr)
            return 1
        if isinstance(cause, BrokenPipeError):
            # The reader went away (`| head -1`): stop quietly, and keep Python from complaining at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if debug:
            traceback.print_exc()
        print(f"transfer: error: {_clean(str(cause))}", file=sys.stderr)
        return cause.exit_code


def _unknown_subcommand(name: str) -> str:
    close = difflib.get_close_matches(name, list(VERBS), n=1, cutoff=0.5)
    hint = f" Did you mean `transfer {close[0]}`?" if close else ""
    return f"unknown subcommand '{name}'.{hint} Subcommands: {', '.join(VERBS)} (see `transfer --help`)."


def _clean(message: str) -> str:
    """A DataLoader worker re-raises our error with its traceback in the text; keep the message."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


if __name__ == "__main__":
    sys.exit(main())
