"""A model on the CPU reads image folders on threads in the main process (data/images.py ThreadDecoded)
instead of loader worker processes, which would take cores from the model's own threads: the batches
must be those the worker processes give, the decoded-once cache must still decode each image once, and
the decoding threads must leave the model's threads alone."""

import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import transfer_cli.data.images as images
from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data import ImageFolderDataModule

# The shared JPEGs are 32 px: 40 px via 46 resamples and rounds every image.
PREP = ImagePreprocessing(crop_size=40, resize_size=46, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
TRAIN, VAL = 270, 30  # the shared folder's 300 training images, 10% held out


def _folder(root, workers: int | None, device: str = "cpu", cache_gb: float = 1.0) -> ImageFolderDataModule:
    data = ImageFolderDataModule(str(root), batch_size=32, num_workers=workers, decoded_cache_gb=cache_gb)
    data.use_preprocessing(PREP)
    # As a fit attaches its trainer: where the model runs decides how the folder is read.
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1)
    data.setup("fit")
    return data


@pytest.fixture(autouse=True)
def three_threads(monkeypatch):
    # num_workers left to transfer is min(8, CPU count): three here, so that batches are decoded on
    # several threads whatever the machine's cores.
    monkeypatch.setattr(images, "default_workers", lambda: 3)


@pytest.fixture()
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what a two-core machine starts with, here on any machine
    yield
    torch.set_num_threads(before)


def test_a_model_on_the_cpu_reads_on_threads_unless_worker_processes_are_asked_for(imagefolder_root):
    for device, workers, threaded in (("cpu", None, True), ("cpu", 2, False), ("cuda", None, False)):
        data = _folder(imagefolder_root, workers, device)
        train, val = data.train_dataloader(), data.val_dataloader()
        assert isinstance(train.dataset, images.ThreadDecoded) is threaded, (device, workers)
        assert isinstance(val.dataset, images.ThreadDecoded) is threaded, (device, workers)
        if threaded:
            assert train.num_workers == 0 and train.dataset.threads == 3
            # One process reads the decoded images: kept in its own memory, not in /dev/shm.
            assert not train.dataset.files.images.is_shared()
        else:
            assert train.num_workers >= 1 and train.dataset.images.is_shared()


def _epochs(loader, count: int = 2) -> list[list[dict]]:
    torch.manual_seed(1)  # the shuffles' order, as Lightning's seed_everything fixes it per run
    return [list(loader) for _ in range(count)]


def _same(a: dict, b: dict) -> bool:
    return a["ids"] == b["ids"] and torch.equal(a["labels"], b["labels"]) and torch.equal(a["inputs"], b["inputs"])


def test_threads_give_the_batches_of_worker_processes_and_decode_each_image_once(imagefolder_root, decodes):
    threaded, workers = _folder(imagefolder_root, None), _folder(imagefolder_root, 2)
    for split, count in (("train", TRAIN), ("val", VAL)):
        fast, slow = threaded.split_loader(split), workers.split_loader(split)
        before = decodes()
        first, second = _epochs(fast)
        assert decodes() - before == count  # each image decoded once, in the first epoch, on the threads
        reference = _epochs(slow)
        # The first epoch in the same order (persistent workers draw no seed for later epochs, a loader
        # without workers does: later epochs are shuffled otherwise), every epoch the same pixels.
        assert all(_same(a, b) for a, b in zip(first, reference[0], strict=True))
        for mine, theirs in zip((first, second), reference, strict=True):
            pixels = {i: x for batch in theirs for i, x in zip(batch["ids"], batch["inputs"], strict=True)}
            assert all(torch.equal(x, pixels[i]) for batch in mine for i, x in zip(batch["ids"], batch["inputs"]))
            assert sum(len(batch["ids"]) for batch in mine) == len(pixels) == count


