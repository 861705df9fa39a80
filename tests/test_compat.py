"""Checkpoints written by an earlier `transfer` keep working: the fixtures in tests/fixtures/.

`image-v1.ckpt` and `text-v1.ckpt` were written by `transfer fit` at commit 3bc9c6f (see
tests/fixtures/make_fixtures.py and MANIFEST.json), together with what that code predicted and tested
from them. Users hold checkpoints like these, so later code must predict byte-identical rows and test
the same metrics from them. Never regenerate the fixtures to make this pass.

The class paths stored in the fixtures (model, backbone, head, optimizer, scheduler, datamodule, and
the callbacks' state keys) are asserted as they are today: a rename or move of any of these classes
must keep an alias (or a versioned mapping) so that these names keep resolving.

Inputs are real data from the shared data folder; the fixtures name them (`*.inputs.json`) and the
test copies or derives them into a temporary folder, so the data never enters the repository.
"""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DATA, run_transfer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGE_TEST_DIR = DATA / "cifar10" / "imagefolder_jpg" / "test"
MNLI_ROWS = DATA / "mnli" / "lmbff_kshot_16" / "16-42" / "dev_matched.tsv"
IMAGE_TEST_ARGS = (f"--data.root={DATA / 'cifar10'}", "--trainer.limit_test_batches=4")
TEXT_TEST_ARGS = (f"--data.root={DATA / 'mnli' / 'fastnlp_fixture'}",)
N_INPUTS = 8

# What the fixtures store today; see the module docstring before changing any of these.
STORED_CLASS_PATHS = {
    "image-v1": {
        "transfer_cli.model.TransferModel",
        "transfer_cli.backbones.TorchvisionBackbone",
        "transfer_cli.heads.LinearHead",
        "torch.optim.SGD",
        "transfer_cli.schedules.WarmupDecay",
        "transfer_cli.data.CIFAR10DataModule",
    },
    "text-v1": {
        "transfer_cli.model.TransferModel",
        "transfer_cli.backbones.HuggingFaceBackbone",
        "transfer_cli.heads.LinearHead",
        "torch.optim.AdamW",
        "transfer_cli.schedules.WarmupDecay",
        "transfer_cli.data.MNLIDataModule",
    },
}
# Lightning keys a callback's state by its class name and arguments.
RUN_CHECKPOINT_KEY = (
    "RunCheckpoint{'monitor': 'val_acc', 'mode': 'max', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
    "'train_time_interval': None}"
)
STORED_CALLBACK_KEYS = {"image-v1": {RUN_CHECKPOINT_KEY}, "text-v1": {RUN_CHECKPOINT_KEY}}


