"""The evaluation summary as rich tables on stderr: overall figures, then the worst classes."""

from typing import Any

from rich.console import Console
from rich.table import Table

WORST_CLASSES = 5


def print_summary(subcommand: str, figures: dict[str, Any]) -> None:
    stage = "val" if subcommand == "validate" else "test"
    overall = Table(title=f"{subcommand}: {figures['num_examples']} examples")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    # The first two carry the names fit logs and checkpoints monitor (val_acc, val_loss).
    rows = [
        (f"{stage}_acc", figures["accuracy"]),
        (f"{stage}_loss", figures["loss"]),
        ("top5_acc", figures["top5_accuracy"]),
        ("macro_precision", figures["macro_precision"]),
        ("macro_recall", figures["macro_recall"]),
        ("macro_f1", figures["macro_f1"]),
        ("ece", figures["ece"]),
    ]
    for name, value in rows:
        if value is not None:
            overall.add_row(name, f"{value:.4f}")
    console = Console(stderr=True)
    console.print(overall)
    seen = [row for row in figures["per_class"] if row["support"] > 0]
    worst = sorted(seen, key=lambda row: (row["f1"], row["class"]))[:WORST_CLASSES]
    if len(seen) > 1:
        table = Table(title=f"worst {len(worst)} of {len(figures['per_class'])} classes by F1")
        for column in ("class", "f1", "precision", "recall", "support"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for row in worst:
            table.add_row(row["class"], *(f"{row[k]:.4f}" for k in ("f1", "precision", "recall")), str(row["support"]))
        console.print(table)
