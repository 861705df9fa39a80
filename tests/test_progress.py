"""Progress and output streams as users meet them: data alone on stdout, progress on stderr, in logs,
pipes and terminals.

Periodic lines are tested at TRANSFER_PROGRESS_INTERVAL=0 (a line every batch), so every timer fires.
"""

import csv
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from test_huggingface import make_tiny_bert
from torch.utils.data import DataLoader, IterableDataset

from transfer_cli.backbones import torchvision as tv
from transfer_cli.callbacks.progress import LineProgressBar

from conftest import TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
NOISE = ("Tip:", "litlogger", "litmodels", "Downloading", "Traceback")


@pytest.fixture()
def env(offline_env):
    """Lines every batch, and tests/ on the path for the fault-injection callbacks."""
    return {
        **offline_env,
        "TRANSFER_PROGRESS_INTERVAL": "0",
        "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")]),
    }


def _fit_args(cifar_root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen", *extra,
    ]  # fmt: skip


def _assert_quiet(result) -> None:
    """Success, nothing on stdout, and none of the libraries' noise on stderr."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    for noise in NOISE:
        assert noise not in result.stderr, (noise, result.stderr[-3000:])


def _json_rows(stdout: str) -> list[dict]:
    """Every stdout line is one JSON object, and nothing else is there."""
    assert stdout.endswith("\n")
    return [json.loads(line) for line in stdout.splitlines()]


def _lines(stderr: str, pattern: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.fullmatch(pattern, line)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, cifar_root):
    """One fit, 4 train batches with a validation after every 2nd, printing a line every batch."""
    cwd = tmp_path_factory.mktemp("fitted")
    env = {**os.environ, "TRANSFER_PROGRESS_INTERVAL": "0", "HF_HUB_OFFLINE": "1"}
    args = _fit_args(cifar_root, "--trainer.limit_train_batches=4", "--trainer.val_check_interval=2")
    result = run_transfer(*args, cwd=cwd, env=env)
    return result, cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"


# 1. Periodic lines on every path, with stderr a pipe ------------------------------------------


def test_fit_prints_a_line_per_train_and_mid_epoch_validation_batch(fitted):
    result, ckpt = fitted
    _assert_quiet(result)
    assert ckpt.is_file()
    train = _lines(result.stderr, r"epoch 0 batch (\d)/4 .*train_loss_step=[\d.]+.*")
    assert [line.split()[3] for line in train] == ["1/4", "2/4", "3/4", "4/4"]
    validation = _lines(result.stderr, r"epoch 0 validation batch \d/2")
    assert len(validation) == 4  # mid-epoch after batch 2, and at the end of the epoch
    assert len(_lines(result.stderr, r"epoch 0 done in [\d.]+s .*val_acc=.*")) == 1


@pytest.mark.parametrize(
    "subcommand,limit,metric",
    [("validate", "limit_val_batches", "val_acc"), ("test", "limit_test_batches", "test_acc")],
)
def test_evaluation_prints_a_line_per_batch_with_its_total(tmp_path, fitted, env, subcommand, limit, metric):
    _, ckpt = fitted
    result = run_transfer(subcommand, "--ckpt", ckpt, f"--trainer.{limit}=3", cwd=tmp_path, env=env)
    _assert_quiet(result)
    assert _lines(result.stderr, rf"{subcommand} batch \d/3") == [f"{subcommand} batch {i}/3" for i in (1, 2, 3)]
    assert metric in result.stderr  # the metrics table still follows


def test_image_predict_prints_lines_and_streams_every_row_from_a_slow_producer(tmp_path, fitted, env, imagefolder_root):
    _, ckpt = fitted
    paths = sorted(str(p) for p in (imagefolder_root / "test").rglob("*.jpg"))[:12]
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "predict", "--ckpt", str(ckpt), "--input", "-",
         "--data.init_args.batch_size=5"],
        cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for path in paths:  # a producer that takes its time, like `find` on a slow disk
        process.stdin.write(path + "\n")
        process.stdin.flush()
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert [row["input"] for row in _json_rows(stdout)] == paths
    # A stream's length is unknown until it ends: no made-up total.
    assert _lines(stderr, r"predict batch \d") == ["predict batch 1", "predict batch 2", "predict batch 3"]
    assert not any(noise in stderr for noise in NOISE)


def test_text_predict_prints_lines_and_only_rows_on_stdout(tmp_path, env, mnli_root):
    glue, held_back = mnli_root / "fastnlp_fixture", mnli_root / "lmbff_kshot_16" / "16-42" / "dev_matched.tsv"
    model = make_tiny_bert(tmp_path / "tiny-bert")
    fit = run_transfer(
        "fit", "--config", "bert-mnli", "--config", "debug", f"--data.root={glue}",
        f"--model.init_args.backbone.init_args.model={model}", cwd=tmp_path, env=env,
    )  # fmt: skip
    _assert_quiet(fit)
    assert _lines(fit.stderr, r"epoch 0 batch 1/1 .*") and _lines(fit.stderr, r"epoch 0 validation batch 1/1")
    ckpt = tmp_path / "runs" / "bert-mnli" / "version_0" / "checkpoints" / "last.ckpt"
    result = run_transfer(
        "predict", "--ckpt", ckpt, "--input", held_back, "--data.init_args.batch_size=8", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(held_back, encoding="utf-8") as f:
        ids = [row["pairID"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert [row["input"] for row in _json_rows(result.stdout)] == ids
    batches = -(-len(ids) // 8)
    # Read and tokenized a batch at a time, so the number of batches is known only at the end.
    expected = [f"predict batch {i}" for i in range(1, batches + 1)]
    assert _lines(result.stderr, r"predict batch \d+") == expected


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_an_invalid_interval_is_a_config_error_before_anything_runs(tmp_path, cifar_root, env, value):
    result = run_transfer(*_fit_args(cifar_root), cwd=tmp_path, env={**env, "TRANSFER_PROGRESS_INTERVAL": value})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "TRANSFER_PROGRESS_INTERVAL" in result.stderr and repr(value) in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_a_disabled_bar_prints_no_progress_lines(tmp_path, cifar_root, env):
    result = run_transfer(*_fit_args(cifar_root, "--trainer.enable_progress_bar=false"), cwd=tmp_path, env=env)
    _assert_quiet(result)
    assert not _lines(result.stderr, r".*batch \d.*") and "done in" not in result.stderr


def test_epoch_time_after_a_mid_epoch_resume_is_the_time_spent(tmp_path, cifar_root, env):
    args = _fit_args(cifar_root, "--trainer.limit_train_batches=4")
    interrupted = run_transfer(*args, "--trainer.callbacks+=faults.SignalAtBatch", cwd=tmp_path, env=env)
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    start = time.monotonic()
    resumed = run_transfer(*args, "--ckpt_path=last", cwd=tmp_path, env=env)
    wall = time.monotonic() - start
    _assert_quiet(resumed)
    assert [line.split()[3] for line in _lines(resumed.stderr, r"epoch 0 batch \d/4 .*")] == ["3/4", "4/4"]
    (done,) = _lines(resumed.stderr, r"epoch 0 done in [\d.]+s .*")
    assert 0 < float(done.split()[4].rstrip("s")) < wall


# 2. Lines no Lightning total describes: iterable loaders ---------------------------------------


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.randn(7, 4))


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch).sum())

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.layer(batch).sum())

    def predict_step(self, batch, batch_idx):
        return self.layer(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_loaders_without_a_length_print_batch_numbers_without_a_total(capfd):
    loader = DataLoader(_Stream(), batch_size=2)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[LineProgressBar(interval_s=0)], logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
    )  # fmt: skip
    model = _Tiny()
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    trainer.validate(model, loader, verbose=False)
    trainer.test(model, loader, verbose=False)
    trainer.predict(model, loader)
    err = capfd.readouterr().err
    for stage in ("epoch 0", "epoch 0 validation", "validate", "test", "predict"):
        assert _lines(err, rf"{stage} batch [1-4]( .*)?"), (stage, err)
    assert not re.search(r"batch \d+/", err)  # no made-up total


# 3. A terminal on stderr -----------------------------------------------------------------------


def _run_with_stderr_on_a_pty(args: list[str], cwd: Path, env: dict, stdout) -> tuple[int, str, str]:
    """Runs transfer with stderr on a pseudo-terminal (as a person's shell has it) and stdout as given.
    Returns the exit code, what reached the terminal, and stdout when it is a pipe."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", *map(str, args)],
        cwd=cwd, env={**env, "TERM": "xterm-256color"}, stdin=subprocess.DEVNULL, stdout=stdout, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    terminal = []

    def read_terminal():
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            try:
                data = os.read(master, 65536) if ready else b""
            except OSError:  # EIO: the process closed the terminal
                data = b""
            if not data:
                return
            terminal.append(data)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    piped, _ = process.communicate(timeout=300)
    reader.join(timeout=60)
    os.close(master)
    return process.returncode, b"".join(terminal).decode(errors="replace"), (piped or b"").decode()


