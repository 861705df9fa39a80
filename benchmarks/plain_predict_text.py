"""A hand-written predictor for a text checkpoint written by `transfer fit` (a HuggingFace encoder
with a linear head): the baseline for the time to the first predicted row of text.

    python benchmarks/plain_predict_text.py CKPT ROWS.jsonl [--device cpu|cuda]

It rebuilds the encoder from the config stored in the checkpoint and the tokenizer from its stored
files (as `transfer predict` must, never downloading), reads the JSONL rows, tokenizes each batch
padded to its longest row, pools the first token, and streams the same JSON rows batch by batch in
the main process (no Lightning, no DataLoader).
"""

import argparse
import base64
import json
import lzma
import sys
import tempfile
from itertools import islice
from pathlib import Path

import torch
import transformers


def rebuild(offline: dict) -> tuple[torch.nn.Module, object]:
    config = dict(offline["model_config"])
    model_type = config.pop("model_type")
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **config))
    with tempfile.TemporaryDirectory() as tmp:
        for name, encoded in offline["tokenizer_files"].items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(lzma.decompress(base64.b64decode(encoded)))
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    meta = checkpoint["transfer"]
    names = meta["class_names"]
    model, tokenizer = rebuild(meta["backbone_offline_init_args"])
    state = checkpoint["state_dict"]
    model.load_state_dict({k.removeprefix("backbone.model."): v for k, v in state.items() if k.startswith("backbone.")})
    head = torch.nn.Linear(*reversed(state["head.1.weight"].shape))
    head.load_state_dict({"weight": state["head.1.weight"], "bias": state["head.1.bias"]})
    model.to(device).eval()
    head.to(device).eval()
    data = meta["data"]["init_args"]
    batch_size, max_length, columns = data["batch_size"], data["max_length"], data["text_columns"]
    mean = meta["model"]["init_args"]["backbone"]["init_args"].get("pooling") == "mean"

    with open(args.rows, encoding="utf-8") as lines:
        records = (json.loads(line) for line in lines if line.strip())
        while batch := list(islice(records, batch_size)):
            texts = [[record[c] for record in batch] for c in columns]
            encoded = tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                encoded = encoded.to(device)
                hidden = model(**encoded).last_hidden_state
                if mean:
                    weights = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
                else:
                    pooled = hidden[:, 0]  # the first token: the tokenizer pads on the right
                probs = head(pooled).float().softmax(dim=-1).cpu()
            scores, indices = probs.topk(min(args.topk, len(names)), dim=1)
            for record, row_scores, row_indices in zip(batch, scores.tolist(), indices.tolist()):
                topk = [[names[c], round(s, 6)] for c, s in zip(row_indices, row_scores)]
                row = {"input": str(record["id"]), "label": topk[0][0], "score": topk[0][1], "topk": topk}
                sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
