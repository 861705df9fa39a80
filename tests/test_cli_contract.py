"""The command line as people type it: repeated flags, `~` after `=`, configs saved with
--print_config, recipes stacked on --ckpt, linked folders, out-of-range values. Each case found by
running transfer the way users do; each ends in the documented exit code or in the right result."""

import json
import os
from pathlib import Path

import pytest

from conftest import TINY_IMAGE_BACKBONE, run_transfer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_root):
    cwd = tmp_path_factory.mktemp("trained")
    fit = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        *TINY_IMAGE_BACKBONE, "--finetuning.strategy=frozen", cwd=cwd,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    return cwd / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"


def _clean(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_repeated_ckpt_takes_the_last_one_like_every_other_flag(tmp_path, trained, imagefolder_root, offline_env):
    image = imagefolder_root / "test" / "cat" / "0000.jpg"
    result = run_transfer(
        "predict", "--ckpt", trained, "--ckpt", tmp_path / "other.ckpt", "--input", image, cwd=tmp_path, env=offline_env
    )
    _clean(result, 4, "other.ckpt")
    assert result.stdout == ""


def test_a_ckpt_saved_in_a_config_file_is_refused_not_ignored(tmp_path, trained, imagefolder_root, offline_env):
    image = imagefolder_root / "test" / "cat" / "0000.jpg"
    saved = run_transfer(
        "predict", "--ckpt", trained, "--input", image, "--print_config", cwd=tmp_path, env=offline_env
    )
    assert saved.returncode == 0, saved.stderr
    (tmp_path / "p.yaml").write_text(saved.stdout)
    # Before: exit 0 with rows from a freshly initialised model, the checkpoint never read.
    result = run_transfer("predict", "--config", "p.yaml", cwd=tmp_path, env=offline_env)
    _clean(result, 2, "command line", "--ckpt")
    assert result.stdout == ""


def test_a_recipe_stacked_on_ckpt_cannot_swap_the_checkpoints_model(tmp_path, trained, cifar_root, offline_env):
    # The recipe names resnet50 with DEFAULT weights (not cached here): the checkpoint's resnet18 must
    # be built instead, with its own weights, and the recipe's other settings may still apply.
    result = run_transfer(
        "test", "--config", "resnet50-cifar10", "--ckpt", trained, "--config", "debug", f"--data.root={cifar_root}",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    _clean(result, 0, "test_acc")
    assert "Downloading" not in result.stderr and "resnet50" not in result.stderr


def test_tilde_after_equals_is_expanded(tmp_path, trained, imagefolder_root, offline_env):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "m.ckpt").symlink_to(trained)
    (home / "photos").symlink_to(imagefolder_root / "test" / "cat")
    env = {**offline_env, "HOME": str(home)}
    result = run_transfer("predict", "--ckpt=~/models/m.ckpt", "--input=~/photos", cwd=tmp_path, env=env)
    _clean(result, 0)
    assert len(_rows(result.stdout)) == len(list((imagefolder_root / "test" / "cat").glob("*.jpg")))


def test_a_directory_given_as_ckpt_points_at_the_checkpoint_inside(tmp_path, trained, imagefolder_root, offline_env):
    run_dir = trained.parent.parent
    result = run_transfer(
        "predict", "--ckpt", run_dir, "--input", imagefolder_root / "test", cwd=tmp_path, env=offline_env
    )
    _clean(result, 4, "is a directory", "last.ckpt")


def test_linked_folders_in_the_input_are_followed_once(tmp_path, trained, imagefolder_root, offline_env):
    photos = tmp_path / "photos"
    (photos / "mine").mkdir(parents=True)
    cats = sorted((imagefolder_root / "test" / "cat").glob("*.jpg"))
    for jpg in cats[:3]:
        (photos / "mine" / jpg.name).symlink_to(jpg)
    (photos / "dogs").symlink_to(imagefolder_root / "test" / "dog")
    (photos / "mine" / "loop").symlink_to(photos)  # a link back up the tree must not loop
    result = run_transfer("predict", "--ckpt", trained, "--input", photos, cwd=tmp_path, env=offline_env)
    _clean(result, 0)
    inputs = [row["input"] for row in _rows(result.stdout)]
    dogs = len(list((imagefolder_root / "test" / "dog").glob("*.jpg")))
    assert len(inputs) == len(set(inputs)) == 3 + dogs
    assert sum("/dogs/" in i for i in inputs) == dogs


@pytest.mark.parametrize(
    "flag,fragment",
    [
        ("--model.init_args.head.init_args.dropout=2", "dropout"),
        ("--model.init_args.backbone.init_args.image_size=0", "image_size"),
        ("--data.init_args.batch_size=0", "batch_size"),
    ],
    ids=["dropout", "image-size", "batch-size"],
)
def test_out_of_range_values_are_config_errors(tmp_path, trained, imagefolder_root, offline_env, flag, fragment):
    result = run_transfer(
        "predict", "--ckpt", trained, "--input", imagefolder_root / "test" / "cat", flag, cwd=tmp_path, env=offline_env
    )
    _clean(result, 2, fragment)
    assert result.stdout == ""


@pytest.mark.parametrize("content,fragment", [("", "empty"), ("- a\n- b\n", "list")], ids=["empty", "list"])
def test_a_config_that_is_not_a_mapping_names_the_file(tmp_path, cifar_root, offline_env, content, fragment):
    (tmp_path / "mine.yaml").write_text(content)
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "mine.yaml", f"--data.root={cifar_root}",
        cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    _clean(result, 2, "mine.yaml", fragment)
    assert not (tmp_path / "runs").exists()


def test_home_is_not_needed_for_absolute_paths(tmp_path, trained, imagefolder_root, offline_env):
    env = {k: v for k, v in offline_env.items() if k != "HOME"}
    env["HOME"] = os.devnull  # a job scheduler's account with no usable home directory
    result = run_transfer("predict", "--ckpt", trained, "--input", imagefolder_root / "test" / "cat" / "0000.jpg",
                          cwd=tmp_path, env=env)  # fmt: skip
    _clean(result, 0)
    assert Path(_rows(result.stdout)[0]["input"]).name == "0000.jpg"


def test_file_names_that_are_not_utf8_round_trip_through_jsonl_and_csv(
    tmp_path, trained, imagefolder_root, offline_env
):
    photos = tmp_path / "photos"
    photos.mkdir()
    jpg = (imagefolder_root / "test" / "cat" / "0000.jpg").read_bytes()
    names = [b"caf\xc3\xa9.jpg", b"latin1-\xe9t\xe9.jpg"]  # UTF-8, and Latin-1 bytes that are not UTF-8
    for name in names:
        Path(os.fsdecode(os.path.join(os.fsencode(photos), name))).write_bytes(jpg)
    jsonl = run_transfer("predict", "--ckpt", trained, "--input", photos, cwd=tmp_path, env=offline_env)
    _clean(jsonl, 0)
    found = {os.path.basename(os.fsencode(row["input"])) for row in _rows(jsonl.stdout)}
    assert found == set(names)
    # A CSV in a folder that does not exist yet: the folder is made, the names are kept as bytes.
    csv_run = run_transfer(
        "predict", "--ckpt", trained, "--input", photos, "--output", "out/rows.csv", cwd=tmp_path, env=offline_env
    )
    _clean(csv_run, 0)
    written = (tmp_path / "out" / "rows.csv").read_bytes()
    assert all(name in written for name in names)


def test_a_fit_refused_before_its_first_step_leaves_no_run_directory(tmp_path, cifar_root, offline_env):
    # torch refuses the learning rate only when the optimizer is built, inside trainer.fit, after
    # Lightning has made the run directory: that directory must not stay behind looking like a run.
    result = run_transfer(
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}", *TINY_IMAGE_BACKBONE,
        "--model.init_args.optimizer.init_args.lr=-1", cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    _clean(result, 2, "learning rate")
    assert not list((tmp_path / "runs").glob("*/version_*"))
