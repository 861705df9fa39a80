"""Evaluation reports: every figure checked against hand computation, the pictures, the report
directory through the real CLI (agreeing with `transfer predict`), and the training curves."""

import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from transfer_cli.autoencoder import ConvEncoder
from transfer_cli.model import TransferModel
from transfer_cli.report.metrics import summarize
from transfer_cli.report.plots import calibration_png, confusion_matrix_png, curves_png
from transfer_cli.report.run_summary import read_metrics
from transfer_cli.report.states import EvaluationStates, Mistakes

from conftest import TINY_IMAGE_BACKBONE, run_transfer

CLASSES = ["a", "b", "c"]
# Six examples, three classes; confidences kept off the bin edges (multiples of 1/15).
PROBS = [
    [0.70, 0.20, 0.10],  # a -> a, bin 10
    [0.20, 0.50, 0.30],  # a -> b, bin 7
    [0.11, 0.79, 0.10],  # b -> b, bin 11
    [0.61, 0.29, 0.10],  # b -> a, bin 9
    [0.11, 0.10, 0.79],  # c -> c, bin 11
    [0.29, 0.61, 0.10],  # c -> b, bin 9
]
LABELS = [0, 0, 1, 1, 2, 2]


def _figures(probs, labels, class_names) -> dict:
    probs, labels = torch.tensor(probs), torch.tensor(labels)
    states = EvaluationStates(len(class_names))
    losses = -probs.gather(1, labels[:, None]).squeeze(1).log()
    states.update(probs, labels, losses)
    return summarize(states.compute(), class_names)


def test_every_figure_equals_hand_computation():
    figures = _figures(PROBS, LABELS, CLASSES)
    assert figures["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]  # rows: true, columns: predicted
    assert figures["num_examples"] == 6 and figures["accuracy"] == pytest.approx(3 / 6)
    per_class = {row["class"]: row for row in figures["per_class"]}
    expected = {"a": (1 / 2, 1 / 2, 1 / 2), "b": (1 / 3, 1 / 2, 2 / 5), "c": (1.0, 1 / 2, 2 / 3)}
    for name, (precision, recall, f1) in expected.items():
        assert per_class[name]["precision"] == pytest.approx(precision)
        assert per_class[name]["recall"] == pytest.approx(recall)
        assert per_class[name]["f1"] == pytest.approx(f1)
        assert per_class[name]["support"] == 2
    assert figures["macro_precision"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert figures["macro_recall"] == pytest.approx(1 / 2)
    assert figures["macro_f1"] == pytest.approx((1 / 2 + 2 / 5 + 2 / 3) / 3)
    true_probs = [0.7, 0.2, 0.79, 0.29, 0.79, 0.10]
    assert figures["loss"] == pytest.approx(sum(-math.log(p) for p in true_probs) / 6)
    # Bins: {0.70 right}, {0.50 wrong}, {0.79 right, 0.79 right}, {0.61 wrong, 0.61 wrong}.
    assert figures["ece"] == pytest.approx((0.30 + 0.50 + abs(2 - 1.58) + 1.22) / 6)
    assert figures["top5_accuracy"] is None  # three classes: top-5 would always be 1
    assert figures["calibration"]["count"][9] == 2 and figures["calibration"]["accuracy"][11] == 1.0


def test_ece_of_a_calibrated_and_of_an_overconfident_model():
    calibrated = _figures([[0.7, 0.3]] * 10, [0] * 7 + [1] * 3, ["x", "y"])  # 70% sure, right 7 times in 10
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-6)  # float32 probabilities
    overconfident = _figures([[0.95, 0.05]] * 10, [0] * 6 + [1] * 4, ["x", "y"])  # 95% sure, right 6 in 10
    assert overconfident["ece"] == pytest.approx(0.95 - 0.6)


def test_figures_agree_with_torchmetrics_on_many_classes():
    generator = torch.Generator().manual_seed(0)
    n, c = 500, 12
    logits = torch.randn(n, c, generator=generator) * 2
    labels = torch.randint(0, c, (n,), generator=generator)
    labels[:50] = logits[:50].argmax(dim=1)  # some right answers
    figures = _figures(logits.softmax(dim=1).tolist(), labels.tolist(), [f"k{i}" for i in range(c)])
    kw = {"num_classes": c}
    assert figures["confusion_matrix"] == MulticlassConfusionMatrix(**kw)(logits, labels).tolist()
    assert figures["accuracy"] == pytest.approx(float(MulticlassAccuracy(**kw, average="micro")(logits, labels)))
    top5 = MulticlassAccuracy(**kw, average="micro", top_k=5)(logits, labels)
    assert figures["top5_accuracy"] == pytest.approx(float(top5))
    for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score)):
        assert figures[f"macro_{name}"] == pytest.approx(float(metric(**kw, average="macro")(logits, labels)))
        per_class = metric(**kw, average="none")(logits, labels).tolist()
        assert [row[name] for row in figures["per_class"]] == pytest.approx(per_class)
    ece = MulticlassCalibrationError(**kw, n_bins=15, norm="l1")(logits, labels)
    assert figures["ece"] == pytest.approx(float(ece), abs=1e-6)
    assert figures["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_mistakes_keep_the_most_confident_wrong_predictions_with_their_ids():
    mistakes = Mistakes(keep=2)
    mistakes.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 0, 1]), ["p0", "p1", "p2"])
    mistakes.update(torch.tensor([[0.05, 0.95], [0.99, 0.01]]), torch.tensor([0, 0]), torch.tensor([30, 31]))
    rows = mistakes.rows(["x", "y"])
    assert [row["input"] for row in rows] == [30, "p1"]  # 0.95 and 0.8; right answers are never kept
    assert rows[0] == {
        "input": 30,
        "true": "x",
        "predicted": "y",
        "score": pytest.approx(0.95),
        "true_score": pytest.approx(0.05),
    }


