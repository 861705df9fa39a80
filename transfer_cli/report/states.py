"""What evaluation accumulates per step: sums only (constant memory, summed across processes by
torchmetrics), updated on the device without a host sync, plus the most confident mistakes."""

import bisect
from typing import Any

import torch
from torchmetrics import Metric

CALIBRATION_BINS = 15
TOP_K = 5


class EvaluationStates(Metric):
    """The confusion matrix, top-5 hits, loss sum and confidence bins of a classifier's evaluation.

    Every figure of the report (accuracy, macro and per-class precision/recall/F1, support, ECE) is
    derived from these sums in report.metrics, so all of them describe exactly the same examples.
    """

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        c, b = num_classes, CALIBRATION_BINS
        self.add_state("confusion", torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("top5_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_count", torch.zeros(b, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bin_confidence", torch.zeros(b, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_correct", torch.zeros(b, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> None:
        c = self.num_classes
        confidence, predicted = probs.max(dim=1)
        correct = predicted == labels
        # index_add_ rather than torch.bincount, which reads the largest value back to the host on CUDA.
        cells = labels * c + predicted
        self.confusion.view(-1).index_add_(0, cells, torch.ones_like(cells))
        k = min(TOP_K, c)
        self.top5_correct += (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        self.loss_sum += losses.double().sum()
        bins = calibration_bin(confidence)
        self.bin_count.index_add_(0, bins, torch.ones_like(bins))
        self.bin_confidence.index_add_(0, bins, confidence.double())
        self.bin_correct.index_add_(0, bins, correct.long())

    def compute(self) -> dict[str, torch.Tensor]:
        names = ("confusion", "top5_correct", "loss_sum", "bin_count", "bin_confidence", "bin_correct")
        return {name: getattr(self, name).detach().cpu() for name in names}


def calibration_bin(confidence: torch.Tensor) -> torch.Tensor:
    """Equal-width bins (lo, hi] over [0, 1], the last one closed: a confidence of exactly 1.0 (common in
    float32 for a confident model) belongs to the top bin, where a reliability diagram shows it."""
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1, device=confidence.device, dtype=confidence.dtype)
    return (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, CALIBRATION_BINS - 1)


class Mistakes:
    """The `keep` most confident wrong predictions seen so far, kept on the device (a top-k over the
    kept ones and each new batch), with the input ids held on the host and looked up only at the end."""

    def __init__(self, keep: int = 100):
        self.keep = keep
        self.reset()

    def reset(self) -> None:
        self._kept: dict[str, torch.Tensor] | None = None
        self._ids: list[tuple[int, Any]] = []  # (first example number, the batch's ids)
        self._seen = 0

    def update(self, probs: torch.Tensor, labels: torch.Tensor, ids: Any) -> None:
        n = labels.shape[0]
        confidence, predicted = probs.max(dim=1)
        numbers = torch.arange(self._seen, self._seen + n, device=labels.device)
        # Correct predictions get a score below any probability, so top-k prefers every mistake.
        batch = {
            "score": torch.where(predicted != labels, confidence, torch.full_like(confidence, -1.0)),
            "true_score": probs.gather(1, labels[:, None]).squeeze(1),
            "label": labels,
            "predicted": predicted,
            "number": numbers,
        }
        if self._kept is not None:
            batch = {key: torch.cat([self._kept[key], value]) for key, value in batch.items()}
        top = batch["score"].topk(min(self.keep, batch["score"].shape[0])).indices
        self._kept = {key: value[top] for key, value in batch.items()}
        self._ids.append((self._seen, ids))
        self._seen += n

    def rows(self, class_names: list[str]) -> list[dict[str, Any]]:
        """The kept mistakes, most confident first, with their input ids (one host sync)."""
        if self._kept is None:
            return []
        kept = {key: value.cpu().tolist() for key, value in self._kept.items()}
        starts = [start for start, _ in self._ids]
        rows = []
        for score, true_score, label, predicted, number in zip(
            kept["score"], kept["true_score"], kept["label"], kept["predicted"], kept["number"]
        ):
            if score < 0:
                continue
            start, ids = self._ids[bisect.bisect_right(starts, number) - 1]
            rows.append(
                {
                    "input": _plain(ids[number - start]) if ids is not None else number,
                    "true": class_names[label],
                    "predicted": class_names[predicted],
                    "score": score,
                    "true_score": true_score,
                }
            )
        return rows


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value
