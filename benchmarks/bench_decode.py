"""Epochs over a real folder of JPEGs with augmentation on: `transfer`'s image-folder loader, which
decodes each image once per fit (data.decoded_cache_gb), beside a plain loop decoding with PIL every epoch.

    python benchmarks/bench_decode.py [--device auto|cpu|cuda] [--quick] [--root DIR]

bench.py calls `measure(spec, device)`; run alone, this prints its result as JSON. Each epoch is timed
whole (loader, host-to-device copy, augmentation and normalisation, a forward pass) and without the
forward pass ("data"), which is what decoding once changes. Both sides use the same loader settings
(batch size, workers kept across epochs, shuffling) and the same model.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = (
    Path(os.environ.get("TRANSFER_TEST_DATA", REPO.parent / "shared" / "data")) / "cifar10" / "imagefolder_jpg"
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synchronize  # noqa: E402
from report import reading  # noqa: E402
from sizes import SIZES as ALL_SIZES  # noqa: E402  (this script's folder, as bench.py has it)

from transfer_cli.data.base import default_workers  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {mode: sizes["decode"] for mode, sizes in ALL_SIZES.items()}


def _epochs(batches, preprocess, model, device: torch.device, epochs: int) -> list[float]:
    """Seconds per epoch: the loader's batches copied to the device, augmented, and (given a model) its forward pass."""
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        for images in batches():
            inputs = preprocess(images.to(device, non_blocking=True))
            if model is not None:
                with torch.no_grad():
                    model(inputs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _both(make_loader, preprocess, spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Epochs with the forward pass, then epochs of the data pipeline alone, each from a new loader
    (for the tool: a new datamodule, so that its first epoch decodes again)."""
    model = _model(spec, device)
    loader, close = make_loader()
    epoch_s = _epochs(lambda: iter(loader), preprocess, model, device, spec["epochs"])
    images, workers = len(loader.dataset), loader.num_workers
    threads = getattr(loader.dataset, "threads", 0) if workers == 0 else 0  # images.ThreadDecoded
    close()
    loader, close = make_loader()
    data_s = _epochs(lambda: iter(loader), preprocess, None, device, spec["epochs"])
    close()
    return {"epoch_s": epoch_s, "data_s": data_s, "images": images, "workers": workers, "threads": threads}


def _model(spec: dict[str, Any], device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(spec["model"], weights=None, num_classes=10)
    return model.to(device).eval().to(memory_format=torch.channels_last)


def tool_side(root: Path, spec: dict[str, Any], device: torch.device, decode_on: str = "workers") -> dict[str, Any]:
    """`decode_on` as data.decode_on: with "device", the loader hands out JPEG bytes and the batch
    transfer (Lightning's transfer_batch_to_device hook) decodes them on `device`."""
    from transfer_cli.backbones import TorchvisionBackbone
    from transfer_cli.data import ImageFolderDataModule
    from transfer_cli.data.image_ops import BatchImageTransform

    backbone = TorchvisionBackbone(spec["model"], weights=None, image_size=spec["image_size"])

    def make_loader():
        batch_size, workers = spec["batch_size"], spec["workers"]
        data = ImageFolderDataModule(
            str(root),
            batch_size=batch_size,
            num_workers=workers,
            augment=True,
            decode_on=decode_on,
            **{key: spec[key] for key in ("decoded_cache_gb",) if key in spec},
        )
        data.connect(backbone)
        # Where the model runs decides how the folder is read, as in a fit: on threads in this process
        # for a model on the CPU (unless workers are given), by worker processes for an accelerator.
        data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device), world_size=1, global_rank=0)
        data.setup("fit")
        loader = data.train_dataloader()
        if decode_on == "device":
            loader = _Transferred(loader, lambda batch: data.transfer_batch_to_device(batch, device, 0))
        return _Images(loader), lambda: data.teardown("fit")

    transform = BatchImageTransform(backbone.preprocessing())  # what on_after_batch_transfer does in training

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        # Both sides run the same channels_last model (_model); a backbone's in_layout brings its inputs so.
        return transform(images, augment=True).contiguous(memory_format=torch.channels_last)

    return _both(make_loader, preprocess, spec, device)


class _Transferred:
    """A loader whose batches go through the datamodule's device transfer (decoding, for decode_on=device)."""

    def __init__(self, loader: DataLoader, transfer):
        self.loader, self.transfer = loader, transfer
        self.dataset, self.num_workers = loader.dataset, loader.num_workers

    def __iter__(self):
        return (self.transfer(batch) for batch in self.loader)


class _Images:
    """The image tensors of a loader's batches (the tool's are dicts, torchvision's (images, labels) pairs)."""

    def __init__(self, loader: DataLoader, key: Any = "inputs"):
        self.loader, self.key, self.dataset, self.num_workers = loader, key, loader.dataset, loader.num_workers

    def __iter__(self):
        return (batch[self.key] for batch in self.loader)


def plain_side(root: Path, spec: dict[str, Any], device: torch.device, workers: int) -> dict[str, Any]:
    """A hand-written loop as tutorials write it: PIL decodes, resizes and augments in the workers."""
    from transfer_cli.backbones import TorchvisionBackbone

    p = TorchvisionBackbone(spec["model"], weights=None, image_size=spec["image_size"]).preprocessing()
    crop = p.crop_size
    augment = transforms.Compose(
        [
            transforms.Resize(p.resize_size),
            transforms.CenterCrop(crop),
            transforms.RandomCrop(crop, padding=max(1, crop // 8), padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )

    def make_loader():
        dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=augment)
        loader = DataLoader(
            dataset,
            batch_size=spec["batch_size"],
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        return _Images(loader, key=0), lambda: None

    mean = torch.tensor(p.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(p.std, device=device).view(1, 3, 1, 1) * 255
    return _both(
        make_loader,
        lambda images: ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last),
        spec,
        device,
    )


def _all_training(source: Path, tmp: Path) -> Path:
    """A root whose train/ is the source's whole train/ (its test/ validates), so every image trains."""
    (tmp / "train").symlink_to(source / "train", target_is_directory=True)
    (tmp / "val").symlink_to(source / "test", target_is_directory=True)
    return tmp


def measure(spec: dict[str, Any] | None = None, device: str | torch.device = "cpu", root: Path = DEFAULT_ROOT) -> dict:
    """Both sides over the same images; ratios of the plain loop's and the first epoch's times to epoch 2."""
    spec = dict(SIZES["cuda" if torch.device(device).type == "cuda" else "cpu"] if spec is None else spec)
    device = torch.device(device)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"no JPEG folder at {root}/train (benchmarks/bench_decode.py --root DIR)")
    load_before = os.getloadavg()[0]  # two shared cores: others' load moves every figure
    with tempfile.TemporaryDirectory(prefix="transfer-bench-decode-") as tmp:
        tree = _all_training(root, Path(tmp))
        transfer = tool_side(tree, spec, device)
        # The plain loop as tutorials write it, with worker processes (as many as transfer would start for
        # an accelerator, min(8, CPU count)), and on the CPU also without any (decoding in the main process,
        # as transfer does there): the faster of the two is the baseline.
        workers = default_workers() if spec["workers"] is None else spec["workers"]
        counts = [workers] + ([0] if device.type == "cpu" and workers != 0 else [])
        plains = {count: plain_side(tree, spec, device, workers=count) for count in counts}
        plain = min(plains.values(), key=lambda side: statistics.median(side["epoch_s"]))
        others = {f"plain_{count}_workers": side for count, side in plains.items() if side is not plain}
        # data.decode_on=device: the same epochs with JPEGs decoded on the device, cache on and off.
        on_device = {
            f"device_cache_{'on' if cache else 'off'}": tool_side(
                tree, {**spec, "decoded_cache_gb": cache}, device, "device"
            )
            for cache in ((4.0, 0.0) if spec.get("device_decode") else ())
        }
    # Epochs of a few tenths of a second on shared cores: one epoch is one noisy sample, so the later
    # epochs count by their median, and the plain loop's by the median of all of its epochs.
    later = statistics.median(transfer["epoch_s"][1:])
    later_data = statistics.median(transfer["data_s"][1:])
    plain_epoch, plain_data = statistics.median(plain["epoch_s"]), statistics.median(plain["data_s"])
    return {
        "unit": "s/epoch",
        "spec": spec,
        "sides": {"transfer": transfer, "plain": plain, **others, **on_device},
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "epoch1_over_epoch2": transfer["epoch_s"][0] / later,
        "plain_over_epoch2": plain_epoch / later,
        "data_epoch1_over_epoch2": transfer["data_s"][0] / later_data,
        "data_plain_over_epoch2": plain_data / later_data,
    }


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def summary(result: dict[str, Any]) -> str:
    t, p = result["sides"]["transfer"], result["sides"]["plain"]
    epochs = ", ".join(f"{s:.2f}" for s in t["epoch_s"])
    data = ", ".join(f"{s:.2f}" for s in t["data_s"])
    return (
        f"{t['images']} JPEGs, {result['spec']['model']} at {result['spec']['image_size']} px; transfer "
        f"{reading(t)}, the plain loop {reading(p)}\n"
        f"transfer epochs: {epochs} s (data only: {data} s)\n"
        f"plain loop epochs: {', '.join(f'{s:.2f}' for s in p['epoch_s'])} s "
        f"(data only: {', '.join(f'{s:.2f}' for s in p['data_s'])} s)\n"
        f"epoch 1 / epoch 2+: {result['epoch1_over_epoch2']:.2f}x "
        f"(data only {result['data_epoch1_over_epoch2']:.2f}x); "
        f"plain epoch / transfer epoch 2+: {result['plain_over_epoch2']:.2f}x "
        f"(data only {result['data_plain_over_epoch2']:.2f}x); load average "
        f"{result['load_average']['before']:.1f} -> {result['load_average']['after']:.1f}"
    ) + "".join(
        f"\ndecoded on the device, cache {name.rsplit('_', 1)[1]}: epochs {_seconds(side['epoch_s'])} s "
        f"(data only: {_seconds(side['data_s'])} s)"
        for name, side in result["sides"].items()
        if name.startswith("device_cache_")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test, not a measurement.")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="An image folder with train/ and test/.")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    spec = SIZES["quick" if args.quick else device]
    if device == "cpu":
        from transfer_cli.allocator import keep_freed_memory

        keep_freed_memory()  # as `transfer fit` on the CPU does (cpu_fit.py), for both sides
    result = measure(spec, device, args.root)
    print(summary(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
