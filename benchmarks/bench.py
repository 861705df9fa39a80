"""One run that measures `transfer` beside a plain hand-written PyTorch loop doing the same work.

    python benchmarks/bench.py [--device auto|cpu|cuda] [--out benchmarks/results.json] [--quick] [--record]

Training cases run in a fresh worker process each (so one case's memory does not count in the
next), with the transfer side and the plain side interleaved inside it; CLI cases run the real
`transfer` executable. Everything is offline: random weights, synthetic data of the real shapes.
On CPU the sizes are small; with CUDA they are the full sizes in bf16 mixed precision.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from machine import OthersLoad, wait_for_quiet
from sizes import SIZES  # a sibling module: this script's folder is first on sys.path

HERE = Path(__file__).resolve().parent

CASES = list(SIZES["cpu"])
WORKER_CASES = ("resnet50_224", "resnet50_32", "bert", "overhead", "probe", "decode", "decode_small")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON results file.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test, not a measurement.")
    parser.add_argument("--record", action="store_true", help="Write this run into benchmarks/RESULTS.md.")
    parser.add_argument("--only", default=",".join(CASES), help=f"Comma-separated subset of: {', '.join(CASES)}.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in the training workers (default: torch's own choice, one per core).",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="Before each case, wait up to this long for other processes to leave the CPU mostly idle.",
    )
    parser.add_argument("--note", action="append", default=[], help="A line to add to the RESULTS.md section.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


# Worker: one training case in this process ---------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    from common import WARNINGS_TO_SILENCE

    for message in WARNINGS_TO_SILENCE:
        warnings.filterwarnings("ignore", message=message)
    import torch

    from transfer_cli.allocator import keep_freed_memory

    # As a CPU fit does (transfer_cli/cpu_fit.py), here from the start and for both sides: the ratios
    # compare the loops, not where glibc happened to put their memory.
    malloc_tuned = keep_freed_memory()
    spec, device = json.loads(args.spec), torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "bert":
        from text import train_case
    elif args.worker == "probe":
        from probe import probe_case as train_case
    elif args.worker == "overhead":
        from overhead import overhead_case as train_case
    elif args.worker in ("decode", "decode_small"):
        from bench_decode import measure as train_case
    else:
        from images import train_case
    result = train_case(spec, device)
    result["torch_threads"] = torch.get_num_threads()
    result["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    result["malloc_tuned"] = malloc_tuned
    args.result.write_text(json.dumps(result))


def run_worker(name: str, spec: dict[str, Any], device: str, threads: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        command = [sys.executable, __file__, "--worker", name, "--device", device, "--spec", json.dumps(spec)]
        command += ["--threads", str(threads)] if threads else []
        with open(log, "wb") as out:
            code = subprocess.run([*command, "--result", str(result)], stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0 or not result.exists():
            raise RuntimeError(f"worker {name} exited {code}:\n{log.read_text(errors='replace')[-4000:]}")
        return json.loads(result.read_text())


# Orchestrator --------------------------------------------------------------------------------


def device_info(device: str, threads: int | None) -> dict[str, Any]:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    cores = os.cpu_count()
    cpu_text = f"{cpu}, {cores} cores; torch threads in the training workers: {threads or torch.get_num_threads()}"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return {"type": "cuda", "name": name, "detail": f"{name} ({memory:.0f} GiB); host {cpu_text}"}
    return {"type": "cpu", "name": f"CPU {cpu} ({cores} cores)", "detail": cpu_text}


def versions() -> dict[str, str]:
    packages = ("torch", "torchvision", "lightning", "transformers", "transfer-cli")
    return {"python": platform.python_version(), **{name: version(name) for name in packages}}


def shown_command(argv: list[str]) -> str:
    """The command as run, with the text of each --note (shown on a line of its own) left out."""
    shown = []
    for arg in argv:
        note_text = shown and shown[-1] == "--note"
        shown.append("TEXT" if note_text else "--note=TEXT" if arg.startswith("--note=") else arg)
    return shlex.join(["python", "benchmarks/bench.py", *shown])


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    sizes = SIZES["quick" if args.quick else device]
    mode = "quick" if args.quick else device
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    selected = [name for name in args.only.split(",") if name]
    unknown = set(selected) - set(CASES)
    if unknown:
        sys.exit(f"--only: unknown cases {sorted(unknown)}; choose from {CASES}")
    for name in WORKER_CASES:
        sizes[name]["precision"] = precision
    results: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shown_command(sys.argv[1:]),
        "mode": mode,
        "threads": args.threads,
        "device": device_info(device, args.threads),
        "versions": versions(),
        "memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "the peak resident set (VmHWM)",
        "sizes": {name: sizes[name] for name in selected},
        "load_average": {"before": os.getloadavg()[0]},
        "cases": {},
        "errors": {},
    }
    # A cache folder of the run's own: transfer's kept choices (the CPU layout of each backbone) start empty,
    # as on a fresh machine; the first transfer run of a model times the layouts, later ones read the choice.
    cache = tempfile.TemporaryDirectory(prefix="transfer-bench-cache-")
    os.environ["TRANSFER_CACHE_DIR"] = cache.name
    start = time.perf_counter()
    for i, name in enumerate(selected, 1):
        waited = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
        print(f"[{i}/{len(selected)}] {name} ...", file=sys.stderr, flush=True)
        case_start, others = time.perf_counter(), OthersLoad().start()
        try:
            if name in WORKER_CASES:
                results["cases"][name] = run_worker(name, sizes[name], device, args.threads)
            elif name == "startup":
                from startup import startup_case

                results["cases"][name] = startup_case(sizes[name])
            elif name == "first_row_text":
                from startup_text import text_first_row_case

                results["cases"][name] = text_first_row_case(sizes[name], device)
            else:
                from startup import first_row_case

                results["cases"][name] = first_row_case(sizes[name], device)
        except Exception as err:  # report the others; a failed case is named in the output
            results["errors"][name] = str(err)
            print(f"    {name} failed: {err}", file=sys.stderr)
        busy = others.stop()
        if name in results["cases"]:
            case = results["cases"][name]
            case.update(wall_s=time.perf_counter() - case_start, others_cpu=busy, waited_s=waited)
        print(
            f"    done in {time.perf_counter() - case_start:.0f} s; others used {busy:.0%} of the CPU", file=sys.stderr
        )
    results["wall_s"] = time.perf_counter() - start
    results["load_average"]["after"] = os.getloadavg()[0]

    from report import print_table, record

    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    if args.record:
        notes = list(args.note)
        if mode == "cpu":
            notes.append("CPU sizes (see `sizes` in results.json); a GPU run uses the full sizes in bf16-mixed.")
        notes += [f"{name} failed: {message}" for name, message in results["errors"].items()]
        print(f"recorded: {record(results, notes)}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
