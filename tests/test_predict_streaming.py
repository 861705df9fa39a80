"""predict streams: rows flow while the producer still writes, in input order, with bounded memory;
bad inputs become error rows on request; the user's files are never replaced or left half-written."""

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_huggingface import make_tiny_bert

from conftest import TINY_IMAGE_BACKBONE, run_transfer

FIRST_ROW_TIMEOUT_S = 240  # start-up (imports, checkpoint) on a busy 2-core machine


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory, cifar_root) -> Path:
    cwd = tmp_path_factory.mktemp("image-ckpt")
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, mnli_root) -> Path:
    cwd = tmp_path_factory.mktemp("text-ckpt")
    tiny = make_tiny_bert(cwd / "tiny-bert")
    result = run_transfer(
        "fit", "--config", "bert-mnli", "--config", "debug", f"--data.root={mnli_root / 'fastnlp_fixture'}",
        f"--model.init_args.backbone.init_args.model={tiny}", cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cwd / "runs" / "bert-mnli" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture()
def jpgs(imagefolder_root) -> list[Path]:
    return sorted((imagefolder_root / "test" / "cat").glob("*.jpg"))[:5]


def _start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "predict", *map(str, args)],
        cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def _next_row(process: subprocess.Popen, timeout: float) -> dict | None:
    """The next row on stdout, or None if none came within `timeout` seconds."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return json.loads(process.stdout.readline()) if ready else None


def _finish(process: subprocess.Popen) -> tuple[list[dict], str, int]:
    rest, stderr = process.communicate(timeout=FIRST_ROW_TIMEOUT_S)  # closes stdin: EOF
    rows = [json.loads(line) for line in rest.decode().splitlines()]
    return rows, stderr.decode(), process.returncode


# 1. Streaming ------------------------------------------------------------------------------------


def test_image_rows_flow_while_the_producer_still_writes(tmp_path, image_ckpt, jpgs):
    """Each path gets its row before the next one is written: a producer that waits for the answer
    (or writes slowly, like `find` over a network disk) is not made to wait for EOF or a full batch."""
    process = _start("--ckpt", image_ckpt, "--input", "-", "--data.init_args.batch_size=64", cwd=tmp_path)
    for i, jpg in enumerate(jpgs[:3]):
        process.stdin.write(f"{jpg}\n".encode())
        process.stdin.flush()
        row = _next_row(process, FIRST_ROW_TIMEOUT_S if i == 0 else 60)
        assert row is not None and row["input"] == str(jpg), row  # stdin is still open
    rows, stderr, code = _finish(process)
    assert code == 0 and rows == [], stderr[-2000:]


def test_text_rows_flow_while_the_producer_still_writes(tmp_path, text_ckpt):
    process = _start("--ckpt", text_ckpt, "--input", "-", cwd=tmp_path)
    for i, line in enumerate(["A man eats.\tSomeone eats.", "It rains.\tThe street is dry."]):
        process.stdin.write(f"{line}\n".encode())
        process.stdin.flush()
        row = _next_row(process, FIRST_ROW_TIMEOUT_S if i == 0 else 60)
        assert row is not None and row["input"] == f"stdin:{i + 1}", row
    rows, stderr, code = _finish(process)
    assert code == 0 and rows == [], stderr[-2000:]
    assert "predict: 2 examples" in stderr


def test_thousands_of_stdin_paths_come_back_complete_and_in_order(tmp_path, image_ckpt, jpgs):
    paths = [str(jpgs[i % len(jpgs)]) + ("" if i % 7 else "  ") for i in range(3000)]  # stray spaces too
    stdin = "".join(f"{p}\n" if i % 500 else f"{p}\n\n" for i, p in enumerate(paths))  # and blank lines
    result = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", "-", "--data.init_args.batch_size=37", cwd=tmp_path, stdin=stdin
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in rows] == [p.strip() for p in paths]
    first = {r["input"]: r["topk"] for r in rows[: len(jpgs)]}
    assert all(r["topk"] == first[r["input"]] for r in rows)  # same image, same prediction, any batch


def test_a_text_file_is_predicted_in_input_order_a_batch_at_a_time(tmp_path, text_ckpt):
    lines = [f"{i}\tPremise number {i}.\tHypothesis {i % 13}." for i in range(1000)]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("pairID\tsentence1\tsentence2\n" + "\n".join(lines) + "\n")
    result = run_transfer(
        "predict", "--ckpt", text_ckpt, "--input", tsv, "--data.init_args.batch_size=16", cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [str(i) for i in range(1000)]
    assert "predict: 1000 examples" in result.stderr


# 2. Bad inputs -----------------------------------------------------------------------------------


def _with_bad_file(tmp_path: Path, jpgs: list[Path]) -> list[Path]:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(jpgs[0].read_bytes()[:200])
    return [*jpgs[:3], bad, tmp_path / "missing.jpg", *jpgs[3:]]


def test_bad_images_in_a_stdin_stream_stop_after_the_rows_before_them(tmp_path, image_ckpt, jpgs):
    paths = _with_bad_file(tmp_path, jpgs)
    stdin = "".join(f"{p}\n" for p in paths)
    result = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", "-", "--data.init_args.batch_size=64", cwd=tmp_path, stdin=stdin
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "broken.jpg" in result.stderr and "--skip_bad_inputs" in result.stderr
    assert "Traceback" not in result.stderr
    # The three rows before the bad file were written, although they share its batch.
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [str(p) for p in paths[:3]]


def test_skip_bad_inputs_writes_error_rows_in_place_and_counts_them(tmp_path, image_ckpt, jpgs):
    paths = _with_bad_file(tmp_path, jpgs)
    stdin = "".join(f"{p}\n" for p in paths)
    result = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", "-", "--skip_bad_inputs", "true",
        "--data.init_args.batch_size=3", cwd=tmp_path, stdin=stdin,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in rows] == [str(p) for p in paths]
    bad = {"broken.jpg", "missing.jpg"}
    assert [("error" in r, "label" in r) for r in rows] == [(p.name in bad, p.name not in bad) for p in paths]
    assert "broken.jpg" in rows[3]["error"] and "missing.jpg" in rows[4]["error"]
    assert "2 unreadable input(s) skipped" in result.stderr


def test_bad_images_in_a_folder_with_output_file_leave_no_file(tmp_path, image_ckpt, jpgs):
    folder = tmp_path / "photos"
    folder.mkdir()
    for jpg in jpgs:
        shutil.copy(jpg, folder / jpg.name)
    (folder / "0002.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    failed = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", folder, "--output", out, "--data.init_args.num_workers=2",
        cwd=tmp_path,
    )  # fmt: skip
    assert failed.returncode == 3 and "0002.jpg" in failed.stderr, failed.stderr[-2000:]
    assert list(out.parent.iterdir()) == []  # neither the final file nor its temporary one

    skipped = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", folder, "--output", out, "--skip_bad_inputs=true",
        "--data.init_args.num_workers=2", cwd=tmp_path,
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines[0] == "input,label,score,topk,error" and len(lines) == 1 + len(jpgs)
    assert lines[3].startswith(f"{folder / '0002.jpg'},,,,") and "Cannot read image" in lines[3]


def test_bad_text_lines_are_skipped_on_request_or_stop_after_the_rows_before_them(tmp_path, text_ckpt):
    stdin = "A man eats.\tSomeone eats.\nno tab here\nIt rains.\tIt pours.\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    failed = run_transfer("predict", "--ckpt", text_ckpt, "--input", "-", cwd=tmp_path, env=env, stdin=stdin)
    assert failed.returncode == 3 and "stdin:2" in failed.stderr, failed.stderr[-2000:]
    assert [json.loads(line)["input"] for line in failed.stdout.splitlines()] == ["stdin:1"]
    skipped = run_transfer(
        "predict", "--ckpt", text_ckpt, "--input", "-", "--skip_bad_inputs=true", cwd=tmp_path, env=env, stdin=stdin
    )
    rows = [json.loads(line) for line in skipped.stdout.splitlines()]
    assert skipped.returncode == 0 and [sorted(r) for r in rows] == [
        ["input", "label", "score", "topk"], ["error", "input"], ["input", "label", "score", "topk"]
    ]  # fmt: skip


# 3. The user's files -----------------------------------------------------------------------------


def test_output_that_is_the_input_file_is_refused_before_anything_is_read(tmp_path, image_ckpt, text_ckpt, jpgs):
    photo = tmp_path / "cat.jpg"
    shutil.copy(jpgs[0], photo)
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"sentence1": "a", "sentence2": "b"}\n')
    (tmp_path / "link.jsonl").symlink_to(texts)
    os.link(texts, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    before = {p: p.read_bytes() for p in (photo, texts)}
    cases = [
        (image_ckpt, photo, photo.with_suffix(".jpg")),  # refused for its suffix, still before reading
        (text_ckpt, texts, texts),
        (text_ckpt, texts, tmp_path / "sub" / ".." / "texts.jsonl"),
        (text_ckpt, texts, tmp_path / "link.jsonl"),
        (text_ckpt, tmp_path / "link.jsonl", texts),
        (text_ckpt, texts, tmp_path / "hard.jsonl"),
    ]
    for ckpt, given, output in cases:
        result = run_transfer("predict", "--ckpt", ckpt, "--input", given, "--output", output, cwd=tmp_path)
        assert "is the --input file" in result.stderr or given == photo, result.stderr[-2000:]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "--output" in result.stderr
    relative = run_transfer("predict", "--ckpt", text_ckpt, "--input", "texts.jsonl", "--output",
                            "./texts.jsonl", cwd=tmp_path)  # fmt: skip
    assert relative.returncode == 2 and "is the --input file" in relative.stderr, relative.stderr[-2000:]
    assert {p: p.read_bytes() for p in (photo, texts)} == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_predict_without_ckpt_or_with_an_unknown_output_suffix_says_so_in_one_line(tmp_path, image_ckpt, jpgs):
    missing = run_transfer("predict", "--input", jpgs[0], cwd=tmp_path)
    assert missing.returncode == 2 and "needs --ckpt" in missing.stderr, missing.stderr
    assert missing.stderr.count("\n") == 1
    suffix = run_transfer("predict", "--ckpt", image_ckpt, "--input", jpgs[0], "--output", "p.txt", cwd=tmp_path)
    assert suffix.returncode == 2 and "--output p.txt: use a .jsonl or .csv" in suffix.stderr, suffix.stderr
    assert not list(tmp_path.iterdir())


class _FullDisk:
    """A file on a disk that fills up: writes (after the first) and close's flush fail with ENOSPC."""

    def __init__(self, f, fail_close: bool):
        self.f, self.writes, self.fail_close = f, 0, fail_close

    def write(self, text):
        self.writes += 1
        if self.writes > 1:
            raise OSError(28, "No space left on device")
        return self.f.write(text)

    def close(self):
        self.f.close()
        if self.fail_close:
            raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_leaves_neither_the_file_nor_its_temporary(tmp_path, image_ckpt, imagefolder_root, monkeypatch):
    """On a real full disk, closing the temporary file fails too (its buffer cannot be flushed)."""
    import transfer_cli.callbacks.prediction_writer as writer
    from transfer_cli.entry import main

    real_open = open
    monkeypatch.setattr(writer, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), True), raising=False)
    out = tmp_path / "out" / "preds.jsonl"
    out.parent.mkdir()
    code = main(["predict", "--ckpt", str(image_ckpt), "--input", str(imagefolder_root / "test"), "--output", str(out),
                 "--data.init_args.batch_size=16", "--data.init_args.num_workers=0"])  # fmt: skip
    assert code == 6
    assert list(out.parent.iterdir()) == []


