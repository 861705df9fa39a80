"""The sizes each benchmark case runs at: small on CPU, the full sizes of issue 6 on a GPU.

`precision` is added by bench.py: 32-true on CPU, bf16-mixed on CUDA.
"""

from typing import Any


def _train(image_size: int, batch_size: int, warmup: int, steps: int, repeats: int, model: str = "resnet50") -> dict:
    """An image training case; augmentation on, as in the CIFAR-10 recipe."""
    return {
        "model": model,
        "image_size": image_size,
        "batch_size": batch_size,
        "warmup": warmup,
        "steps": steps,
        "repeats": repeats,
        "augment": True,
    }


# bert-base is BertConfig's defaults; on CPU a 4-layer, 256-wide BERT of the same structure.
SMALL_BERT = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # Two CPU cores: a ResNet50 step at 224 px takes seconds, so few steps and small batches.
    "cpu": {
        "resnet50_224": _train(224, batch_size=4, warmup=1, steps=3, repeats=3),
        "resnet50_32": _train(32, batch_size=32, warmup=2, steps=8, repeats=5),
        "bert": {"seq_len": 128, "batch_size": 8, "warmup": 2, "steps": 10, "repeats": 5, **SMALL_BERT},
        "overhead": _train(32, batch_size=32, warmup=20, steps=200, repeats=7),  # a difference of two ~4 ms figures
        "probe": {"model": "resnet50", "image_size": 32, "images": 1024, "batch_size": 64, "epochs": 10, "repeats": 2},
        "startup": {"repeats": 5, "heavy_repeats": 2},
        # The shared JPEGs are 32 px CIFAR-10 images; every epoch resizes them up to the training size.
        # Five epochs: the ratios use the median of epochs 2-5 (an epoch here is a few tenths of a second).
        "decode": {"model": "resnet18", "image_size": 64, "batch_size": 64, "epochs": 5, "workers": None},
        # Issue 16's "small backbone": MobileNetV3-Small (2.5 M parameters, 0.06 GFLOPs at 224 px, torchvision's
        # smallest classifier) at the same 64 px; ResNet18 (1.8 GFLOPs) spends most of a CPU epoch in the model.
        "decode_small": {
            "model": "mobilenet_v3_small",
            "image_size": 64,
            "batch_size": 64,
            "epochs": 5,
            "workers": None,
        },
        "first_row": {"model": "resnet18", "image_size": 32, "source_size": 32, "counts": [1, 1000], "batch_size": 16}
        | {"repeats": 3, "memory_inputs": 10000},
        # A text checkpoint: all-MiniLM-L6-v2 (6 layers, 384 wide) with a linear head, JSONL rows of 6-40 words.
        "first_row_text": {"batch_size": 16, "counts": [1, 1000], "repeats": 3},
    },
    "cuda": {
        "resnet50_224": _train(224, batch_size=256, warmup=10, steps=40, repeats=3),
        "resnet50_32": _train(32, batch_size=256, warmup=10, steps=50, repeats=3),
        "bert": {"seq_len": 128, "batch_size": 64, "warmup": 10, "steps": 50, "repeats": 3},
        "overhead": _train(32, batch_size=256, warmup=20, steps=200, repeats=3),
        "probe": {"model": "resnet50", "image_size": 224, "images": 4096, "batch_size": 256, "epochs": 10}
        | {"repeats": 2},
        "startup": {"repeats": 7, "heavy_repeats": 3},
        # device_decode: also the epochs with data.decode_on=device (nvjpeg), the decoded-once cache on and off.
        "decode": {"model": "resnet18", "image_size": 224, "batch_size": 256, "epochs": 3, "workers": None}
        | {"device_decode": True},
        "decode_small": {"model": "mobilenet_v3_small", "image_size": 224, "batch_size": 256, "epochs": 3}
        | {"workers": None},
        "first_row": {"model": "resnet50", "image_size": 224, "source_size": 32, "counts": [1, 1000], "batch_size": 64}
        | {"repeats": 3, "memory_inputs": 10000},
        "first_row_text": {"batch_size": 64, "counts": [1, 1000], "repeats": 3},
    },
    # A smoke test of the whole script in a couple of minutes; the numbers mean little.
    "quick": {
        "resnet50_224": _train(224, batch_size=2, warmup=1, steps=1, repeats=1),
        "resnet50_32": _train(32, batch_size=8, warmup=1, steps=2, repeats=1),
        "bert": {"seq_len": 32, "batch_size": 4, "warmup": 1, "steps": 2, "repeats": 1, **TINY_BERT},
        "overhead": _train(32, batch_size=8, warmup=5, steps=20, repeats=1),
        "probe": {"model": "resnet50", "image_size": 32, "images": 32, "batch_size": 16, "epochs": 2, "repeats": 1},
        "startup": {"repeats": 2, "heavy_repeats": 1},
        "decode": {"model": "resnet18", "image_size": 32, "batch_size": 32, "epochs": 2, "workers": None}
        | {"device_decode": True},
        "decode_small": {
            "model": "mobilenet_v3_small",
            "image_size": 32,
            "batch_size": 32,
            "epochs": 2,
            "workers": None,
        },
        "first_row": {"model": "resnet18", "image_size": 32, "source_size": 32, "counts": [1, 16], "batch_size": 8}
        | {"repeats": 1, "memory_inputs": 100},
        "first_row_text": {"batch_size": 8, "counts": [1, 16], "repeats": 1},
    },
}
