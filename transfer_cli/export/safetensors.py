"""The weights alone (`model.safetensors`) and a `config.json` that rebuilds the model with transfer.

No pickle anywhere: the weights are safetensors, the config plain JSON, checked on loading like a
checkpoint's stored config (no code named outside the trusted packages, no remote code).
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.checkpoint import check_class_paths, check_no_stored_code, disable_remote_code
from transfer_cli.export.deploy import reference
from transfer_cli.export.parity import Runner
from transfer_cli.export.source import Source, from_restored
from transfer_cli.restore import Restored

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def write(model: torch.nn.Module, source: Source, folder: Path, metadata: dict[str, str]) -> None:
    folder.mkdir()
    # Each tensor in its own storage: safetensors refuses shared ones, and a strict load wants every key.
    weights = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    restored = source.restored
    config = {key: json.loads(value) for key, value in metadata.items()}
    config.update({"model": restored.model_config, "data": restored.data_config})
    (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def load_source(folder: str | Path) -> Source:
    """The model rebuilt from an exported folder, in eval mode on the CPU, with its preprocessing."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    for section in ("model", "data"):
        # The same checks as a checkpoint's stored config: nothing names code outside the trusted packages.
        check_class_paths(config.get(section), folder / CONFIG)
        check_no_stored_code(config.get(section), folder / CONFIG)
        disable_remote_code(config.get(section))
    stored = config.get("preprocessing")
    restored = Restored(
        path=folder / CONFIG,
        checkpoint={"state_dict": load_file(str(folder / WEIGHTS))},
        class_names=list(config["class_names"]),
        model_config=config["model"],
        data_config=config["data"],
        preprocessing=ImagePreprocessing.from_dict(stored) if stored else None,
    )
    return from_restored(restored)


def load(folder: Path) -> Runner:
    rebuilt = load_source(folder)

    def run(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return reference(rebuilt, inputs)

    return run
