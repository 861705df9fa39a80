"""Defects found by using the new verbs (report, export, check) as users do; each test failed before its fix."""

import os
import stat

import torch

from transfer_cli.report.metrics import summarize
from transfer_cli.report.states import EvaluationStates
from transfer_cli.report.writer import report_document, write_report


def _tiny_document() -> dict:
    states = EvaluationStates(num_classes=3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    states.update(probs, torch.tensor([0, 1, 2, 1]), torch.ones(4))
    figures = summarize(states.compute(), ["a", "b", "c"])
    return report_document("test", None, {"root": "x"}, figures)


def test_report_directory_gets_the_usual_permissions(tmp_path):
    # The report is staged in a tempfile.mkdtemp folder (mode 0700) and renamed: without care the
    # finished report was unreadable by anyone else (a shared results folder, a web server), unlike
    # every other directory transfer makes (fit's run directory, export's folders).
    umask = os.umask(0o022)
    try:
        target = write_report(str(tmp_path / "my report"), _tiny_document(), errors=[])
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["metrics.json", "per_class.csv", "confusion_matrix.png", "calibration.png", "errors.jsonl"]
    )
