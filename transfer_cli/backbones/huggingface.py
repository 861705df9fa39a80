"""Any HuggingFace `AutoModel` as a backbone, by hub name or local directory, with its tokenizer.

Loading never hangs: a local directory or the HuggingFace cache is used without touching the
network; the hub is asked only when it is allowed (no HF_HUB_OFFLINE) and reachable. A checkpoint
stores the model config and the tokenizer files (`offline_init_args`), so the backbone can be rebuilt
with `AutoModel.from_config` and no hub at all; the checkpoint's state dict then supplies the weights.
"""

import base64
import json
import lzma
import os
import socket
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import torch

# transformers is imported where a model or tokenizer is made: importing this module (done whenever
# transfer_cli.backbones is) must not cost an image model the second transformers takes to import.
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

from transfer_cli.backbones.base import Backbone
from transfer_cli.checkpoint import CODE_KEYS, TOKENIZER_FILE_NAMES, decode_stored_file, is_tokenizer_file_name
from transfer_cli.errors import ConfigError, WeightsUnavailableError

HUB_PROBE_TIMEOUT_S = 3.0


class HuggingFaceBackbone(Backbone):
    def __init__(
        self,
        model: str = "bert-base-cased",
        revision: str | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        trust_remote_code: bool = False,
        model_config: dict[str, Any] | None = None,
        tokenizer_files: dict[str, str] | None = None,
    ):
        """A pretrained transformer encoder and its tokenizer, pooled to one vector per text.

        Args:
            model: Hub name (`bert-base-cased`, `org/name`) or a local directory holding the config,
                the weights and the tokenizer files.
            revision: Hub branch, tag or commit to load; null for the default branch.
            pooling: `cls` takes the first token's final hidden state; `mean` averages all tokens.
            trust_remote_code: Allow models whose code lives in their hub repository (runs that code).
                Never applies to a backbone rebuilt from a checkpoint's model_config and tokenizer_files:
                those are data only, and rebuilding them never runs code.
            model_config: Set by checkpoints: the model's config, to rebuild the architecture offline.
            tokenizer_files: Set by checkpoints: the tokenizer's files (name -> base64 of the xz-compressed
                bytes), to rebuild it offline.
        """
        super().__init__()
        self.name = model
        self.pooling = pooling
        if (model_config is None) != (tokenizer_files is None):
            raise ConfigError(
                "model.backbone: give both model_config and tokenizer_files (as a checkpoint stores them), or neither."
            )
        if model_config is not None:
            self.model, self.tokenizer = _rebuild(model_config, tokenizer_files)
            self._offline_args = {"model_config": model_config, "tokenizer_files": tokenizer_files}
        else:
            self.model, self.tokenizer = _load(model, revision, trust_remote_code)
            self._offline_args = None
        self.num_features = _hidden_size(self.model.config, model)
        # By module name within this backbone: what former_parameter_names needs.
        self._held = {f"model.{module}": names for module, names in _hold_unused_pooler(self.model).items()}
        # from_pretrained hands models over in eval mode; a fresh backbone trains like any nn.Module.
        self.model.train()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # The output object by name: its tuple form changes with the model's config and version.
        hidden = self.model(**inputs, return_dict=True).last_hidden_state
        mask = inputs["attention_mask"]
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        # The first real token, which is position 0 unless the tokenizer pads on the left.
        first = mask.int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]

    def preprocessing(self) -> "PreTrainedTokenizerBase":
        return self.tokenizer

    def former_parameter_names(self) -> list[str] | None:
        # Training checkpoints written before the pooler was held list its weights in the optimizer's
        # backbone group; parameters() follows module order, and the held tensors kept their modules.
        if not self._held:
            return None
        names = []
        for prefix, module in self.named_modules():
            own = [name for name, _ in module.named_parameters(recurse=False)] + self._held.get(prefix, [])
            names += [f"{prefix}.{name}" for name in own]
        return names

    def offline_init_args(self) -> dict[str, Any]:
        if self._offline_args is None:
            # Plain JSON types only: checkpoints are read back with torch.load(weights_only=True).
            config = json.loads(self.model.config.to_json_string(use_diff=False))
            self._offline_args = {"model_config": config, "tokenizer_files": _tokenizer_files(self.tokenizer)}
        return self._offline_args


def _load(
    name: str, revision: str | None, trust_remote_code: bool
) -> tuple[torch.nn.Module, "PreTrainedTokenizerBase"]:
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_pretrained(str(path), None, trust_remote_code, local_only=True, what=f"local directory {path}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(
            f"Model directory not found: {path} (model.backbone.model). Give a local directory with config.json, "
            "the weights and the tokenizer files, or a HuggingFace hub name such as bert-base-cased."
        )
    what = f"HuggingFace model {name!r}" + (f" (revision {revision})" if revision else "")
    try:
        # The cache first: a model that is already here loads without any network round trip.
        return _from_pretrained(name, revision, trust_remote_code, local_only=True, what=what)
    except WeightsUnavailableError:
        pass
    reason = "HF_HUB_OFFLINE is set" if _offline() else None if _hub_reachable() else "the hub cannot be reached"
    if reason is not None:
        from huggingface_hub import constants

        raise WeightsUnavailableError(
            f"{what} is not in the HuggingFace cache ({constants.HF_HUB_CACHE}) and {reason}. "
            f"On a machine with internet, run the same command once without HF_HUB_OFFLINE (or `hf download "
            f"{name}`) and copy its HuggingFace cache here (HF_HOME); or save the model to a directory "
            "(config, weights, tokenizer) and set model.backbone.model to that directory."
        )
    return _from_pretrained(name, revision, trust_remote_code, local_only=False, what=what)


