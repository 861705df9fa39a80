"""Predicting files on the CPU decodes them on threads in this process instead of loader worker
processes (data/images.py, ThreadDecoded): the rows must be the very bytes the worker path and the
stdin path write, a bad input in the middle included."""

import io
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data import ImageFolderDataModule
from transfer_cli.data.images import ImageDataModule, ThreadDecoded
from transfer_cli.entry import main
from transfer_cli.errors import EXIT_DATA

CKPT = Path(__file__).parent / "fixtures" / "image-v1.ckpt"  # a tiny CIFAR-10 model (32 px), batch size 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory, imagefolder_root) -> Path:
    """21 real JPEGs of two sizes of batch, an unreadable one sorted into the middle of the second batch."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in ("cat", "dog"):
        for path in sorted((imagefolder_root / "test" / name).glob("*.jpg"))[:10]:
            shutil.copy(path, folder / f"{name}-{path.name}")
    (folder / "cat-0009x.jpg").write_bytes(b"not a jpeg")  # sorts after cat-0009.jpg: row 11 of 21
    return folder


def _predict(capsys, monkeypatch, in_process: bool, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """(exit code, stdout) of `transfer predict` run in this process, with files decoded on threads in
    this process or by two worker processes (the checkpoint's CIFAR-10 datamodule stores num_workers: 0,
    so the choice is forced here; which one a run takes is tested below)."""
    monkeypatch.setattr(ImageDataModule, "_decode_in_process", lambda self: in_process)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main(
        ["predict", "--ckpt", str(CKPT), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
        + ["--data.init_args.num_workers=2", *args]
    )
    return code, capsys.readouterr().out


def test_threads_write_the_bytes_worker_processes_write_bad_input_included(folder, capsys, monkeypatch):
    skip = ("--input", str(folder), "--skip_bad_inputs=true")
    code_threads, threads = _predict(capsys, monkeypatch, True, *skip)
    code_workers, workers = _predict(capsys, monkeypatch, False, *skip)
    assert code_threads == code_workers == 0
    lines = threads.splitlines()
    assert len(lines) == 21 and '"error"' in lines[10] and "cat-0009x.jpg" in lines[10]
    assert threads == workers


def test_threads_stop_at_a_bad_input_after_the_same_rows_as_worker_processes(folder, capsys, monkeypatch):
    code_threads, threads = _predict(capsys, monkeypatch, True, "--input", str(folder))
    code_workers, workers = _predict(capsys, monkeypatch, False, "--input", str(folder))
    assert code_threads == code_workers == EXIT_DATA
    assert len(threads.splitlines()) == 10  # the rows before the bad input, also those of its own batch
    assert threads == workers


def test_a_folder_on_threads_writes_the_bytes_of_its_paths_given_on_stdin(folder, capsys, monkeypatch):
    paths = "".join(f"{p}\n" for p in sorted(folder.iterdir()))
    skip = "--skip_bad_inputs=true"
    _, from_folder = _predict(capsys, monkeypatch, True, "--input", str(folder), skip)
    _, from_stdin = _predict(capsys, monkeypatch, True, "--input", "-", skip, stdin=paths)
    assert len(from_folder.splitlines()) == 21
    assert from_folder == from_stdin


def _loader(folder: Path, num_workers: int | None, device: str | None):
    data = ImageFolderDataModule(
        class_names=["cat", "dog"], num_workers=num_workers, batch_size=8, predict_input=str(folder)
    )
    data.use_preprocessing(ImagePreprocessing(crop_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    if device is not None:
        strategy = SimpleNamespace(root_device=torch.device(device))
        data.trainer = SimpleNamespace(strategy=strategy, global_rank=0, world_size=1)
    return data.predict_dataloader()


def test_the_cpu_decodes_on_threads_unless_worker_processes_are_asked_for(folder):
    cpu = _loader(folder, None, "cpu")
    assert isinstance(cpu.dataset, ThreadDecoded) and cpu.num_workers == 0
    assert cpu.dataset.threads >= 1
    asked = _loader(folder, 2, "cpu")
    assert not isinstance(asked.dataset, ThreadDecoded) and asked.num_workers == 2
    # An accelerator computes while worker processes decode ahead.
    gpu = _loader(folder, None, "cuda")
    assert not isinstance(gpu.dataset, ThreadDecoded) and gpu.num_workers >= 1


def test_the_console_script_runs_atexit_handlers_flushes_then_exits_without_teardown(monkeypatch):
    import atexit
    import os

    from transfer_cli import entry

    events = []

    class Stream(io.StringIO):
        def flush(self):
            events.append("flush")

    class Exited(Exception):
        pass

    def exit_now(code: int) -> None:
        events.append(("exit", code))
        raise Exited

    monkeypatch.setattr(entry, "_run_verb", lambda args, debug: 3)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: events.append("atexit"))
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(sys, "stdout", Stream())
    monkeypatch.setattr(sys, "stderr", Stream())
    monkeypatch.setattr(sys, "argv", ["transfer", "predict", "--ckpt", "m.ckpt", "--input", "x.jpg"])
    with pytest.raises(Exited):
        main()
    assert events == ["atexit", "flush", "flush", ("exit", 3)]
    # Called from Python with its arguments, main returns: the caller's process goes on.
    events.clear()
    assert main(["predict", "--ckpt", "m.ckpt", "--input", "x.jpg"]) == 3 and events == []


def test_decoding_on_threads_draws_no_advice_to_start_more_workers(folder, capsys, monkeypatch):
    import warnings

    from lightning.pytorch.trainer.connectors import data_connector

    # Lightning advises more workers where it counts more than two cores; this machine may have fewer.
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, rows = _predict(capsys, monkeypatch, True, "--input", str(folder), "--skip_bad_inputs=true")
    assert code == 0 and len(rows.splitlines()) == 21
    assert not [w for w in caught if "does not have many workers" in str(w.message)]
