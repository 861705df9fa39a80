"""`transfer export`: ONNX, pt2 and safetensors artifacts of tiny trained models, loaded back without
transfer's model classes and compared with predict's own rows on real inputs (CIFAR-10 JPEGs, MNLI)."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_huggingface import make_tiny_bert

from transfer_cli.cli import TransferCLI
from transfer_cli.entry import main

from conftest import REPO, TINY_IMAGE_BACKBONE, skip_unless_ci

try:
    import onnxruntime
except ImportError:  # the export extra; CI installs it with the test extra, so there it must be present
    onnxruntime = None

DEBUG = ("--config", "debug")
PAIR = ("A man is playing a guitar on the stage.", "Someone is making music.")


def _readme_snippet() -> str:
    """The python block of the README's "Deploy" section: the documented code is the tested code."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"## Deploy.*?```python\n(.*?)```", readme, flags=re.S)
    assert found, "README.md lost its Deploy section's python block"
    return found.group(1)


@pytest.fixture(autouse=True)
def _needs_onnxruntime() -> None:
    if onnxruntime is None:
        skip_unless_ci("onnxruntime is not installed (pip install 'transfer-cli[export]')")


def _fit(root: Path, recipe: str, *args: str) -> Path:
    TransferCLI(
        args=[
            "fit",
            "--config",
            recipe,
            *DEBUG,
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            *args,
        ]
    )
    (ckpt,) = root.glob("*/version_*/checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory, imagefolder_root) -> Path:
    return _fit(
        tmp_path_factory.mktemp("image"), "resnet50-cifar10", *TINY_IMAGE_BACKBONE,
        "--data=transfer_cli.data.ImageFolderDataModule", f"--data.root={imagefolder_root}",
        "--data.init_args.num_workers=0",
    )  # fmt: skip


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, mnli_root) -> Path:
    root = tmp_path_factory.mktemp("text")
    tiny = make_tiny_bert(root / "tiny-bert")
    return _fit(
        root, "bert-mnli", f"--data.root={mnli_root / 'fastnlp_fixture'}",
        f"--model.init_args.backbone.init_args.model={tiny}",
    )  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory, imagefolder_root) -> Path:
    """Seven real test JPEGs of different classes (a batch that is neither 1 nor the parity's 8)."""
    folder = tmp_path_factory.mktemp("photos")
    for i, class_dir in enumerate(sorted((imagefolder_root / "test").iterdir())[:7]):
        shutil.copy(sorted(class_dir.glob("*.jpg"))[0], folder / f"{i}-{class_dir.name}.jpg")
    return folder


