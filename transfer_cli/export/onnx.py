"""ONNX through torch's dynamo exporter, checked with onnxruntime's CPU provider."""

import contextlib
import json
import sys
import warnings
from pathlib import Path

import torch

from transfer_cli.errors import ConfigError
from transfer_cli.export.deploy import dynamic_shapes, example_inputs, input_names, output_names
from transfer_cli.export.parity import Runner
from transfer_cli.export.source import Source

EXTRA = "pip install 'transfer-cli[export]'"


def require() -> None:
    """The optional extra, checked before any work is done."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"--format onnx needs {', '.join(missing)}, which are not installed. Install the export extra: "
            f"`{EXTRA}` (onnx, onnxscript, onnxruntime), or choose --format pt2 or safetensors."
        )


def write(module: torch.nn.Module, source: Source, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    # The exporter reports its progress on stdout, which belongs to data (the --json report).
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example_inputs(source),
            str(path),
            dynamo=True,
            input_names=input_names(source),
            output_names=output_names(source),
            dynamic_shapes=dynamic_shapes(source),
            verbose=False,
        )
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def load(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = session.run(names, {name: tensor.numpy() for name, tensor in inputs.items()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}

    return run


def read_metadata(path: Path) -> dict[str, object]:
    """The transfer metadata of an exported file (JSON values decoded), as a deployment reads it."""
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    return {p.key: json.loads(p.value) for p in props}
