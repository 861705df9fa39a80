"""The failure contract: each bad input or fault gives its exit code, a message that says what, where and
how to fix it, no traceback, and nothing already written lost or half-written."""

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent


def _fit_args(data_root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={data_root}",
        *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen", *extra,
    ]  # fmt: skip


@pytest.fixture()
def env(offline_env):
    return {**offline_env, "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")])}


def _assert_clean_failure(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_root):
    """One small checkpoint shared by the checkpoint-error tests."""
    cwd = tmp_path_factory.mktemp("trained")
    result = run_transfer(*_fit_args(cifar_root), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"


# 1. Configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,fragments",
    [
        ("trainer:\n  max_epochs: [1\n", ["Malformed YAML", "bad.yaml:3"]),
        ("trainer:\n  max_epochz: 1\n", ["trainer.max_epochz"]),
        ("trainer:\n  max_epochs: lots\n", ["trainer.max_epochs", "lots"]),
        (
            "model:\n  init_args:\n    backbone:\n      init_args:\n        weights: /nowhere/w.pth\n",
            ["/nowhere/w.pth"],
        ),
    ],
    ids=["malformed-yaml", "unknown-key", "wrong-type", "missing-weights-file"],
)
def test_config_errors_exit_2_before_any_run_directory(tmp_path, cifar_root, env, content, fragments):
    (tmp_path / "bad.yaml").write_text(content)
    result = run_transfer(*_fit_args(cifar_root, "--config", "bad.yaml"), cwd=tmp_path, env=env)
    _assert_clean_failure(result, 2, *fragments)
    assert not (tmp_path / "runs").exists()


def test_missing_config_file_lists_the_recipes(tmp_path, env):
    result = run_transfer("fit", "--config", "no-such-recipe", cwd=tmp_path, env=env)
    _assert_clean_failure(result, 2, "no-such-recipe", "resnet50-cifar10")


# 2. Data --------------------------------------------------------------------------------------


