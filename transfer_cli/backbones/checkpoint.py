"""Any checkpoint written by `transfer` as a backbone: its feature extractor, architecture and weights.

The stored backbone is rebuilt from the checkpoint's own `transfer` metadata (its config with the
offline init args applied, so nothing is downloaded) and gets the `backbone.` weights of its
state_dict. A model trained on top of it stays self-contained: `offline_init_args` swaps the source
file for the inner backbone's config, and that model's own checkpoint carries the weights.
"""

from pathlib import Path
from typing import Any

import torch

from transfer_cli.backbones.base import Backbone
from transfer_cli.checkpoint import check_class_paths, read_checkpoint
from transfer_cli.errors import CheckpointError, ConfigError

OPTION = "model.init_args.backbone.init_args.checkpoint"
STATE_PREFIX = "backbone."


class CheckpointBackbone(Backbone):
    def __init__(self, checkpoint: str | None = None, source: Backbone | None = None):
        """The backbone of a checkpoint written by `transfer fit` (an autoencoder's encoder, or a
        finetuned classifier's feature extractor), with its weights.

        Args:
            checkpoint: Path to that checkpoint (`.ckpt`).
            source: The stored backbone itself, in its offline form and randomly initialised;
                transfer sets it (and clears `checkpoint`) in the checkpoints it writes, which then
                restore its weights. Leave null and give `checkpoint`.
        """
        super().__init__()
        if checkpoint is not None and checkpoint.lower() in ("none", "null"):
            # jsonargparse hands a nested `--...checkpoint null` override over as the string 'None'.
            checkpoint = None
        if checkpoint is None and source is None:
            raise ConfigError(
                f"CheckpointBackbone needs a checkpoint: set {OPTION} to a .ckpt file written by `transfer fit`, "
                "e.g. runs/autoencoder-cifar10/version_0/checkpoints/last.ckpt."
            )
        if checkpoint is not None and source is not None:
            raise ConfigError(
                f"CheckpointBackbone takes checkpoint or source, not both: clear one of {OPTION} and "
                "model.init_args.backbone.init_args.source."
            )
        self.checkpoint = checkpoint
        # The stored backbone's config, kept to rebuild it without the file (see offline_init_args).
        self._source_config: dict[str, Any] | None = None
        if checkpoint is not None:
            self._source_config, state = _read_source(Path(checkpoint).expanduser())
            source = _build(self._source_config, checkpoint)
            _load(source, state, checkpoint)
        self.encoder = source
        self.num_features = source.num_features

    def forward(self, inputs: Any) -> Any:
        return self.encoder(inputs)

    @property
    def memory_format(self) -> torch.memory_format | None:
        return self.encoder.memory_format

    def use_memory_format(self, layout: torch.memory_format) -> None:
        self.encoder.use_memory_format(layout)

    def preprocessing(self) -> Any:
        # The inputs must look like those the stored backbone was trained on.
        return self.encoder.preprocessing()

    def offline_init_args(self) -> dict[str, Any]:
        # The file is not needed again: the architecture comes from `source`, the weights from the
        # checkpoint that stores these args.
        if self._source_config is None:
            # Built from `source`: the model config saved beside these args already holds it.
            return {"checkpoint": None}
        init_args = {**(self._source_config.get("init_args") or {}), **self.encoder.offline_init_args()}
        return {"checkpoint": None, "source": {"class_path": self._source_config["class_path"], "init_args": init_args}}


def _read_source(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored backbone's config, offline args applied, and its `backbone.` weights."""
    if not path.is_file():
        raise CheckpointError(
            f"Backbone checkpoint not found: {path} ({OPTION}). Give a .ckpt file written by `transfer fit`."
        )
    try:
        checkpoint = read_checkpoint(path, option=OPTION)
    except CheckpointError as err:
        raise CheckpointError(f"{OPTION}: {err}") from err
    meta = checkpoint["transfer"]
    stored = ((meta.get("model") or {}).get("init_args") or {}).get("backbone")
    if not isinstance(stored, dict) or not isinstance(stored.get("class_path"), str):
        raise CheckpointError(
            f"{path} ({OPTION}) records no backbone config (model.init_args.backbone), so its feature "
            "extractor cannot be rebuilt. Use a checkpoint of a model with a `backbone`."
        )
    init_args = {**(stored.get("init_args") or {}), **(meta.get("backbone_offline_init_args") or {})}
    source = {"class_path": stored["class_path"], "init_args": init_args}
    weights = {k[len(STATE_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} ({OPTION}) holds no `backbone.` weights in its state_dict.")
    return source, weights


def _build(config: dict[str, Any], checkpoint: str) -> Backbone:
    """Instantiate the stored backbone the way the CLI does: jsonargparse, the signature as schema."""
    from transfer_cli.restore import build_stored  # restore builds whole models, which hold backbones

    check_class_paths(config, checkpoint)  # before jsonargparse imports anything it names
    return build_stored(Backbone, "backbone", config, f"{checkpoint} ({OPTION})")


def _load(encoder: Backbone, state: dict[str, Any], checkpoint: str) -> None:
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"The backbone weights in {checkpoint} do not fit the backbone built from its own config: "
            f"{str(err).splitlines()[0]}"
        ) from err
