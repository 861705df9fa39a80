"""predict on several devices: each input's row exactly once, in input order, the same bytes as one
process writes; a run stopped midway leaves neither a file under the final name nor a temporary one."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from transfer_cli.callbacks.prediction_shards import _round_robin
from transfer_cli.data.base import PredictShard, owns_batch
from transfer_cli.data.text_batches import PredictTexts
from transfer_cli.errors import ConfigError

from conftest import run_transfer

CKPT = Path(__file__).parent / "fixtures" / "image-v1.ckpt"  # a tiny CIFAR-10 model (32 px)
DDP = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")
ODD = 27  # images: 7 batches of 4, the last one short, so the two ranks get 4 and 3 batches


@pytest.fixture()
def odd_folder(tmp_path, imagefolder_root) -> Path:
    """ODD real test images in two class folders (predict reads a folder recursively, sorted)."""
    for name in ("cat", "ship"):
        for path in sorted((imagefolder_root / "test" / name).glob("*.jpg"))[: ODD // 2 + (name == "cat")]:
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp_path / "images" / name / path.name)
    return Path("images")  # relative to the run's cwd: rows name inputs as given


def _one_process_rows(tmp_path: Path, folder: Path, capsys, monkeypatch) -> str:
    from transfer_cli.cli import TransferCLI

    monkeypatch.chdir(tmp_path)
    TransferCLI(args=["predict", "--ckpt", str(CKPT), "--input", str(folder), "--data.batch_size=4"])
    return capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_write_each_input_once_in_order_as_one_process_does(
    tmp_path, odd_folder, offline_env, capsys, monkeypatch
):
    single = _one_process_rows(tmp_path, odd_folder, capsys, monkeypatch)
    result = run_transfer(
        "predict", "--ckpt", CKPT, "--input", odd_folder, "--data.batch_size=4", *DDP, cwd=tmp_path, env=offline_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr  # really two ranks
    expected = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / odd_folder).rglob("*.jpg"))
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == expected
    assert result.stdout == single
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


@pytest.mark.slow
def test_sigterm_on_several_devices_leaves_no_output_and_no_parts(tmp_path, imagefolder_root, offline_env):
    out = tmp_path / "out" / "preds.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "predict", "--ckpt", str(CKPT),
         "--input", str(imagefolder_root / "test"), "--output", str(out), "--data.batch_size=1", *DDP],
        cwd=tmp_path, env={**offline_env, "TRANSFER_PROGRESS_INTERVAL": "0"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in process.stderr:
        if "predict batch" in line:  # both ranks are predicting
            process.send_signal(signal.SIGTERM)
            break
    stderr = process.stderr.read()  # ends only when no rank is left holding the pipe
    assert process.wait(timeout=120) == 143, stderr[-3000:]
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert os.listdir(out.parent) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "code", "says"),
    [
        ("FullDiskOnRank", 6, ("Cannot write predictions to", "No space left on device")),
        ("CrashOnRank", 1, ("injected failure on rank 1",)),
        # Before the predict loop rank 0 sits in Lightning's barriers, reading no marker: the run must still
        # end (the process group notices rank 1 is gone), not hang with both ranks waiting.
        ("OomMovingModelOnRank", None, ("CUDA out of memory (injected on rank 1)",)),
    ],
)
def test_a_rank_that_fails_ends_the_run_with_its_error_and_leaves_nothing(
    tmp_path, odd_folder, offline_env, fault, code, says
):
    """Rank 1's disk fills up at its second batch, or rank 1 fails there with an error of its own: rank 0
    sees its marker, removes the parts and ends with rank 1's error and exit code, where Lightning's
    launcher would otherwise SIGKILL it (exit 137, parts left)."""
    out = tmp_path / "out" / "preds.jsonl"
    tests = str(Path(__file__).parent)  # for predict_faults
    env = {**offline_env, "PYTHONPATH": os.pathsep.join([tests, offline_env.get("PYTHONPATH", "")])}
    result = run_transfer(
        "predict", "--ckpt", CKPT, "--input", odd_folder, "--output", out, "--data.batch_size=4", *DDP,
        f"--trainer.callbacks+=predict_faults.{fault}", cwd=tmp_path, env=env, timeout=240,
    )  # fmt: skip
    if code is None:
        assert result.returncode not in (0, 137, -9), result.stderr[-3000:]
    else:
        assert result.returncode == code, result.stderr[-3000:]
        assert "Process 1 of 2 failed, so nothing was written: " in result.stderr
    assert all(fragment in result.stderr for fragment in says), result.stderr[-3000:]
    assert os.listdir(out.parent) == []  # neither the output nor the parts folder beside it


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--input", "-", "--trainer.devices=2"), "stdin"),
        (("--input", "x.jpg", "--trainer.num_nodes=2"), "one machine"),
    ],
)
def test_a_stream_or_several_machines_are_refused_before_anything_starts(flags, fragment):
    from transfer_cli.cli import TransferCLI

    with pytest.raises(ConfigError, match=fragment):
        TransferCLI(args=["predict", "--ckpt", str(CKPT), "--trainer.accelerator=cpu", *flags])


@pytest.mark.parametrize(("count", "batch_size", "world"), [(27, 4, 2), (9, 2, 3), (3, 4, 2), (8, 4, 2)])
def test_shards_are_whole_batches_that_round_robin_back_into_input_order(count, batch_size, world):
    shards = [list(PredictShard(range(count), batch_size, rank, world)) for rank in range(world)]
    batches = [
        [" ".join(map(str, shard[i : i + batch_size])) + "\n" for i in range(0, len(shard), batch_size)]
        for shard in shards
    ]
    merged = " ".join(line.strip() for line in _round_robin([iter_lines(b) for b in batches]))
    assert merged == " ".join(map(str, range(count)))
    one_process = [list(range(count))[i : i + batch_size] for i in range(0, count, batch_size)]
    assert all(
        [int(x) for x in batches[b % world][b // world].split()] == one_process[b] for b in range(len(one_process))
    )
    if len(one_process) < world:  # a rank without a batch: no length, so Lightning runs it as an empty stream
        with pytest.raises(TypeError):
            len(PredictShard(range(count), batch_size, 0, world))
    else:
        assert [len(PredictShard(range(count), batch_size, r, world)) for r in range(world)] == list(map(len, shards))


def test_text_ranks_tokenize_only_their_own_batches():
    rows = [[(f"r{b}.{i}", ("text",), None) for i in range(2)] for b in range(5)]
    ids = []
    for rank in range(2):
        collate = lambda items: {"ids": [item["id"] for item in items]}  # noqa: E731
        texts = PredictTexts(lambda: iter(rows), _Tokenizer(), 8, collate, shard=(rank, 2))
        ids.append([batch["ids"] for batch in texts])
    assert ids[0] == [[r[0] for r in rows[b]] for b in range(5) if owns_batch(b, 0, 2)]
    assert ids[1] == [[r[0] for r in rows[b]] for b in (1, 3)]


class iter_lines:  # noqa: N801 (a file-like reader over lines, as _round_robin reads rank files)
    def __init__(self, lines: list[str]):
        self.lines = list(lines)

    def readline(self) -> str:
        return self.lines.pop(0) if self.lines else ""


class _Tokenizer:
    def __call__(self, *columns, **kwargs):
        return {"input_ids": [[1, 2] for _ in columns[0]]}


class _Killed(BaseException):
    """Stands for the process dying: what SIGTERM's default handler does."""


