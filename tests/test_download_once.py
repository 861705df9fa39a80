"""Every process of a multi-device run prepares its data at once (torchrun, SLURM); a download
happens once per machine, and no process reads a half-unpacked archive."""

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from transfer_cli.data import cifar10, mnli
from transfer_cli.data.cifar10 import CIFAR10DataModule
from transfer_cli.data.mnli import MNLIDataModule

UNPACK_S = 0.5  # long enough for the other process to look while the first still unpacks


def _slow_fetch(layout: dict[str, str], calls: Path):
    """A download that counts itself and unpacks file by file, the marker files first."""

    def fetch(root: Path) -> None:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        for name, text in layout.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
            time.sleep(UNPACK_S / len(layout))

    return fetch


def _prepare(make_data, start, complete):
    start.wait()  # both processes ask for the data at the same moment
    data = make_data()
    data.prepare_data()
    complete.put(sorted(p.name for p in Path(data.root).rglob("*") if p.is_file()))


CASES = {
    "cifar10": (
        cifar10,
        {f"cifar-10-batches-py/{n}": "x" for n in ("batches.meta", *cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH)},
        lambda root: CIFAR10DataModule(str(root), download=True),
    ),
    "mnli": (
        mnli,
        {f"MNLI/{n}": "x" for n in mnli.SPLIT_FILES.values()},
        lambda root: MNLIDataModule(str(root), download=True),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_preparing_at_once_download_once_and_find_every_file(name, tmp_path, monkeypatch):
    module, layout, make = CASES[name]
    calls = tmp_path / "calls"
    monkeypatch.setattr(module, "fetch", _slow_fetch(layout, calls))  # inherited by the forked processes
    context = multiprocessing.get_context("fork")
    start, complete = context.Barrier(2), context.Queue()
    root = tmp_path / "data"
    processes = [context.Process(target=_prepare, args=(lambda: make(root), start, complete)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert len(calls.read_text().splitlines()) == 1
    expected = sorted(Path(n).name for n in layout)
    assert [complete.get(timeout=5), complete.get(timeout=5)] == [expected, expected]
