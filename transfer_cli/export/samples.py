"""Real inputs for the parity check, shaped as a deployment feeds them.

From --input (what predict takes), else a slice of the checkpoint's validation data when it is
reachable on this machine, else synthetic inputs: seeded random pixels for images, a fixed set of
sentences (pairs) through the model's own tokenizer for text.
"""

import sys
from dataclasses import dataclass
from typing import Any

import torch

from transfer_cli.data.image_ops import resize_center_crop
from transfer_cli.errors import ConfigError, DataError
from transfer_cli.export.deploy import input_names
from transfer_cli.export.source import Source

SAMPLES = 8
# Used when neither --input nor the validation data is at hand (documented in the README).
SYNTHETIC_TEXTS = (
    ("A man is playing a guitar on the stage.", "Someone is making music."),
    ("The children are asleep.", "The kids are running in the park."),
    ("A dog runs through the snow.", "An animal is outside."),
    ("Two women are drinking coffee in a small cafe near the station.", "Nobody is drinking anything."),
    ("It rained all day.", "The ground is wet."),
    ("The committee postponed its decision until the next meeting.", "A decision was made today."),
    ("She bought three apples.", "She bought fruit."),
    ("The train was late again this morning, so he missed the first lecture.", "He was on time."),
)


@dataclass
class Case:
    name: str
    inputs: dict[str, torch.Tensor]


def parity_cases(source: Source, input_spec: str | None) -> tuple[str, list[Case]]:
    """Where the samples came from, and the batches to compare: batch 1 and batch N, and for text a
    second, longer padded length."""
    where, examples = _examples(source, input_spec)
    if len(examples) == 1:
        examples = examples * 2  # one input still checks a real batch, not batch 1 twice
    if source.kind == "image":
        pool = torch.stack(examples)
        return where, [Case("batch 1", {"images": pool[:1]}), Case(f"batch {len(pool)}", {"images": pool})]
    one = _pad(source, examples[:1], 0)
    many = _pad(source, examples, 0)
    longest = _position_limit(source)
    width = many["input_ids"].shape[1]
    cases = [
        Case(f"batch 1, length {one['input_ids'].shape[1]}", one),
        Case(f"batch {len(examples)}, length {width}", many),
    ]
    longer = min(longest, width + 24)
    if longer > width:
        cases.append(Case(f"batch {len(examples)}, length {longer}", _pad(source, examples, longer)))
    return where, cases


def _examples(source: Source, input_spec: str | None) -> tuple[str, list[Any]]:
    if input_spec is not None:
        source.datamodule.predict_input = input_spec
        return f"--input {input_spec}", _take(source, source.datamodule.predict_dataloader(), predicting=True)
    try:
        source.datamodule.setup("validate")
        found = _take(source, source.datamodule.val_dataloader(), predicting=False)
        return "the checkpoint's validation data", found
    except (DataError, ConfigError, OSError) as err:
        print(
            f"transfer: validation data not reachable ({str(err).splitlines()[0]}); using synthetic inputs",
            file=sys.stderr,
        )
    return "synthetic inputs", _synthetic(source)


def _take(source: Source, loader: Any, predicting: bool) -> list[Any]:
    examples: list[Any] = []
    for batch in loader:
        errors = batch.get("errors") or [None] * _batch_len(batch["inputs"])
        for i, error in enumerate(errors):
            if error is not None:
                raise DataError(f"{error} (a parity sample; give readable inputs with --input).")
            examples.append(_example(source, batch["inputs"], i))
            if len(examples) == SAMPLES:
                return examples
    if not examples:
        raise DataError("No samples to check the export with (--input is empty).")
    return examples


def _batch_len(inputs: Any) -> int:
    return len(inputs["input_ids"]) if isinstance(inputs, dict) else len(inputs)


def _example(source: Source, inputs: Any, i: int) -> Any:
    if source.kind == "image":
        p = source.preprocessing
        # Validation images may still be at their stored size; files arrive cropped from the loader.
        return resize_center_crop(inputs[i], p.resize_size, p.crop_size, p.interpolation).to(torch.uint8)
    keep = inputs["attention_mask"][i].bool()
    return {name: inputs[name][i][keep] if name != "attention_mask" else None for name in input_names(source)}


def _synthetic(source: Source) -> list[Any]:
    if source.kind == "image":
        size = source.preprocessing.crop_size
        generator = torch.Generator().manual_seed(0)
        return list(torch.randint(0, 256, (SAMPLES, 3, size, size), dtype=torch.uint8, generator=generator))
    pairs = len(getattr(source.datamodule, "text_columns", ("text",))) == 2
    tokenizer, examples = source.tokenizer, []
    for premise, hypothesis in SYNTHETIC_TEXTS:
        encoded = tokenizer(
            premise, hypothesis if pairs else None, truncation=True, max_length=source.datamodule.max_length
        )
        examples.append(
            {name: torch.tensor(encoded.get(name, [])) for name in input_names(source) if name != "attention_mask"}
        )
    return examples


def _pad(source: Source, examples: list[dict[str, Any]], width: int) -> dict[str, torch.Tensor]:
    """Examples padded as the datamodule pads them (side and pad values), to `width` or their longest."""
    tokenizer = source.tokenizer
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "token_type_ids": tokenizer.pad_token_type_id}
    left = tokenizer.padding_side == "left"
    width = max(width, *(len(e["input_ids"]) for e in examples))
    batch = {}
    for name in input_names(source):
        rows = []
        for example in examples:
            length = len(example["input_ids"])
            values = torch.ones(length, dtype=torch.int64) if name == "attention_mask" else example[name].long()
            pad = torch.full((width - length,), 0 if name == "attention_mask" else pad_values.get(name, 0))
            rows.append(torch.cat([pad, values] if left else [values, pad]))
        batch[name] = torch.stack(rows)
    return batch


def _position_limit(source: Source) -> int:
    config = source.model.backbone.model.config
    return int(getattr(config, "max_position_embeddings", 512) or 512)
