"""The one transfer model: an injected backbone, a head sized from it, and a classification loss."""

import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from transfer_cli.backbones.base import Backbone
from transfer_cli.errors import ConfigError
from transfer_cli.heads import LinearHead
from transfer_cli.optimizer_state import drop_former_parameters
from transfer_cli.report.metrics import summarize
from transfer_cli.report.states import EvaluationStates, Mistakes
from transfer_cli.schedules import build, optimizers

HeadFactory = Callable[[int, int], nn.Module]
# What _step and _log_accuracy log, by the names Lightning gives them (train_loss is logged per step
# and per epoch, hence its _step and _epoch variants).
MONITORABLE = ("val_loss", "val_acc", "train_loss_epoch", "train_acc")


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


class TransferModel(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        head: HeadFactory = LinearHead,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_monitor: str = "val_loss",
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
        backbone_lr_factor: float = 1.0,
        label_smoothing: float = 0.0,
        compile: bool = False,
    ):
        """A pretrained backbone with a new classification head.

        Args:
            backbone: The feature extractor (torchvision, HuggingFace, or a transfer checkpoint).
            class_names: Class names, set from the data; the head gets one output per class.
            head: Head class, called with (backbone.num_features, len(class_names)).
            optimizer: Optimizer over the head's and the backbone's parameters.
            lr_scheduler: Optional learning-rate schedule for that optimizer.
            lr_scheduler_monitor: The metric ReduceLROnPlateau follows (one of MONITORABLE).
            lr_scheduler_interval: Step the schedule every optimizer `step` or every `epoch`; null
                takes the schedule's own (per step: WarmupDecay, OneCycleLR, CyclicLR; others per epoch).
            backbone_lr_factor: The backbone trains at the optimizer's learning rate times this
                factor (whenever the finetuning strategy lets it train).
            label_smoothing: Label smoothing of the cross-entropy loss.
            compile: Compile backbone and head with torch.compile (the first step then includes the
                compilation, reported on stderr).
        """
        super().__init__()
        self.backbone = backbone
        self.class_names = list(class_names)
        self.head = head(backbone.num_features, len(self.class_names))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if lr_scheduler_monitor not in MONITORABLE:
            # Checked here, before training: Lightning would only fail at the end of the first epoch.
            raise ConfigError(
                f"model.lr_scheduler_monitor {lr_scheduler_monitor!r} is not a metric the model logs: "
                f"use one of {', '.join(MONITORABLE)}."
            )
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.lr_scheduler_interval = lr_scheduler_interval
        self.backbone_lr_factor = backbone_lr_factor
        self.label_smoothing = label_smoothing
        self.compile_modules = compile
        self._first_step_started: float | None = None  # set while the first (compiling) step runs
        num_classes = len(self.class_names)
        # validate_args=False: the checks call torch.unique on the labels, a GPU sync every step.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        # The full evaluation report, accumulated only by `transfer validate` and `transfer test`: the
        # validation inside fit logs the cheap scalars above and nothing else.
        self.report_states = EvaluationStates(num_classes)
        self.mistakes = Mistakes()
        self.evaluation: dict[str, Any] | None = None  # set at the end of validate/test, on every process
        self._real_left: int | None = None  # examples of this process's share that are not sampler padding

    def configure_model(self) -> None:
        if self.compile_modules:
            # In place (nn.Module.compile), so parameter names and checkpoints stay the same.
            self.backbone.compile()
            self.head.compile()

    def on_train_start(self) -> None:
        if self.compile_modules:
            self._first_step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._first_step_started is not None:
            seconds = time.perf_counter() - self._first_step_started
            print(f"transfer: first training step, including torch.compile: {seconds:.1f}s", file=sys.stderr)
            self._first_step_started = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning restores the optimizer, so an earlier version's training state resumes.
        drop_former_parameters(checkpoint, self.backbone)

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.backbone(inputs))

    def _step(self, batch: dict[str, Any], stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        # Cached frozen features (see feature_cache.py) skip the backbone.
        logits = self.head(batch["features"]) if "features" in batch else self(batch["inputs"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        # Accumulated here, logged once per epoch: logging the metric object every step costs about a
        # millisecond of host time per step in Lightning's bookkeeping.
        accuracy.update(logits.detach(), labels)
        on_step = stage == "train"
        self.log(
            f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=labels.shape[0],
            sync_dist=not on_step,  # validation and test losses are averaged over all processes
        )  # fmt: skip
        if on_step and self.trainer.is_last_batch:
            # Here rather than in on_train_epoch_end, which runs after the callbacks reporting the epoch.
            self._log_accuracy("train", accuracy)
        if not on_step and self._evaluating():
            self._update_report(batch, logits.detach(), labels)
        return loss

    # The evaluation report ---------------------------------------------------------------------

    def _evaluating(self) -> bool:
        return self.trainer.state.fn in ("validate", "test")

    def _start_report(self, loaders: Any) -> None:
        self.report_states.reset()
        self.mistakes.reset()
        self.evaluation = None
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        self._real_left = None
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            # The sampler pads every process's share to the same length with examples from the start:
            # the process holding global position i*W + r counts it only if that position is < N.
            n, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
            self._real_left = max(0, math.ceil((n - rank) / world))

    def _update_report(self, batch: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor) -> None:
        ids = batch.get("ids")
        if self._real_left is not None:
            keep = min(labels.shape[0], self._real_left)
            self._real_left -= keep
            logits, labels = logits[:keep], labels[:keep]
            ids = ids[:keep] if ids is not None else None
            if keep == 0:
                return
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        self.report_states.update(probs, labels, F.cross_entropy(logits, labels, reduction="none"))
        self.mistakes.update(probs, labels, ids)

    def _finish_report(self) -> None:
        with warnings.catch_warnings():
            # A process whose share was empty still joins the sum across processes.
            warnings.filterwarnings("ignore", message=r".*compute.*was called before the .*update.*")
            figures = summarize(self.report_states.compute(), self.class_names)
        errors = self.mistakes.rows(self.class_names)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, errors)
            errors = [row for rows in gathered for row in rows]
            errors = sorted(errors, key=lambda row: -row["score"])[: self.mistakes.keep]
        self.evaluation = {"metrics": figures, "errors": errors}

    def _log_accuracy(self, stage: str, accuracy: MulticlassAccuracy) -> None:
        if accuracy.update_count:  # compute() syncs the counts across processes under DDP
            value = accuracy.compute()  # the same on every process, so sync_dist costs one reduce per epoch
            self.log(f"{stage}_acc", value, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        accuracy.reset()

    def on_validation_epoch_start(self) -> None:
        if self._evaluating():
            self._start_report(self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        self._start_report(self.trainer.test_dataloaders)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val", self.val_acc)
        if self._evaluating():
            self._finish_report()

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test", self.test_acc)
        self._finish_report()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"probs": self(batch["inputs"]).float().softmax(dim=-1)}

    def configure_optimizers(self) -> Any:
        # The backbone always has its own parameter group, frozen or not: a frozen parameter has no
        # gradient and the optimizer skips it, so unfreezing later needs no optimizer surgery and the
        # LR schedule sees the same groups from the first step to the last.
        groups = [
            {"params": list(self.head.parameters()), "name": "head"},
            {"params": list(self.backbone.parameters()), "name": "backbone"},
        ]
        optimizer = build(self.optimizer_factory, "model.optimizer", groups)
        backbone_group = optimizer.param_groups[1]
        backbone_group["lr"] = backbone_group["lr"] * self.backbone_lr_factor
        return optimizers(
            optimizer, self.lr_scheduler_factory, self.trainer, self.lr_scheduler_monitor, self.lr_scheduler_interval
        )
