"""Any checkpoint written by `transfer` as a backbone: its feature extractor, architecture and weights.

The stored backbone is rebuilt from the checkpoint's own `transfer` metadata (its config with the
offline init args applied, so nothing is downloaded) and gets the `backbone.` weights of its
state_dict. A model trained on top of it stays self-contained: `offline_init_args` swaps the source
file for the inner backbone's config, and that model's own checkpoint carries the weights.
"""

from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from transfer_cli.backbones.base import Backbone
from transfer_cli.checkpoint import ALLOWED_CLASS_PREFIXES, read_checkpoint
from transfer_cli.errors import CheckpointError, ConfigError

OPTION = "model.init_args.backbone.init_args.checkpoint"
STATE_PREFIX = "backbone."


class CheckpointBackbone(Backbone):
    def __init__(self, checkpoint: str | None = None, source: dict[str, Any] | None = None):
        """The backbone of a checkpoint written by `transfer fit` (an autoencoder's encoder, or a
        finetuned classifier's feature extractor), with its weights.

        Args:
            checkpoint: Path to that checkpoint (`.ckpt`).
            source: The stored backbone's config (`class_path`, `init_args`) to rebuild it without the
                file, randomly initialised; transfer sets this in the checkpoints it writes, whose
                weights are restored afterwards. Leave null and give `checkpoint`.
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
        self.checkpoint = checkpoint
        state = None
        if checkpoint is not None:
            source, state = _read_source(Path(checkpoint))
        _check_class_paths(source, checkpoint)
        self.source = source
        self.encoder = _build(source, checkpoint)
        if state is not None:
            _load(self.encoder, state, checkpoint)
        self.num_features = self.encoder.num_features

    def forward(self, inputs: Any) -> Any:
        return self.encoder(inputs)

    def preprocessing(self) -> Any:
        # The inputs must look like those the stored backbone was trained on.
        return self.encoder.preprocessing()

    def offline_init_args(self) -> dict[str, Any]:
        # The file is not needed again: the architecture comes from `source`, the weights from the
        # checkpoint that stores these args. The inner backbone's own offline args apply as well.
        init_args = {**(self.source.get("init_args") or {}), **self.encoder.offline_init_args()}
        return {"checkpoint": None, "source": {"class_path": self.source["class_path"], "init_args": init_args}}


def _read_source(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored backbone's config, offline args applied, and its `backbone.` weights."""
    if not path.is_file():
        raise CheckpointError(
            f"Backbone checkpoint not found: {path} ({OPTION}). Give a .ckpt file written by `transfer fit`."
        )
    checkpoint = read_checkpoint(path)
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


def _check_class_paths(node: Any, checkpoint: str | None) -> None:
    """`source` comes out of a checkpoint: refuse anything that would import untrusted code."""
    if isinstance(node, dict):
        class_path = node.get("class_path")
        trusted = isinstance(class_path, str) and class_path.startswith(ALLOWED_CLASS_PREFIXES)
        if class_path is not None and not trusted:
            raise CheckpointError(
                f"The backbone source of {_where(checkpoint)} names class {class_path!r}, outside the trusted packages "
                f"({', '.join(p.rstrip('.') for p in ALLOWED_CLASS_PREFIXES)}); refusing to load it."
            )
        for value in node.values():
            _check_class_paths(value, checkpoint)
    elif isinstance(node, list):
        for value in node:
            _check_class_paths(value, checkpoint)


def _where(checkpoint: str | None) -> str:
    return checkpoint if checkpoint is not None else "model.init_args.backbone.init_args.source"


def _build(source: dict[str, Any], checkpoint: str | None) -> Backbone:
    """Instantiate the stored backbone the way the CLI would: jsonargparse, its signature as schema."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Backbone, "backbone", required=True)
    try:
        config = parser.parse_object({"backbone": source})
        return parser.instantiate_classes(config).backbone
    except CheckpointError:
        raise
    except ConfigError as err:
        # The stored backbone's own checks (a missing file, unknown names): in this context it is
        # the checkpoint that holds the bad config.
        raise CheckpointError(f"Cannot rebuild the backbone of {_where(checkpoint)}: {err}") from err
    except Exception as err:  # jsonargparse raises its own error types for configs that do not fit
        raise CheckpointError(
            f"Cannot rebuild the backbone {source.get('class_path')!r} of {_where(checkpoint)} with this version of "
            f"transfer: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


def _load(encoder: Backbone, state: dict[str, Any], checkpoint: str) -> None:
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"The backbone weights in {checkpoint} do not fit the backbone built from its own config: "
            f"{str(err).splitlines()[0]}"
        ) from err
