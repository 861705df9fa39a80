"""Finetuning on several processes (two CPU processes, gloo) stays synchronised: every parameter and
buffer identical on every rank at the end of a fit, checked by an all-gather of per-tensor checksums
(tests/ddp_probes.py), through the launchers users run (torchrun, Lightning's own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from test_huggingface import make_tiny_bert

from transfer_cli.callbacks.finetuning import FinetuningPolicy
from transfer_cli.errors import ConfigError

from conftest import TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
PROBE = "--trainer.callbacks+=ddp_probes.ReplicaChecksums"
GRADUAL = ("--finetuning.strategy=gradual", "--finetuning.unfreeze_at_epoch=1")


def _env(offline_env: dict[str, str]) -> dict[str, str]:
    return {**offline_env, "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")])}


def _torchrun(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m transfer_cli ...`, on a free port of its own (--standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "transfer_cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _replicas(cwd: Path) -> tuple[list[dict[str, str]], dict[str, dict[str, str]], set[str]]:
    """Every rank's checksums of the whole model (after asserting there were two ranks), rank 0's
    backbone checksums by epoch, and the names of the backbone's parameters."""
    found = json.loads((cwd / "replicas.json").read_text())
    ranks = found["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    return [r["model"] for r in ranks], found["backbone"], set(found["backbone_parameters"])


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before if before[k] != after[k]}


@pytest.mark.slow
def test_gradual_under_torchrun_keeps_replicas_identical_across_the_unfreeze_and_a_resume(
    tmp_path, cifar_root, offline_env
):
    env = _env(offline_env)
    fit = (
        "fit", "--config", "resnet50-cifar10", "--config", "debug", "--config", "ddp", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, "--trainer.accelerator=cpu", *GRADUAL, PROBE,  # devices auto: one per process
    )  # fmt: skip
    result = _torchrun(*fit, "--trainer.max_epochs=2", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "" and result.stderr.count("checkpoints: ") == 1  # one summary, from rank zero
    assert "sync_dist=True" not in result.stderr  # Lightning's advice against the per-process train loss
    runs = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").glob("*/*"))
    assert runs == ["runs/resnet50-cifar10/version_0"]  # one run directory for both processes
    models, backbone, parameters = _replicas(tmp_path)
    assert models[0] == models[1]  # every parameter and buffer, bit for bit
    assert backbone["epoch0"] == backbone["start"]  # frozen: weights and BatchNorm statistics untouched
    assert _changed(backbone["epoch0"], backbone["epoch1"]) >= parameters  # trained from epoch 1

    # Resumed past the unfreeze epoch: Lightning wraps the model with the backbone frozen (as setup
    # leaves it); it must be trained, and kept synchronised, from the first resumed epoch.
    (tmp_path / "replicas.json").unlink()
    result = _torchrun(*fit, "--trainer.max_epochs=3", "--ckpt_path=last", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    models, backbone, parameters = _replicas(tmp_path)
    assert models[0] == models[1]
    assert _changed(backbone["start"], backbone["epoch2"]) >= parameters
    assert [p.name for p in (tmp_path / "runs" / "resnet50-cifar10").iterdir()] == ["version_0"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "gradual"])
def test_huggingface_finetuning_with_an_unused_pooler_runs_synchronised_under_ddp(
    strategy, tmp_path, mnli_root, offline_env
):
    """BertModel builds a pooler the backbone never uses; as parameters without gradients it would stop
    DDP ("parameters that were not used in producing loss"). Full finetuning through Lightning's own
    launcher; gradual (bert-mnli, the issue's torchrun command) through torchrun, re-wrapped at epoch 1."""
    tiny = make_tiny_bert(tmp_path / "tiny-bert")
    fit = (
        "fit", "--config", "bert-mnli", "--config", "debug", f"--data.root={mnli_root / 'fastnlp_fixture'}",
        f"--model.init_args.backbone.init_args.model={tiny}", "--trainer.accelerator=cpu", PROBE,
    )  # fmt: skip
    if strategy == "full":
        args = (*fit, "--finetuning.strategy=full", "--trainer.strategy=ddp", "--trainer.devices=2")
        result = run_transfer(*args, cwd=tmp_path, env=_env(offline_env))
    else:
        args = (*fit, "--config", "ddp", *GRADUAL, "--trainer.max_epochs=2")
        result = _torchrun(*args, cwd=tmp_path, env=_env(offline_env))
    assert result.returncode == 0, result.stderr[-3000:]
    models, backbone, parameters = _replicas(tmp_path)
    assert models[0] == models[1]
    pooler = {k for k in backbone["start"] if ".pooler." in k}
    assert pooler and not pooler & parameters  # kept (same state dict), but nothing to train
    last = backbone["epoch0" if strategy == "full" else "epoch1"]
    assert not _changed(backbone["start"], last) & pooler
    if strategy == "gradual":
        assert backbone["epoch0"] == backbone["start"]  # frozen through epoch 0
    assert _changed(backbone["start"], last) >= parameters


def test_gradual_is_refused_early_with_strategies_that_are_not_re_wrapped():
    policy = FinetuningPolicy(strategy="gradual")
    with pytest.raises(ConfigError, match="gradual on several devices runs with --trainer.strategy ddp"):
        policy.check_devices(2, ModelParallelStrategy())
    policy.check_devices(2, DDPStrategy())  # synchronised by re-wrapping
    policy.check_devices(1, ModelParallelStrategy())  # nothing to synchronise
    FinetuningPolicy(strategy="full").check_devices(2, ModelParallelStrategy())


def test_torchrun_sets_devices_auto_to_its_processes_and_refuses_a_count_that_disagrees(monkeypatch):
    from jsonargparse import Namespace

    from transfer_cli.cli import _fit_devices_to_launcher

    launched = {"TORCHELASTIC_RUN_ID": "test", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "RANK": "0"}
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    trainer = Namespace(devices="auto", num_nodes=2)
    _fit_devices_to_launcher(trainer)
    assert trainer.devices == 2
    with pytest.raises(ConfigError, match="torchrun started 4 processes .2 per node.*--trainer.devices 2"):
        _fit_devices_to_launcher(Namespace(devices=4, num_nodes=2))
    with pytest.raises(ConfigError, match="make 2"):
        _fit_devices_to_launcher(Namespace(devices="2", num_nodes=1))
