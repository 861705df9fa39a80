"""Turn the measured cases into table rows, target checks, a printed table and a RESULTS.md section."""

import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Written by `python benchmarks/bench.py --record` (see benchmarks/README.md): one section per device
and mode, replaced when the same device and mode are measured again. Ratios are transfer / plain
loop for throughput (higher is better) and transfer / baseline for times (lower is better).
"""
COLUMNS = [
    "benchmark",
    "setting",
    "transfer",
    "baseline",
    "ratio",
    "ratio by CPU time",
    "peak mem transfer / baseline",
    "others' CPU use",
]

# The image-folder decode cases (bench_decode.py): ResNet18, and a genuinely small backbone.
DECODE_CASES = ("decode", "decode_small")
# Issue 16's target names "a small backbone"; ResNet18 spends most of a CPU epoch in the model, so its
# rows are shown without a verdict.
DECODE_TARGET = "decode_small"


def reading(side: dict[str, Any]) -> str:
    """How a decode case's side read the folder: worker processes, or threads in the main process
    (transfer_cli/data/images.py ThreadDecoded, for a model on the CPU)."""
    if side["workers"] == 0 and side.get("threads"):
        return f"decoded on {side['threads']} threads in the main process"
    return f"{side['workers']} loader workers"


# (case, what one input is called, the baseline script)
FIRST_ROW_CASES = (("first_row", "image", "plain_predict.py"), ("first_row_text", "text", "plain_predict_text.py"))


def _mem(side: dict[str, Any] | None) -> str:
    return "—" if side is None or "memory" not in side else f"{side['memory']['peak_mb']:,.0f} MB"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per measurement: what the tool did, what the baseline did, their ratios, peak memory."""
    cases, sizes, out = results["cases"], results["sizes"], []
    cpu = results["device"]["type"] == "cpu"

    def row(name: str, key: str, transfer: str, baseline: str, ratio: str, ratio_cpu: str, memory: str) -> None:
        others = f"{cases[key]['others_cpu']:.0%}" if "others_cpu" in cases[key] else "—"
        out.append(
            [name, _setting(key, sizes[key]), transfer, baseline, ratio, ratio_cpu if cpu else "—", memory, others]
        )

    for key in ("resnet50_224", "resnet50_32", "bert"):
        if key in cases:
            case = cases[key]
            t, p = case["sides"]["transfer"], case["sides"]["plain"]
            row(
                "BERT train step" if key == "bert" else "ResNet50 train step",
                key,
                _rate(t["throughput"], case["unit"]),
                _rate(p["throughput"], case["unit"]) + " (plain loop)",
                f"{case['ratio']:.3f}",
                f"{case['ratio_cpu']:.3f}",
                f"{_mem(t)} / {_mem(p)}",
            )
    if "overhead" in cases:
        case = cases["overhead"]
        t, p = case["sides"]["transfer"], case["sides"]["plain"]
        extra = t["ms_per_step"] - p["ms_per_step"]
        row(
            "Per-step host overhead",
            "overhead",
            f"{t['ms_per_step']:.2f} ms/step ({t['cpu_ms_per_step']:.2f} CPU ms), {extra:+.2f} ms",
            f"{p['ms_per_step']:.2f} ms/step ({p['cpu_ms_per_step']:.2f} CPU ms) (plain loop)",
            f"{case['ratio']:.3f}",
            f"{case['ratio_cpu']:.3f}",
            f"{_mem(t)} / {_mem(p)}",
        )
    if "probe" in cases:
        case = cases["probe"]
        t, p, c = (case["sides"][k] for k in ("transfer", "plain", "plain_cached"))

        def timed(side: dict[str, Any]) -> str:
            return f"{side['seconds']:.1f} s ({_rate(side['throughput'], 'images/s')})"

        row(
            "Linear probe, frozen, no feature cache",
            "probe",
            timed(t) + " (cache_features false)",
            timed(p) + " (plain loop)",
            f"{case['ratio']:.3f}",
            f"{case['ratio_cpu']:.3f}",
            f"{_mem(t)} / {_mem(p)}",
        )
        tc = case["sides"].get("transfer_cached")
        speedups = f"caching speedup: plain {case['plain_caching_speedup']:.1f}x"
        if tc is None:
            transfer, ratio, ratio_cpu = "n/a: transfer has no feature cache", "—", "—"
        else:
            transfer = f"{timed(tc)}; caching speedup {case['transfer_caching_speedup']:.1f}x"
            ratio, ratio_cpu = f"{case['cached_ratio']:.3f}", f"{case['cached_ratio_cpu']:.3f}"
        row(
            "Linear probe, frozen, feature cache",
            "probe",
            transfer,
            f"{timed(c)} (plain loop, cached); {speedups}",
            ratio,
            ratio_cpu,
            f"{_mem(tc)} / {_mem(c)}",
        )
        floor = case["sides"].get("lightning_cached")
        if floor is not None and tc is not None:
            # The smallest LightningModule on the plain loop's cached features (probe.lightning_probe).
            row(
                "Linear probe, frozen, feature cache: Lightning's floor",
                "probe",
                f"{timed(tc)}; {case['cached_over_lightning']:.3f} of the floor",
                f"{timed(floor)} (minimal LightningModule on the plain loop's cached features), "
                f"{case['lightning_cached_ratio']:.3f} of the plain cached loop",
                f"{case['cached_over_lightning']:.3f}",
                "—",
                f"{_mem(tc)} / {_mem(floor)}",
            )
    for decode_key in [k for k in DECODE_CASES if k in cases]:
        case = cases[decode_key]
        t, p = case["sides"]["transfer"], case["sides"]["plain"]

        def epochs(values: list[float]) -> str:
            return " / ".join(f"{v:.2f}" for v in values)

        for label, key, ratio_key, plain_key in (
            ("with forward", "epoch_s", "epoch1_over_epoch2", "plain_over_epoch2"),
            ("data only", "data_s", "data_epoch1_over_epoch2", "data_plain_over_epoch2"),
        ):
            row(
                f"Image folder epochs, decoded once ({label})",
                decode_key,
                f"epochs {epochs(t[key])} s ({reading(t)})",
                f"epochs {epochs(p[key])} s (plain loop, PIL every epoch, {reading(p)})"
                + "".join(
                    f"; {reading(o)}: epochs {epochs(o[key])} s (slower)"
                    for name, o in case["sides"].items()
                    if name.startswith("plain_") and name.endswith("_workers")
                ),
                f"epoch 1 / epochs 2+ {case[ratio_key]:.2f}x; plain / epochs 2+ {case[plain_key]:.2f}x",
                "—",
                "—",
            )
        for cache in ("on", "off"):  # data.decode_on=device (bench_decode: spec device_decode)
            d = case["sides"].get(f"device_cache_{cache}")
            if d is not None:
                row(
                    f"Image folder epochs, JPEGs decoded on the device, cache {cache} (with forward)",
                    decode_key,
                    f"epochs {epochs(d['epoch_s'])} s (data only {epochs(d['data_s'])} s)",
                    f"epochs {epochs(t['epoch_s'])} s ({reading(t)})",
                    f"workers / device, epoch 1 {t['epoch_s'][0] / d['epoch_s'][0]:.2f}x, "
                    f"epoch 2 {t['epoch_s'][1] / d['epoch_s'][1]:.2f}x",
                    "—",
                    "—",
                )
    if "startup" in cases:
        s = cases["startup"]["sides"]
        baseline = f"{s['import_torch']['seconds']:.3f} s (`python -c 'import torch'`)"
        ratio = f"{cases['startup']['ratio']:.3f}"
        row("CLI start-up", "startup", f"{s['transfer_help']['seconds']:.3f} s", baseline, ratio, "—", "—")
        built = s.get("transfer_fit_help_built")
        cold = f"; built without the cache {built['seconds']:.2f} s" if built else ""
        out.append(
            ["CLI start-up", "`transfer fit --help`, median", f"{s['transfer_fit_help']['seconds']:.2f} s{cold}"]
        )
        out[-1] += ["—"] * (len(COLUMNS) - len(out[-1]))
    for key, unit, script in FIRST_ROW_CASES:
        if key not in cases:
            continue
        case = cases[key]
        for count, measured in case.get("counts", {"": case}).items():
            t, p = measured["sides"]["transfer"], measured["sides"]["plain"]
            total_ratio = f"; all rows {measured['total_ratio']:.3f}" if "total_ratio" in measured else ""
            out.append(
                [
                    "Time to first predicted row" + (f", {count} {unit}{'s' * (count != '1')}" if count else ""),
                    _setting(key, results["sizes"][key]),
                    f"{t['first_row_s']:.2f} s (all rows {t['total_s']:.2f} s)",
                    f"{p['first_row_s']:.2f} s (all rows {p['total_s']:.2f} s) ({script})",
                    f"first row {measured['ratio']:.3f}{total_ratio}",
                    "—",
                    "—",
                    f"{case['others_cpu']:.0%}" if "others_cpu" in case else "—",
                ]
            )
        if "memory" in case:
            peaks = case["memory"]["peak_rss_mb"]
            (small, a), (large, b) = sorted(peaks.items(), key=lambda kv: int(kv[0]))
            out.append(
                [
                    "Predict peak memory (stdin list)",
                    f"{int(large):,} vs {int(small):,} inputs",
                    f"{b:,.0f} MB",
                    f"{a:,.0f} MB ({int(small):,} inputs)",
                    f"growth {case['memory']['growth']:+.1%}",
                    "—",
                    "—",
                    "—",
                ]
            )
    return out


