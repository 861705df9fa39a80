"""A checkpoint never runs code: not through pickle, not through a class or callable it names (at any
depth, as a class_path or as a plain dotted string), not through transformers' remote code (a nested
trust_remote_code, an auto_map, a stored `.py` tokenizer module), whatever the subcommand or strategy.

Every payload here writes a marker file when it runs; each refusal is checked for exit 4, a clean
message, and no marker. Predicting from a pretrained torchvision checkpoint needs no network at all.
"""

import base64
import json
import lzma
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from test_huggingface import make_tiny_bert

from transfer_cli.checkpoint import check_class_paths, install_safe_loaders
from transfer_cli.checkpoint_io import AtomicCheckpointIO
from transfer_cli.errors import CheckpointError

from conftest import TINY_IMAGE_BACKBONE, run_transfer

TESTS = Path(__file__).resolve().parent
CHECKPOINT_BACKBONE = "transfer_cli.backbones.CheckpointBackbone"


# Checkpoints to tamper with: real ones, trained by the real CLI --------------------------------


def _image_fit_args(cifar_root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}",
        "--finetuning.strategy=frozen", *extra,
    ]  # fmt: skip


def _bert_fit_args(glue: Path, model_dir: Path) -> list[str]:
    return [
        "fit", "--config", "bert-mnli", "--config", "debug", f"--data.root={glue}",
        f"--model.init_args.backbone.init_args.model={model_dir}",
    ]  # fmt: skip


