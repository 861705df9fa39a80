"""Defects found by using the new verbs (report, export, check) as users do; each test failed before its fix."""

import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from transfer_cli.errors import EXIT_TERMINATED
from transfer_cli.report.metrics import summarize
from transfer_cli.report.states import EvaluationStates
from transfer_cli.report.writer import FILES, check_report_target, report_document, write_report


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


def test_sigterm_while_the_report_is_written_leaves_no_staging_folder(tmp_path):
    # The report is written after Lightning's run has ended and given SIGTERM back to its default
    # action, so a SIGTERM there (a scheduler's time limit) killed the process outright and left the
    # half-written DIR.tmp-XXXX staging folder beside DIR. README: "complete or not at all", 143.
    target = tmp_path / "rep"
    script = tmp_path / "stalled.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_adversarial_review as t\n"
        "import transfer_cli.report.writer as w\n"
        "from transfer_cli.errors import Interrupted\n"
        "def stalled(*args):\n"  # a big confusion matrix takes a while to draw
        "    print('drawing', flush=True)\n"
        "    time.sleep(60)\n"
        "w.confusion_matrix_png = stalled\n"
        "try:\n"
        f"    w.write_report({str(target)!r}, t._tiny_document(), errors=[])\n"
        "except Interrupted as err:\n"
        "    sys.exit(err.exit_code)\n"
    )
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "drawing\n"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == EXIT_TERMINATED
    finally:
        child.kill()
    assert list(tmp_path.iterdir()) == [script]


def test_export_misspelt_option_says_did_you_mean(capsys):
    # README: every verb beyond Lightning's four answers a bad option with exit 2 and a "did you mean";
    # export parsed its own options and said only "unrecognized arguments: --fromat pt2".
    from transfer_cli.entry import main

    assert main(["export", "--ckpt", "c.ckpt", "--output", "m.pt2", "--fromat", "pt2"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean --format?" in err and "Traceback" not in err
    assert main(["export", "--ckpt", "c.ckpt"]) == 2
    assert "output" in capsys.readouterr().err


def test_report_into_the_current_empty_folder(tmp_path, monkeypatch):
    # `--report .` in an empty folder passed the pre-check, then, after the whole evaluation, failed
    # with "internal error: OSError: [Errno 22] Invalid argument: '.'" (exit 1, nothing written).
    here = tmp_path / "results"
    here.mkdir()
    monkeypatch.chdir(here)
    check_report_target(".")
    assert write_report(".", _tiny_document(), errors=[]) == here
    assert sorted(p.name for p in here.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_pt2_export_writes_no_torch_warnings_on_stderr(tmp_path):
    # `transfer export --output m.pt2` printed torch's "UserWarning: No complete tensor found in the
    # group! ... may cause issues when your weights are not on CPU" on every image export (CPU only).
    from transfer_cli.export import pt2
    from transfer_cli.export.command import _metadata
    from transfer_cli.export.deploy import deploy_module
    from transfer_cli.export.source import load_source

    source = load_source(str(Path(__file__).parent / "fixtures" / "image-v1.ckpt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pt2.write(deploy_module(source), source, tmp_path / "m.pt2", _metadata(source))
    assert [str(w.message) for w in caught] == []
    assert (tmp_path / "m.pt2").stat().st_size > 0