@pytest.mark.parametrize("to", ["file", "pipe"])
def test_predictions_reach_stdout_when_stderr_is_a_terminal(tmp_path, fitted, env, imagefolder_root, to):
    _, ckpt = fitted
    paths = sorted(str(p) for p in (imagefolder_root / "test" / "cat").glob("*.jpg"))
    args = ["predict", "--ckpt", ckpt, "--input", imagefolder_root / "test" / "cat", "--data.init_args.batch_size=4"]
    out_file = tmp_path / "out.jsonl"
    with open(out_file, "wb") as f:
        code, terminal, piped = _run_with_stderr_on_a_pty(args, tmp_path, env, f if to == "file" else subprocess.PIPE)
    assert code == 0, terminal[-3000:]
    stdout = out_file.read_text() if to == "file" else piped
    assert [row["input"] for row in _json_rows(stdout)] == paths
    assert '"input"' not in terminal  # no row leaked onto the screen
    assert "Predicting" in terminal  # the bar is there, on stderr


def test_fit_on_a_terminal_draws_the_bar_on_stderr(tmp_path, cifar_root, env):
    code, terminal, stdout = _run_with_stderr_on_a_pty(_fit_args(cifar_root), tmp_path, env, subprocess.PIPE)
    assert code == 0, terminal[-3000:]
    assert stdout == ""
    assert "Epoch 0" in terminal and "val_acc" in terminal and "checkpoints:" in terminal
    assert "Traceback" not in terminal and "Tip:" not in terminal


