"""Start-up: what a `transfer` process imports before its first row, and `VERB --help` from its cache."""

import json
import subprocess
import sys
from pathlib import Path

from test_compat import image_inputs

from transfer_cli import help_cache

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Imported by torchmetrics' optional metrics or by other backbones' modules, and torch._dynamo by
# Lightning and torchvision for names that only matter once something is compiled; an image
# checkpoint's predict needs none of them (about 5 s of a 9 s start-up before, benchmarks/RESULTS.md).
NOT_NEEDED_FOR_IMAGES = {"transformers", "timm", "matplotlib", "scipy.signal", "torch._dynamo"}

PROBE = """
import json, sys
from transfer_cli.entry import main
code = main(sys.argv[1:])
from torchmetrics.utilities import imports
print(json.dumps({
    "code": code,
    # held back while torchmetrics imports, only: a metric built afterwards sees what is installed
    "transformers_available": bool(imports._TRANSFORMERS_AVAILABLE),
    "torchvision_available": bool(imports._TORCHVISION_AVAILABLE),
    # every class defined (a short name such as `--data MNLIDataModule` resolves only to a defined
    # subclass), though their heavy packages were not imported
    "classes_defined": all(name in sys.modules for name in (
        "transfer_cli.data.mnli", "transfer_cli.data.text_files", "transfer_cli.backbones.huggingface",
        "transfer_cli.backbones.timm",
    )),
}), file=sys.stderr)
"""


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_an_image_predict_imports_no_text_plot_or_signal_package_and_predicts_as_before(
    tmp_path, cifar_root, offline_env
):
    names = json.loads((FIXTURES / "image-v1.inputs.json").read_text())
    folder = image_inputs(names, tmp_path)
    args = ["predict", "--ckpt", str(FIXTURES / "image-v1.ckpt"), "--input", str(folder)]
    done = _run(["-c", PROBE, *args], tmp_path, offline_env)
    imported = _imported(done.stderr)
    assert {"torch", "lightning"} <= imported, done.stderr[-2000:]
    assert not imported & NOT_NEEDED_FOR_IMAGES, sorted(imported & NOT_NEEDED_FOR_IMAGES)
    report = json.loads(next(line for line in done.stderr.splitlines() if line.startswith('{"code"')))
    assert report == {
        "code": 0,
        "transformers_available": True,
        "torchvision_available": True,
        "classes_defined": True,
    }
    assert done.stdout == (FIXTURES / "image-v1.predict.jsonl").read_text()


def test_verb_help_comes_from_the_cache_without_torch_and_reads_as_built(tmp_path, offline_env):
    env = {**offline_env, "TRANSFER_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "100"}
    built = _run(["-m", "transfer_cli", "predict", "--help"], tmp_path, env)
    assert built.returncode == 0 and "--ckpt" in built.stdout and "--trainer.accelerator" in built.stdout
    assert "torch" in _imported(built.stderr)
    cached = _run(["-m", "transfer_cli", "predict", "--help"], tmp_path, env)
    assert cached.returncode == 0
    assert cached.stdout == built.stdout
    assert "torch" not in _imported(cached.stderr)


def test_the_help_cache_key_follows_versions_sources_and_width(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path))
    first = help_cache._entry(["fit", "--help"])
    assert first is not None and first.parent == tmp_path / "help"
    assert help_cache._entry(["fit", "-h"]) == first
    assert help_cache._entry(["predict", "--help"]) != first
    stamp = help_cache._source_stamp()
    assert any(name == "help_cache.py" for name, _, _ in stamp)
    monkeypatch.setattr(help_cache, "_source_stamp", lambda: (*stamp, ("new.py", 1, 1)))
    assert help_cache._entry(["fit", "--help"]) != first
    monkeypatch.undo()
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(help_cache, "_versions", lambda: ("lightning==0.0",))
    assert help_cache._entry(["fit", "--help"]) != first
    monkeypatch.undo()
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(help_cache, "_width", lambda: help_cache.shutil.get_terminal_size().columns + 1)
    assert help_cache._entry(["fit", "--help"]) != first  # argparse wraps to the width
    monkeypatch.setenv("TRANSFER_HELP_CACHE", "0")
    assert help_cache._entry(["fit", "--help"]) is None
    assert help_cache.is_plain_help(["fit", "--help"]) and not help_cache.is_plain_help(["fit", "-c", "x", "--help"])


def test_a_damaged_cache_entry_is_built_again(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path))
    entry = help_cache._entry(["fit", "--help"])
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"\xff\xfe not text")

    def build() -> int:
        print("the help")
        return 0

    assert help_cache.cached_help(["fit", "--help"], build) == 0
    assert capsys.readouterr().out == "the help\n"
    assert entry.read_text() == "the help\n"
    assert help_cache.cached_help(["fit", "--help"], lambda: 1 / 0) == 0  # served, not built
    assert capsys.readouterr().out == "the help\n"