def _last(cwd: Path, recipe: str) -> Path:
    return cwd / "runs" / recipe / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory, cifar_root) -> Path:
    cwd = tmp_path_factory.mktemp("image")
    result = run_transfer(*_image_fit_args(cifar_root, *TINY_IMAGE_BACKBONE), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return _last(cwd, "resnet50-cifar10")


@pytest.fixture(scope="module")
def glue(mnli_root) -> Path:
    return mnli_root / "fastnlp_fixture"


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory, glue) -> Path:
    cwd = tmp_path_factory.mktemp("bert")
    model_dir = make_tiny_bert(cwd / "tiny-bert")
    result = run_transfer(*_bert_fit_args(glue, model_dir), cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    shutil.rmtree(model_dir)  # the checkpoint alone must be enough
    return _last(cwd, "bert-mnli")


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture()
def env(tmp_path, marker) -> dict[str, str]:
    """Offline, with an importable module whose import alone writes the marker (what an attacker
    would look for among the installed packages)."""
    modules = tmp_path / "installed"
    modules.mkdir()
    (modules / "evilpayload.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\nclass Backbone:\n    pass\n"
    )
    path = [str(modules), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "TORCH_HOME": str(tmp_path / "torch_home"),
    }


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _nest(checkpoint: dict, source: object) -> dict:
    """The checkpoint's model with its backbone moved under a CheckpointBackbone's `source`, as
    `transfer fit` stores a model trained on another checkpoint's backbone."""
    meta = checkpoint["transfer"]
    meta["model"]["init_args"]["backbone"] = {"class_path": CHECKPOINT_BACKBONE, "init_args": {"checkpoint": None}}
    meta["backbone_offline_init_args"] = {"checkpoint": None, "source": source}
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {
        (f"backbone.encoder.{k[len('backbone.') :]}" if k.startswith("backbone.") else k): v for k, v in state.items()
    }
    return checkpoint


def _stored_backbone(checkpoint: dict) -> dict:
    meta = checkpoint["transfer"]
    stored = meta["model"]["init_args"]["backbone"]
    return {
        "class_path": stored["class_path"],
        "init_args": {**stored["init_args"], **meta["backbone_offline_init_args"]},
    }


def _encode(content: str) -> str:
    return base64.b64encode(lzma.compress(content.encode())).decode("ascii")


def _decode(encoded: str) -> dict:
    return json.loads(lzma.decompress(base64.b64decode(encoded)))


def _save(checkpoint: dict, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


def _assert_refused(result, marker: Path, *fragments: str) -> None:
    assert not marker.exists(), f"the checkpoint ran code (exit {result.returncode})"
    assert result.returncode == 4, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def _every_subcommand(ckpt: Path, cwd: Path, env: dict, fit_args: list[str], predict_input: Path):
    """predict and validate with --ckpt, and fit resuming from it with --ckpt_path."""
    yield run_transfer("predict", "--ckpt", ckpt, "--input", predict_input, cwd=cwd, env=env)
    yield run_transfer("validate", "--ckpt", ckpt, cwd=cwd, env=env)
    yield run_transfer(*fit_args, "--ckpt_path", ckpt, cwd=cwd, env=env)


# The nested form is a real, working checkpoint (so the refusals below are about the payload) ---


def test_a_backbone_nested_under_a_checkpoint_backbone_predicts(tmp_path, image_ckpt, imagefolder_root, env, marker):
    checkpoint = _load(image_ckpt)
    nested = _save(_nest(checkpoint, _stored_backbone(checkpoint)), tmp_path / "nested.ckpt")
    result = run_transfer(
        "predict", "--ckpt", nested, "--input", imagefolder_root / "test" / "cat", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(list((imagefolder_root / "test" / "cat").iterdir()))


# Classes and callables named by a stored string -----------------------------------------------


def _source_as_string(checkpoint: dict) -> dict:
    # A string where a class is expected: jsonargparse imports it as a class_path.
    return _nest(checkpoint, "evilpayload.Backbone")


def _source_nested_as_string(checkpoint: dict) -> dict:
    inner = {"class_path": CHECKPOINT_BACKBONE, "init_args": {"checkpoint": None, "source": "evilpayload.Backbone"}}
    return _nest(checkpoint, inner)


def _source_named_in_a_dict_inside_init_args(checkpoint: dict) -> dict:
    inner = {
        "class_path": CHECKPOINT_BACKBONE,
        "init_args": {"checkpoint": None, "source": {"class_path": "evilpayload.Backbone"}},
    }
    return _nest(checkpoint, inner)


def _class_path_in_a_list(checkpoint: dict) -> dict:
    checkpoint["transfer"]["data"]["init_args"]["class_names"] = [{"class_path": "evilpayload.Backbone"}]
    return checkpoint


def _optimizer_as_string(checkpoint: dict) -> dict:
    checkpoint["transfer"]["model"]["init_args"]["optimizer"] = "evilpayload.Backbone"
    return checkpoint


@pytest.mark.parametrize(
    "tamper",
    [
        _source_as_string,
        _source_nested_as_string,
        _source_named_in_a_dict_inside_init_args,
        _class_path_in_a_list,
        _optimizer_as_string,
    ],
)
def test_a_stored_string_naming_an_untrusted_module_is_refused_before_it_is_imported(
    tmp_path, image_ckpt, cifar_root, imagefolder_root, env, marker, tamper
):
    ckpt = _save(tamper(_load(image_ckpt)), tmp_path / "evil.ckpt")
    fit = _image_fit_args(cifar_root, *TINY_IMAGE_BACKBONE)
    results = _every_subcommand(ckpt, tmp_path, env, fit, imagefolder_root / "test" / "cat")
    for result in results if tamper in (_source_as_string, _source_nested_as_string) else [next(results)]:
        _assert_refused(result, marker, "evilpayload.Backbone", "trusted packages", "evil.ckpt")
    assert not (tmp_path / "runs").exists()


def test_lightning_hyper_parameters_naming_a_class_are_refused(tmp_path, image_ckpt, cifar_root, env, marker):
    # LightningCLI parses a --ckpt_path's hyper_parameters into the model config, `_class_path` and all.
    checkpoint = _load(image_ckpt)
    checkpoint["hyper_parameters"] = {"_class_path": "evilpayload.Backbone"}
    ckpt = _save(checkpoint, tmp_path / "hparams.ckpt")
    fit = _image_fit_args(cifar_root, *TINY_IMAGE_BACKBONE)
    result = run_transfer(*fit, "--ckpt_path", ckpt, cwd=tmp_path, env=env)
    _assert_refused(result, marker, "evilpayload.Backbone", "_class_path")


def test_resuming_last_goes_through_the_safe_loader_too(tmp_path, cifar_root, env, marker, pickled_payload):
    # `last` is resolved after the command line is checked: the trainer's own loader must refuse it.
    last = tmp_path / "runs" / "resnet50-cifar10" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(pickled_payload, last)
    env = {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    result = run_transfer(*_image_fit_args(cifar_root, *TINY_IMAGE_BACKBONE), "--ckpt_path=last", cwd=tmp_path, env=env)
    _assert_refused(result, marker, "last.ckpt", "refused for safety")


def test_the_faults_module_named_as_a_source_is_refused(tmp_path, image_ckpt, imagefolder_root, env, marker):
    ckpt = _save(_nest(_load(image_ckpt), "faults.PoisonAtEpoch"), tmp_path / "faults.ckpt")
    result = run_transfer("predict", "--ckpt", ckpt, "--input", imagefolder_root / "test", cwd=tmp_path, env=env)
    _assert_refused(result, marker, "faults.PoisonAtEpoch")


def test_dotted_strings_that_import_nothing_are_accepted(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    fine = ["runs/x/last.ckpt", "model.ckpt", "org/name", "1e-3", "0.5", "2.6.0", "v2.6", "bert-base-cased", "a b.c"]
    config = {"init_args": {"root": fine, "optimizer": {"class_path": "torch.optim.SGD"}, "x": "transfer_cli.heads"}}
    check_class_paths(config, "ok.ckpt")
    for name in ("os.system", "faults.PoisonAtEpoch", "this.ckpt", "subprocess.run"):
        with pytest.raises(CheckpointError, match="trusted packages"):
            check_class_paths({"init_args": {"deep": [{"value": name}]}}, "bad.ckpt")
    with pytest.raises(CheckpointError, match="trusted packages"):
        check_class_paths({"class_path": "NotAPath"}, "bad.ckpt")  # class_path: only trusted names


# Remote code through transformers ---------------------------------------------------------------


def _hf_source(checkpoint: dict) -> dict:
    source = _stored_backbone(checkpoint)
    source["init_args"]["trust_remote_code"] = True  # nested, where a top-level reset does not reach
    return source


def _tokenizer_module(checkpoint: dict, marker: Path) -> dict:
    source = _hf_source(checkpoint)
    files = source["init_args"]["tokenizer_files"]
    tokenizer_config = _decode(files["tokenizer_config.json"])
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    files["tokenizer_config.json"] = _encode(json.dumps(tokenizer_config))
    files["evil_tokenizer.py"] = _encode(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('tokenizer module ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return _nest(checkpoint, source)


def _model_auto_map(checkpoint: dict, marker: Path) -> dict:
    source = _hf_source(checkpoint)
    code = marker.parent / "model_code"
    code.mkdir()
    (code / "evil_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('model module ran')\n"
        "from transformers import BertModel\n\n\nclass EvilModel(BertModel):\n    pass\n"
    )
    model_config = source["init_args"]["model_config"]
    model_config["auto_map"] = {"AutoModel": "evil_model.EvilModel"}
    model_config["_name_or_path"] = str(code)  # where transformers looks for the module
    return _nest(checkpoint, source)


@pytest.mark.parametrize(
    "tamper", [_tokenizer_module, _model_auto_map], ids=["tokenizer-py-auto_map", "model-auto_map"]
)
def test_remote_code_stored_in_a_checkpoint_never_runs(tmp_path, bert_ckpt, glue, env, marker, tamper):
    ckpt = _save(tamper(_load(bert_ckpt), marker), tmp_path / "remote.ckpt")
    model_dir = make_tiny_bert(tmp_path / "tiny-bert")
    fit = _bert_fit_args(glue, model_dir)
    for result in _every_subcommand(ckpt, tmp_path, env, fit, glue / "dev_matched.tsv"):
        _assert_refused(result, marker, "remote.ckpt", "never runs code")
    assert not (tmp_path / "runs").exists()


def test_trust_remote_code_is_off_at_every_depth_of_a_checkpoint(tmp_path, bert_ckpt, glue, env, marker):
    # No code stored, so the checkpoint is accepted; the flag it carried, nested twice, is not.
    checkpoint = _load(bert_ckpt)
    source = _hf_source(checkpoint)
    nested = {"class_path": CHECKPOINT_BACKBONE, "init_args": {"checkpoint": None, "source": source}}
    ckpt = _save(_nest(_nest(checkpoint, source), nested), tmp_path / "trusting.ckpt")
    from transfer_cli.checkpoint import config_from_checkpoint, read_checkpoint

    config = config_from_checkpoint(read_checkpoint(ckpt), keep_data_root=False)
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(v for k, v in node.items() if k == "trust_remote_code")
            [walk(v) for v in node.values()]

    walk(config)
    assert found == [False]
    result = run_transfer("predict", "--ckpt", ckpt, "--input", glue / "dev_matched.tsv", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr


# Every loader a trainer may use, whatever the strategy --------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture()
def pickled_payload(tmp_path, marker) -> Path:
    # torch.save's own zip format, which every loader (FSDP's lazy one too) accepts as a checkpoint.
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "transfer": _Payload(marker)}, path)
    return path


def test_fit_resuming_from_a_malicious_pickle_exits_4(tmp_path, cifar_root, env, marker, pickled_payload):
    env = {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # an environment cannot switch safety off
    result = run_transfer(
        *_image_fit_args(cifar_root, *TINY_IMAGE_BACKBONE), "--ckpt_path", pickled_payload, cwd=tmp_path, env=env
    )
    _assert_refused(result, marker, "payload.ckpt", "refused for safety")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy, DDPStrategy])
def test_every_strategy_loads_checkpoints_through_the_safe_loader(
    strategy, marker, pickled_payload, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    install_safe_loaders()
    # Set up only as far as each loader needs to reach the file (no process group, a stand-in model).
    instance = strategy.__new__(strategy)
    instance._checkpoint_io = None
    instance._model = torch.nn.Linear(1, 1)
    instance._lightning_module = SimpleNamespace(strict_loading=True)
    instance._optimizers = []
    instance.load_full_weights = False
    instance.broadcast = lambda obj, src=0: obj  # one process
    instance.cluster_environment = None
    try:
        outcome = instance.load_checkpoint(pickled_payload)
    except Exception as err:  # noqa: BLE001 - whatever happened, first: did the payload run?
        outcome = err
    assert not marker.exists(), f"the payload ran ({outcome!r})"
    assert isinstance(outcome, CheckpointError) and "refused for safety" in str(outcome), outcome
    # A sharded checkpoint is a folder of pickles (torch.distributed.checkpoint metadata): refused too.
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        instance.load_checkpoint(sharded)


def test_the_trainers_own_checkpoint_io_loads_safely_and_once(pickled_payload, marker, image_ckpt, monkeypatch):
    install_safe_loaders()
    strategy = DDPStrategy(checkpoint_io=AtomicCheckpointIO())
    with pytest.raises(CheckpointError, match="refused for safety"):
        strategy.load_checkpoint(pickled_payload)
    assert not marker.exists()
    reads = []
    real = AtomicCheckpointIO.load_checkpoint

    def counting(self, *args, **kwargs):
        reads.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", counting)
    assert strategy.load_checkpoint(image_ckpt)["transfer"]["class_names"]
    assert reads == [image_ckpt]


# Item 14b: a pretrained torchvision checkpoint predicts with no cache and no network -------------


SITECUSTOMIZE = """
import os
import socket

_connect = socket.socket.connect


def _refuse(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["SOCKET_LOG"], "a") as log:
            log.write(repr(address) + "\\n")
        raise OSError("network blocked by the test")
    return _connect(self, address, *args)


socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def test_predict_from_default_weights_needs_no_cache_and_no_network(tmp_path, cifar_root, imagefolder_root):
    torch_home = tmp_path / "torch_home"
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cached = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(7)
    fake = torchvision.models.resnet18().state_dict()
    torch.save(fake, cached)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    socket_log = tmp_path / "sockets.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
        "SOCKET_LOG": str(socket_log),
        "TORCH_HOME": str(torch_home),
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    backbone = "--model.init_args.backbone.init_args."
    args = [f"{backbone}name=resnet18", f"{backbone}weights=DEFAULT", f"{backbone}image_size=32"]
    fit = run_transfer(*_image_fit_args(cifar_root, *args), cwd=tmp_path, env=env)
    assert fit.returncode == 0, fit.stderr
    ckpt = _last(tmp_path, "resnet50-cifar10")
    state = _load(ckpt)["state_dict"]
    assert torch.equal(state["backbone.model.conv1.weight"], fake["conv1.weight"])  # DEFAULT came from the file

    shutil.rmtree(torch_home)
    images = imagefolder_root / "test" / "dog"
    predict = run_transfer("predict", "--ckpt", ckpt, "--input", images, cwd=tmp_path, env=env)
    assert predict.returncode == 0, predict.stderr
    rows = [json.loads(line) for line in predict.stdout.splitlines()]
    assert len(rows) == len(list(images.iterdir())) and all(row["label"] for row in rows)
    assert not torch_home.exists()  # nothing looked for, nothing downloaded
    assert not socket_log.exists(), socket_log.read_text()