def test_sigterm_while_rank_zero_waits_for_the_other_ranks_is_143_and_leaves_nothing(tmp_path):
    """Lightning puts SIGTERM's default handler back before callbacks' teardown, where rank 0 waits for
    the other ranks' parts and merges them: a SIGTERM there must still be exit 143 with nothing left."""
    import threading
    from types import SimpleNamespace

    from transfer_cli.callbacks.prediction_shards import PredictionShards
    from transfer_cli.callbacks.prediction_writer import PredictionWriter
    from transfer_cli.errors import EXIT_TERMINATED, Interrupted

    def killed(signum, frame):
        raise _Killed()

    output = tmp_path / "predictions.jsonl"
    writer = PredictionWriter(output=str(output))
    parts = tmp_path / ".predictions.jsonl.parts"
    parts.mkdir()
    writer._shards = PredictionShards(parts, rank=0, world_size=2)  # rank 1 never finishes: rank 0 waits
    trainer = SimpleNamespace(global_rank=0, received_sigterm=False)
    previous = signal.signal(signal.SIGTERM, killed)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(Interrupted) as stopped:
            writer.teardown(trainer, None, "predict")
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.exit_code == EXIT_TERMINATED
    assert sorted(os.listdir(tmp_path)) == []  # no output, no parts


@pytest.mark.parametrize(
    ("marker", "error", "fragment"),
    [
        ('{"error": "DataError", "exit_code": 3, "message": "x.jpg is not an image."}', "DataError", "x.jpg is not"),
        ('{"error": "Interrupted", "exit_code": 130, "message": "interrupted"}', "RankFailed", "interrupted"),
        ('[[{"input": "a.jpg"}], [null]]\n', "ResourceError", "it could not write"),  # its part file, renamed
    ],
)
def test_rank_zero_ends_with_the_error_a_failed_rank_left(tmp_path, marker, error, fragment):
    from transfer_cli.callbacks.prediction_shards import PredictionShards

    shards = PredictionShards(tmp_path, rank=0, world_size=2)
    (tmp_path / "rank1.failed").write_text(marker)
    with pytest.raises(Exception, match=f"Process 1 of 2 failed, so nothing was written: .*{fragment}") as failed:
        polls = iter(range(20))  # then give up as SIGTERM would, rather than wait for ever
        shards.wait_for_ranks(lambda: next(polls, None) is None)
    assert type(failed.value).__name__ == error
    assert failed.value.exit_code == {"DataError": 3, "RankFailed": 130, "ResourceError": 6}[error]
    shards.remove()


def test_rank_zero_removes_the_parts_even_when_another_rank_renames_its_file_meanwhile(tmp_path, monkeypatch):
    """SIGTERM reaches every rank: rank 1 may rename its finished part (finish) after rank 0's rmtree has
    listed the folder, which left the renamed file and the folder behind (seen in the SIGTERM test above)."""
    from transfer_cli.callbacks import prediction_shards

    parts = tmp_path / ".preds.jsonl.x.parts"
    parts.mkdir()
    shards = prediction_shards.PredictionShards(parts, rank=0, world_size=2)
    (parts / "rank1.part").write_text("[]\n")
    rmtree = shutil.rmtree
    renamed = []

    def listed_then_renamed(path, ignore_errors=False):
        rmtree(path, ignore_errors=ignore_errors)
        if not renamed:  # the other rank's rename lands after the listing: rmdir failed, the file stays
            parts.mkdir()
            (parts / "rank1.done").write_text("[]\n")
            renamed.append(True)

    monkeypatch.setattr(prediction_shards.shutil, "rmtree", listed_then_renamed)
    shards.remove()
    assert renamed and not parts.exists()