def _from_pretrained(source: str, revision: str | None, trust_remote_code: bool, local_only: bool, what: str):
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local_only}
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModel.from_pretrained(source, config=config, **kwargs)
    except ValueError as err:  # unknown architecture, or code that needs trust_remote_code
        hint = " Set model.backbone.trust_remote_code: true if you trust it." if "trust_remote_code" in str(err) else ""
        raise ConfigError(f"Cannot load {what}: {err}{hint}") from err
    except OSError as err:  # missing files (local or cached), unknown repository, download failures
        error = ConfigError if what.startswith("local") else WeightsUnavailableError
        raise error(f"Cannot load {what}: {err}") from err
    # float32 whatever dtype the weights were saved in (exact); the trainer's precision decides the rest.
    return model.float(), tokenizer


def _hold_unused_pooler(model: torch.nn.Module) -> dict[str, list[str]]:
    """Turn the weights of the model's pooler (BERT, RoBERTa, ALBERT, MPNet...) into buffers.

    forward pools `last_hidden_state` itself, so the pooler never reaches the loss: as parameters its
    weights would get no gradient, which stops DDP's full finetuning ("parameters that were not used in
    producing loss") and gives the optimizer weights it can never move. As buffers they keep their
    names, so state dicts (and checkpoints written before, in both directions) stay the same, and
    nothing makes them trainable again (the finetuning policy unfreezes parameters only).

    Returns the names held, by module name within `model`.
    """
    pooler = getattr(model, "pooler", None)
    held: dict[str, list[str]] = {}
    if not isinstance(pooler, torch.nn.Module):
        return held
    for prefix, module in pooler.named_modules(prefix="pooler"):
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
            held.setdefault(prefix, []).append(name)
    return held


def _offline() -> bool:
    from huggingface_hub import constants

    # The environment too: huggingface_hub reads it once, at import, and tests set it later.
    from_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return from_env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable() -> bool:
    """A quick TCP connect, so that no network fails at once instead of after minutes of retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy the hub's host may not resolve here; let the client try
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _hidden_size(config: "PretrainedConfig", name: str) -> int:
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise ConfigError(
            f"{name}: its config ({type(config).__name__}) states no hidden_size, so the feature width is "
            "unknown. Use an encoder model such as BERT, RoBERTa, DeBERTa or MiniLM."
        )
    return size


def _tokenizer_files(tokenizer: "PreTrainedTokenizerBase") -> dict[str, str]:
    """The files `save_pretrained` writes, each as base64 of its xz-compressed bytes.

    Compressed because the config travels through YAML several times per run and a vocabulary is
    hundreds of kilobytes (five times faster); bytes rather than text so binary vocabularies
    (SentencePiece models) travel too.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {
            path.relative_to(tmp).as_posix(): base64.b64encode(lzma.compress(path.read_bytes())).decode("ascii")
            for path in sorted(Path(tmp).rglob("*"))
            if path.is_file()
        }


def _rebuild(config: dict[str, Any], tokenizer_files: dict[str, str]):
    """The architecture from a stored config and the tokenizer from stored files, with no code run:
    keys that name code are dropped, only the files a tokenizer writes are accepted, and remote code
    stays off whatever the flag says (a checkpoint's contents are not the user's to vouch for)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    settings = _without_code_keys(config)
    model_type = settings.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.backbone.model_config has no model_type; it must come from a transfer checkpoint.")
    try:
        model_config = AutoConfig.for_model(model_type, **settings)
        model = AutoModel.from_config(model_config, trust_remote_code=False).float()
    except (ValueError, KeyError) as err:
        raise ConfigError(f"Cannot rebuild a {model_type!r} model from the checkpoint's config: {err}") from err
    with tempfile.TemporaryDirectory() as tmp:
        for name, encoded in tokenizer_files.items():
            if not is_tokenizer_file_name(name):
                raise ConfigError(
                    f"Refusing tokenizer file {name!r} (model.backbone.tokenizer_files): only the data files a "
                    f"tokenizer writes are accepted ({', '.join(sorted(TOKENIZER_FILE_NAMES))})."
                )
            target = Path(tmp, *PurePosixPath(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                content = decode_stored_file(encoded)
                if name == "tokenizer_config.json":
                    content = json.dumps(_without_code_keys(json.loads(content))).encode()
            except (ValueError, TypeError, lzma.LZMAError) as err:
                raise ConfigError(f"Tokenizer file {name!r} in the checkpoint is corrupt: {err}.") from err
            target.write_bytes(content)
        # Loaded fully into memory, so the temporary directory can go.
        tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
    return model, tokenizer


def _without_code_keys(config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ValueError("expected a JSON object")
    return {key: value for key, value in config.items() if key not in CODE_KEYS}
