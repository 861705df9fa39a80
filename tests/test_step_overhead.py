"""The fast paths of the training step give what the slow ones gave.

The model sums each epoch's loss and right answers on the device and logs them once per epoch, and logs
a step's loss only on the steps a logger or the progress line reads. A reference model that logs the way
the model used to (self.log of the loss every step with on_step and on_epoch, a torchmetrics accuracy)
runs beside it: every figure that reaches the logger must be the same.
"""

import os
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from transfer_cli.backbones.base import Backbone
from transfer_cli.callbacks.nonfinite import NonFiniteLossGuard
from transfer_cli.callbacks.progress import LineProgressBar
from transfer_cli.errors import NonFiniteLossError
from transfer_cli.model import TransferModel

CLASSES = ["a", "b", "c"]
EPOCH_FIGURES = ("train_loss_epoch", "train_acc", "val_loss", "val_acc")


class TinyBackbone(Backbone):
    def __init__(self, nan_at_call: int | None = None):
        super().__init__()
        self.linear = nn.Linear(8, 6)
        self.num_features = 6
        self.calls, self.nan_at_call = 0, nan_at_call

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(inputs)
        return out * float("nan") if self.calls == self.nan_at_call else out

    def preprocessing(self):
        return None

    def offline_init_args(self):
        return {}


class PerStepReference(TransferModel):
    """The model's logging as it was: self.log every step, torchmetrics accuracy updated every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_acc = {s: MulticlassAccuracy(len(CLASSES), average="micro") for s in ("train", "val")}

    def _step(self, batch, stage):
        logits, labels = self(batch["inputs"]), batch["labels"]
        loss = F.cross_entropy(logits, labels)
        self.ref_acc[stage].update(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(labels))
        if on_step and self.trainer.is_last_batch:
            self._log_ref_acc("train")
        return loss

    def _log_ref_acc(self, stage):
        self.log(f"{stage}_acc", self.ref_acc[stage].compute(), on_step=False, on_epoch=True, prog_bar=True)
        self.ref_acc[stage].reset()

    def on_validation_epoch_end(self):
        self._log_ref_acc("val")


class RecordingLogger(Logger):
    """Every row that reaches a logger, as (step, name, value)."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, str, float]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows += [(step, k, float(v)) for k, v in metrics.items() if k != "epoch"]

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, value) for step, key, value in self.rows if key == name]


