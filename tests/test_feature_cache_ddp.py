"""The frozen-feature cache on two processes (CPU, gloo, Lightning's own launcher): each process
computes a share of the features, and trains on the very batches DDP's sampler would have dealt it."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
HEAD = ("head.1.weight", "head.1.bias")
SEED = 42  # seed_everything in configs/resnet50-cifar10.yaml: Lightning's DistributedSampler seed
SEEN = "--trainer.callbacks+=ddp_probes.SeenExamples"  # needs the cache


def _fit(tmp_path: Path, imagefolder_root: Path, env: dict[str, str], name: str, *extra: str):
    """A frozen fit of the 300-image folder (270 train, 30 val); its stderr, last.ckpt's state dict and cwd."""
    cwd = tmp_path / name
    cwd.mkdir()
    result = run_transfer(*_args(imagefolder_root, *extra), cwd=cwd, env=_env(env), timeout=600)  # a loaded CI machine
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"
    return result.stderr, torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"], cwd


def _args(imagefolder_root: Path, *extra: str) -> tuple[str, ...]:
    return (
        "fit", "--config", "resnet50-cifar10", f"--data.root={imagefolder_root}",
        "--data=transfer_cli.data.ImageFolderDataModule", "--data.init_args.num_workers=0",
        "--data.init_args.augment=false", *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen",
        "--trainer.accelerator=cpu", "--model.init_args.optimizer.init_args.lr=0.1", *extra,
    )  # fmt: skip


def _env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])}


def _validation(cwd: Path) -> torch.Tensor:
    """val_loss and val_acc of every epoch, from the run's metrics.csv."""
    with open(cwd / "runs" / "resnet50-cifar10" / "version_0" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val_loss")]
    return torch.tensor([[float(row["val_loss"]), float(row["val_acc"])] for row in rows], dtype=torch.float64)


def _seen(cwd: Path) -> dict[str, list[list[int]]]:
    """By epoch, the training examples each rank's batches held (tests/ddp_probes.SeenExamples)."""
    found = json.loads((cwd / "seen.json").read_text())
    epochs = sorted({epoch for rank in found["ranks"] for epoch in rank})
    return {epoch: [rank.get(epoch, []) for rank in found["ranks"]] for epoch in epochs}


@pytest.mark.slow
def test_cached_features_under_ddp_train_the_head_like_the_uncached_path(tmp_path, imagefolder_root, offline_env):
    # 269 training and 31 validation images: DistributedSampler pads both to an even count. Five
    # shuffled batches a process per epoch, three epochs, dropout in the head: any difference in what
    # each process sees, in which order, or in the random state training draws from shows in the head.
    same = (
        *DDP, "--data.init_args.val_fraction=0.103", "--data.init_args.batch_size=32", "--trainer.max_epochs=3",
        "--model.init_args.head.init_args.dropout=0.5",
    )  # fmt: skip
    log, cached, cwd = _fit(tmp_path, imagefolder_root, offline_env, "cached", *same, SEEN)
    plain_log, plain, plain_cwd = _fit(
        tmp_path, imagefolder_root, offline_env, "plain", *same, "--finetuning.cache_features=false"
    )
    assert "Starting with 2 processes" in log or "distributed_backend=gloo" in log  # really two ranks
    assert log.count("cached frozen features of 269 train and 31 val examples on 2 processes") == 1
    assert "not cached" not in log and "cached frozen features" not in plain_log
    for key in HEAD:
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-6)
    # Validation is served from the cache too, dealt (unshuffled, padded) as Lightning deals it.
    validation = _validation(cwd)
    assert len(validation) == 3
    torch.testing.assert_close(validation, _validation(plain_cwd), rtol=1e-5, atol=1e-6)
    seen = _seen(cwd)
    assert list(seen) == ["epoch0", "epoch1", "epoch2"]
    for epoch, ranks in seen.items():
        assert [len(r) for r in ranks] == [135, 135], epoch  # as many steps on each rank
        assert sorted(set(ranks[0] + ranks[1])) == list(range(269)), epoch  # one example repeated as padding
        assert ranks == _dealt(269, int(epoch.removeprefix("epoch"))), epoch
    assert seen["epoch0"] != seen["epoch1"]  # reshuffled every epoch

    # Resumed: Lightning sets the restored epoch on the sampler, so the shuffle goes on where it stood.
    resumed = run_transfer(*_args(imagefolder_root, *same, SEEN, "--trainer.max_epochs=4", "--ckpt_path=last"),
                           cwd=cwd, env=_env(offline_env), timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _seen(cwd) == {"epoch3": _dealt(269, 3)}


def _dealt(count: int, epoch: int) -> list[list[int]]:
    """The examples of an epoch that Lightning's DistributedSampler deals each of two processes."""
    samplers = [DistributedSampler(range(count), num_replicas=2, rank=r, shuffle=True, seed=SEED) for r in (0, 1)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.slow
def test_two_processes_with_the_cache_give_the_head_of_one_process_with_the_same_global_batch(
    tmp_path, imagefolder_root, offline_env
):
    # The global batch is the whole training split (one step per epoch), so the order cannot matter.
    ddp_log, ddp, cwd = _fit(
        tmp_path,
        imagefolder_root,
        offline_env,
        "ddp",
        *DDP,
        "--data.init_args.batch_size=135",
        "--trainer.max_epochs=3",
        SEEN,
    )
    one_log, one, _ = _fit(
        tmp_path, imagefolder_root, offline_env, "one", "--data.init_args.batch_size=270", "--trainer.max_epochs=3"
    )
    assert "cached frozen features of 270 train and 30 val examples on 2 processes" in ddp_log
    assert "cached frozen features of 270 train and 30 val examples in" in one_log
    for epoch, ranks in _seen(cwd).items():
        assert len(ranks) == 2 and [len(r) for r in ranks] == [135, 135], epoch
        assert sorted(ranks[0] + ranks[1]) == list(range(270)), epoch  # every example exactly once
    assert not torch.equal(one["head.1.weight"], torch.zeros_like(one["head.1.weight"]))
    for key in HEAD:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5)


COUNTS = (7, 1)  # 7: rounds of 2 rows over shares of 4 and 3; 1: a process with no rows


def _gather(rank: int, port: int, out: Path) -> None:
    """One of two gloo processes: all-gathers its share of COUNTS numbered rows, two rows a round."""
    import torch.distributed as dist

    from transfer_cli import feature_cache

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        feature_cache.GATHER_BYTES = 2 * 2 * 3 * 4  # two rows of three float32 from each of two processes
        gathered = {}
        for count in COUNTS:
            share = -(-count // 2)
            rows = torch.arange(count * 3, dtype=torch.float32).reshape(count, 3)[rank * share : (rank + 1) * share]
            labels = torch.arange(count)[rank * share : (rank + 1) * share]
            device = torch.device("cpu")
            gathered[count] = [feature_cache._all_gather_rows(t, count, share, device) for t in (rows, labels)]
        torch.save(gathered, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shares_gathered_in_bounded_rounds_come_back_whole_and_in_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather, args=(port, tmp_path), nprocs=2)
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"rank{rank}.pt")
        for count in COUNTS:
            rows, labels = gathered[count]
            assert torch.equal(rows, torch.arange(count * 3, dtype=torch.float32).reshape(count, 3)), (rank, count)
            assert torch.equal(labels, torch.arange(count)), (rank, count)