def test_missing_or_empty_data_directory_exits_3(tmp_path, env):
    missing = run_transfer(*_fit_args(tmp_path / "nothing-here"), cwd=tmp_path, env=env)
    _assert_clean_failure(missing, 3, str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    empty = run_transfer(
        *_fit_args(tmp_path / "empty", "--data=transfer_cli.data.ImageFolderDataModule"), cwd=tmp_path, env=env
    )
    _assert_clean_failure(empty, 3, "train")
    assert not (tmp_path / "runs").exists()


def _image_folder(root: Path, source: Path) -> Path:
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for jpg in sorted((source / "train" / name).glob("*.jpg"))[:6]:
            shutil.copy(jpg, root / "train" / name / jpg.name)
    return root


def test_bad_images_are_listed_with_exit_3_or_skipped_on_request(tmp_path, imagefolder_root, env):
    root = _image_folder(tmp_path / "images", imagefolder_root)
    cat = root / "train" / "cat"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "truncated.jpg").write_bytes((cat / "0000.jpg").read_bytes()[:300])
    (cat / "notes.png").write_text("not an image at all")
    # Odd but valid formats are converted, not rejected.
    Image.new("L", (20, 20), 90).save(cat / "grey.png")
    Image.new("P", (20, 20), 5).save(cat / "palette.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(cat / "alpha.png")
    Image.new("CMYK", (20, 20), (1, 2, 3, 4)).save(cat / "cmyk.jpg")
    Image.new("I;16", (20, 20), 4000).save(cat / "deep.png")

    args = _fit_args(root, "--data=transfer_cli.data.ImageFolderDataModule", "--data.init_args.num_workers=0")
    failed = run_transfer(*args, cwd=tmp_path, env=env)
    _assert_clean_failure(failed, 3, "zero.jpg", "truncated.jpg", "notes.png", "skip_bad_images")
    for fine in ("grey.png", "palette.png", "alpha.png", "cmyk.jpg", "deep.png"):
        assert fine not in failed.stderr
    assert not (tmp_path / "runs").exists()

    skipped = run_transfer(*args, "--data.init_args.skip_bad_images=true", cwd=tmp_path, env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 3 unreadable image(s)" in skipped.stderr


# 4. Checkpoints -------------------------------------------------------------------------------


def test_bad_checkpoints_exit_4(tmp_path, trained, imagefolder_root, env):
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained.read_bytes()[:4096])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    cases = {
        tmp_path / "absent.ckpt": "not found",
        not_ckpt: "not a checkpoint",
        truncated: "truncated",
        foreign: "not written by transfer",
    }
    for ckpt, fragment in cases.items():
        result = run_transfer("predict", "--ckpt", ckpt, "--input", imagefolder_root / "test", cwd=tmp_path, env=env)
        _assert_clean_failure(result, 4, str(ckpt.name), fragment)


def test_data_with_other_classes_than_the_checkpoint_exits_4(tmp_path, trained, imagefolder_root, env):
    root = _image_folder(tmp_path / "images", imagefolder_root)  # cat, dog: not CIFAR-10's ten classes
    result = run_transfer(
        "test", "--ckpt", trained, "--data=transfer_cli.data.ImageFolderDataModule", f"--data.root={root}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    _assert_clean_failure(result, 4, "classes differ", "airplane")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, trained, imagefolder_root, env):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "transfer": _Payload(marker)}, f)
    bad_class = tmp_path / "class.ckpt"
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    checkpoint["transfer"]["model"]["init_args"]["backbone"]["class_path"] = "faults.PoisonAtEpoch"
    torch.save(checkpoint, bad_class)

    for ckpt, fragment in ((evil, "refused"), (bad_class, "faults.PoisonAtEpoch")):
        result = run_transfer(
            "predict", "--ckpt", ckpt, "--input", imagefolder_root / "test", cwd=tmp_path,
            env={**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},  # an environment cannot switch safety off
        )  # fmt: skip
        _assert_clean_failure(result, 4, fragment)
    assert not marker.exists()


# 6. Non-finite loss ---------------------------------------------------------------------------


def test_nan_loss_exits_5_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cifar_root, env):
    result = run_transfer(
        *_fit_args(cifar_root, "--trainer.max_epochs=2", "--trainer.callbacks+=faults.PoisonAtEpoch"),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    _assert_clean_failure(result, 5, "nan", "step 2", "gradient_clip_val")
    last = tmp_path / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2  # written after epoch 0, untouched by the failure
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


# 7. Resources ---------------------------------------------------------------------------------


def test_unwritable_output_locations_exit_6(tmp_path, trained, cifar_root, imagefolder_root, env):
    predict = run_transfer(
        "predict", "--ckpt", trained, "--input", imagefolder_root / "test", "--output", "/proc/transfer/p.jsonl",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    _assert_clean_failure(predict, 6, "/proc/transfer")
    fit = run_transfer(
        *_fit_args(cifar_root, "--trainer.logger.init_args.save_dir=/proc/transfer-runs"), cwd=tmp_path, env=env
    )
    _assert_clean_failure(fit, 6, "/proc/transfer-runs")


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(tmp_path, cifar_root, monkeypatch):
    import transfer_cli.checkpoint_io as safety
    from transfer_cli.entry import main

    real_open, writes, before = open, [], {}
    checkpoints = tmp_path / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints"

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode:
            writes.append(path)
            if len(writes) > 2:  # epoch 0 wrote best and last; the disk fills up in epoch 1
                before.update({p.name: _digest(p) for p in checkpoints.glob("*.ckpt")})
                raise OSError(28, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(safety, "open", full_disk, raising=False)
    monkeypatch.chdir(tmp_path)
    code = main(_fit_args(cifar_root, "--trainer.max_epochs=2", "--model.init_args.optimizer.init_args.lr=0.5"))
    assert code == 6
    assert before and {p.name: _digest(p) for p in checkpoints.glob("*.ckpt")} == before
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_predicting_leaves_no_file_under_the_final_name(
    tmp_path, trained, imagefolder_root, monkeypatch
):
    import transfer_cli.callbacks.prediction_writer as writer
    from transfer_cli.entry import main

    real_open = open

    class FillsUp:
        def __init__(self, f):
            self.f, self.rows = f, 0

        def write(self, text):
            self.rows += 1
            if self.rows > 1:
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer, "open", lambda *a, **k: FillsUp(real_open(*a, **k)), raising=False)
    out = tmp_path / "preds.jsonl"
    code = main(["predict", "--ckpt", str(trained), "--input", str(imagefolder_root / "test"), "--output", str(out),
                 "--data.init_args.batch_size=16"])  # fmt: skip
    assert code == 6
    assert list(tmp_path.iterdir()) == []  # neither preds.jsonl nor its temporary file


# 8. Interrupts --------------------------------------------------------------------------------


# Interrupts during fit and resuming: tests/test_runs.py.


# 9. Predict -----------------------------------------------------------------------------------


def test_a_killed_predict_leaves_nothing_under_the_final_name(tmp_path, trained, imagefolder_root, env):
    out = tmp_path / "out" / "preds.jsonl"
    out.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "predict", "--ckpt", str(trained), "--input", str(imagefolder_root),
         "--output", str(out), "--data.init_args.batch_size=1", "--data.init_args.num_workers=0"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(out.parent.glob(".preds.jsonl.*.tmp")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # rows are being written now
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()


# 10. Determinism ------------------------------------------------------------------------------


def test_same_seed_twice_gives_the_same_metrics_and_weights(tmp_path, cifar_root, env):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        result = run_transfer(*_fit_args(cifar_root, "--finetuning.strategy=full"), cwd=tmp_path / name, env=env)
        assert result.returncode == 0, result.stderr
        runs.append(tmp_path / name / "runs" / "resnet50-cifar10" / "version_0")
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in runs)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (runs[0] / "metrics.csv").read_text() == (runs[1] / "metrics.csv").read_text()


def test_readme_documents_every_exit_code():
    readme = (REPO / "README.md").read_text()
    for code in ("| 0 ", "| 2 ", "| 3 ", "| 4 ", "| 5 ", "| 6 ", "| 130 ", "| 143 "):
        assert code in readme
    assert "--debug" in readme and "TRANSFER_DEBUG" in readme


# Found in review ------------------------------------------------------------------------------


def test_settings_lightning_rejects_are_config_errors(tmp_path, cifar_root, trained, imagefolder_root, env):
    gpu = run_transfer(*_fit_args(cifar_root, "--trainer.accelerator=gpu"), cwd=tmp_path, env=env)
    _assert_clean_failure(gpu, 2, "--trainer")
    folder = imagefolder_root / "test"
    for flag, fragment in (("--topk=0", "--topk 0"), ("--trainer.num_nodes=2", "one machine")):
        result = run_transfer("predict", "--ckpt", trained, "--input", folder, flag, cwd=tmp_path, env=env)
        _assert_clean_failure(result, 2, fragment)


def test_a_checkpoint_naming_a_callable_outside_the_trusted_packages_is_refused(tmp_path, trained, env):
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    checkpoint["transfer"]["model"]["init_args"]["head"] = "this.s"  # importing `this` prints a poem
    bad = tmp_path / "callable.ckpt"
    torch.save(checkpoint, bad)
    result = run_transfer("predict", "--ckpt", bad, "--input", "-", cwd=tmp_path, env=env, stdin="")
    _assert_clean_failure(result, 4, "this.s")
    assert result.stdout == "" and "Beautiful is better" not in result.stderr


def test_sigterm_during_predict_exits_143_and_leaves_no_output(tmp_path, trained, imagefolder_root, env):
    out = tmp_path / "preds.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "predict", "--ckpt", str(trained), "--input", str(imagefolder_root),
         "--output", str(out), "--data.init_args.batch_size=1", "--data.init_args.num_workers=0"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".preds.jsonl.*.tmp")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 143, stderr[-2000:]
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_progress_bar_of_your_own_replaces_ours(tmp_path, cifar_root, env):
    result = run_transfer(
        *_fit_args(cifar_root, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"),
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr


def test_the_feature_cache_respects_the_debug_limits(tmp_path, cifar_root, env):
    result = run_transfer(*_fit_args(cifar_root, "--data.init_args.augment=false"), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "not cached: the run uses part of the data" in result.stderr


def test_predict_uses_the_preprocessing_stored_in_the_checkpoint(tmp_path, trained, imagefolder_root, env):
    folder = imagefolder_root / "test" / "cat"
    original = run_transfer("predict", "--ckpt", trained, "--input", folder, cwd=tmp_path, env=env)
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    checkpoint["transfer"]["preprocessing"].update(crop_size=48, resize_size=48)
    changed_ckpt = tmp_path / "other-size.ckpt"
    torch.save(checkpoint, changed_ckpt)
    changed = run_transfer("predict", "--ckpt", changed_ckpt, "--input", folder, cwd=tmp_path, env=env)
    assert original.returncode == changed.returncode == 0, changed.stderr
    assert original.stdout != changed.stdout  # the stored size, not the backbone's default, was used


def test_empty_input_and_no_arguments(tmp_path, trained, env):
    empty = run_transfer("predict", "--ckpt", trained, "--input", "-", cwd=tmp_path, env=env, stdin="")
    _assert_clean_failure(empty, 3, "stdin")
    bare = run_transfer(cwd=tmp_path, env=env)
    assert bare.returncode == 2 and bare.stdout == "" and "usage" in bare.stderr
