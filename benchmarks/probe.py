"""The frozen linear probe over N epochs, validating after each, as `transfer fit` runs it.

Four ways to do the same work: `transfer` with and without its feature cache, and a plain loop
with and without caching the frozen backbone's features (computed once, the head trained on them).
"""

import inspect
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from common import PeakMemory, SyntheticImages, autocast, compare, interleaved, summarise, synchronize, trainer
from images import PlainPreprocess, SyntheticImageData, plain_loader, plain_model, to_device, tool_model
from torch import nn

from transfer_cli.finetuning import BackboneFinetuning

TOOL_CACHES = "cache_features" in inspect.signature(BackboneFinetuning).parameters


def val_count(spec: dict[str, Any]) -> int:
    return max(1, spec["images"] // 8)


def tool_probe(spec: dict[str, Any], device: torch.device, cache: bool) -> dict[str, Any]:
    model, backbone = tool_model(spec)
    data = SyntheticImageData(spec["images"], spec["batch_size"], augment=False, val_count=val_count(spec))
    data.connect(backbone)
    finetuning = BackboneFinetuning(strategy="frozen", **({"cache_features": cache} if TOOL_CACHES else {}))
    fit = trainer(device, spec["precision"], [finetuning], max_epochs=spec["epochs"], limit_val_batches=1.0)
    with PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        fit.fit(model, datamodule=data)
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "seconds_cpu": cpu_seconds, "memory": memory.report()}


class _PlainParts:
    """What both plain sides start from: the model split into frozen backbone and head, its preprocessing,
    and the loaders over the same images as SyntheticImageData's."""

    def __init__(self, spec: dict[str, Any], device: torch.device):
        self.spec, self.device = spec, device
        model = plain_model(spec)
        self.head, model.fc = model.fc, nn.Identity()
        self.model, self.preprocess = model, PlainPreprocess(spec, device)
        self.train = plain_loader(SyntheticImages(spec["images"]), spec, shuffle=True)
        self.val = plain_loader(SyntheticImages(val_count(spec), seed=1), spec, shuffle=False)

    def frozen(self) -> None:
        """The backbone on the device in eval mode, under no gradient: the first timed step of both sides."""
        self.backbone = self.model.to(self.device).to(memory_format=self.preprocess.layout)
        self.backbone.eval().requires_grad_(False)

    def features(self, loader):
        for batch in loader:
            images, labels = to_device(batch, self.device)
            with torch.no_grad(), autocast(self.device, self.spec["precision"]):
                feats = self.backbone(self.preprocess(images, augment=False))
            yield feats, labels  # outside the no_grad block: a generator would leak it to the caller

    def cached(self) -> tuple["_Cached", "_Cached"]:
        return tuple(_Cached(self.features(loader), self.spec["batch_size"]) for loader in (self.train, self.val))


def plain_probe(spec: dict[str, Any], device: torch.device, cached: bool) -> dict[str, Any]:
    """The frozen backbone in eval mode under no_grad, a linear head trained on its features."""
    parts = _PlainParts(spec, device)
    head = parts.head
    with PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        parts.frozen()
        head.to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
        if cached:
            train_batches, val_batches = parts.cached()
        else:
            train_batches, val_batches = (lambda _: parts.features(parts.train)), (lambda _: parts.features(parts.val))
        for _ in range(spec["epochs"]):
            head.train()
            for feats, labels in train_batches(True):
                with autocast(device, spec["precision"]):
                    loss = F.cross_entropy(head(feats), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            head.eval()
            correct = torch.zeros((), device=device)
            with torch.no_grad(), autocast(device, spec["precision"]):
                for feats, labels in val_batches(False):
                    correct += (head(feats).argmax(dim=1) == labels).sum()
            _ = correct.item()  # the epoch's validation accuracy, as a plain loop would print it
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "seconds_cpu": cpu_seconds, "memory": memory.report()}


def lightning_probe(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The floor under `transfer` with the feature cache: the plain cached loop's features, its head
    trained by the smallest LightningModule (no callbacks, metrics or logging) under the same Trainer
    settings. What this takes beyond the plain cached loop is Lightning's own loop, not transfer's."""
    parts = _PlainParts(spec, device)
    fit = trainer(device, spec["precision"], [], max_epochs=spec["epochs"], limit_val_batches=1.0)
    with PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        parts.frozen()
        train, val = parts.cached()
        fit.fit(_HeadOnly(parts.head), _Epochs(train, shuffle=True), _Epochs(val, shuffle=False))
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "seconds_cpu": cpu_seconds, "memory": memory.report()}


class _Cached:
    """A split's features, computed once; called with `shuffle`, one epoch of batches over them."""

    def __init__(self, pairs, batch_size: int):
        pairs = list(pairs)
        self.feats, self.labels = torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __call__(self, shuffle: bool):
        return _batches(self.feats, self.labels, self.batch_size, shuffle)


class _Epochs:
    """What Lightning iterates once per epoch: a fresh pass over a cached split."""

    def __init__(self, cached: _Cached, shuffle: bool):
        self.cached, self.shuffle = cached, shuffle

    def __len__(self) -> int:
        return len(self.cached)

    def __iter__(self):
        return self.cached(self.shuffle)


class _HeadOnly(L.LightningModule):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def training_step(self, batch, batch_idx):
        feats, labels = batch
        return F.cross_entropy(self.head(feats), labels)

    def validation_step(self, batch, batch_idx):
        feats, labels = batch
        return (self.head(feats).argmax(dim=1) == labels).sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=1e-3, weight_decay=0.01)


def _batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool):
    order = torch.randperm(len(labels), device=feats.device) if shuffle else torch.arange(len(labels))
    for index in order.split(batch_size):
        yield feats[index], labels[index]


def probe_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    sides = {
        "transfer": lambda: tool_probe(spec, device, cache=False),
        "plain": lambda: plain_probe(spec, device, cached=False),
        "plain_cached": lambda: plain_probe(spec, device, cached=True),
        "lightning_cached": lambda: lightning_probe(spec, device),
    }
    if TOOL_CACHES:
        sides["transfer_cached"] = lambda: tool_probe(spec, device, cache=True)
    runs = interleaved(sides, spec["repeats"])
    sides = {name: summarise(side_runs, "seconds") for name, side_runs in runs.items()}
    for side in sides.values():
        side["throughput"] = spec["epochs"] * spec["images"] / side["seconds"]
        side["throughput_cpu"] = spec["epochs"] * spec["images"] / side["seconds_cpu"]
    result = compare("images/s", sides)
    result["plain_caching_speedup"] = sides["plain"]["seconds"] / sides["plain_cached"]["seconds"]
    result["transfer_caching_speedup"] = None
    if TOOL_CACHES:
        cached = {"transfer": sides["transfer_cached"], "plain": sides["plain_cached"]}
        result["cached_ratio"] = compare("images/s", cached)["ratio"]
        result["cached_ratio_cpu"] = compare("images/s", cached)["ratio_cpu"]
        result["transfer_caching_speedup"] = sides["transfer"]["seconds"] / sides["transfer_cached"]["seconds"]
        # Against the floor Lightning's loop sets (lightning_probe): what of the gap is transfer's own.
        floor = {"transfer": sides["transfer_cached"], "plain": sides["lightning_cached"]}
        result["cached_over_lightning"] = compare("images/s", floor)["ratio"]
    result["lightning_cached_ratio"] = compare(
        "images/s", {"transfer": sides["lightning_cached"], "plain": sides["plain_cached"]}
    )["ratio"]
    return result
