"""The `export` verb: a plain function whose signature is its command line."""

import copy
import json as jsonlib
import os
import sys
from pathlib import Path

import torch

from transfer_cli import __version__
from transfer_cli.checkpoint import is_tokenizer_file_name
from transfer_cli.errors import ConfigError, ExportParityError, ResourceError, sigterm_as_interrupt
from transfer_cli.export import onnx, pt2, safetensors
from transfer_cli.export.deploy import deploy_module, input_names, output_names
from transfer_cli.export.files import Staging
from transfer_cli.export.parity import EMBEDDING_TOL, PROBS_ATOL, ParityReport, check, print_report
from transfer_cli.export.samples import parity_cases
from transfer_cli.export.source import Source, load_source

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
# Test-only: set to 1 to perturb the exported weights, so the parity check's failure path can be proven.
PERTURB_ENV = "TRANSFER_TEST_PERTURB_EXPORT"


def export(
    ckpt: str,
    output: str,
    format: str | None = None,
    input: str | None = None,
    json: bool = False,
) -> int:
    """Export a checkpoint for deployment and prove it computes what the checkpoint computes.

    Args:
        ckpt: A checkpoint written by `transfer fit`.
        output: The file to write (`model.onnx`, `model.pt2`), or the folder for `--format safetensors`.
        format: onnx, pt2 or safetensors; taken from the output's suffix when not given.
        input: Samples for the parity check, as predict takes them (image file, folder, text file);
            default: the checkpoint's validation data when it is on this machine, else synthetic inputs.
        json: Also write the parity report to stdout as JSON.
    """
    fmt = _format(format, output)
    if fmt == "onnx":
        onnx.require()
    final = _output_path(output, ckpt)
    _check_replaceable(final, fmt)
    source = load_source(ckpt)
    samples, cases = parity_cases(source, os.path.expanduser(input) if input else None)
    with sigterm_as_interrupt("terminated (SIGTERM); nothing was written"), Staging(final) as staging:
        names = _write(fmt, source, staging, final)
        report = check(source, _runner(fmt, source, staging.path(final.name)), cases, fmt, str(final), samples)
        print_report(report)
        if json:
            print(jsonlib.dumps(report.to_dict()), flush=True)
        if not report.passed:
            raise ExportParityError(_failure(report))
        staging.commit(names)
    beside = f" (tokenizer: {_tokenizer_dir(final)})" if len(names) > 1 else ""
    print(f"exported: {final}{beside}", file=sys.stderr)
    return 0


def _format(given: str | None, output: str) -> str:
    known = ("onnx", "pt2", "safetensors")
    if given is not None:
        if given not in known:
            raise ConfigError(f"Unknown --format {given!r}: use one of {', '.join(known)}.")
        return given
    fmt = FORMATS.get(Path(output).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"Cannot tell the format from --output {output}: name a .onnx or .pt2 file, or give --format "
            "(onnx, pt2, or safetensors, which writes a folder)."
        )
    return fmt


def _output_path(output: str, ckpt: str) -> Path:
    final = Path(os.path.expanduser(output)).absolute()
    if final.exists() and Path(ckpt).expanduser().exists() and os.path.samefile(final, Path(ckpt).expanduser()):
        raise ConfigError(f"--output {output} is the --ckpt file: the export would replace it. Choose another name.")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ResourceError(
            f"Cannot create the folder of --output {output}: {err.strerror or err}. Choose a writable location."
        ) from err
    if not os.access(final.parent, os.W_OK):
        raise ResourceError(
            f"Cannot write to {final.parent} (--output): permission denied. Choose a writable location."
        )
    return final


def _check_replaceable(final: Path, fmt: str) -> None:
    """An existing folder under an output name is replaced only when it is an earlier export: a slip
    such as `--output .` must never swap a folder of the user's for a model."""
    earlier = {
        final: {safetensors.WEIGHTS, safetensors.CONFIG} if fmt == "safetensors" else set(),
        _tokenizer_dir(final): None,  # tokenizer files only
    }
    for path, allowed in earlier.items():
        if not path.is_dir():
            continue
        names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        others = sorted(n for n in names if not (is_tokenizer_file_name(n) if allowed is None else n in allowed))
        if others or (allowed is not None and not allowed):
            raise ConfigError(
                f"--output {final} would replace the folder {path}, which is not an earlier export "
                f"(it holds {', '.join(others[:3]) or 'other files'}). Choose a new name, or remove it first."
            )


