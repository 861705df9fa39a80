"""The one transfer model: an injected backbone, a head sized from it, and a classification loss."""

import functools
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

from transfer_cli import memory_format
from transfer_cli.backbones.base import Backbone
from transfer_cli.callbacks.progress import StepMetricsOnDemand
from transfer_cli.cpu_fit import CpuFitTuning
from transfer_cli.errors import ConfigError
from transfer_cli.heads import LinearHead
from transfer_cli.lightning_private import logs_this_step
from transfer_cli.optimizer_state import drop_former_parameters
from transfer_cli.report.metrics import summarize
from transfer_cli.report.states import EvaluationStates, Mistakes
from transfer_cli.schedules import build, optimizers

HeadFactory = Callable[[int, int], nn.Module]
# What the model logs per epoch (train_loss_step, the loss of single steps, is not a figure to follow).
MONITORABLE = ("val_loss", "val_acc", "train_loss_epoch", "train_acc")
# Set by Lightning before and after every hook it calls (twice per hook, dozens of times a step): plain
# strings, never parameters or submodules, so nn.Module.__setattr__'s checks are skipped for them.
LIGHTNING_BOOKKEEPING = frozenset({"_current_fx_name"})


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


class TransferModel(CpuFitTuning, L.LightningModule):
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
        self.tallies = {stage: EpochTally() for stage in ("train", "val", "test")}
        # The full evaluation report, accumulated only by `transfer validate` and `transfer test`: the
        # validation inside fit logs the cheap scalars above and nothing else.
        self.report_states = EvaluationStates(num_classes)
        self.mistakes = Mistakes()
        self.evaluation: dict[str, Any] | None = None  # set at the end of validate/test, on every process
        self._real_left: int | None = None  # examples of this process's share that are not sampler padding

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LIGHTNING_BOOKKEEPING:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        memory_format.settle(self.backbone, self.trainer)

    def configure_model(self) -> None:
        if self.compile_modules:
            # In place (nn.Module.compile), so parameter names and checkpoints stay the same.
            self.backbone.compile()
            self.head.compile()

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

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        # Cached frozen features (see feature_cache.py) skip the backbone.
        logits = self.head(batch["features"]) if "features" in batch else self(batch["inputs"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        tally = self.tallies[stage]
        tally.update(loss, logits, labels)
        if stage == "train":
            if self._step_loss_read():
                # A CPU copy: Lightning turns the progress-bar value it holds into a number after every
                # step, logged or not, which for a value on the GPU is a wait for the GPU every step.
                value = loss.detach().cpu()
                self.log("train_loss_step", value, on_step=True, on_epoch=False, prog_bar=True, batch_size=tally.last)
            if self.trainer.is_last_batch:
                # Here rather than in on_train_epoch_end, which runs after the callbacks reporting the epoch.
                self._log_epoch("train")
        elif self._evaluating():
            self._update_report(batch, logits.detach(), labels)
        return loss

    def _step_loss_read(self) -> bool:
        """Whether anything reads this step's loss: self.log costs about a millisecond of host time in
        Lightning's bookkeeping, so the loss of a step nobody sees is only added to the epoch's tally."""
        trainer = self.trainer
        if trainer.is_last_batch or trainer.fast_dev_run or trainer.should_stop:
            return True  # the epoch's progress line shows the last step's loss; a stop logs this step
        if trainer.loggers and logs_this_step(trainer):
            return True
        bar = trainer.progress_bar_callback
        if isinstance(bar, StepMetricsOnDemand):
            return bar.shows_step_metrics(trainer)
        return bar is not None and bar.is_enabled  # another bar may show the metrics after every step

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

    def _log_epoch(self, stage: str) -> None:
        """Log the stage's epoch figures from its tally, once per epoch, and start a new tally.

        Train loss is this process's mean, as Lightning's unsynchronised on_epoch mean was; accuracy, and
        the validation and test loss, are over all processes (one all-reduce of the sums each).
        """
        tally = self.tallies[stage]
        if not tally.count:
            return
        reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
        correct, count = reduce(torch.stack([tally.correct, tally.count_tensor()])).unbind()
        accuracy = correct.float() / count.float()  # as torchmetrics' micro accuracy divides
        if stage == "train":
            loss, synced = tally.loss_sum / tally.count_tensor(), False
            # train_loss as well, kept for monitors that named the name Lightning added to callback_metrics.
            self.log("train_loss", loss, on_step=False, on_epoch=True, logger=False, batch_size=1)
        else:
            loss, synced = reduce(tally.loss_sum) / count, True
        # Already summed over processes: sync_dist=True only averages equal values (and keeps Lightning
        # from warning that an epoch figure is not synchronised).
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=1, sync_dist=True)
        name = "train_loss_epoch" if stage == "train" else f"{stage}_loss"
        self.log(name, loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=1, sync_dist=synced)
        tally.reset()

    def on_train_start(self) -> None:
        memory_format.align_optimizer_state(self.trainer.optimizers)  # restored by now, in the layout saved
        self.tallies["train"].reset()  # a run resumed mid-epoch counts from here, as Lightning's logging does
        if self.compile_modules:
            self._first_step_started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")  # an epoch cut short (max_steps, limit) never saw its last batch

    def on_validation_epoch_start(self) -> None:
        self.tallies["val"].reset()
        if self._evaluating():
            self._start_report(self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        self.tallies["test"].reset()
        self._start_report(self.trainer.test_dataloaders)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        if self._evaluating():
            self._finish_report()

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self._finish_report()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

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


class EpochTally:
    """An epoch's loss and right answers, summed on the device in a few tensor operations per step.

    Logging the loss through self.log and updating a torchmetrics accuracy every step cost more host time
    than the step of a small head. The sums give the figures those did: the loss mean as Lightning's
    on_epoch mean computes it (loss times batch size, summed, over the count), accuracy as torchmetrics'
    micro accuracy (argmax equal to the label, over the count).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Any = 0.0
        self.correct: Any = 0
        self.count = 0
        self.last = 0  # the batch size of the latest step

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.last = labels.shape[0]
        loss = loss.detach()
        if loss.dtype not in (torch.float32, torch.float64):  # as Lightning stores a logged value
            loss = loss.float()
        self.loss_sum = self.loss_sum + loss * self.last
        self.correct = self.correct + (logits.detach().argmax(dim=-1) == labels).sum()
        self.count += self.last

    def count_tensor(self) -> torch.Tensor:
        return torch.tensor(self.count, device=self.correct.device)
