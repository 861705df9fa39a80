"""The figures of metrics.json, derived from the accumulated evaluation sums (report.states)."""

from typing import Any

import torch

from transfer_cli.report.states import CALIBRATION_BINS, TOP_K


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A class never predicted has no precision, one never seen no recall: 0, as torchmetrics and
    # scikit-learn (zero_division=0) report them.
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def per_class(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support of every class; rows of `confusion` are true classes."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    predicted, support = confusion.sum(dim=0), confusion.sum(dim=1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, predicted + support)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long(), "predicted": predicted}


def expected_calibration_error(count: torch.Tensor, confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """ECE = sum over bins of |accuracy - mean confidence| weighted by the bin's share of examples."""
    total = count.sum()
    if total == 0:
        return 0.0
    return float((correct.double() - confidence.double()).abs().sum() / total)


def summarize(states: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, Any]:
    """Every figure of the report as plain JSON values (stable keys: see the README)."""
    confusion = states["confusion"]
    n = int(confusion.sum())
    classes = per_class(confusion)
    # Macro averages over the classes that occur in the labels or the predictions, as torchmetrics does:
    # a class absent from both (a test folder holding a subset of the classes) says nothing.
    present = (classes["support"] > 0) | (classes["predicted"] > 0)
    macro = {
        name: float(classes[name][present].mean()) if present.any() else 0.0 for name in ("precision", "recall", "f1")
    }
    count, confidence, correct = states["bin_count"], states["bin_confidence"], states["bin_correct"]
    return {
        "num_examples": n,
        "class_names": list(class_names),
        "accuracy": float(confusion.diagonal().sum()) / n if n else 0.0,
        "top5_accuracy": float(states["top5_correct"]) / n if n and len(class_names) > TOP_K else None,
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "loss": float(states["loss_sum"]) / n if n else 0.0,
        "ece": expected_calibration_error(count, confidence, correct),
        "per_class": [
            {
                "class": name,
                "precision": float(classes["precision"][i]),
                "recall": float(classes["recall"][i]),
                "f1": float(classes["f1"][i]),
                "support": int(classes["support"][i]),
            }
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": confusion.tolist(),
        "calibration": {
            "bins": CALIBRATION_BINS,
            "count": count.tolist(),
            "confidence": _ratio(confidence.double(), count.double()).tolist(),
            "accuracy": _ratio(correct.double(), count.double()).tolist(),
        },
    }