def _loader(count: int, seed: int, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    rows = [{"inputs": x, "labels": y} for x, y in zip(torch.randn(count, 8, generator=g), torch.arange(count) % 3)]
    return DataLoader(rows, batch_size=5, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _fit(model_class, callbacks=(), logger=None, **trainer_args):
    torch.manual_seed(0)
    model = model_class(TinyBackbone(trainer_args.pop("nan_at_call", None)), class_names=CLASSES)
    settings = {"max_epochs": 3, "enable_progress_bar": False, **trainer_args}
    trainer = L.Trainer(
        accelerator="cpu", logger=logger or False, callbacks=list(callbacks), enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, **settings,
    )  # fmt: skip
    # 23 and 11 examples in batches of 5: the last batch of each is smaller, so the means are weighted.
    trainer.fit(model, train_dataloaders=_loader(23, 1, shuffle=True), val_dataloaders=_loader(11, 2))
    return trainer, model


@pytest.mark.parametrize("every", [1, 2])
def test_logged_figures_equal_the_per_step_logging(every):
    fast, slow = RecordingLogger(), RecordingLogger()
    _fit(TransferModel, logger=fast, log_every_n_steps=every)
    _fit(PerStepReference, logger=slow, log_every_n_steps=every)
    for name in (*EPOCH_FIGURES, "train_loss_step"):
        expected = slow.series(name)
        assert expected, name
        got = fast.series(name)
        assert [s for s, _ in got] == [s for s, _ in expected], name
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6, abs=0), name
    assert len(fast.series("train_acc")) == len(fast.series("val_acc")) == 3


def test_without_logger_or_progress_line_the_step_loss_is_logged_once_per_epoch(monkeypatch):
    logged: list[str] = []
    original = TransferModel.log

    def spy(self, name, *args, **kwargs):
        logged.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(TransferModel, "log", spy)
    trainer, _ = _fit(TransferModel)
    assert logged.count("train_loss_step") == 3  # the last step of each of 3 epochs (5 steps each)
    assert logged.count("val_loss") == logged.count("val_acc") == 3  # once per validation, not per batch
    assert {"train_loss_epoch", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)


def test_epoch_line_shows_the_last_steps_loss(capfd):
    losses: list[float] = []

    class LastLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _fit(TransferModel, callbacks=[LineProgressBar(interval_s=1e9), LastLoss()], enable_progress_bar=True)
    lines = [line for line in capfd.readouterr().err.splitlines() if re.match(r"epoch \d done in", line)]
    assert len(lines) == 3
    shown = float(re.search(r"train_loss_step=(\S+)", lines[-1]).group(1))
    assert shown == pytest.approx(losses[-1], rel=1e-3)
    assert "train_loss_epoch=" in lines[-1] and "train_acc=" in lines[-1] and "val_acc=" in lines[-1]


def test_progress_line_due_at_a_step_shows_that_steps_loss(capfd):
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _fit(TransferModel, callbacks=[LineProgressBar(interval_s=0), Record()], enable_progress_bar=True, max_epochs=1)
    shown = [float(v) for v in re.findall(r"epoch 0 batch \d/5 train_loss_step=(\S+)", capfd.readouterr().err)]
    assert shown == pytest.approx(losses, rel=1e-3)


def test_nonfinite_guard_stops_at_the_step_whose_loss_is_nan():
    # The 4th training forward (step 3, 0-based) gives NaN features, so a NaN loss.
    with pytest.raises(NonFiniteLossError, match="became nan at step 3 "):
        _fit(TransferModel, callbacks=[NonFiniteLossGuard()], nan_at_call=4)


def test_an_epoch_cut_short_by_max_steps_still_logs_its_epoch_figures():
    logger = RecordingLogger()
    _fit(TransferModel, logger=logger, log_every_n_steps=1, max_steps=7)  # 5 steps an epoch: the 2nd is cut at 2
    steps = [value for _, value in logger.series("train_loss_step")]
    epochs = [value for _, value in logger.series("train_loss_epoch")]
    assert len(steps) == 7 and len(epochs) == 2 and len(logger.series("train_acc")) == 2
    # Batches of 5, 5, 5, 5 and 3 examples: the epoch loss is the mean over examples, as Lightning's was.
    assert epochs[0] == pytest.approx(sum(v * n for v, n in zip(steps[:5], (5, 5, 5, 5, 3))) / 23, rel=1e-6)
    assert epochs[1] == pytest.approx(sum(steps[5:]) / 2, rel=1e-6)


def test_a_cpu_fit_does_not_ask_nvml_for_cuda_on_every_optimizer_step(monkeypatch):
    # Lightning sets the variable at import; torch's AdamW then asks NVML whether CUDA is there every step.
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    asked, training = [], []
    original = torch.cuda._device_count_nvml

    def counting():
        asked.append(bool(training))
        return original()

    class Window(L.Callback):
        def on_train_start(self, trainer, pl_module):
            training.append(True)

        def on_train_end(self, trainer, pl_module):
            training.clear()

    if not torch.backends.cuda.is_built() or torch.cuda.is_initialized() or torch.cuda.device_count() > 0:
        pytest.skip("torch asks NVML per step only in a CUDA build, before CUDA is initialised, without a GPU")
    if not hasattr(torch.cuda, "_device_count_nvml"):
        pytest.skip("this torch no longer asks NVML through torch.cuda._device_count_nvml")
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", counting)
    torch.cuda.is_available()
    assert asked == [False]  # the probe sees what torch asks
    _fit(TransferModel, callbacks=[Window()])  # 15 AdamW steps
    assert asked.count(True) == 0
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"  # put back for the rest of the process


def test_where_a_cuda_device_is_visible_a_cpu_fit_leaves_lightnings_fork_safe_check(monkeypatch):
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from transfer_cli import cuda_probe

    monkeypatch.setattr(cuda_probe, "visible_cuda_devices", lambda: 1)  # a GPU machine training on the CPU
    seen = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"])

    _fit(TransferModel, callbacks=[Look()], max_epochs=1)
    assert seen == ["1"] * 5  # the CUDA runtime would initialise the driver that a later fork inherits


def test_a_cpu_fit_keeps_freed_memory_for_the_next_step(monkeypatch):
    from transfer_cli import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("tuned") or True)
    _fit(TransferModel, max_epochs=1)
    assert calls == ["tuned"]
