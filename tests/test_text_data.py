"""Text data: GLUE MNLI parsing on the real files, your own CSV/TSV/JSONL, tokenization and batches."""

import csv
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
from test_huggingface import make_tiny_bert

from transfer_cli.backbones import HuggingFaceBackbone, TorchvisionBackbone
from transfer_cli.data import CIFAR10DataModule, MNLIDataModule, TextClassificationDataModule
from transfer_cli.data import mnli as mnli_module
from transfer_cli.data import text as text_module
from transfer_cli.errors import ConfigError, DataError

LABELS = ["entailment", "neutral", "contradiction"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> HuggingFaceBackbone:
    return HuggingFaceBackbone(str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))))


@pytest.fixture()
def glue(mnli_root) -> Path:
    return mnli_root / "fastnlp_fixture"


def _mnli_dir(tmp_path: Path, train: Path, dev: Path, mismatched: Path | None = None) -> Path:
    """An MNLI-layout directory of symlinks to the real files (nothing copied)."""
    root = tmp_path / "mnli"
    root.mkdir()
    (root / "train.tsv").symlink_to(train)
    (root / "dev_matched.tsv").symlink_to(dev)
    if mismatched is not None:
        (root / "dev_mismatched.tsv").symlink_to(mismatched)
    return root


def _altered_copy(source: Path, target: Path, labels: dict[int, str]) -> Path:
    """A copy of a GLUE file with the gold labels of some data rows (0-based) replaced."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    for row, label in labels.items():
        fields = lines[row + 1].rstrip("\n").split("\t")
        fields[-1] = label
        lines[row + 1] = "\t".join(fields) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(lines), encoding="utf-8")
    return target


def _labels(rows) -> list[str]:
    return [LABELS[i] for i in rows.labels]


# GLUE MNLI on the real files ------------------------------------------------------------------


def test_glue_train_and_dev_headers_are_read_by_name(glue):
    data = MNLIDataModule(root=str(glue))
    assert data.class_names == LABELS
    train, val, test = (data.split_rows(split) for split in ("train", "val", "test"))
    assert len(train.texts) == 6 and len(val.texts) == 5 and len(test.texts) == 5  # 12 and 16 columns
    assert train.texts[0] == (
        "Conceptually cream skimming has two basic dimensions - product and geography.",
        "Product and geography are what make cream skimming work. ",
    )
    assert sorted(_labels(train)) == sorted(["neutral"] * 2 + ["entailment"] * 3 + ["contradiction"])
    assert val.texts[0] == ("The new rights are nice enough", "Everyone really likes the newest benefits ")
    assert _labels(val).count("contradiction") == 3 and _labels(val)[0] == "neutral"
    assert train.ids[0] == f"{glue / 'train.tsv'}:2"


def test_quotes_are_literal_text_as_in_glue(mnli_root, tmp_path):
    kshot = mnli_root / "lmbff_kshot_16" / "16-42"
    data = MNLIDataModule(root=str(_mnli_dir(tmp_path, kshot / "train.tsv", kshot / "dev_matched.tsv")))
    val = data.split_rows("val")
    assert len(val.texts) == 48  # a quote opening a field would swallow following lines if parsed as quoting
    premises = [premise for premise, _ in val.texts]
    assert (
        ' "Interesting material," he commented, as if only the technical nature'
        in premises[next(i for i, p in enumerate(premises) if "Interesting material" in p)]
    )
    assert any(h == 'We are trying to "go green" by keeping our bags.' for _, h in val.texts)


def test_dash_labels_are_dropped_and_counted(glue, tmp_path, capsys):
    root = tmp_path / "mnli"
    _altered_copy(glue / "train.tsv", root / "train.tsv", {1: "-", 4: "-"})
    train = MNLIDataModule(root=str(root)).split_rows("train")
    assert len(train.texts) == 4
    assert "dropped 2 rows without a gold label" in capsys.readouterr().err


def test_unknown_label_fails_with_file_and_line(glue, tmp_path):
    root = tmp_path / "mnli"
    _altered_copy(glue / "dev_matched.tsv", root / "dev_matched.tsv", {2: "maybe"})
    with pytest.raises(DataError, match=r"dev_matched\.tsv:4: unknown label 'maybe'"):
        MNLIDataModule(root=str(root)).split_rows("val")


def test_missing_data_names_the_directory_and_the_way_out(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}.*--data\.download true"):
        MNLIDataModule(root=str(tmp_path)).prepare_data()


def test_download_failure_is_a_data_error_naming_the_directory(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnli_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=rf"Could not download MNLI.*{tmp_path}"):
        MNLIDataModule(root=str(tmp_path), download=True).prepare_data()


def test_download_unpacks_the_glue_archive(glue, tmp_path, monkeypatch):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
            zipped.write(glue / name, f"MNLI/{name}")
    monkeypatch.setattr(mnli_module.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.getvalue()))
    data = MNLIDataModule(root=str(tmp_path / "glue"), download=True)
    data.prepare_data()
    assert data.data_dir == tmp_path / "glue" / "MNLI"
    assert len(data.split_rows("train").texts) == 6


def test_predicting_without_root_never_touches_training_data(tiny, glue, monkeypatch):
    monkeypatch.setattr(MNLIDataModule, "split_rows", lambda self, split: pytest.fail("read training data"))
    data = MNLIDataModule(root=None, class_names=LABELS, predict_input=str(glue / "dev_matched.tsv"))
    data.connect(tiny)
    data.setup("predict")
    batches = list(data.predict_dataloader())
    ids = [i for batch in batches for i in batch["ids"]]
    with open(glue / "dev_matched.tsv", encoding="utf-8") as f:
        expected = [row["pairID"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert ids == expected  # the file's pairIDs, in input order


# Tokenization and batches ---------------------------------------------------------------------


def test_each_split_is_tokenized_once_not_every_epoch(tiny, glue, monkeypatch):
    calls = []
    real = text_module.tokenize
    monkeypatch.setattr(text_module, "tokenize", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    data = MNLIDataModule(root=str(glue), batch_size=4, max_length=32)
    data.connect(tiny)
    for _ in range(2):  # as Lightning and the CLI both call setup
        data.setup("fit")
    for _epoch in range(3):
        for _ in data.train_dataloader():
            pass
        for _ in data.val_dataloader():
            pass
    assert calls == ["train", "val"]


def test_batches_are_padded_to_their_longest_example(tiny, tmp_path):
    rows = [("a", "x"), ("it is a cat", "y"), ("no", "x"), ("the end of it all is near", "y")]
    with open(tmp_path / "test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    data = TextClassificationDataModule(root=str(tmp_path), class_names=["x", "y"], batch_size=2)
    data.connect(tiny)
    data.setup("test")
    batches = list(data.test_dataloader())  # in file order
    lengths = [len(tiny.tokenizer(text)["input_ids"]) for text, _ in rows]
    assert [b["inputs"]["input_ids"].shape[1] for b in batches] == [max(lengths[:2]), max(lengths[2:])]
    inputs = batches[0]["inputs"]
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"}
    assert inputs["attention_mask"].sum(dim=1).tolist() == lengths[:2]
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == tiny.tokenizer.pad_token_id).all()
    assert batches[0]["labels"].tolist() == [0, 1]


def test_truncation_is_counted_exactly_and_reported(tiny, capsys):
    # "a a a" is [CLS] a a a [SEP]: 5 tokens, which fits max_length 5; one more word does not.
    rows = text_module.Rows(texts=[("a a a",), ("a a a a",), ("a",)], labels=[0, 1, 0], ids=["1", "2", "3"])
    dataset = text_module.tokenize(tiny.tokenizer, rows, 5, "train")
    assert "train: 3 examples, 1 truncated to max_length 5" in capsys.readouterr().err
    assert [len(dataset[i]["features"]["input_ids"]) for i in range(3)] == [5, 5, 3]


def test_mnli_pairs_are_truncated_at_max_length(tiny, glue, capsys):
    data = MNLIDataModule(root=str(glue), max_length=16)
    data.connect(tiny)
    data.setup("fit")
    assert "train: 6 examples, 6 truncated to max_length 16" in capsys.readouterr().err
    assert all(b["inputs"]["input_ids"].shape[1] <= 16 for b in data.train_dataloader())


def test_max_length_beyond_the_model_is_a_config_error(tiny, glue):
    with pytest.raises(ConfigError, match="max_length 512"):
        MNLIDataModule(root=str(glue), max_length=512).connect(tiny)  # the tiny model takes 128


def test_text_data_and_image_backbones_do_not_mix(tiny, glue):
    with pytest.raises(ConfigError, match="expects images"):
        MNLIDataModule(root=str(glue)).connect(TorchvisionBackbone("resnet18", weights=None))
    with pytest.raises(ConfigError, match="Pair image data with an image backbone"):
        CIFAR10DataModule(class_names=["a", "b"]).connect(tiny)


# Your own text files ----------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_quoting_and_class_names_from_the_data(tmp_path):
    _write(tmp_path / "train.csv", 'id,text,label\nr1,"Hello, world",pos\nr2,"two\nlines",neg\nr3,fine,pos\n')
    data = TextClassificationDataModule(root=str(tmp_path))
    assert data.class_names == ["neg", "pos"]  # sorted
    rows = data.with_label_indices(*data.read_labeled(tmp_path / "train.csv"))
    assert rows.texts == [("Hello, world",), ("two\nlines",), ("fine",)]
    assert rows.labels == [1, 0, 1]
    assert rows.ids[2] == f"{tmp_path / 'train.csv'}:5"  # a quoted field spans lines 3-4


def test_jsonl_pairs_with_given_class_names_and_val_file(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 2} for i in range(6)]
    _write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write(tmp_path / "val.jsonl", json.dumps(rows[0]) + "\n\n")
    data = TextClassificationDataModule(
        root=str(tmp_path), text_columns=("premise", "hypothesis"), class_names=["1", "0"]
    )
    assert data.class_names == ["1", "0"]  # given: authoritative, in the given order
    train, val = data.split_rows("train"), data.split_rows("val")
    assert len(train.texts) == 6 and train.texts[1] == ("p1", "h1") and train.labels[:2] == [1, 0]
    assert len(val.texts) == 1


def test_without_a_val_file_a_seeded_fraction_is_held_out(tmp_path):
    _write(tmp_path / "train.tsv", "text\tlabel\n" + "".join(f"t{i}\t{'ab'[i % 2]}\n" for i in range(20)))
    data = TextClassificationDataModule(root=str(tmp_path), val_fraction=0.25, seed=3)
    train, val = data.split_rows("train"), data.split_rows("val")
    assert (len(train.texts), len(val.texts)) == (15, 5)
    assert not set(train.texts) & set(val.texts)
    assert data.split_rows("val").texts == val.texts  # the same split every time


def test_empty_text_and_unknown_label_name_file_and_line(tmp_path):
    _write(tmp_path / "a" / "train.csv", "text,label\nok,x\n ,y\n")
    with pytest.raises(DataError, match=r"train\.csv:3: the 'text' text is empty"):
        TextClassificationDataModule(root=str(tmp_path / "a"))
    _write(tmp_path / "b" / "train.jsonl", '{"text": "ok", "label": "x"}\n{"text": "fine", "label": "z"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: unknown label 'z'"):
        TextClassificationDataModule(root=str(tmp_path / "b"), class_names=["x", "y"]).split_rows("train")


def test_missing_column_and_missing_files_are_data_errors(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\nhello\tx\nbye\ty\n")
    with pytest.raises(DataError, match="no 'text' column"):
        TextClassificationDataModule(root=str(tmp_path))
    with pytest.raises(DataError, match="No train.csv, train.tsv or train.jsonl"):
        TextClassificationDataModule(root=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="no test.csv"):
        TextClassificationDataModule(root=str(tmp_path), text_columns=("sentence",)).split_rows("test")


# Predict input ---------------------------------------------------------------------------------


def test_stdin_pairs_keep_their_order_and_lines(tiny, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('A man eats.\tSomeone eats.\n\nIt is "so".\tIt is.\n'))
    data = MNLIDataModule(class_names=LABELS, predict_input="-")
    data.connect(tiny)
    rows = [row for batch in data.predict_rows() for row in batch]  # batches, read as needed
    assert rows == [("stdin:1", ("A man eats.", "Someone eats."), None), ("stdin:3", ('It is "so".', "It is."), None)]


def test_stdin_line_without_a_tab_fails_for_pairs_but_is_one_text_for_single_sentences(tiny, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("premise\thypothesis\njust one sentence\n"))
    # The bad line keeps its place with its error; the writer stops there or writes an error row.
    [[_, (where, texts, error)]] = list(MNLIDataModule(class_names=LABELS, predict_input="-").predict_rows())
    assert where == "stdin:2" and texts == ("", "") and "stdin:2: expected sentence1<TAB>sentence2" in error
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\tb\n"))
    single = TextClassificationDataModule(class_names=["x", "y"], predict_input="-")
    assert list(single.predict_rows()) == [[("stdin:1", ("a\tb",), None)]]


def test_predict_file_without_an_id_column_names_rows_by_file_and_line(tiny, tmp_path):
    path = _write(tmp_path / "in.csv", "text\nfirst\nsecond\n")
    data = TextClassificationDataModule(class_names=["x", "y"], predict_input=str(path))
    data.connect(tiny)
    batch = next(iter(data.predict_dataloader()))
    assert batch["ids"] == [f"{path}:2", f"{path}:3"] and "labels" not in batch


def test_predict_input_errors(tmp_path):
    data = TextClassificationDataModule(class_names=["x", "y"], predict_input=str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="Input not found"):
        next(data.predict_rows())
    bad = _write(tmp_path / "in.txt", "hello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        next(TextClassificationDataModule(class_names=["x", "y"], predict_input=str(bad)).predict_rows())


def test_length_grouped_batches_cover_every_example_once_with_little_padding():
    import numpy as np
    import torch

    from transfer_cli.data.text import LengthGroupedBatches

    torch.manual_seed(0)
    lengths = np.random.default_rng(0).integers(5, 128, size=1000)
    batches = list(LengthGroupedBatches(lengths, batch_size=32, window=10))
    assert sorted(i for b in batches for i in b) == list(range(1000)) and len(batches) == 32
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = torch.randperm(1000).split(32)
    padded_random = sum(len(b) * lengths[b.numpy()].max() for b in random_batches)
    assert padded < 0.7 * padded_random  # far less padding than plain shuffling
    assert list(LengthGroupedBatches(lengths, 32)) != batches  # a new order every epoch
