"""The graph a deployment runs: what a server has in, probabilities (or embeddings) out.

Images come in as uint8 [B, 3, H, W] at the model's input size, already resized and centre-cropped
(a server resizes as it decodes); the normalisation is inside the graph. Text comes in as the
tokenizer's arrays. `reference` computes the same outputs the way `transfer predict` does, for the
parity check to compare against.
"""

from typing import Any

import torch
from torch import nn

from transfer_cli.data.image_ops import BatchImageTransform
from transfer_cli.export.source import Source

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def input_names(source: Source) -> list[str]:
    if source.kind == "image":
        return ["images"]
    used = set(source.tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    return [name for name in TEXT_INPUTS if name in used]


def output_names(source: Source) -> list[str]:
    return ["embedding"] if source.embeds else ["probs"]


class ImageDeploy(nn.Module):
    def __init__(self, source: Source):
        super().__init__()
        p = source.preprocessing
        self.model = source.model
        self.embeds = source.embeds
        # Scaled to 0..255 once, so the graph goes from uint8 pixels to normalised floats in one step.
        self.register_buffer("mean", torch.tensor(p.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(p.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = (images.float() - self.mean) / self.std
        if self.embeds:
            return self.model.backbone(inputs)
        return self.model(inputs).float().softmax(dim=-1)


class TextDeploy(nn.Module):
    def __init__(self, source: Source):
        super().__init__()
        self.model = source.model
        self.names = input_names(source)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model({name: inputs[name] for name in self.names}).float().softmax(dim=-1)


def deploy_module(source: Source) -> nn.Module:
    return (ImageDeploy(source) if source.kind == "image" else TextDeploy(source)).eval()


def example_inputs(source: Source, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: two examples, so the batch axis is not taken for a constant 1."""
    if source.kind == "image":
        size = source.preprocessing.crop_size
        return (torch.zeros(batch, 3, size, size, dtype=torch.uint8),)
    return tuple(torch.ones(batch, length, dtype=torch.int64) for _ in input_names(source))


def dynamic_shapes(source: Source) -> Any:
    batch = torch.export.Dim("batch", min=1, max=65536)
    if source.kind == "image":
        return ({0: batch},)
    # Capped at the position table: longer inputs cannot run in the checkpoint's model either.
    longest = int(getattr(source.model.backbone.model.config, "max_position_embeddings", 512) or 512)
    length = torch.export.Dim("length", min=1, max=longest)
    return {name: {0: batch, 1: length} for name in input_names(source)}


@torch.no_grad()
def reference(source: Source, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's own outputs on `inputs`, computed as predict computes them."""
    model = source.model
    if source.kind == "image":
        images = BatchImageTransform(source.preprocessing)(inputs["images"], augment=False)
        if source.embeds:
            return {"embedding": model.backbone(images).float()}
        return {"probs": model(images).float().softmax(dim=-1)}
    return {"probs": model(dict(inputs)).float().softmax(dim=-1)}
