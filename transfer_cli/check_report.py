"""What `transfer check` reports about the config, the data and the model, and how it reads on stderr."""

from collections import Counter
from statistics import median
from typing import Any

import yaml

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.callbacks.finetuning import FinetuningPolicy

# A class is flagged when it has fewer examples than this fraction of the median class, or than MIN_EXAMPLES.
FEW_FRACTION = 0.1
MIN_EXAMPLES = 5


def config_changes(cli: Any, args: list[str]) -> dict[str, Any]:
    """The resolved settings that differ from the recipe's (the --config files alone)."""
    from transfer_cli.recipes import resolve_config_args

    resolved = resolve_config_args(["fit", *args])
    configs = [resolved[i : i + 2] for i, a in enumerate(resolved) if a in ("--config", "-c") and i + 1 < len(resolved)]
    parser = cli.subcommand_parser("fit")
    try:
        recipe = parser.parse_args([a for pair in configs for a in pair])
    except Exception:  # noqa: BLE001 - a recipe that needs flags to parse: show the whole config instead
        recipe = None
    ours, theirs = _dumped(parser, cli.config["fit"]), _dumped(parser, recipe)
    return {k: v for k, v in ours.items() if k != "config" and theirs.get(k, object()) != v}


def _dumped(parser: Any, config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    try:
        return _flat(yaml.safe_load(parser.dump(config, skip_none=False, skip_validation=True)))
    except Exception:  # noqa: BLE001 - a value the dump cannot write: the report goes without the comparison
        return {}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def data_summary(datamodule: Any) -> dict[str, Any]:
    """Examples per split and per class, from the datasets fit's setup built (no second scan)."""
    names = list(getattr(datamodule, "class_names", []) or [])
    splits = {}
    for split in ("train", "val"):
        loader = getattr(datamodule, f"{split}_dataloader")()
        labels = getattr(loader.dataset, "labels", None)
        counts = Counter(int(y) for y in labels) if labels is not None else Counter()
        per_class = {names[i] if i < len(names) else str(i): counts.get(i, 0) for i in range(len(names))}
        splits[split] = {"examples": len(loader.dataset), "batches": len(loader), "per_class": per_class}
    return {
        "datamodule": type(datamodule).__name__,
        "classes": len(names),
        "splits": splits,
        "few_examples": _few(splits["train"]["per_class"]),
    }


def _few(per_class: dict[str, int]) -> list[str]:
    if not per_class:
        return []
    limit = max(MIN_EXAMPLES, FEW_FRACTION * median(per_class.values()))
    return [name for name, n in per_class.items() if n < limit]


def model_summary(model: Any, trainer: Any) -> dict[str, Any]:
    """Parameters in total and trainable at the first step under the finetuning strategy."""
    strategy = next((c.strategy for c in trainer.callbacks if isinstance(c, FinetuningPolicy)), "full")
    total = sum(p.numel() for p in model.parameters())
    backbone = getattr(model, "backbone", None)
    frozen = sum(p.numel() for p in backbone.parameters()) if backbone is not None and strategy != "full" else 0
    summary: dict[str, Any] = {
        "model": type(model).__name__,
        "backbone": type(backbone).__name__ if backbone is not None else None,
        "backbone_name": getattr(backbone, "name", None) or getattr(backbone, "model_name", None),
        "strategy": strategy,
        "parameters": {"total": total, "trainable": total - frozen},
    }
    if hasattr(model, "head") and hasattr(model, "class_names") and backbone is not None:
        summary["head"] = {
            "class": type(model.head).__name__,
            "in_features": backbone.num_features,
            "out_features": len(model.class_names),
            "parameters": sum(p.numel() for p in model.head.parameters()),
        }
    preprocessing = backbone.preprocessing() if backbone is not None else None
    if isinstance(preprocessing, ImagePreprocessing):
        summary["preprocessing"] = preprocessing.to_dict()
    elif preprocessing is not None:  # a tokenizer
        summary["preprocessing"] = {"tokenizer": type(preprocessing).__name__}
    return summary


def render(report: dict[str, Any]) -> str:
    """The report for a person, on stderr."""
    lines = ["transfer check"]
    if report.get("config_changes"):
        lines.append("settings that differ from the recipe:")
        lines += [f"  {k}: {v}" for k, v in report["config_changes"].items()]
    lines += _render_data(report.get("data"))
    lines += _render_model(report.get("model"))
    lines += _render_device(report.get("device"))
    if report["problems"]:
        lines.append(f"{len(report['problems'])} problem(s) fit would stop at:")
        lines += [f"  [exit {p['exit_code']}] {p['message']}" for p in report["problems"]]
        lines.append(f"transfer check: fit would not run (exit {report['exit_code']}).")
    else:
        lines.append("transfer check: fit would run (exit 0).")
    return "\n".join(lines)


def _render_data(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = [f"data: {data['datamodule']}, {data['classes']} classes"]
    for split, info in data["splits"].items():
        counts = ", ".join(f"{k} {v}" for k, v in info["per_class"].items())
        lines.append(f"  {split}: {info['examples']} examples in {info['batches']} batches ({counts})")
    if data["few_examples"]:
        lines.append(f"  classes with few training examples: {', '.join(data['few_examples'])}")
    return lines


def _render_model(model: dict[str, Any] | None) -> list[str]:
    if not model:
        return []
    params = model["parameters"]
    lines = [
        f"model: {model['model']} with {model['backbone']} {model.get('backbone_name') or ''}".rstrip(),
        f"  parameters: {params['total']:,} total, {params['trainable']:,} trainable at the start "
        f"(finetuning.strategy {model['strategy']})",
    ]
    if "head" in model:
        head = model["head"]
        lines.append(f"  head: {head['class']} {head['in_features']} -> {head['out_features']} classes")
    if "preprocessing" in model:
        lines.append(f"  preprocessing: {model['preprocessing']}")
    return lines


def _render_device(device: dict[str, Any] | None) -> list[str]:
    if not device:
        return []
    lines = [
        f"device: {device['accelerator']}, precision {device['precision']}, batch size {device['batch_size']}",
        f"  training step {device['train_step_s']:.3f}s, evaluation step {device['eval_step_s']:.3f}s, "
        f"peak memory {device['peak_memory_bytes'] / 2**20:.0f} MiB ({device['memory_measure']})",
        f"  estimated: {device['epoch_s']:.0f}s per epoch ({device['train_batches']} training and "
        f"{device['val_batches']} validation batches), {device['run_s']:.0f}s for the run "
        f"({device['epochs']} epoch(s))",
        f"  feature cache: {device['feature_cache']}",
    ]
    search = device.get("batch_size_search")
    if search:
        if search["largest"]:
            lines.append(f"  largest batch size that fits: {search['largest']}; add {search['flag']}")
        else:
            lines.append("  no batch size fits, not even 1: the model does not fit this device")
    return lines
