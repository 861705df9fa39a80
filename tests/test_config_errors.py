"""Config errors name the real cause: the full dotted key, the closest valid name, the class not found,
what a subcommand needs; always exit 2, one paragraph, no traceback, nothing written.

Run as users run it: `python -m transfer_cli` in a subprocess, from a directory of its own.
"""

import os
from pathlib import Path

import pytest

from conftest import TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
BACKBONE = "model.init_args.backbone.init_args"


@pytest.fixture()
def env(offline_env):
    return {**offline_env, "PYTHONPATH": os.pathsep.join([str(TESTS), offline_env.get("PYTHONPATH", "")])}


def _fit(data_root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={data_root}", *extra]


def _assert_config_error(result, *fragments: str, absent: tuple[str, ...] = ()) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])
    # jsonargparse's list of every Union subtype it tried is noise that hid the cause.
    for noise in ("NoneType", "Given value", "Subtypes", *absent):
        assert noise not in result.stderr, (noise, result.stderr[-3000:])


def _yaml(path: Path, dotted: str, value: str) -> Path:
    """A YAML file that sets one dotted key, nested as a user writes it."""
    lines = [f"{'  ' * depth}{key}:" for depth, key in enumerate(dotted.split("."))]
    lines[-1] += f" {value}"
    path.write_text("\n".join(lines) + "\n")
    return path


# 1. An unknown key at any depth: its full dotted path and the closest valid key --------------

UNKNOWN_KEYS = [
    # (dotted key as given, the valid key it should suggest)
    (f"{BACKBONE}.nmae", f"{BACKBONE}.name"),
    ("model.init_args.head.init_args.dropuot", "model.init_args.head.init_args.dropout"),
    ("model.init_args.optimizer.init_args.lrr", "model.init_args.optimizer.init_args.lr"),
    ("model.init_args.lr_scheduler.init_args.warmup_fractoin", "warmup_fraction"),
    ("model.init_args.label_smoothin", "model.init_args.label_smoothing"),
    ("data.init_args.batch_sise", "data.init_args.batch_size"),
    ("trainer.max_epochz", "trainer.max_epochs"),
]


@pytest.mark.parametrize("given,suggested", UNKNOWN_KEYS, ids=[k for k, _ in UNKNOWN_KEYS])
@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_unknown_key_names_its_full_path_and_the_closest_valid_key(tmp_path, cifar_root, env, given, suggested, where):
    extra = [f"--{given}", "1"] if where == "flag" else ["--config", str(_yaml(tmp_path / "t.yaml", given, "1"))]
    result = run_transfer(*_fit(cifar_root, *TINY_IMAGE_BACKBONE, *extra), cwd=tmp_path, env=env)
    _assert_config_error(result, given, "Did you mean", suggested)
    assert not (tmp_path / "runs").exists()


def test_unknown_key_without_a_close_match_lists_the_valid_ones(tmp_path, cifar_root, env):
    result = run_transfer(*_fit(cifar_root, "--data.init_args.zzz", "1"), cwd=tmp_path, env=env)
    _assert_config_error(result, "data.init_args.zzz", "CIFAR10DataModule", "batch_size", "val_fraction")


def test_an_optimizer_key_list_leaves_out_what_the_call_supplies(tmp_path, cifar_root, env):
    """`params` is passed by the model, so offering it as a YAML key would send the user into a new error."""
    result = run_transfer(*_fit(cifar_root, "--model.init_args.optimizer.init_args.qqq", "1"), cwd=tmp_path, env=env)
    _assert_config_error(result, "model.init_args.optimizer.init_args.qqq", "momentum", absent=("params",))


# 2. A class path that does not exist: named, with the closest existing classes -----------------

WRONG_CLASSES = [
    (
        "--model.init_args.backbone",
        "transfer_cli.backbones.TorchvisonBackbone",
        "transfer_cli.backbones.TorchvisionBackbone",
    ),
    ("--data", "transfer_cli.data.ImageFoldrDataModule", "transfer_cli.data.ImageFolderDataModule"),
    ("--model.init_args.optimizer", "torch.optim.Adamm", "torch.optim.Adam"),
    ("--model.init_args.head", "transfer_cli.heads.MLPHaed", "transfer_cli.heads.MLPHead"),
    ("--model.init_args.backbone", "transfer_cli.bacbones.TorchvisionBackbone", "transfer_cli.backbones"),
]