def _metadata(source: Source) -> dict[str, str]:
    """What a deployment needs besides the graph, as JSON strings (ONNX metadata holds strings only)."""
    values = {
        "transfer_version": __version__,
        "task": "embedding" if source.embeds else "classification",
        "class_names": source.class_names,
        "inputs": input_names(source),
        "outputs": output_names(source),
        "preprocessing": None
        if source.preprocessing is None
        else {
            **source.preprocessing.to_dict(),
            "note": "resize the shorter side to resize_size, centre-crop crop_size, feed uint8 RGB [B, 3, H, W]; "
            "the normalisation (mean, std) is inside the graph",
        },
        "versions": {**source.restored.checkpoint["transfer"].get("versions", {}), "export_torch": torch.__version__},
    }
    return {key: jsonlib.dumps(value) for key, value in values.items()}


def _write(fmt: str, source: Source, staging: Staging, final: Path) -> list[str]:
    module = deploy_module(source) if fmt != "safetensors" else source.model
    if os.environ.get(PERTURB_ENV) == "1":
        module = _perturbed(module)
    metadata = _metadata(source)
    target = staging.path(final.name)
    if fmt == "onnx":
        onnx.write(module, source, target, metadata)
    elif fmt == "pt2":
        pt2.write(module, source, target, metadata)
    else:
        safetensors.write(module, source, target, metadata)
    names = [final.name]
    if source.kind == "text" and fmt != "safetensors":
        source.tokenizer.save_pretrained(staging.path(_tokenizer_dir(final).name))
        names.append(_tokenizer_dir(final).name)
    return names


def _tokenizer_dir(final: Path) -> Path:
    return final.with_name(final.stem + ".tokenizer")


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    module = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


def _runner(fmt: str, source: Source, path: Path):
    if fmt == "onnx":
        return onnx.load(path)
    if fmt == "pt2":
        return pt2.runner_for(path, source)
    return safetensors.load(path)


def _failure(report: ParityReport) -> str:
    worst = max(report.cases, key=lambda c: c.max_abs_diff)
    agreement = min((c.top1_agreement for c in report.cases if c.top1_agreement is not None), default=None)
    top1 = "" if agreement is None else f", top-1 agreement {agreement:.0%}"
    allowed = (
        f"within {EMBEDDING_TOL:g} of the largest value"
        if agreement is None
        else f"max abs diff {PROBS_ATOL:g} and 100% top-1 agreement"
    )
    return (
        f"Export parity failed for {report.output} ({report.format}): the exported model differs from the "
        f"checkpoint by up to {worst.max_abs_diff:.2e} ({worst.case}{top1}; allowed: {allowed}), so nothing was "
        "written. Try another --format (pt2, safetensors), and report it with --debug's output and the versions "
        "of torch and onnxruntime."
    )


def main(args: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from transfer_cli.recipes import explain_parser_error

    parser = ArgumentParser(prog="transfer export", exit_on_error=False, description=export.__doc__.split("\n")[0])
    parser.add_function_arguments(export, as_group=False)
    # A bare `--json` is a switch, as users type it; `--json true|false` works too.
    args = [f"{arg}=true" if arg == "--json" and not _has_value(args, i) else arg for i, arg in enumerate(args)]
    try:
        config = parser.parse_args(args)
    except Exception as err:  # jsonargparse's ArgumentError and its kin: a usage error
        # The same "Did you mean --format?" as every other verb gives for a misspelt option.
        options = [o for action in getattr(parser, "_actions", []) for o in action.option_strings]
        raise ConfigError(f"{explain_parser_error(err, options)}\nSee `transfer export --help`.") from None
    return export(**{key: config[key] for key in ("ckpt", "output", "format", "input", "json")})


def _has_value(args: list[str], i: int) -> bool:
    return i + 1 < len(args) and args[i + 1].lower() in ("true", "false")
