"""Frozen-feature caching gives the same training as the uncached path, and only when it is valid."""

import pytest
import torch

from conftest import run_transfer


def _probe(tmp_path, imagefolder_root, env, name: str, *extra: str):
    cwd = tmp_path / name
    cwd.mkdir()
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", f"--data.root={imagefolder_root}",
        "--data=transfer_cli.data.ImageFolderDataModule", "--data.init_args.num_workers=0",
        "--model.init_args.backbone.init_args.name=resnet18", "--model.init_args.backbone.init_args.weights=null",
        "--model.init_args.backbone.init_args.image_size=32", "--finetuning.strategy=frozen",
        # One batch holds the whole training split, so the data order cannot matter.
        "--data.init_args.batch_size=512", "--trainer.max_epochs=3", "--trainer.accelerator=cpu",
        "--model.init_args.optimizer.init_args.lr=0.1",
        *extra,
        cwd=cwd, env=env, timeout=900,  # a loaded CI machine
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    state = torch.load(cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    return result.stderr, state["state_dict"]


def test_cached_features_train_the_head_like_the_uncached_path(tmp_path, imagefolder_root, offline_env):
    cached_log, cached = _probe(tmp_path, imagefolder_root, offline_env, "cached", "--data.init_args.augment=false")
    plain_log, plain = _probe(
        tmp_path, imagefolder_root, offline_env, "plain",
        "--data.init_args.augment=false", "--finetuning.cache_features=false",
    )  # fmt: skip
    assert "cached frozen features of 270 train and 30 val examples" in cached_log
    assert "cached" not in plain_log
    assert not torch.equal(cached["head.1.weight"], torch.zeros_like(cached["head.1.weight"]))
    for key in ("head.1.weight", "head.1.bias"):
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)
    for key in cached:
        if key.startswith("backbone."):
            assert torch.equal(cached[key], plain[key]), key


def test_random_augmentation_turns_caching_off_and_says_why(tmp_path, imagefolder_root, offline_env):
    log, _ = _probe(tmp_path, imagefolder_root, offline_env, "augmented", "--trainer.max_epochs=1")
    assert "not cached: random augmentation" in log


# 2: persistent loader workers, which draw their seed only once; null: on the CPU, threads in this process.
@pytest.mark.parametrize("workers", ["0", "2", "null"])
def test_cache_gives_the_same_batches_in_the_same_order_every_epoch(tmp_path, imagefolder_root, offline_env, workers):
    # 9 shuffled batches per epoch, 3 epochs, and dropout in the head: any difference in the order of
    # the examples or in the random state the training draws from shows in the head's weights.
    same = (
        "--data.init_args.augment=false", "--data.init_args.batch_size=32", f"--data.init_args.num_workers={workers}",
        "--model.init_args.head.init_args.dropout=0.5",
    )  # fmt: skip
    cached_log, cached = _probe(tmp_path, imagefolder_root, offline_env, "cached", *same)
    _, plain = _probe(tmp_path, imagefolder_root, offline_env, "plain", *same, "--finetuning.cache_features=false")
    assert "cached frozen features of 270 train and 30 val examples" in cached_log
    for key in ("head.1.weight", "head.1.bias"):
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-6)


def test_one_batch_given_as_an_int_is_part_of_the_data(tmp_path, imagefolder_root, offline_env):
    # Lightning reads limit_train_batches=1 as one batch (1.0 would be all of them).
    log, _ = _probe(tmp_path, imagefolder_root, offline_env, "one", "--data.init_args.augment=false",
                    "--trainer.limit_train_batches=1", "--trainer.max_epochs=1")  # fmt: skip
    assert "not cached: the run uses part of the data" in log
