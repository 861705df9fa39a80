"""A hand-written predictor for a ResNet checkpoint written by `transfer fit`: the baseline for the
time to the first predicted row.

    python benchmarks/plain_predict.py CKPT IMAGE_FOLDER [--device cpu|cuda]

It reads the same checkpoint, decodes, resizes and crops images the way the library does (written
out here: importing `transfer_cli.data` would import Lightning), and streams the same JSON rows,
batch by batch, in the main process (no Lightning, no DataLoader workers).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load(path: Path, resize: int, crop: int, interpolation: str) -> torch.Tensor:
    """Decode to RGB, resize the shorter side to `resize`, take the central `crop` square."""
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    height, width = pixels.shape[-2:]
    scale = resize / min(height, width)
    size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
    image = pixels[None].float()
    if size != (height, width):
        image = F.interpolate(image, size=size, mode=interpolation, align_corners=False, antialias=scale < 1)
        image = image.round().clamp(0, 255)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return image[0, :, top : top + crop, left : left + crop]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    meta = checkpoint["transfer"]
    names, p = meta["class_names"], meta["preprocessing"]
    name = meta["model"]["init_args"]["backbone"]["init_args"]["name"]
    model = torchvision.models.get_model(name, weights=None, num_classes=len(names))
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("backbone.model."): v for k, v in state.items() if k.startswith("backbone.model.")}
    weights["fc.weight"], weights["fc.bias"] = state["head.1.weight"], state["head.1.bias"]
    model.load_state_dict(weights)
    # The layout a hand-written script uses: torch's default NCHW on the CPU, channels_last on CUDA.
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device).to(memory_format=layout).eval()
    mean = torch.tensor(p["mean"], device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(p["std"], device=device).view(1, 3, 1, 1) * 255.0
    batch_size = meta["data"]["init_args"]["batch_size"]

    paths = sorted(q for q in Path(args.folder).rglob("*") if q.is_file() and q.suffix.lower() in SUFFIXES)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [load(q, p["resize_size"], p["crop_size"], p["interpolation"]) for q in chunk]
        with torch.inference_mode():
            inputs = (torch.stack(images).to(device) - mean) / std
            probs = model(inputs.contiguous(memory_format=layout)).float().softmax(dim=-1).cpu()
        scores, indices = probs.topk(min(args.topk, len(names)), dim=1)
        for path, row_scores, row_indices in zip(chunk, scores.tolist(), indices.tolist()):
            topk = [[names[c], round(s, 6)] for c, s in zip(row_indices, row_scores)]
            row = {"input": str(path), "label": topk[0][0], "score": topk[0][1], "topk": topk}
            sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