def test_padding_of_a_distributed_sampler_is_counted_once():
    """DistributedSampler pads each process's share with examples from the start; each example counts once."""
    n, world = 7, 3
    labels = torch.arange(n) % 2
    dataset = [{"index": i} for i in range(n)]
    confusion_total, seen = 0, []
    for rank in range(world):
        model = TransferModel(ConvEncoder(num_features=4, width=4), class_names=["x", "y"])
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler)
        model._start_report(loader)
        for batch in loader:
            index = batch["index"]
            logits = torch.nn.functional.one_hot(1 - labels[index], 2).float()  # always wrong, so all are kept
            model._update_report({"ids": index}, logits, labels[index])
        confusion_total += int(model.report_states.compute()["confusion"].sum())
        seen += [row["input"] for row in model.mistakes.rows(["x", "y"])]
    assert confusion_total == n and sorted(seen) == list(range(n))


def _decoded(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_pictures_are_real_images_that_change_with_the_figures(tmp_path):
    one, other = _figures(PROBS, LABELS, CLASSES), _figures(PROBS, [0, 1, 1, 0, 2, 2], CLASSES)
    for name, figures in (("one", one), ("other", other)):
        confusion_matrix_png(tmp_path / f"cm-{name}.png", figures["confusion_matrix"], CLASSES)
        calibration_png(tmp_path / f"cal-{name}.png", figures["calibration"], figures["ece"])
    for kind, size in (("cm", (1100, 560)), ("cal", (600, 700))):
        first, second = _decoded(tmp_path / f"{kind}-one.png"), _decoded(tmp_path / f"{kind}-other.png")
        assert first.size == second.size == size
        assert len(set(first.convert("L").getdata())) > 10  # drawn, not a blank canvas
        assert first.tobytes() != second.tobytes()
    names = [f"class_{i:03d}" for i in range(100)]
    confusion_matrix_png(tmp_path / "cm-100.png", torch.eye(100, dtype=torch.long).tolist(), names)
    assert _decoded(tmp_path / "cm-100.png").size == (4500, 2260)  # a heat map; tick labels still fit


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


def test_a_resumed_run_draws_one_curve_over_all_its_epochs(tmp_path):
    # Lightning's CSV layout: per-step rows, per-epoch rows; the first segment was kept by runs.keep_metrics.
    header = "epoch,lr-backbone,lr-head,step,train_acc,train_loss_epoch,train_loss_step,val_acc,val_loss"
    _write_csv(
        tmp_path / "metrics-segment1.csv",
        header,
        [",0.01,0.01,0,,,,,", "0,,,1,,,,0.2,2.0", "0,,,1,0.1,2.2,,,", ",0.009,0.009,2,,,,,", "1,,,3,,,,0.3,1.8"],
    )  # interrupted after epoch 1's validation, before its training row
    _write_csv(
        tmp_path / "metrics.csv",
        header,
        ["1,,,3,0.2,2.0,,,", ",0.008,0.008,4,,,,,", "2,,,5,,,,0.4,1.6", "2,,,5,0.3,1.9,,,"],
    )
    epochs, rates = read_metrics(tmp_path)
    assert [e for e, _ in epochs["val_acc"]] == [0, 1, 2] and [e for e, _ in epochs["train_acc"]] == [0, 1, 2]
    assert [s for s, _ in rates["head"]] == [0, 2, 4]
    curves_png(tmp_path / "curves.png", epochs, rates, unfreeze_at=1)
    assert _decoded(tmp_path / "curves.png").size == (1500, 450)


# The same report from every recipe, in-process --------------------------------------------------


def _evaluate(model: TransferModel, datamodule: L.LightningDataModule) -> dict:
    datamodule.connect(model.backbone)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return model.evaluation


@pytest.fixture(scope="module")
def image_subset(tmp_path_factory, imagefolder_root) -> Path:
    """Two test images per class of the real JPEG subset, linked, so test and predict see the same 20."""
    root = tmp_path_factory.mktemp("subset")
    for folder in sorted((imagefolder_root / "test").iterdir()):
        (root / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            os.symlink(image, root / "test" / folder.name / image.name)
    return root


def test_image_text_and_autoencoder_classifier_reports_have_the_same_keys(tmp_path, image_subset):
    from test_huggingface import make_tiny_bert

    from transfer_cli.backbones import HuggingFaceBackbone
    from transfer_cli.data import ImageFolderDataModule, TextClassificationDataModule

    names = sorted(p.name for p in (image_subset / "test").iterdir())
    # The autoencoder classifier's architecture: a linear head on ConvEncoder (CheckpointBackbone holds one).
    image = _evaluate(
        TransferModel(ConvEncoder(), class_names=names),
        ImageFolderDataModule(str(image_subset), class_names=names, batch_size=8),
    )
    rows = ["text,label"] + [f"{w} is here,{'pos' if i % 2 else 'neg'}" for i, w in enumerate("abcdefghij")]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    text = _evaluate(
        TransferModel(HuggingFaceBackbone(str(make_tiny_bert(tmp_path / "bert"))), class_names=["neg", "pos"]),
        TextClassificationDataModule(str(tmp_path), batch_size=4),
    )
    assert image["metrics"].keys() == text["metrics"].keys()
    assert image["metrics"]["num_examples"] == 20 and text["metrics"]["num_examples"] == 10
    assert image["errors"] and text["errors"]
    assert all(Path(row["input"]).parent.parent == image_subset / "test" for row in image["errors"])
    assert all(row["input"].startswith(str(tmp_path / "test.csv") + ":") for row in text["errors"])


# The CLI: `transfer test --report`, agreeing with `transfer predict` ---------------------------------


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, cifar_root) -> Path:
    """A tiny model fitted on the real CIFAR-10 subset: terminated (SIGTERM) at the end of its first epoch,
    which leaves curves already, then resumed for a second."""
    cwd = tmp_path_factory.mktemp("fit")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    common = ["fit", "--config", "resnet50-cifar10", "--config", "debug", f"--data.root={cifar_root}"]
    common += [*TINY_IMAGE_BACKBONE, "--trainer.log_every_n_steps=1", "--trainer.max_epochs=2"]
    run = cwd / "runs" / "resnet50-cifar10" / "version_0"
    terminated = run_transfer(*common, "--trainer.callbacks+=faults.SignalAtEpochEnd", cwd=cwd, env=env)
    assert terminated.returncode == 143, terminated.stderr
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True
    assert _decoded(run / "curves.png").size == (1500, 450)
    resumed = run_transfer(*common, "--ckpt_path=last", cwd=cwd, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"curves: {Path('runs/resnet50-cifar10/version_0/curves.png')}" in resumed.stderr
    return run


@pytest.mark.slow
def test_fit_leaves_curves_and_summary_over_both_segments(resumed_run):
    summary = json.loads((resumed_run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4 and not summary["interrupted"]
    assert summary["examples_seen"] == 32  # 2 epochs x 2 batches x 8, counted across the resume
    assert summary["last"]["epoch"] == 1 and "val_acc" in summary["best"]
    assert Path(resumed_run.parent.parent.parent / summary["checkpoints"]["last"]).is_file()
    epochs, rates = read_metrics(resumed_run)
    assert [e for e, _ in epochs["val_loss"]] == [0, 1] and len(rates["head"]) == 4
    assert _decoded(resumed_run / "curves.png").size == (1500, 450)


@pytest.mark.slow
def test_report_directory_agrees_with_predict(tmp_path, resumed_run, image_subset):
    ckpt = resumed_run / "checkpoints" / "last.ckpt"
    data = ["--data=transfer_cli.data.ImageFolderDataModule", f"--data.root={image_subset}"]
    tested = run_transfer("test", "--ckpt", ckpt, *data, "--report", tmp_path / "r", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert tested.stdout == "" and "test_acc" in tested.stderr and "worst" in tested.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
        ["metrics.json", "per_class.csv", "confusion_matrix.png", "calibration.png", "errors.jsonl"]
    )
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    predicted = run_transfer("predict", "--ckpt", ckpt, "--input", image_subset / "test", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    rows = {row["input"]: row for row in map(json.loads, predicted.stdout.splitlines())}
    right = sum(Path(path).parent.name == row["label"] for path, row in rows.items())
    assert metrics["num_examples"] == len(rows) == 20 and metrics["accuracy"] == pytest.approx(right / 20)
    assert metrics["checkpoint"] == str(ckpt.resolve()) and metrics["split"] == "test"
    assert metrics["data"]["class_path"] == "transfer_cli.data.ImageFolderDataModule"
    errors = [json.loads(line) for line in (tmp_path / "r" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 20 - right
    for error in errors:  # the image, its folder's class, and the prediction predict makes
        assert error["true"] == Path(error["input"]).parent.name != error["predicted"]
        assert rows[error["input"]]["label"] == error["predicted"]
        assert rows[error["input"]]["score"] == pytest.approx(error["score"], abs=1e-4)
    assert [e["score"] for e in errors] == sorted((e["score"] for e in errors), reverse=True)

    piped = run_transfer("test", "--ckpt", ckpt, *data, "--report", "-", cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == metrics


@pytest.mark.slow
def test_a_non_empty_report_directory_is_refused_before_evaluating(tmp_path, resumed_run):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    refused = run_transfer(
        "test", "--ckpt", resumed_run / "checkpoints" / "last.ckpt", "--report", tmp_path / "r", cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stderr
    assert "not empty" in refused.stderr and "Traceback" not in refused.stderr and "test batch" not in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and os.listdir(tmp_path / "r") == ["notes.txt"]
