"""Callbacks that record what happened inside a CLI run, for tests that run `transfer` as a subprocess
(add `--trainer.callbacks+=probes.NAME` and put this folder on PYTHONPATH)."""

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class LearningRateProbe(Callback):
    """Writes lr_probe.json: per optimizer step, the learning rate of each named parameter group as
    the update uses it (read just before the optimizer applies it, after any hook has adjusted it)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}
        self.steps.append({"step": trainer.global_step, **lrs})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path("lr_probe.json").write_text(json.dumps(self.steps))


class EvaluationProbabilities(Callback):
    """Keeps softmax(model(inputs)) of every validation and test batch, computed on the batch exactly as
    the evaluation step receives it (after the datamodule's on-device preprocessing), in loader order."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []

    @torch.no_grad()
    def _keep(self, pl_module: L.LightningModule, batch: dict) -> None:
        self.probs.append(pl_module(batch["inputs"]).float().softmax(dim=-1).cpu())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(pl_module, batch)


class OptimizerStateLayout(Callback):
    """Writes optimizer_layout.json at the first training batch (state restored, hooks run): whether every
    optimizer state tensor shaped like its parameter is laid out like it, the fused flag, the backbone layout."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if Path("optimizer_layout.json").exists():
            return
        optimizer = trainer.optimizers[0]
        pairs = [
            (value.stride(), param.stride())
            for param, state in optimizer.state.items()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.shape == param.shape
        ]
        found = {
            "state_tensors": len(pairs),
            "state_follows": all(mine == theirs for mine, theirs in pairs),
            "fused": [group.get("fused") for group in optimizer.param_groups],
            "layout": str(pl_module.backbone.memory_format).removeprefix("torch."),
        }
        Path("optimizer_layout.json").write_text(json.dumps(found))