def _setting(key: str, spec: dict[str, Any]) -> str:
    precision = spec.get("precision", "")
    if key.startswith("resnet50"):
        aug = ", augment" if spec["augment"] else ""
        return f"{spec['image_size']} px, batch {spec['batch_size']}, {precision}{aug}, {spec['steps']} timed steps"
    if key == "bert":
        shape = "bert-base" if "num_hidden_layers" not in spec else _small_bert(spec)
        return f"{shape}, len {spec['seq_len']}, batch {spec['batch_size']}, {precision}, {spec['steps']} timed steps"
    if key == "overhead":
        return f"one linear layer, {spec['image_size']} px, batch {spec['batch_size']}, {spec['steps']} timed steps"
    if key == "probe":
        return (
            f"{spec['model']} {spec['image_size']} px, {spec['images']} images, batch {spec['batch_size']}, "
            f"{spec['epochs']} epochs + validation on {max(1, spec['images'] // 8)}, {precision}"
        )
    if key == "first_row":
        return f"{spec['model']} {spec['image_size']} px PNGs, batch {spec['batch_size']}"
    if key == "first_row_text":
        return f"all-MiniLM-L6-v2 + linear head, JSONL rows of 6-40 words, batch {spec['batch_size']}"
    if key == "startup":
        return f"`transfer --help`, median of {spec['repeats']}"
    if key in DECODE_CASES:
        return f"{spec['model']} {spec['image_size']} px, the shared JPEG folder (train), batch {spec['batch_size']}"
    return ""