def pick_images(root: Path) -> list[str]:
    """The first JPEG of each of the first N_INPUTS classes, as `class/file` under the test folder."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())[:N_INPUTS]
    return [f"{c.name}/{min(f.name for f in c.glob('*.jpg'))}" for c in classes]


def image_inputs(names: list[str], work: Path) -> Path:
    """A folder holding copies of the named real test images (predict reads a folder sorted, recursively)."""
    folder = work / "images"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGE_TEST_DIR / name, folder / name)
    return Path("images")  # relative to the run's cwd, so the rows' "input" does not depend on the machine


def pick_pair_ids() -> list[str]:
    return [row["pairID"] for row in _mnli_rows()][:N_INPUTS]


def text_inputs(pair_ids: list[str], work: Path) -> Path:
    """A GLUE-format TSV of the named real MNLI rows, their lines copied byte for byte, in that order."""
    lines = MNLI_ROWS.read_bytes().splitlines(keepends=True)
    by_id = {line.split(b"\t")[2].decode(): line for line in lines[1:]}
    (work / "rows.tsv").write_bytes(lines[0] + b"".join(by_id[i] for i in pair_ids))
    return Path("rows.tsv")


def _mnli_rows() -> list[dict]:
    with open(MNLI_ROWS, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_metrics(ckpt: Path, args: tuple[str, ...]) -> dict[str, float]:
    """`transfer test --ckpt` in process: its table on stderr rounds to 4 digits, the trainer keeps all."""
    from transfer_cli.cli import TransferCLI

    cli = TransferCLI(args=["test", "--ckpt", str(ckpt), *args])
    return {k: float(v) for k, v in sorted(cli.trainer.callback_metrics.items())}


test_metrics.__test__ = False  # a helper shared with make_fixtures.py, not a test


def stored_names(ckpt: Path) -> tuple[set[str], set[str]]:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    return set(_class_paths(saved["transfer"])), set(saved.get("callbacks", {})) - {"RandomState"}


def _class_paths(value):
    if isinstance(value, dict):
        if isinstance(value.get("class_path"), str):
            yield value["class_path"]
        for item in value.values():
            yield from _class_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _class_paths(item)


FIXTURE_INPUTS = {
    "image-v1": (pick_images, image_inputs, IMAGE_TEST_ARGS),
    "text-v1": (pick_pair_ids, text_inputs, TEXT_TEST_ARGS),
}


@pytest.fixture(params=sorted(FIXTURE_INPUTS))
def fixture_name(request, cifar_root, mnli_root) -> str:
    return request.param


def test_old_checkpoint_predicts_the_same_rows_byte_for_byte(fixture_name, tmp_path, offline_env):
    names = json.loads((FIXTURES / f"{fixture_name}.inputs.json").read_text())
    _, make_input, _ = FIXTURE_INPUTS[fixture_name]
    input_path = make_input(names, tmp_path)
    ckpt = FIXTURES / f"{fixture_name}.ckpt"
    result = run_transfer("predict", "--ckpt", ckpt, "--input", input_path, cwd=tmp_path, env=offline_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (FIXTURES / f"{fixture_name}.predict.jsonl").read_text()
    assert len(result.stdout.splitlines()) == N_INPUTS


def test_old_checkpoint_tests_to_the_same_metrics(fixture_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # test writes no files; if it ever did, not into the repository
    expected = json.loads((FIXTURES / f"{fixture_name}.test.json").read_text())
    _, _, args = FIXTURE_INPUTS[fixture_name]
    got = test_metrics(FIXTURES / f"{fixture_name}.ckpt", args)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), (key, got[key], value)


@pytest.mark.parametrize("name", sorted(STORED_CLASS_PATHS))
def test_class_paths_stored_in_old_checkpoints_are_todays(name):
    class_paths, callback_keys = stored_names(FIXTURES / f"{name}.ckpt")
    assert class_paths == STORED_CLASS_PATHS[name]
    assert callback_keys == STORED_CALLBACK_KEYS[name]


def test_old_text_training_checkpoint_resumes_with_its_optimizer_state(tmp_path, offline_env, mnli_root):
    """`fit --ckpt_path` on a training checkpoint of an earlier version goes on where it stopped.

    text-v1 was written when the BERT pooler's weights were still parameters (now buffers, see
    backbones/huggingface.py): its optimizer's backbone group lists two tensors more than today's.
    """
    from test_huggingface import make_tiny_bert

    tiny = make_tiny_bert(tmp_path / "tiny-bert")  # the same architecture the fixture was written with
    old = torch.load(FIXTURES / "text-v1.ckpt", map_location="cpu", weights_only=True)
    result = run_transfer(
        "fit", "--config=bert-mnli", "--config=debug", f"--data.root={mnli_root / 'fastnlp_fixture'}",
        f"--model.init_args.backbone.init_args.model={tiny}", f"--ckpt_path={FIXTURES / 'text-v1.ckpt'}",
        "--trainer.max_epochs=2", cwd=tmp_path, env=offline_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    new = torch.load(tmp_path / "runs" / "bert-mnli" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert new["epoch"] == old["epoch"] + 1
    steps_taken = new["global_step"] - old["global_step"]
    assert steps_taken > 0
    before, after = old["optimizer_states"][0], new["optimizer_states"][0]
    head, backbone = (len(group["params"]) for group in after["param_groups"])
    assert len(before["param_groups"][1]["params"]) == backbone + 2  # the pooler's weight and bias
    # Every parameter's Adam step count went on from the saved one: the state was resumed, not restarted.
    for position in range(head + backbone):
        assert after["state"][position]["step"] == before["state"][position]["step"] + steps_taken