@pytest.mark.parametrize("kept", [TRAIN + VAL, 100], ids=["all kept", "some kept"])
def test_threads_give_the_batches_of_decoding_every_epoch_in_this_process(imagefolder_root, kept):
    # 100 kept: every batch of the second epoch mixes images read from memory with images decoded again.
    threaded = _folder(imagefolder_root, None, cache_gb=kept * 3 * PREP.crop_size**2 / 2**30)
    plain = _folder(imagefolder_root, 0, cache_gb=0)  # worker processes asked for: none; nothing kept
    for split in ("train", "val"):
        fast, slow = _epochs(threaded.split_loader(split)), _epochs(plain.split_loader(split))
        assert isinstance(threaded.split_loader(split).dataset, images.ThreadDecoded)
        for mine, theirs in zip(fast, slow, strict=True):
            assert all(_same(a, b) for a, b in zip(mine, theirs, strict=True))


class _ThreadCount(torch.utils.data.Dataset):
    """An 'image' that is the number of torch threads of the thread decoding it."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def test_decoding_threads_run_torch_on_one_thread_each_and_leave_the_models_count(two_torch_threads):
    # A decoding thread whose torch calls ran OpenMP teams of their own slowed the model's forward pass
    # on the main thread 2.5x on two cores (images.decode_pool).
    seen = images.ThreadDecoded(_ThreadCount(), threads=2).__getitems__(list(range(64)))
    assert set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_stdin_decoding_threads_run_torch_on_one_thread_each(monkeypatch, two_torch_threads):
    counts = []
    monkeypatch.setattr(images, "predict_item", lambda path, preprocessing: counts.append(torch.get_num_threads()))
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"/nowhere/{i}.jpg\n" for i in range(40))))
    monkeypatch.setattr(images, "collate_predict", lambda items: items)
    stream = images.StdinImages(PREP, batch_size=20, threads=2, stopped=lambda: False)
    assert len(list(stream)) == 2
    assert counts and set(counts) == {1} and torch.get_num_threads() == 2


def test_validating_under_inference_mode_after_fit_setup_reads_and_keeps_on_threads(imagefolder_root, decodes):
    # Lightning validates under inference mode (`transfer check` after fit's setup); the threads write the
    # decoded images outside it.
    data = _folder(imagefolder_root, None)
    with torch.inference_mode():
        first = [batch["ids"] for batch in data.val_dataloader()]
    assert decodes() == VAL
    with torch.inference_mode():
        assert [batch["ids"] for batch in data.val_dataloader()] == first
    assert decodes() == VAL


def test_the_cache_made_before_the_trainer_is_shared_once_worker_processes_read_it(imagefolder_root):
    # `transfer check` counts the examples before the trainer says the model is on a GPU.
    data = ImageFolderDataModule(str(imagefolder_root), batch_size=32, decoded_cache_gb=1.0)
    data.use_preprocessing(PREP)
    data.setup("fit")
    assert not data.train_dataloader().dataset.files.images.is_shared()  # no trainer: taken as the CPU
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")), world_size=1)
    loader = data.train_dataloader()
    assert loader.num_workers >= 1 and loader.dataset.images.is_shared()
    assert data._budget.left == int(1.0 * 2**30) - TRAIN * 3 * PREP.crop_size**2  # the first one given back


def test_decoding_on_the_device_keeps_a_cache_its_loader_workers_read(imagefolder_root, monkeypatch):
    import transfer_cli.data.device_decode as device_decode

    decoded = []
    real = device_decode._decode
    monkeypatch.setattr(device_decode, "_decode", lambda *args: decoded.append(len(args[0])) or real(*args))
    data = ImageFolderDataModule(str(imagefolder_root), batch_size=32, decode_on="device", decoded_cache_gb=1.0)
    data.use_preprocessing(PREP)
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), world_size=1)
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.num_workers >= 1  # decode_on device: the workers read the files
    for epoch, expected in enumerate((TRAIN, 0)):
        before = sum(decoded)
        for batch in loader:
            data.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        assert sum(decoded) - before == expected, f"epoch {epoch}"


def test_the_main_threads_count_stays_when_decoding_threads_start_before_it_used_torch(tmp_path):
    # A fresh process whose main thread has not run torch yet: the decoding threads' count of 1 must not
    # become its own.
    script = (
        "import torch, transfer_cli.data.images as images\n"
        "class D(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return torch.get_num_threads()\n"
        "seen = images.ThreadDecoded(D(), threads=2).__getitems__(list(range(8)))\n"
        "print(sorted(set(seen)), torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[1]", "2"]
