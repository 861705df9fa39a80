"""The two CPU memory layouts side by side: what transfer_cli/memory_format.py chooses between.

    python benchmarks/layouts.py [--models resnet50:32,resnet50:224,...] [--batch 8]

For each torchvision model and image size: milliseconds of one eval forward pass under no_grad in NCHW
(weights and input contiguous) and in channels_last, the median of five alternating rounds after a warm-up
of each, and NCHW's time over channels_last's (below 1: NCHW faster). It also prints what
`memory_format.fastest_on_cpu` picks for the same backbone, so a reading of the table can be checked
against the rule. Run it on a quiet machine; it prints a markdown table.
"""

import argparse
import statistics
import time

import torch
import torchvision

from transfer_cli import memory_format
from transfer_cli.backbones import TorchvisionBackbone

MODELS = "resnet50:32,resnet50:224,resnet18:64,mobilenet_v3_small:64,efficientnet_b0:64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--batch", type=int, default=memory_format.TIMING_BATCH)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} torch threads, batch {args.batch}, torch {torch.__version__}\n")
    print("| model | px | NCHW ms | channels_last ms | NCHW / channels_last | fastest_on_cpu picks |")
    print("|---|---|---|---|---|---|")
    for item in args.models.split(","):
        name, size = item.split(":")
        size = int(size)
        model = torchvision.models.get_model(name, weights=None).eval()
        images = torch.rand(args.batch, 3, size, size)
        layouts = (torch.contiguous_format, torch.channels_last)
        seconds = {layout: [] for layout in layouts}
        with torch.no_grad():
            for layout in layouts:
                model.to(memory_format=layout)(images.contiguous(memory_format=layout))
            for _ in range(5):
                for layout in layouts:
                    model.to(memory_format=layout)
                    start = time.perf_counter()
                    model(images.contiguous(memory_format=layout))
                    seconds[layout].append(time.perf_counter() - start)
        nchw, nhwc = (1000 * statistics.median(seconds[layout]) for layout in layouts)
        backbone = TorchvisionBackbone(name, weights=None, image_size=size)
        picked = memory_format.fastest_on_cpu(backbone, size, args.batch)
        print(
            f"| {name} | {size} | {nchw:.1f} | {nhwc:.1f} | {nchw / nhwc:.2f} | {str(picked).removeprefix('torch.')} |"
        )


if __name__ == "__main__":
    main()
