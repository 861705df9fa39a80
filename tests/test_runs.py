"""Runs, resumes and interrupts never lose work: where runs go, a second run never overwrites an earlier
one, an interrupt at any point of fit leaves a checkpoint that resumes where it stopped, and last.ckpt
is always the newest state."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
RUN = Path("runs") / "resnet50-cifar10" / "version_0"
# Two epochs of four steps, validating every two steps (mid-epoch and at the end of each epoch).
SCHEDULE = (
    "--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=2",
)  # fmt: skip


def _fit_args(data_root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={data_root}",
        *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen", *SCHEDULE, *extra,
    ]  # fmt: skip


@pytest.fixture()
def env(offline_env):
    return {**offline_env, "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")])}


def _ok(result) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])


def _refused(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(cwd: Path) -> list[dict]:
    return [json.loads(line) for line in (cwd / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cifar_root):
    """The uninterrupted run the interrupted ones are measured against."""
    cwd = tmp_path_factory.mktemp("straight")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    _ok(run_transfer(*_fit_args(cifar_root), cwd=cwd, env=env))
    return cwd / RUN / "checkpoints" / "last.ckpt"


# Interrupts and resume ------------------------------------------------------------------------

INTERRUPTS = {
    # id: (callback flags, exit code, step the checkpoint holds, epoch the resume starts in, exact weights).
    # Interrupted in the end-of-epoch validation, the resumed process re-enters epoch 0 and draws one more
    # data order from the random generator than an uninterrupted run: same steps, not the same weights.
    "sigterm-at-epoch-end": (["faults.SignalAtEpochEnd"], 143, 4, 1, True),
    "ctrl-c-mid-epoch-training": (["faults.SignalAtBatch"], 130, 2, 0, False),
    "sigterm-in-mid-epoch-validation": (
        ["run_probes.SignalDuringValidation", "--trainer.callbacks.init_args.at_step=2"], 143, 2, 0, False,
    ),
    "ctrl-c-in-end-of-epoch-validation": (
        ["run_probes.SignalDuringValidation", "--trainer.callbacks.init_args.at_step=4",
         "--trainer.callbacks.init_args.signal_name=SIGINT"], 130, 4, 0, False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", INTERRUPTS, ids=list(INTERRUPTS))
def test_an_interrupt_anywhere_in_fit_resumes_where_it_stopped(tmp_path, cifar_root, env, straight, case):
    callback, code, saved_step, start_epoch, exact = INTERRUPTS[case]
    record = "--trainer.callbacks+=run_probes.RecordSteps"
    interrupted = run_transfer(
        *_fit_args(cifar_root, record, f"--trainer.callbacks+={callback[0]}", *callback[1:]), cwd=tmp_path, env=env
    )
    _refused(interrupted, code, "resumable checkpoint written")
    checkpoints = tmp_path / RUN / "checkpoints"
    assert _load(checkpoints / "last.ckpt")["global_step"] == saved_step

    resumed = run_transfer(*_fit_args(cifar_root, record, "--ckpt_path=last"), cwd=tmp_path, env=env)
    _ok(resumed)
    first, second = _steps(tmp_path)
    assert first["batches"] == saved_step  # the interrupted process trained this far ...
    # ... and the resumed one started there and trained only the rest.
    assert (second["start_epoch"], second["start_step"]) == (start_epoch, saved_step)
    assert second["batches"] == 8 - saved_step
    # One last.ckpt, the newest state, in the run's own directory.
    assert (
        not list(checkpoints.glob("last-v*.ckpt"))
        and not (tmp_path / "runs" / "resnet50-cifar10" / "version_1").exists()
    )
    final = _load(checkpoints / "last.ckpt")
    assert (final["global_step"], final["epoch"]) == (8, 1)
    if exact:  # resumed at an epoch boundary: the same weights as never interrupted
        expected = _load(straight)["state_dict"]
        assert all(torch.equal(final["state_dict"][k], expected[k]) for k in expected)


def test_an_interrupt_before_the_first_step_says_there_is_nothing_to_resume(tmp_path, cifar_root, env):
    in_sanity_check = (
        "--trainer.num_sanity_val_steps=2", "--trainer.callbacks+=run_probes.SignalDuringValidation",
        "--trainer.callbacks.init_args.at_step=-1",
    )  # fmt: skip
    result = run_transfer(*_fit_args(cifar_root, *in_sanity_check), cwd=tmp_path, env=env)
    _refused(result, 143, "nothing to resume")
    assert not list(tmp_path.glob("runs/*/*/checkpoints/*.ckpt"))
    again = run_transfer(*_fit_args(cifar_root, "--ckpt_path=last"), cwd=tmp_path, env=env)
    _refused(again, 2, "no last.ckpt")


# A second run never overwrites an earlier one ---------------------------------------------------


@pytest.mark.parametrize(
    "place,run_dir,fragment",
    [
        (["--trainer.logger.init_args.version=0"], RUN, "--trainer.logger.init_args.version"),
        (["--trainer.logger=false", "--trainer.default_root_dir=out"], Path("out"), "--trainer.default_root_dir"),
    ],
    ids=["explicit-version", "no-logger"],
)
def test_a_second_run_in_the_same_place_is_refused_unless_it_resumes(
    tmp_path, cifar_root, env, place, run_dir, fragment
):
    one_epoch = ("--trainer.max_epochs=1", *place)
    _ok(run_transfer(*_fit_args(cifar_root, *one_epoch), cwd=tmp_path, env=env))
    last = tmp_path / run_dir / "checkpoints" / "last.ckpt"
    written = {p: _digest(p) for p in (tmp_path / run_dir).rglob("*") if p.is_file()}
    assert last in written
    metrics = tmp_path / run_dir / "metrics.csv"
    first_metrics = metrics.read_text() if metrics.exists() else None

    again = run_transfer(*_fit_args(cifar_root, *one_epoch), cwd=tmp_path, env=env)
    _refused(again, 2, str(run_dir), "already holds an earlier run", "--ckpt_path last", fragment)
    assert {p: _digest(p) for p in (tmp_path / run_dir).rglob("*") if p.is_file()} == written  # untouched

    resumed = run_transfer(*_fit_args(cifar_root, *place, "--ckpt_path=last"), cwd=tmp_path, env=env)
    _ok(resumed)
    assert _load(last)["global_step"] == 8
    if first_metrics is not None:  # the first run's metrics survive its continuation
        assert (tmp_path / run_dir / "metrics-segment1.csv").read_text() == first_metrics


# A checkpoint that cannot be resumed ----------------------------------------------------------


def test_a_checkpoint_of_another_recipe_or_no_checkpoint_is_exit_4_without_a_run_directory(
    tmp_path, cifar_root, env, straight
):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(straight.read_bytes()[:4096])
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    cases = {
        straight: (["--model.init_args.head=transfer_cli.heads.MLPHead"], "another recipe"),
        truncated: ([], "truncated"),
        notes: ([], "notes.ckpt"),
        tmp_path / "absent.ckpt": ([], "absent.ckpt"),
    }
    for ckpt, (flags, fragment) in cases.items():
        cwd = tmp_path / f"run-{ckpt.stem}"
        cwd.mkdir()
        result = run_transfer(*_fit_args(cifar_root, *flags, f"--ckpt_path={ckpt}"), cwd=cwd, env=env)
        _refused(result, 4, fragment)
        assert list(cwd.iterdir()) == []


# Where runs go ----------------------------------------------------------------------------------


def test_runs_go_under_default_root_dir_and_last_finds_them_there(tmp_path, cifar_root, env):
    place = ("--trainer.default_root_dir=elsewhere",)
    _ok(run_transfer(*_fit_args(cifar_root, *place, "--trainer.max_epochs=1"), cwd=tmp_path, env=env))
    run = tmp_path / "elsewhere" / "resnet50-cifar10" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()
    assert not (tmp_path / "runs").exists()
    _ok(run_transfer(*_fit_args(cifar_root, *place, "--ckpt_path=last"), cwd=tmp_path, env=env))
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_the_run_is_named_after_the_first_recipe(tmp_path, cifar_root, env):
    (tmp_path / "my-experiment.yaml").write_text("trainer:\n  max_epochs: 1\n  limit_train_batches: 1\n")
    args = _fit_args(cifar_root, "--trainer.limit_val_batches=1")
    _ok(run_transfer(args[0], "--config", "my-experiment.yaml", *args[1:], cwd=tmp_path, env=env))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["my-experiment"]
    assert (tmp_path / "runs" / "my-experiment" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_given_logger_settings_win_over_the_defaults():
    from jsonargparse import Namespace

    from transfer_cli.runs import fill_logger_defaults

    configs = ["configs/resnet50-cifar10.yaml", "mine.yaml"]
    for given, root, expected in (
        ({}, None, ("runs", "resnet50-cifar10")),
        ({}, "out", ("out", "resnet50-cifar10")),
        ({"name": "custom", "save_dir": "logs"}, "out", ("logs", "custom")),
    ):
        logger = Namespace(class_path="CSVLogger", init_args=Namespace(**{"save_dir": "", "name": None, **given}))
        fill_logger_defaults(logger, root, configs)
        assert (logger.init_args.save_dir, logger.init_args.name) == expected


def test_recipes_leave_the_logger_to_the_cli():
    for recipe in (REPO / "configs").glob("*.yaml"):
        assert "logger" not in recipe.read_text(), recipe
