"""BERT-shaped text classification training steps, `transfer` vs plain loop.

The library's HuggingFace backbone is being written at the same time as this benchmark, so the
transfer side wraps a randomly initialised `BertModel` in a minimal `Backbone` here (CLS pooling);
everything else on that side is the library's `TransferModel` under Lightning.
"""

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from common import (
    ClockCallback,
    PeakMemory,
    StepClock,
    SyntheticTokens,
    autocast,
    compare,
    interleaved,
    summarise,
    trainer,
)
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

from transfer_cli.backbones.base import Backbone
from transfer_cli.finetuning import BackboneFinetuning
from transfer_cli.heads import LinearHead
from transfer_cli.model import TransferModel

CLASSES = ["entailment", "neutral", "contradiction"]


def bert_config(spec: dict[str, Any]) -> BertConfig:
    """bert-base (BertConfig's defaults) unless the spec makes it smaller (on CPU)."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    return BertConfig(**{key: spec[key] for key in keys if key in spec})


class BertBackbone(Backbone):
    """A randomly initialised BERT whose CLS hidden state is the pooled feature."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.model = BertModel(config, add_pooling_layer=False)
        self.num_features = config.hidden_size

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs).last_hidden_state[:, 0]

    def preprocessing(self) -> Any:
        return None

    def offline_init_args(self) -> dict[str, Any]:
        return {}


class SyntheticTextData(L.LightningDataModule):
    def __init__(self, count: int, spec: dict[str, Any], vocab_size: int):
        super().__init__()
        self.count, self.spec, self.vocab_size = count, spec, vocab_size
        self.class_names = list(CLASSES)

    def setup(self, stage: str) -> None:
        self.dataset = SyntheticTokens(self.count, self.spec["seq_len"], self.vocab_size, len(CLASSES))

    def train_dataloader(self) -> DataLoader:
        return _loader(self.dataset, self.spec)


def _loader(dataset, spec: dict[str, Any]) -> DataLoader:
    pin = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True, num_workers=0, pin_memory=pin)


def tool_train(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    config = bert_config(spec)
    torch.manual_seed(0)
    model = TransferModel(BertBackbone(config), class_names=CLASSES, head=LinearHead)  # default optimizer: AdamW
    clock = StepClock(spec["warmup"], spec["steps"], device)
    data = SyntheticTextData(clock.total * spec["batch_size"], spec, config.vocab_size)
    callbacks = [BackboneFinetuning(strategy="full"), ClockCallback(clock)]
    fit = trainer(device, spec["precision"], callbacks, max_steps=clock.total, max_epochs=1)
    with PeakMemory(device) as memory:
        fit.fit(model, datamodule=data)
    return {**clock.result(spec["batch_size"]), "memory": memory.report()}


def plain_train(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    config = bert_config(spec)
    torch.manual_seed(0)
    encoder = BertModel(config, add_pooling_layer=False)
    head = nn.Linear(config.hidden_size, len(CLASSES))
    clock = StepClock(spec["warmup"], spec["steps"], device)
    loader = _loader(SyntheticTokens(clock.total * spec["batch_size"], spec["seq_len"], config.vocab_size), spec)
    with PeakMemory(device) as memory:
        encoder.to(device).train()
        head.to(device).train()
        params = [*head.parameters(), *encoder.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        for batch in loader:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast(device, spec["precision"]):
                logits = head(encoder(**inputs).last_hidden_state[:, 0])
                loss = F.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.tick()
    return {**clock.result(spec["batch_size"]), "memory": memory.report()}


def train_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    runs = interleaved(
        {"transfer": lambda: tool_train(spec, device), "plain": lambda: plain_train(spec, device)}, spec["repeats"]
    )
    return compare("seq/s", {name: summarise(side_runs, "throughput") for name, side_runs in runs.items()})
