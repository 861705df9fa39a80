"""The report's pictures. matplotlib is imported inside each drawing function, so that `transfer --help`
and prediction never pay for it; Figure objects (not pyplot) render with Agg and need no display."""

from pathlib import Path
from typing import Any

# Past this many classes the cells are too small for numbers: a heat map alone.
NUMBERS_UP_TO = 20
DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def confusion_matrix_png(path: Path, confusion: list[list[int]], class_names: list[str]) -> None:
    """Counts and row-normalised rates side by side, true classes down, predicted classes across."""
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    c = len(class_names)
    side = min(max(5.0, 0.5 * c + 2), 22.0)  # inches per panel: 10 classes ~7 in, 100 classes 22 in
    font = max(4.0, min(9.0, 160 / max(c, 1)))
    figure = _figure(2 * side + 1, side + 0.6)
    for ax, values, title, fmt in zip(
        figure.subplots(1, 2),
        (counts, rates),
        ("counts", "row-normalised (recall on the diagonal)"),
        ("{:.0f}", "{:.2f}"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=None if values is counts else 1.0)
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(f"Confusion matrix: {title}")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_xticks(range(c), class_names, rotation=90, fontsize=font)
        ax.set_yticks(range(c), class_names, fontsize=font)
        if c <= NUMBERS_UP_TO:
            high = values.max() / 2 if values.size else 0
            for i in range(c):
                for j in range(c):
                    color = "white" if values[i, j] > high else "black"
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=font, color=color)
    figure.savefig(path)


def calibration_png(path: Path, calibration: dict[str, Any], ece: float) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, and how many examples each bin holds."""
    bins = calibration["bins"]
    width = 1.0 / bins
    centers = [(i + 0.5) * width for i in range(bins)]
    figure = _figure(6, 7)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(centers, calibration["accuracy"], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    # The mean confidence of each bin as a point: above its bar is overconfident, below underconfident.
    shown = [i for i, n in enumerate(calibration["count"]) if n > 0]
    top.plot(
        [centers[i] for i in shown],
        [calibration["confidence"][i] for i in shown],
        "o", color="tab:red", label="mean confidence",
    )  # fmt: skip
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram: ECE {ece:.4f} ({bins} bins, top label)")
    top.legend(loc="upper left")
    bottom.bar(centers, calibration["count"], width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("examples")
    figure.savefig(path)


def curves_png(
    path: Path,
    epochs: dict[str, list[tuple[int, float]]],
    lr: dict[str, list[tuple[int, float]]],
    unfreeze_at: int | None,
) -> None:
    """Loss and accuracy per epoch (train and validation), learning rate per step, unfreezing marked."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(15, 4.5)
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3)
    for ax, kind in ((loss_ax, "loss"), (acc_ax, "acc")):
        for stage, name in (
            ("train", f"train_{kind}_epoch" if kind == "loss" else "train_acc"),
            ("val", f"val_{kind}"),
        ):
            points = epochs.get(name) or []
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=stage)
        if unfreeze_at is not None:
            ax.axvline(
                unfreeze_at - 0.5, color="gray", linestyle="--", label=f"backbone unfrozen (epoch {unfreeze_at})"
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("loss" if kind == "loss" else "accuracy")
        ax.legend()
    for group, points in sorted(lr.items()):
        lr_ax.plot([s for s, _ in points], [v for _, v in points], label=group)
    if lr:
        lr_ax.legend()
    else:
        lr_ax.text(
            0.5,
            0.5,
            "no learning rate logged\n(fewer steps than --trainer.log_every_n_steps)",
            ha="center",
            va="center",
        )
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_title("learning rate")
    figure.savefig(path)