def _small_bert(spec: dict[str, Any]) -> str:
    return f"BERT {spec['num_hidden_layers']} layers / {spec['hidden_size']} hidden (small, CPU)"


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of issue 6 that this device can check."""
    cases, gpu, out = results["cases"], results["device"]["type"] == "cuda", []

    def ratio(key: str, floor: float) -> None:
        if key in cases:
            case = cases[key]
            measured = f"{case['ratio']:.3f}" + ("" if gpu else f" (by CPU time {case['ratio_cpu']:.3f})")
            out.append((f"{key}: ratio >= {floor}", measured, case["ratio"] >= floor))

    def rate(key: str, floor: float) -> None:
        if key in cases:
            value = cases[key]["sides"]["transfer"]["throughput"]
            out.append((f"{key}: >= {floor:,.0f} {cases[key]['unit']}", f"{value:,.0f}", value >= floor))

    if gpu:
        rate("resnet50_224", 3000)
        ratio("resnet50_224", 0.95)
        rate("bert", 2500)
    else:
        for key in ("resnet50_224", "resnet50_32", "bert"):
            ratio(key, 0.97)
    if "probe" in cases:
        speedup, target = (
            cases["probe"]["transfer_caching_speedup"],
            "probe: transfer with caching >= 8x faster than without",
        )
        if speedup is None:
            out.append((target, "not implemented in transfer", None))
        else:
            out.append((target, f"{speedup:.1f}x", speedup >= 8))
    if "startup" in cases:
        s = cases["startup"]["sides"]["transfer_help"]["seconds"]
        out.append(("`transfer --help` < 0.5 s", f"{s:.3f} s", s < 0.5))
        out.append(
            (
                "`transfer --help` < 1/4 of `import torch`",
                f"{cases['startup']['ratio']:.3f}",
                cases["startup"]["ratio"] < 0.25,
            )
        )
    if "probe" in cases:  # issue 16's small-step targets
        probe = cases["probe"]
        out.append(("probe without the cache: ratio >= 0.97", f"{probe['ratio']:.3f}", probe["ratio"] >= 0.97))
        if probe.get("cached_ratio") is not None:
            cached = probe["cached_ratio"]
            out.append(
                ("probe with the cache: ratio >= 0.95 of the plain cached loop", f"{cached:.3f}", cached >= 0.95)
            )
    if "overhead" in cases:
        sides = cases["overhead"]["sides"]
        extra = sides["transfer"]["ms_per_step"] - sides["plain"]["ms_per_step"]
        out.append(("per-step host overhead < 1 ms", f"{extra:+.2f} ms", extra < 1))
    for decode_key in [k for k in DECODE_CASES if k in cases]:
        d = cases[decode_key]
        model = f"{d['spec']['model']} {d['spec']['image_size']} px"
        for label, first, plain in (
            ("with forward", d["epoch1_over_epoch2"], d["plain_over_epoch2"]),
            ("data only", d["data_epoch1_over_epoch2"], d["data_plain_over_epoch2"]),
        ):
            what = f"image folder ({model}), {label}"
            if decode_key != DECODE_TARGET:
                what += " (for information: not the small backbone of the target)"
            target = decode_key == DECODE_TARGET
            out.append(
                (f"{what}: epochs 2+ >= 2x faster than epoch 1", f"{first:.2f}x", first >= 2 if target else None)
            )
            out.append(
                (f"{what}: epochs 2+ >= 2x faster than the plain loop", f"{plain:.2f}x", plain >= 2 if target else None)
            )
    if "startup" in cases and "transfer_fit_help" in cases["startup"]["sides"]:
        s = cases["startup"]["sides"]["transfer_fit_help"]["seconds"]
        out.append(("`transfer fit --help` < 2 s", f"{s:.2f} s", s < 2))
    for key, unit, _ in FIRST_ROW_CASES:
        for count, measured in cases.get(key, {}).get("counts", {}).items():
            worst = max(measured["ratio"], measured["total_ratio"])
            what = f"predict, {count} {unit}{'s' * (count != '1')}: first row and all rows <= 1.3x plain"
            out.append((what, f"{worst:.3f}", worst <= 1.3))
    if "memory" in cases.get("first_row", {}):
        growth = cases["first_row"]["memory"]["growth"]
        out.append(("predict peak memory, 10x the inputs: within 10%", f"{growth:+.1%}", growth <= 0.10))
    return out


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"transfer vs plain PyTorch on {results['device']['name']}")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows(results):
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    for target, measured, met in targets(results):
        console.print(f"  {_verdict(met):8} {target}: {measured}")


def _verdict(met: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "N/A"}[met]


def markdown(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(results)]
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {_verdict(ok)} |" for t, m, ok in targets(results)]
    return "\n".join(lines)


def record(results: dict[str, Any], notes: list[str]) -> Path:
    """Write this run's section into RESULTS.md, replacing an earlier one for the same device and mode."""
    device, threads = results["device"], results.get("threads")
    key = _slug(f"{device['name']}-{results['mode']}" + (f"-{threads}-threads" if threads else ""))
    title = f"{device['name']}, {results['mode']} sizes" + (
        f", {threads} torch thread(s) per worker" if threads else ""
    )
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    load = results["load_average"]
    body = [
        f"## {title}, {results['date'][:10]}",
        "",
        f"- Command: `{results['command']}`; run at {results['date']}, {results['wall_s']:.0f} s.",
        f"- Device: {device['detail']}.",
        f"- Versions: {versions}.",
        f"- 1-minute load average before / after the run: {load['before']:.2f} / {load['after']:.2f}"
        " (other work on a shared machine slows both sides; repeats are interleaved and the median is shown).",
        f"- Peak memory is {results['memory_kind']}.",
        *[f"- {note}" for note in notes],
        "",
        markdown(results),
        "",
    ]
    section = f"<!-- bench:{key} start -->\n" + "\n".join(body) + f"\n<!-- bench:{key} end -->\n"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} start -->.*?<!-- bench:{re.escape(key)} end -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    return RESULTS


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