# 4. Noise --------------------------------------------------------------------------------------


def test_a_weights_download_prints_one_line_of_ours(tmp_path, monkeypatch, capfd):
    """torch hub announces a download with its own 'Downloading: ...' line; ours names file and source."""
    source = tmp_path / "server" / "tiny-0123abcd.pth"
    source.parent.mkdir()
    torch.save({"weight": torch.ones(2)}, source)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    class Weights:
        url = source.as_uri()

    state = tv._download_state(Weights())
    assert torch.equal(state["weight"], torch.ones(2))
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / source.name).is_file()
    captured = capfd.readouterr()
    assert captured.out == "" and "Downloading:" not in captured.err
    assert captured.err.count("\n") == 1 and source.name in captured.err
    tv._download_state(Weights())  # cached now: nothing to say
    assert capfd.readouterr().err == ""


# 5. A stderr nobody reads ----------------------------------------------------------------------


def _predict_cats(ckpt: Path, imagefolder_root: Path) -> list[str]:
    return [sys.executable, "-m", "transfer_cli", "predict", "--ckpt", str(ckpt), "--input",
            str(imagefolder_root / "test" / "cat"), "--data.init_args.batch_size=4"]  # fmt: skip


def test_a_closed_stderr_keeps_logs_off_stdout(tmp_path, fitted, env, imagefolder_root):
    _, ckpt = fitted
    # Like `transfer predict ... 2>&-`.
    result = subprocess.run(
        _predict_cats(ckpt, imagefolder_root), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2), text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0
    rows = _json_rows(result.stdout)  # no progress line or log fell back to stdout
    assert [row["input"] for row in rows] == sorted(str(p) for p in (imagefolder_root / "test" / "cat").glob("*.jpg"))


def test_a_broken_stderr_pipe_does_not_stop_predictions(tmp_path, fitted, env, imagefolder_root):
    _, ckpt = fitted
    out = tmp_path / "preds.jsonl"
    process = subprocess.Popen(
        [*_predict_cats(ckpt, imagefolder_root), "--output", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stderr.close()  # the log reader went away (`2>&1 >/dev/null | head -1`)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and stdout == ""
    assert len(_json_rows(out.read_text())) == 30  # every row, under the final name
