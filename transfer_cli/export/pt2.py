"""A torch.export program (`torch.export.save`), checked by loading it back with torch.export.load."""

import json
import warnings
from pathlib import Path

import torch

from transfer_cli.export.deploy import dynamic_shapes, example_inputs, input_names, output_names
from transfer_cli.export.parity import Runner
from transfer_cli.export.source import Source

METADATA_FILE = "transfer.json"


def write(module: torch.nn.Module, source: Source, path: Path, metadata: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example_inputs(source), dynamic_shapes=dynamic_shapes(source))
        extra = {METADATA_FILE: json.dumps({key: json.loads(value) for key, value in metadata.items()})}
        # save warns "No complete tensor found in the group ... may cause issues when your weights are
        # not on CPU" for tied or shared weights; exports run on the CPU, so it only alarms the user.
        torch.export.save(program, str(path), extra_files=extra)


def load(path: Path, names: list[str], outputs: list[str]) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on how weights were grouped, not problems
        program = torch.export.load(str(path)).module()

    @torch.no_grad()
    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {outputs[0]: program(*(inputs[n] for n in names))}

    return run


def runner_for(path: Path, source: Source) -> Runner:
    return load(path, input_names(source), output_names(source))