@pytest.mark.parametrize("flag,given,suggested", WRONG_CLASSES, ids=[g for _, g, _ in WRONG_CLASSES])
def test_a_class_that_does_not_exist_is_named_with_the_closest_ones(tmp_path, cifar_root, env, flag, given, suggested):
    result = run_transfer(*_fit(cifar_root, flag, given), cwd=tmp_path, env=env)
    _assert_config_error(result, "Class not found", flag.lstrip("-"), given, f"Did you mean {suggested}")


def test_a_class_without_a_close_match_lists_what_the_module_has(tmp_path, cifar_root, env):
    result = run_transfer(*_fit(cifar_root, "--data", "transfer_cli.data.Nope"), cwd=tmp_path, env=env)
    _assert_config_error(result, "transfer_cli.data.Nope", "CIFAR10DataModule", "ImageFolderDataModule")


# 3. What a subcommand needs, bad trainer names, an unknown subcommand: one clear message, exit 2 ----

MISSING = [
    (["fit", "--config", "debug", "--print_config"], ["data.init_args.batch_size", "overlay", "--config debug"]),
    (["fit"], ["transfer fit needs a recipe", "--config", "resnet50-cifar10"]),
    (["predict"], ["transfer predict needs --ckpt"]),
    (["predict", "--input", "x.jpg"], ["transfer predict needs --ckpt"]),
    (["validate"], ["transfer validate needs --ckpt"]),
    (["test"], ["transfer test needs --ckpt"]),
    (["fitt", "--config", "resnet50-cifar10"], ["unknown subcommand 'fitt'", "transfer fit"]),
]


@pytest.mark.parametrize("args,fragments", MISSING, ids=[" ".join(a) for a, _ in MISSING])
def test_what_is_missing_is_said_in_one_message(tmp_path, env, args, fragments):
    result = run_transfer(*args, cwd=tmp_path, env=env)
    _assert_config_error(result, *fragments, absent=("required", "invalid choice"))
    assert not (tmp_path / "runs").exists()


TRAINER_NAMES = [("accelerator", "tpuu", "tpu"), ("strategy", "ddpp", "ddp")]


@pytest.mark.parametrize("flag,value,suggested", TRAINER_NAMES, ids=[f for f, _, _ in TRAINER_NAMES])
def test_unknown_trainer_names_exit_2_before_any_run_directory(tmp_path, cifar_root, env, flag, value, suggested):
    result = run_transfer(*_fit(cifar_root, *TINY_IMAGE_BACKBONE, f"--trainer.{flag}", value), cwd=tmp_path, env=env)
    _assert_config_error(result, f"trainer.{flag}", repr(value), f"Did you mean {suggested}?", absent=("internal",))
    assert not (tmp_path / "runs").exists()


RANGES = [("batch_size", "-3", "1 or more"), ("batch_size", "0", "1 or more"), ("val_fraction", "1.5", "below 1")]


@pytest.mark.parametrize("key,value,rule", RANGES, ids=[f"{k}={v}" for k, v, _ in RANGES])
def test_out_of_range_data_settings_exit_2_before_any_run_directory(tmp_path, cifar_root, env, key, value, rule):
    args = _fit(cifar_root, *TINY_IMAGE_BACKBONE, f"--data.init_args.{key}", value)
    result = run_transfer(*args, cwd=tmp_path, env=env)
    _assert_config_error(result, f"data.init_args.{key}", value, rule, absent=("internal",))
    assert not (tmp_path / "runs").exists()


# 4. A directory named like a recipe never shadows it -------------------------------------------


def test_a_run_directory_named_like_the_recipe_does_not_shadow_it(tmp_path, cifar_root, env):
    (tmp_path / "resnet50-cifar10" / "version_0").mkdir(parents=True)  # runs saved to `.`
    result = run_transfer(*_fit(cifar_root, "--print_config"), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transfer_cli.backbones.TorchvisionBackbone" in result.stdout


def test_a_directory_that_is_no_recipe_is_called_a_directory(tmp_path, env):
    (tmp_path / "my-experiment").mkdir()
    result = run_transfer("fit", "--config", "my-experiment", cwd=tmp_path, env=env)
    _assert_config_error(result, "my-experiment", "is a directory", "resnet50-cifar10")