def _predicted(capsys, ckpt: Path, source: str, stdin: str | None = None, monkeypatch=None) -> dict[str, dict]:
    """predict's own rows, by input."""
    capsys.readouterr()
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    TransferCLI(args=["predict", "--ckpt", str(ckpt), "--input", source, "--trainer.enable_progress_bar=false"])
    return {row["input"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def _export(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _batch(folder: Path) -> tuple[list[str], np.ndarray]:
    from PIL import Image

    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    return paths, np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths])


@pytest.mark.slow
def test_image_onnx_matches_predict_at_batch_1_and_7(tmp_path, capsys, image_ckpt, photos):
    code, out, err = _export(
        capsys, "--ckpt", image_ckpt, "--output", tmp_path / "model.onnx", "--input", photos, "--json"
    )
    assert code == 0, err
    report = json.loads(out)  # stdout holds the report and nothing else
    assert report["passed"] and [c["batch"] for c in report["cases"]] == [1, 7]
    assert all(c["top1_agreement"] == 1.0 and c["max_abs_diff"] <= 1e-4 for c in report["cases"])
    assert "parity (onnx" in err and "exported:" in err

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["class_names"] == torch.load(image_ckpt, weights_only=True)["transfer"]["class_names"]
    assert meta["preprocessing"]["crop_size"] == 32 and "torch" in meta["versions"]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    rows = _predicted(capsys, image_ckpt, str(photos))
    paths, images = _batch(photos)
    one = session.run(["probs"], {"images": images[:1]})[0]
    seven = session.run(["probs"], {"images": images})[0]  # dynamic batch: the same graph at 1 and 7
    np.testing.assert_allclose(one[0], seven[0], atol=1e-5)
    for path, probs in zip(paths, seven):
        row = rows[path]
        assert meta["class_names"][probs.argmax()] == row["label"]
        assert abs(float(probs.max()) - row["score"]) <= 1e-4


@pytest.mark.slow
def test_text_onnx_matches_predict_at_two_lengths_and_the_readme_snippet_runs(
    tmp_path, capsys, monkeypatch, text_ckpt, image_ckpt, photos, mnli_root
):
    dev = mnli_root / "fastnlp_fixture" / "dev_matched.tsv"
    code, _, err = _export(capsys, "--ckpt", text_ckpt, "--output", tmp_path / "bert-mnli.onnx", "--input", dev)
    assert code == 0, err
    assert (
        re.search(r"batch 1, length \d+ .* ok", err) and (tmp_path / "bert-mnli.tokenizer" / "tokenizer.json").is_file()
    )

    session = onnxruntime.InferenceSession(str(tmp_path / "bert-mnli.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    for length in (8, 100):  # dynamic sequence length, and batch
        feed = {i.name: np.ones((3, length), dtype=np.int64) for i in session.get_inputs()}
        assert session.run(["probs"], feed)[0].shape == (3, 3)

    # The README's snippet, run as a user runs it, beside the two exported files and one photo.
    assert _export(capsys, "--ckpt", image_ckpt, "--output", tmp_path / "model.onnx", "--input", photos)[0] == 0
    photo = sorted(photos.glob("*.jpg"))[0]
    shutil.copy(photo, tmp_path / "photo.jpg")
    ran = subprocess.run([sys.executable, "-c", _readme_snippet()], cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    image_row, text_row = map(json.loads, ran.stdout.splitlines())
    predicted_image = _predicted(capsys, image_ckpt, str(photo))[str(photo)]
    predicted_text = _predicted(capsys, text_ckpt, "-", stdin="\t".join(PAIR) + "\n", monkeypatch=monkeypatch)[
        "stdin:1"
    ]
    for got, expected in ((image_row, predicted_image), (text_row, predicted_text)):
        assert got["label"] == expected["label"] and abs(got["score"] - expected["score"]) <= 1e-4


@pytest.mark.slow
def test_pt2_and_safetensors_agree_with_predict(tmp_path, capsys, image_ckpt, photos):
    rows = _predicted(capsys, image_ckpt, str(photos))
    paths, images = _batch(photos)
    classes = torch.load(image_ckpt, weights_only=True)["transfer"]["class_names"]

    assert _export(capsys, "--ckpt", image_ckpt, "--output", tmp_path / "model.pt2", "--input", photos)[0] == 0
    program = torch.export.load(str(tmp_path / "model.pt2")).module()  # torch alone, no transfer classes
    with torch.no_grad():
        probs = program(torch.from_numpy(images))
    assert [classes[i] for i in probs.argmax(-1)] == [rows[p]["label"] for p in paths]
    torch.testing.assert_close(probs.max(-1).values, torch.tensor([rows[p]["score"] for p in paths]), atol=1e-4, rtol=0)

    folder = tmp_path / "weights"
    assert (
        _export(capsys, "--ckpt", image_ckpt, "--output", folder, "--format", "safetensors", "--input", photos)[0] == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())  # plain JSON: no pickle anywhere
    assert config["class_names"] == classes and config["model"]["class_path"] == "transfer_cli.model.TransferModel"
    assert "root" not in config["data"]["init_args"]  # nothing of the training machine
    from safetensors.torch import load_file

    from transfer_cli.export.safetensors import load_source

    assert set(load_file(str(folder / "model.safetensors"))) == set(
        torch.load(image_ckpt, weights_only=True)["state_dict"]
    )
    rebuilt = load_source(folder)
    from transfer_cli.export.deploy import reference

    again = reference(rebuilt, {"images": torch.from_numpy(images)})["probs"]
    torch.testing.assert_close(again, probs, atol=1e-5, rtol=0)


def test_broken_export_fails_parity_with_exit_7_and_keeps_what_was_there(
    tmp_path, capsys, monkeypatch, image_ckpt, photos
):
    final = tmp_path / "model.pt2"
    final.write_text("the previous export")
    monkeypatch.setenv("TRANSFER_TEST_PERTURB_EXPORT", "1")
    code, out, err = _export(capsys, "--ckpt", image_ckpt, "--output", final, "--input", photos, "--json")
    assert code == 7, err
    assert "FAILED" in err and "Export parity failed" in err and "Traceback" not in err
    assert json.loads(out)["passed"] is False
    assert final.read_text() == "the previous export"  # nothing new under the final name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # and no temporary leftovers


def test_bad_requests_exit_with_their_documented_codes(tmp_path, capsys, monkeypatch, image_ckpt):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    (tmp_path / "a_file").write_text("")
    cases = [
        (("--ckpt", image_ckpt, "--output", tmp_path / "m.onnx", "--format", "tflite"), 2, "Unknown --format 'tflite'"),
        (("--ckpt", image_ckpt, "--output", tmp_path / "m.bin"), 2, "Cannot tell the format"),
        (("--ckpt", foreign, "--output", tmp_path / "m.pt2"), 4, "not written by transfer"),
        (("--ckpt", image_ckpt, "--output", tmp_path / "a_file" / "m.pt2"), 6, "Cannot create the folder"),
        (("--ckpt", image_ckpt, "--output", image_ckpt, "--format", "pt2"), 2, "is the --ckpt file"),
        (("--ckpt", image_ckpt), 2, "output"),
        (("--ckpt", image_ckpt, "--output", tmp_path, "--format", "safetensors"), 2, "not an earlier export"),
    ]
    for args, code, words in cases:
        got, out, err = _export(capsys, *args)
        assert (got, out) == (code, ""), (args, err)
        assert words in err and err.startswith("transfer: error:") and "Traceback" not in err, err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the export extra not installed
    got, _, err = _export(capsys, "--ckpt", image_ckpt, "--output", tmp_path / "m.onnx")
    assert got == 2 and "pip install 'transfer-cli[export]'" in err and "onnxruntime" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "foreign.ckpt"]


@pytest.mark.slow
def test_autoencoder_embeddings_and_a_classifier_on_its_encoder_export(tmp_path, capsys, cifar_root, photos):
    encoder_ckpt = _fit(tmp_path / "ae", "autoencoder-cifar10", f"--data.root={cifar_root}")
    code, out, err = _export(
        capsys, "--ckpt", encoder_ckpt, "--output", tmp_path / "encoder.onnx", "--input", photos, "--json"
    )
    assert code == 0, err
    session = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    rows = _predicted(capsys, encoder_ckpt, str(photos))
    paths, images = _batch(photos)
    embeddings = session.run(["embedding"], {"images": images})[0]
    for path, embedding in zip(paths, embeddings):
        np.testing.assert_allclose(embedding, rows[path]["embedding"], atol=1e-4)

    classifier_ckpt = _fit(
        tmp_path / "clf", "autoencoder-classifier-cifar10", f"--data.root={cifar_root}",
        f"--model.init_args.backbone.init_args.checkpoint={encoder_ckpt}",
    )  # fmt: skip
    code, _, err = _export(
        capsys, "--ckpt", classifier_ckpt, "--output", tmp_path / "classifier.onnx", "--input", photos
    )
    assert code == 0, err
    rows = _predicted(capsys, classifier_ckpt, str(photos))
    session = onnxruntime.InferenceSession(str(tmp_path / "classifier.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["probs"], {"images": images})[0]
    classes = torch.load(classifier_ckpt, weights_only=True)["transfer"]["class_names"]
    assert [classes[i] for i in probs.argmax(-1)] == [rows[p]["label"] for p in paths]


@pytest.mark.slow
def test_timm_onnx_matches_predict(tmp_path, capsys, imagefolder_root, photos):
    ckpt = _fit(
        tmp_path, "convnext-imagefolder", f"--data.root={imagefolder_root}", "--data.init_args.num_workers=0",
        "--model.init_args.backbone.init_args.name=resnet10t", "--model.init_args.backbone.init_args.weights=null",
        "--model.init_args.backbone.init_args.image_size=32",
    )  # fmt: skip
    code, _, err = _export(capsys, "--ckpt", ckpt, "--output", tmp_path / "timm.onnx", "--input", photos)
    assert code == 0, err
    rows = _predicted(capsys, ckpt, str(photos))
    paths, images = _batch(photos)
    session = onnxruntime.InferenceSession(str(tmp_path / "timm.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["probs"], {"images": images})[0]
    classes = torch.load(ckpt, weights_only=True)["transfer"]["class_names"]
    assert [classes[i] for i in probs.argmax(-1)] == [rows[p]["label"] for p in paths]
    np.testing.assert_allclose(probs.max(-1), [rows[p]["score"] for p in paths], atol=1e-4)


def test_without_the_training_data_the_check_uses_synthetic_inputs(tmp_path, capsys, mnli_root):
    data = tmp_path / "mnli"
    shutil.copytree(mnli_root / "fastnlp_fixture", data)
    ckpt = _fit(
        tmp_path / "runs", "bert-mnli", f"--data.root={data}",
        f"--model.init_args.backbone.init_args.model={make_tiny_bert(tmp_path / 'tiny-bert')}",
    )  # fmt: skip
    shutil.rmtree(data)  # exported on a machine that never had the training data
    code, out, err = _export(capsys, "--ckpt", ckpt, "--output", tmp_path / "model.pt2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"] == "synthetic inputs" and report["passed"] and len(report["cases"]) >= 2


@pytest.mark.slow
def test_sigterm_mid_export_exits_143_and_leaves_nothing(tmp_path, image_ckpt, photos):
    args = ["export", "--ckpt", image_ckpt, "--output", tmp_path / "out" / "model.onnx", "--input", photos]
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", *map(str, args)], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not list((tmp_path / "out").glob(".model.onnx.*.partial")):  # the export is being written
        assert process.poll() is None and time.monotonic() < deadline, "the export ended before it was staged"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []
