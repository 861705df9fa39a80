"""Where `transfer`'s per-step and per-epoch host time goes: cProfile over the benchmark's own cases.

    python benchmarks/profile_step.py [overhead|probe_cached|probe] [--top 40] [--sort tottime]

`overhead` runs the per-step overhead case (one linear layer, 32 px, batch 32) through the library,
`probe_cached` the frozen linear probe with the feature cache (10 epochs, validation each), `probe`
the same without the cache. The run is profiled after one unprofiled warm-up run (imports, first
allocations), and the table printed is the top of the profile, by own time (`tottime`) or including
callees (`cumulative`). The plain loop's profile (`--plain`) is the floor to compare against.

`--time N` profiles nothing: it runs the case N times, the library and the plain loop interleaved,
and prints their CPU milliseconds per step (overhead) or CPU seconds per run (probes): CPU time of
this process moves much less than wall time when other processes share the cores. Compare two
checkouts by running it under each:
`PYTHONPATH=/path/to/checkout python benchmarks/profile_step.py probe_cached --time 5`.
"""

import argparse
import cProfile
import pstats
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WARNINGS_TO_SILENCE  # noqa: E402
from sizes import SIZES  # noqa: E402


def run(case: str, plain: bool) -> None:
    import torch

    device = torch.device("cpu")
    if case == "overhead":
        import images
        import overhead

        spec = {**SIZES["cpu"]["overhead"], "model": "resnet50", "precision": "32-true"}
        if plain:
            images.plain_train(spec, device, build=overhead._plain)
        else:
            images.tool_train(spec, device, build=overhead._tool)
        return
    import probe

    spec = {**SIZES["cpu"]["probe"], "precision": "32-true"}
    cached = case == "probe_cached"
    if plain:
        probe.plain_probe(spec, device, cached=cached)
    else:
        probe.tool_probe(spec, device, cache=cached)


def time_case(case: str, repeats: int) -> None:
    import statistics

    import images
    import overhead
    import probe
    import torch

    import transfer_cli

    device = torch.device("cpu")
    if case == "overhead":
        spec = {**SIZES["cpu"]["overhead"], "model": "resnet50", "precision": "32-true"}
        unit, scale = "CPU ms/step", 1000 * spec["batch_size"]
        sides = {
            "transfer": lambda: scale / images.tool_train(spec, device, build=overhead._tool)["throughput_cpu"],
            "plain": lambda: scale / images.plain_train(spec, device, build=overhead._plain)["throughput_cpu"],
        }
    else:
        spec, cached = {**SIZES["cpu"]["probe"], "precision": "32-true"}, case == "probe_cached"
        unit = "CPU s/run"
        sides = {
            "transfer": lambda: probe.tool_probe(spec, device, cache=cached)["seconds_cpu"],
            "plain": lambda: probe.plain_probe(spec, device, cached=cached)["seconds_cpu"],
        }
    results: dict[str, list[float]] = {"transfer": [], "plain": []}
    for _ in range(repeats):
        for name, side in sides.items():
            results[name].append(side())
    extra = [t - p for t, p in zip(results["transfer"], results["plain"], strict=True)]
    print(f"{case}: transfer_cli from {Path(transfer_cli.__file__).parent}")
    for name, values in {**results, "transfer - plain": extra}.items():
        runs = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:>16}: median {statistics.median(values):.3f} {unit}  (runs: {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", default="overhead", choices=["overhead", "probe_cached", "probe"])
    parser.add_argument("--plain", action="store_true", help="Profile the plain loop instead of the library.")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier numbers).")
    parser.add_argument("--time", type=int, metavar="N", help="Time the case N times instead.")
    parser.add_argument("--save", type=Path, help="Also write the raw profile here (for snakeviz and the like).")
    args = parser.parse_args()
    for message in WARNINGS_TO_SILENCE:
        warnings.filterwarnings("ignore", message=message)
    import torch

    torch.set_num_threads(args.threads)
    if args.time:
        return time_case(args.case, args.time)
    run(args.case, args.plain)  # warm-up: imports, first allocations, lazy initialisation
    profiler = cProfile.Profile()
    profiler.enable()
    run(args.case, args.plain)
    profiler.disable()
    if args.save:
        profiler.dump_stats(args.save)
    pstats.Stats(profiler).strip_dirs().sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