def test_a_silent_producer_does_not_keep_sigterm_waiting(tmp_path, image_ckpt, jpgs):
    import signal

    out = tmp_path / "preds.jsonl"
    process = _start("--ckpt", image_ckpt, "--input", "-", "--output", out, cwd=tmp_path)
    process.stdin.write(f"{jpgs[0]}\n".encode())
    process.stdin.flush()
    deadline = time.time() + FIRST_ROW_TIMEOUT_S
    while not list(tmp_path.glob(".preds.jsonl.*.tmp")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the first row is written; the producer says nothing more
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)  # stdin stays open: the run must end by itself
    stderr = process.stderr.read().decode()
    process.stdin.close()
    assert code == 143, stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_plain_progress_lines_during_predict_from_a_stream_and_a_folder(tmp_path, image_ckpt, jpgs):
    """The periodic progress line (stderr not a terminal) at interval 0, so it fires every batch."""
    progress = ["--trainer.callbacks+=transfer_cli.progress.LineProgressBar", "--trainer.callbacks.interval_s=0"]
    stdin = "".join(f"{p}\n" for p in jpgs)
    streamed = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", "-", "--data.init_args.batch_size=2", *progress,
        cwd=tmp_path, stdin=stdin,
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert "predict batch 3\n" in streamed.stderr and len(streamed.stdout.splitlines()) == len(jpgs)
    folder = run_transfer(
        "predict", "--ckpt", image_ckpt, "--input", jpgs[0].parent, "--data.init_args.batch_size=16", *progress,
        cwd=tmp_path,
    )  # fmt: skip
    assert folder.returncode == 0, folder.stderr[-2000:]
    assert "predict batch 2/2\n" in folder.stderr
