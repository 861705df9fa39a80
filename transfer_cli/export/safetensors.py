"""The weights alone (`model.safetensors`) and a `config.json` that rebuilds the model with transfer.

No pickle anywhere: the weights are safetensors, the config plain JSON, checked on loading like a
checkpoint's stored config (no code named outside the trusted packages, no remote code).
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.checkpoint import check_class_paths, check_no_stored_code, disable_remote_code
from transfer_cli.errors import CheckpointError
from transfer_cli.export.deploy import reference
from transfer_cli.export.parity import Runner
from transfer_cli.export.source import Source, build

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def write(model: torch.nn.Module, source: Source, folder: Path, metadata: dict[str, str]) -> None:
    folder.mkdir()
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    data = json.loads(json.dumps(source.data_config))
    for key in ("root", "download"):  # the training data need not exist where the model is used
        data.get("init_args", {}).pop(key, None)
    config = {key: json.loads(value) for key, value in metadata.items()}
    config.update({"model": source.model_config, "data": data})
    (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def load_source(folder: str | Path) -> Source:
    """The model rebuilt from an exported folder, in eval mode on the CPU, with its preprocessing."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    for section in ("model", "data"):
        check_class_paths(config.get(section), folder / CONFIG)
        check_no_stored_code(config.get(section), folder / CONFIG)
        disable_remote_code(config.get(section))
    model, datamodule = build(config["model"], config["data"], str(folder / CONFIG))
    missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not fit its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    stored = config.get("preprocessing")
    return Source(
        path=folder,
        model=model.eval(),
        datamodule=datamodule,
        class_names=list(config["class_names"]),
        preprocessing=ImagePreprocessing.from_dict(stored) if stored else None,
        model_config=config["model"],
        data_config=config["data"],
        versions=config.get("versions", {}),
    )


def load(folder: Path, exported_from: Source) -> Runner:
    rebuilt = load_source(folder)

    def run(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return reference(rebuilt, inputs)

    return run
