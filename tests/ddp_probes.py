"""Callbacks for fits on several processes (add `--trainer.callbacks+=ddp_probes.NAME`, this folder on PYTHONPATH)."""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


def checksums(module: torch.nn.Module) -> dict[str, str]:
    """A digest of the exact bytes of every parameter and buffer, by name."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name: _digest(t) for name, t in tensors.items()}


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


class ReplicaChecksums(Callback):
    """Writes replicas.json on rank 0: every rank's checksums of the whole model at the end of training
    (all-gathered), and rank 0's backbone checksums at the start and after each training epoch."""

    def __init__(self) -> None:
        self.backbone: dict[str, dict[str, str]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backbone["start"] = checksums(pl_module.backbone)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backbone[f"epoch{trainer.current_epoch}"] = checksums(pl_module.backbone)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mine = {"rank": trainer.global_rank, "world_size": trainer.world_size, "model": checksums(pl_module)}
        ranks = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(ranks, mine)
        if trainer.is_global_zero:
            parameters = [name for name, _ in pl_module.backbone.named_parameters()]
            found = {"ranks": ranks, "backbone": self.backbone, "backbone_parameters": parameters}
            Path("replicas.json").write_text(json.dumps(found))


class SeenExamples(Callback):
    """Writes seen.json on rank 0: by epoch, by rank, the examples each training batch held, as
    indices into the cached training features (so it needs the frozen-feature cache)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}
        self._index: dict[bytes, int] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        features = trainer.train_dataloader.features  # a FeatureBatches: the run's cached features
        self._index = {row.numpy().tobytes(): i for i, row in enumerate(features)}
        assert len(self._index) == len(features), "two examples with the same features: indices would be ambiguous"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        rows = batch["features"].cpu()
        self.seen.setdefault(f"epoch{trainer.current_epoch}", []).extend(self._index[r.numpy().tobytes()] for r in rows)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ranks = [None] * dist.get_world_size() if dist.is_initialized() else [self.seen]
        if dist.is_initialized():
            dist.all_gather_object(ranks, self.seen)
        if trainer.is_global_zero:
            Path("seen.json").write_text(json.dumps({"world_size": trainer.world_size, "ranks": ranks}))


class RankLayouts(Callback):
    """Makes rank 0's CPU timing pick NCHW and any other rank's choice channels_last, were it asked, then
    writes layouts.json on rank 0: by rank, whether it was asked, what its backbone runs in, and whether
    every 4-D weight is laid out that way."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from transfer_cli import memory_format  # this runs before the model's setup, which settles the layout

        self.timed = False

        def asked(*args, **kwargs):
            self.timed = True
            return torch.contiguous_format if trainer.global_rank == 0 else torch.channels_last

        if trainer.global_rank == 0:
            memory_format.fastest_on_cpu = asked  # behind rank 0's real cache of choices
        else:
            memory_format.cpu_layout = asked

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layout = pl_module.backbone.memory_format
        weights = [p for p in pl_module.backbone.parameters() if p.dim() == 4]
        mine = {
            "timed": self.timed,
            "runs": str(layout).removeprefix("torch."),
            "weights_follow": bool(weights) and all(p.is_contiguous(memory_format=layout) for p in weights),
        }
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if trainer.is_global_zero:
            Path("layouts.json").write_text(json.dumps(ranks))
