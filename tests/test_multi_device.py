"""Lightning's DDP is the engine beyond one device: two CPU processes (gloo) through the real CLI."""

import json
import pickle
from pathlib import Path

import torch

from conftest import TINY_IMAGE_BACKBONE, run_transfer

DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")


def _fit(tmp_path, cifar_root, env, *extra: str):
    return run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, *DDP, *extra,
        cwd=tmp_path, env=env,
    )  # fmt: skip


def test_ddp_fit_writes_one_run_and_one_summary(tmp_path, cifar_root, offline_env):
    result = _fit(tmp_path, cifar_root, offline_env, "--finetuning.strategy=frozen")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.count("checkpoints: ") == 1  # summaries from rank zero only
    runs = list((tmp_path / "runs" / "resnet50-cifar10").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    state = torch.load(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    # Drawn on rank zero alone, after the other process has finished: no collective may be waiting there.
    assert (runs[0] / "curves.png").is_file() and (runs[0] / "summary.json").is_file()


def _odd_cifar(tmp_path: Path, cifar_root: Path, keep: int) -> Path:
    """The real CIFAR-10 files with a test_batch of its first `keep` images (the real ones)."""
    from transfer_cli.data.cifar10 import read_batch

    source, target = cifar_root / "cifar-10-batches-py", tmp_path / "odd" / "cifar-10-batches-py"
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != "test_batch":
            (target / path.name).symlink_to(path)
    images, labels = read_batch(source / "test_batch")
    batch = {"data": images[:keep].reshape(keep, -1).numpy(), "labels": labels[:keep].tolist()}
    with open(target / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return target.parent


def test_an_evaluation_report_on_two_processes_counts_every_example_once(tmp_path, cifar_root, offline_env):
    """DistributedSampler pads an odd test set with a repeated example so both processes get as many;
    the report must not count it, and must equal the one-process report."""
    ckpt = Path(__file__).parent / "fixtures" / "image-v1.ckpt"
    examples = 99  # odd: the sampler pads one process's share
    root = _odd_cifar(tmp_path, cifar_root, examples)
    reports = []
    for extra in ((), DDP):
        result = run_transfer(
            "test", "--ckpt", ckpt, f"--data.root={root}", "--trainer.accelerator=cpu", *extra, "--report", "-",
            cwd=tmp_path, env=offline_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads(result.stdout))
    single, ddp = reports
    assert ddp["num_examples"] == single["num_examples"] == examples
    assert sum(map(sum, ddp["confusion_matrix"])) == examples
    assert ddp["confusion_matrix"] == single["confusion_matrix"]
    assert ddp["accuracy"] == single["accuracy"]
