"""`transfer fetch`: download every file a config names, so that fit later runs with no network.

The config is resolved by the real TransferCLI with fit's arguments and nothing is instantiated (an
instantiation would download the files one at a time and stop at the first that fails). What each
backbone and datamodule needs, and where it goes, is asked of the same module fit uses to find it;
data is fetched by the datamodules' own fetch functions.
"""

import contextlib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_cli.download import download_file, torch_cache_path
from transfer_cli.errors import EXIT_OK, ResourceError, WeightsUnavailableError, as_transfer_error

HELP = """\
usage: transfer fetch --config R [fit's flags]

Download everything the config names, to where fit looks for it: torchvision weights to $TORCH_HOME
(hub/checkpoints), HuggingFace model and tokenizer files at the pinned revision to the HuggingFace cache
($HF_HOME), timm weights (the HuggingFace cache, or $TORCH_HOME for weights published at a URL), and
CIFAR-10 / GLUE MNLI when --data.init_args.download is true. Files already here are kept. Progress goes
to stderr; each file fetched is printed on stdout as `WHAT<TAB>PATH`. Downloads to $TORCH_HOME resume
where an interrupted one stopped and are checked against the checksum in their file name; the
HuggingFace cache and the data archives are checked as their own code does (etag, md5).

Offline, it fails at once (exit 2) listing every missing file and where it must go.
Every other flag is fit's (`transfer fit --help`); the flags that name files are the ones that matter.
"""


@dataclass
class Needed:
    """A file (or file set) the config needs, where fit looks for it, and how to get it."""

    what: str
    where: str
    present: bool
    fetch: Callable[[], None]
    source: str


def _class(class_path: str | None) -> type | None:
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    with contextlib.suppress(ImportError, AttributeError):
        return getattr(importlib.import_module(module), name)
    return None


def _backbone_needs(backbone: Any) -> list[Needed]:
    from transfer_cli.backbones import HuggingFaceBackbone, TimmBackbone, TorchvisionBackbone

    cls, args = _class(backbone.get("class_path")), dict(backbone.get("init_args") or {})
    if cls is None:
        return []
    if issubclass(cls, TorchvisionBackbone):
        return _torchvision_needs(args.get("name", "resnet50"), args.get("weights", "DEFAULT"))
    if issubclass(cls, TimmBackbone):
        from transfer_cli.fetch_hub import timm_needs

        return timm_needs(args.get("name"), args.get("weights", "DEFAULT"))
    if issubclass(cls, HuggingFaceBackbone) and not args.get("model_config"):
        from transfer_cli.fetch_hub import huggingface_needs

        return huggingface_needs(args.get("model", "bert-base-cased"), args.get("revision"))
    return []  # our own checkpoints and untrained encoders: nothing to download


def _torchvision_needs(name: str, weights: str | None) -> list[Needed]:
    from transfer_cli.backbones.torchvision import _weights_enum

    if weights is None or str(weights).lower() in ("none", "null"):
        return []
    enum = _weights_enum(name, weights)
    if enum is None:
        return []  # a local file
    path = torch_cache_path(enum.url)
    return [
        Needed(
            f"torchvision {name} {enum.name}",
            str(path),
            path.is_file(),
            lambda: download_file(enum.url, path),
            enum.url,
        )
    ]


def _data_needs(data: Any) -> list[Needed]:
    from transfer_cli.data import cifar10, mnli

    cls, args = _class(data.get("class_path")), dict(data.get("init_args") or {})
    if cls is None or not args.get("download") or not args.get("root"):
        return []
    root = Path(args["root"]).expanduser()
    for module, find, name, layout in (
        (cifar10, cifar10.find_batches_dir, "CIFAR10DataModule", "cifar-10-batches-py"),
        (mnli, mnli.find_mnli_dir, "MNLIDataModule", "MNLI"),
    ):
        if cls.__name__ == name:
            return [Needed(name.removesuffix("DataModule"), str(root / layout), find(root) is not None,
                           lambda m=module: m.fetch(root), module.ARCHIVE_URL)]  # fmt: skip
    return []


def needs(config: Any) -> list[Needed]:
    """Everything the resolved fit config needs from the network, present or not."""
    model = config.get("model") or {}
    backbone = (model.get("init_args") or {}).get("backbone")
    found = _backbone_needs(backbone) if backbone is not None else []
    return found + _data_needs(config.get("data") or {})


class _Stop(Exception):
    pass


def resolve(args: list[str]) -> Any:
    """fit's parsed config for these flags, before anything is built."""
    from transfer_cli.cli import TransferCLI

    found: dict[str, Any] = {}

    class FetchCLI(TransferCLI):
        def before_instantiate_classes(self) -> None:
            found["config"] = self._subconfig()
            raise _Stop()

    with contextlib.suppress(_Stop):
        FetchCLI(args=["fit", *args])
    return found["config"]


def missing_message(missing: list[Needed], reason: str) -> str:
    listed = "\n".join(f"  {item.what}: {item.where}\n    from {item.source}" for item in missing)
    return (
        f"Cannot download ({reason}). {len(missing)} file(s) this config needs are missing; each must go where "
        f"shown:\n{listed}\nRun `transfer fetch` with the same flags on a machine with internet and copy these "
        "paths here (same TORCH_HOME / HF_HOME), or point the config at local files."
    )


def fetch_all(items: list[Needed]) -> list[Needed]:
    """Fetch the missing items in order; at the first that cannot be downloaded, fail listing them all."""
    missing = [item for item in items if not item.present]
    for i, item in enumerate(missing):
        print(f"transfer: fetching {item.what} from {item.source}", file=sys.stderr, flush=True)
        try:
            item.fetch()
        except Exception as err:  # noqa: BLE001 - ours, or a resource error, is told apart below
            cause = as_transfer_error(err)
            if isinstance(cause, ResourceError) or (cause is None and not isinstance(err, OSError)):
                raise
            reason = str(cause or err).split(". ")[0]
            raise WeightsUnavailableError(missing_message(missing[i:], reason)) from err
    return missing


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return EXIT_OK
    from transfer_cli.cli import quiet_lightning

    quiet_lightning()
    items = needs(resolve(args))
    fetched = fetch_all(items)
    for item in fetched:
        print(f"{item.what}\t{item.where}")
    kept = len(items) - len(fetched)
    print(f"transfer: fetched {len(fetched)}, {kept} already here, {len(items)} in all", file=sys.stderr)
    return EXIT_OK
