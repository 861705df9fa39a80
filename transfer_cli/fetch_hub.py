"""What timm and HuggingFace backbones need from the network, found the way the backbones find it."""

from pathlib import Path

from transfer_cli.download import download_file, torch_cache_path
from transfer_cli.fetch import Needed

# The files from_pretrained reads: config and tokenizer files, and the weights in one format.
HF_TEXT_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]


def timm_needs(name: str | None, weights: str | None) -> list[Needed]:
    from transfer_cli.backbones.timm import _hub_weights_file, _pretrained_config

    if name is None or weights != "DEFAULT":
        return []  # random initialisation or a local file
    config = _pretrained_config(name)
    if config.hf_hub_id:
        repo, _, revision = config.hf_hub_id.partition("@")
        where = f"{_hf_cache()}/models--{repo.replace('/', '--')} ({config.hf_hub_filename or 'model.safetensors'})"
        present = _timm_cached(name, config)
        return [Needed(f"timm {name}", where, present, lambda: _hub_weights_file(name, config), f"hf://{repo}")]
    if config.url:
        path = torch_cache_path(config.url)
        return [Needed(f"timm {name}", str(path), path.is_file(), lambda: download_file(config.url, path), config.url)]
    return []


def _timm_cached(name: str, config) -> bool:
    # Offline for the question alone: the backbone's lookup tries the cache first, then the network.
    import huggingface_hub.constants as constants

    from transfer_cli.backbones.timm import _hub_weights_file
    from transfer_cli.errors import WeightsUnavailableError

    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        _hub_weights_file(name, config)
    except WeightsUnavailableError:
        return False
    finally:
        constants.HF_HUB_OFFLINE = previous
    return True


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def huggingface_needs(model: str, revision: str | None) -> list[Needed]:
    if Path(model).expanduser().is_dir():
        return []
    where = f"{_hf_cache()}/models--{model.replace('/', '--')}"
    at = f"@{revision}" if revision else ""
    return [Needed(f"huggingface {model}{at}", where, _hf_cached(model, revision), lambda: _hf_fetch(model, revision),
                   f"https://huggingface.co/{model}")]  # fmt: skip


def _hf_cached(model: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    return (folder / "config.json").is_file() and bool(weights)


def _hf_fetch(model: str, revision: str | None) -> None:
    """The repository's config, tokenizer and weights (safetensors where published, as from_pretrained
    prefers), at the pinned revision; huggingface_hub resumes and checks each file."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(model, revision=revision)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    snapshot_download(model, revision=revision, allow_patterns=HF_TEXT_FILES + weights)
