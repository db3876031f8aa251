"""Inference latency before/after compression, next to the MACs ratio, for every zoo model.

Usage (from the repository root; models as for ``bench/zoo_table.py``, conv5m/conv25m from
``bench/models/export_speed.py``)::

    python bench/latency_table.py           # prints the markdown table, writes bench/results/latency.json
    python bench/latency_table.py --models digits_cnn mnist1d_cnn --threads 1
    python bench/latency_table.py --from-json bench/results/latency.json   # reprint (verdicts recomputed)

Per model: ``compress(tolerance=0.02)`` with the zoo table's verification inputs and, for the conv nets,
``compress(target_macs=0.8)`` (the run where MACs drop >= 20%) at the default channel multiple (16) and
at each of ``--multiples`` (8), each saved to a temporary folder. Then, per intra-op thread count and batch
(1 and 16, repeated along ``measure.benchmark.batch_axes``: axis 0 of the inputs where it is dynamic, and the
axis of the same name — or, unnamed, of the same size — in the others, e.g. silero's ``state``), the
original, each compressed model and **the original again** (a second session: the A/A check) are timed
in interleaved runs by ``measure.latency.LatencyService`` (CPU execution provider, ``ORT_ENABLE_ALL``,
warm-up, medians; at least ``--runs`` timed runs, more for fast models up to ``--seconds`` per group); a
model without a batch axis its inputs agree on is timed at batch 1 only. A run counts as slower where at
least two of its timings exceed 1 + max(the A/A deviation at that thread count, 3%). Each model
also records how many convs onnxruntime leaves out of its blocked NCHWc layout, before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.approx_digits import SPEC as DIGITS_SPEC
from bench.data import cache_dir
from bench.speed import model_path
from bench.tasks import mobilenet_path
from bench.zoo import zoo_dir
from bench.zoo_table import REAL_MODELS, _spec
from red_onnx import compress
from red_onnx.demo import demo_path
from red_onnx.errors import RedOnnxError
from red_onnx.io.files import save_model
from red_onnx.measure.benchmark import BATCHES, BatchAxisError, batched_feed
from red_onnx.measure.latency import LatencyService
from red_onnx.options import CPU_PROVIDER, DEFAULT_TOLERANCE, InputSpec

NCHWC_DOMAIN = "com.microsoft.nchwc"
TARGET_MACS = 0.8
#: Conv nets that also get the ``target_macs=0.8`` run (by file name).
CONV_NETS = {"ppocrv4_det.onnx", "ppocr_mobile_cls.onnx", "ppocrv4_rec.onnx", "yolov8n_320n.onnx",
             "mobilenetv2.onnx", "digits_cnn.onnx", "mnist1d_cnn.onnx", "conv5m.onnx",
             "conv25m.onnx"}  # fmt: skip
EXTRA_MODELS = (("digits (bundled)", "digits_cnn.onnx"), ("mnist1d", "mnist1d_cnn.onnx"),
                ("conv5m (ResNet-50 layout)", "conv5m.onnx"),
                ("conv25m (ResNet-50)", "conv25m.onnx"))  # fmt: skip


def model_source(file: str, scratch: Path) -> tuple[Path, InputSpec | None]:
    """Path and verification spec of a model (the zoo table's spec for zoo models); spec None: absent."""
    paths = {"mobilenetv2.onnx": mobilenet_path(), "digits_cnn.onnx": demo_path(),
             "mnist1d_cnn.onnx": cache_dir() / "mnist1d_cnn.onnx"}  # fmt: skip
    if file.startswith("conv"):
        paths[file] = model_path(file.removesuffix(".onnx"))
    path = Path(paths.get(file, zoo_dir() / file))
    if not path.is_file():
        return path, None
    if file == "digits_cnn.onnx":
        return path, DIGITS_SPEC
    if file in paths:
        return path, InputSpec()  # mnist1d, conv nets: standard normal (as bench/compare.py, speed.py)
    return path, _spec(file, path, scratch)


def compressed_runs(
    file: str, path: Path, spec: InputSpec, scratch: Path, multiples: list[int],
    tolerance_multiples: list[int] = (),
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The tolerance run and (conv nets) the target runs, each saved in ``scratch``; their figures.

    ``multiples``: extra target runs at these ``channel_multiple`` values (the approximate default is 16);
    ``tolerance_multiples``: extra tolerance runs of the conv nets at these values.
    """
    options: dict[str, dict[str, Any]] = {"tolerance 0.02": {"tolerance": DEFAULT_TOLERANCE}}
    if file in CONV_NETS:
        for multiple in tolerance_multiples:
            options[f"tolerance 0.02, multiple {multiple}"] = {
                "tolerance": DEFAULT_TOLERANCE, "channel_multiple": multiple}  # fmt: skip
        options[f"target {TARGET_MACS}"] = {"target_macs": TARGET_MACS}
        for multiple in multiples:
            options[f"target {TARGET_MACS}, multiple {multiple}"] = {
                "target_macs": TARGET_MACS, "channel_multiple": multiple}  # fmt: skip
    runs = {}
    for run, kwargs in options.items():
        started = time.perf_counter()
        try:
            result = compress(path, input_spec=spec, raise_on_failure=False, **kwargs)
        except RedOnnxError as error:
            runs[run] = {"failed": str(error).splitlines()[0]}
            continue
        target = scratch / f"{path.stem}.{len(runs)}.onnx"
        save_model(result.model, target)
        runs[run] = {"path": str(target), "seconds": round(time.perf_counter() - started, 1),
                     **result_figures(result, onnx.load(str(path), load_external_data=False)),
                     "layout": ort_layout(target, scratch)}  # fmt: skip
    return runs


def ort_layout(path: Path, scratch: Path) -> dict[str, int]:
    """Convs that onnxruntime leaves in the plain NCHW layout at ``ORT_ENABLE_ALL``, and its reorders.

    ORT's NCHWc transformer runs a conv in the blocked layout only when its channel counts fit the CPU's
    block size (``MlasNchwcGetBlockSize``); a conv left out runs a slower kernel between reorders.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    optimized = scratch / f"{path.stem}.ort.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=[CPU_PROVIDER])
    nodes = onnx.load(str(optimized), load_external_data=False).graph.node
    optimized.unlink()
    return {
        "plain_convs": sum(n.op_type in ("Conv", "FusedConv") and n.domain != NCHWC_DOMAIN for n in nodes),
        "reorders": sum(n.op_type.startswith("Reorder") for n in nodes),
    }


def result_figures(result: Any, original: onnx.ModelProto) -> dict[str, Any]:
    """MACs, verification and what changed structurally (for explaining a slower model)."""
    report = result.report
    ops_before = Counter(node.op_type for node in original.graph.node)
    ops_after = Counter(node.op_type for node in result.model.graph.node)
    changed = [layer for layer in report.layers if layer.channels_after != layer.channels_before]
    return {
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "macs_ratio": report.macs_after / report.macs_before if report.macs_before else None,
        "verified": result.verified, "budget_error": (report.budget or {}).get("error"),
        "rewrites": sorted(p.name for p in report.passes if p.modified),
        "op_changes": {op: ops_after[op] - ops_before[op] for op in ops_before | ops_after
                       if ops_after[op] != ops_before[op]},
        "layers_changed": len(changed),
        "widths_not_multiple_of_16": sorted({layer.channels_after for layer in changed
                                             if layer.channels_after % 16}),
    }  # fmt: skip


def time_group(service: LatencyService, sessions: list[ort.InferenceSession], feed: dict, args: Any) -> list:
    """Median ms of each session, interleaved; runs >= ``args.runs``, more while under ``args.seconds``."""
    inputs = {i.name: feed[i.name] for i in sessions[0].get_inputs()}
    sessions[0].run(None, inputs)  # the first run at a new shape is slow: probe the second
    started = time.perf_counter()
    sessions[0].run(None, inputs)
    once = time.perf_counter() - started
    service.runs = max(args.runs, min(args.max_runs, math.floor(args.seconds / (len(sessions) * once))))
    return [round(seconds * 1e3, 4) for seconds in service.time_sessions(sessions, feed)]


def measure(original: Path, runs: dict[str, dict[str, Any]], spec: InputSpec, args: Any) -> list[dict]:
    """Per thread count and batch: median ms of original, each run, original again (A/A); or why not."""
    model = onnx.load(str(original), load_external_data=False)
    timed = [run for run, figures in runs.items() if "path" in figures]
    groups: list[dict[str, Any]] = []
    for threads in args.threads:
        service = LatencyService(provider=CPU_PROVIDER, threads=threads)
        paths = [str(original), *(runs[run]["path"] for run in timed), str(original)]
        sessions = [service.session(path) for path in paths]
        for batch in BATCHES:
            group: dict[str, Any] = {"threads": threads, "batch": batch}
            groups.append(group)
            try:
                feed = batched_feed(model, spec, batch, own_batch=batch == BATCHES[0])
            except BatchAxisError as reason:
                group["skipped"] = str(reason)
                continue
            try:
                medians = time_group(service, sessions, feed, args)
            except Exception as error:  # onnxruntime raises its own Fail types
                group["skipped"] = str(error).splitlines()[0][:200]
                continue
            group |= {"runs": service.runs, "original_ms": medians[0], "aa_ms": medians[-1],
                      "after_ms": dict(zip(timed, medians[1:-1], strict=True))}  # fmt: skip
    return groups


def run_model(label: str, file: str, scratch: Path, args: Any) -> dict[str, Any] | None:
    """Compress, time and summarise one model (None when absent)."""
    path, spec = model_source(file, scratch)
    if spec is None:
        print(f"{file}: absent ({path}); left out", file=sys.stderr)
        return None
    print(f"{label}: compressing ...", file=sys.stderr, flush=True)
    runs = compressed_runs(file, path, spec, scratch, args.multiples, args.tolerance_multiples)
    print(f"{label}: timing ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    row = {"label": label, "file": file, "runs": runs, "groups": measure(path, runs, spec, args)}
    row["layout"] = ort_layout(path, scratch)
    row["timing_seconds"] = round(time.perf_counter() - started, 1)
    for figures in runs.values():
        figures.pop("path", None)
    return summarise(row)


# ---------------------------------------------------------------- ratios and verdicts (no timing)
#: The latency targets checked: latency reduction >= 0.8x the MACs reduction where MACs drop >= 20%.
LEAST_MACS_DROP = 0.2
LEAST_EFFICIENCY = 0.8
#: A run counts as slower when this many of its timed groups are over 1 + noise (one alone: maybe noise).
LEAST_SLOWER_GROUPS = 2
#: Least noise assumed: two sessions of one model differ by a few percent from process to process (the
#: second A/A session samples that once). Measured here: the unchanged conv25m 1.009-1.021 in one run,
#: 0.985-1.001 in six order-swapped runs; silero op15's unchanged graph 0.98-1.08 at 2 threads.
NOISE_FLOOR = 0.03


def reduction_efficiency(macs_ratio: float | None, latency_ratio: float) -> float | None:
    """(1 - latency ratio) / (1 - MACs ratio) where MACs drop >= 20% (at 3 decimals); else None."""
    if macs_ratio is None or round(1.0 - macs_ratio, 3) < LEAST_MACS_DROP:
        return None
    return (1.0 - latency_ratio) / (1.0 - macs_ratio)


def aa_noise(groups: list[dict[str, Any]]) -> dict[str, float]:
    """The largest |A/A ratio - 1| over a model's timed groups, per thread count (``1t``, ``2t``)."""
    noise: dict[str, float] = {}
    for group in groups:
        if "aa_ms" in group:
            key = f"{group['threads']}t"
            noise[key] = max(noise.get(key, 0.0), abs(group["aa_ms"] / group["original_ms"] - 1.0))
    return noise


def noise_margin(aa: float | None) -> float:
    """How far over 1 a latency ratio must be to count as slower: the A/A noise, at least the floor."""
    return max(aa or 0.0, NOISE_FLOOR)


def verdict(macs_ratio: float | None, ratios: dict[str, float], margins: dict[str, float]) -> dict[str, Any]:
    """One run against both targets; ``ratios`` are latency ratios (after / before) by group label.

    ``slower``: the groups over 1 + their noise margin (by label); ``is_slower``: at least
    ``LEAST_SLOWER_GROUPS`` of them (or every group, when fewer were timed) — a single group over the
    noise is reported, not judged.
    """
    slower = {label: ratio for label, ratio in ratios.items() if ratio > 1.0 + margins[label]}
    efficiencies = {label: reduction_efficiency(macs_ratio, ratio) for label, ratio in ratios.items()}
    measured = {label: value for label, value in efficiencies.items() if value is not None}
    met = sum(value >= LEAST_EFFICIENCY for value in measured.values())
    is_slower = len(slower) >= min(LEAST_SLOWER_GROUPS, len(ratios)) and bool(slower)
    return {"slower": slower, "is_slower": is_slower, "efficiency": measured or None,
            "efficiency_met": [met, len(measured)] if measured else None}  # fmt: skip


def group_label(group: dict[str, Any]) -> str:
    """``b16 1t``: batch and intra-op threads of a timed group."""
    return f"b{group['batch']} {group['threads']}t"


def _noise_cell(noise: dict[str, float]) -> str:
    return " / ".join(f"±{value * 100:.1f}%" for value in noise.values()) or "—"


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    """Add the noise, each run's latency ratios and its verdict to a measured row."""
    timed = [g for g in row["groups"] if "original_ms" in g]
    row["aa_noise"] = aa_noise(timed)
    for run, figures in row["runs"].items():
        ratios = {
            group_label(g): g["after_ms"][run] / g["original_ms"] for g in timed if run in g["after_ms"]
        }
        figures["latency_ratio"] = {label: round(ratio, 4) for label, ratio in ratios.items()}
        margins = {group_label(g): noise_margin(row["aa_noise"].get(f"{g['threads']}t")) for g in timed}
        if ratios:
            figures["verdict"] = verdict(figures.get("macs_ratio"), ratios, margins)
    return row


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _by_batch(values: dict[str, float] | None, batch: int) -> str:
    """The values of one batch, one per thread count (``0.83 / 0.85``), from labels like ``b1 2t``."""
    cells = [f"{value:.2f}" for label, value in (values or {}).items() if label.startswith(f"b{batch} ")]
    return " / ".join(cells) or "—"


def _verdict(figures: dict[str, Any]) -> str:
    if "failed" in figures:
        return f"not compressed: {figures['failed']}"
    judged = figures.get("verdict")
    if judged is None:
        return "not timed"
    parts = []
    if judged["efficiency_met"]:
        met, total = judged["efficiency_met"]
        parts.append("≥0.8×: met" if met == total else f"≥0.8×: {met}/{total} groups")
    slower = ", ".join(f"{label} {ratio:.2f}" for label, ratio in judged["slower"].items())
    if judged["is_slower"]:
        parts.append(f"SLOWER ({slower})")
    else:
        parts.append(f"not slower (over noise only at {slower})" if slower else "not slower")
    return "; ".join(parts)


def _layout(before: dict[str, int] | None, after: dict[str, int] | None) -> str:
    """Convs outside ORT's NCHWc layout, before → after (and the reorders, where they changed)."""
    if not before or not after:
        return "—"
    text = f"{before['plain_convs']} → {after['plain_convs']}"
    if before["reorders"] != after["reorders"]:
        text += f" (reorders {before['reorders']} → {after['reorders']})"
    return text


def table_row(row: dict[str, Any], run: str, figures: dict[str, Any]) -> str:
    """One markdown row."""
    macs = figures.get("macs_ratio")
    first = next((g for g in row["groups"] if "original_ms" in g), None)
    before = "—" if first is None else " / ".join(
        _ms(g["original_ms"]) for g in row["groups"] if g.get("threads") == first["threads"]
        and "original_ms" in g)  # fmt: skip
    efficiency = (figures.get("verdict") or {}).get("efficiency")
    noise = _noise_cell(row["aa_noise"])
    counted = "—" if "failed" in figures else "n/a (inside If)"
    ratios = figures.get("latency_ratio")
    cells = [row["label"], run, counted if macs is None else f"{macs:.3f}", before, _by_batch(ratios, 1),
             _by_batch(ratios, 16), noise, _by_batch(efficiency, 1), _by_batch(efficiency, 16),
             _layout(row.get("layout"), figures.get("layout")), _verdict(figures)]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def markdown(data: dict[str, Any]) -> str:
    """The README table and how it was measured."""
    env = data["environment"]
    threads = " / ".join(f"{t} thr" for t in env["threads"])
    lines = [
        f"| model | run | MACs ratio | before ms (b1 / b16, {env['threads'][0]} thr) | latency ratio b1 "
        f"({threads}) | latency ratio b16 ({threads}) | A/A noise ({threads}) "
        f"| latency red. / MACs red. b1 ({threads}) | latency red. / MACs red. b16 ({threads}) "
        "| convs outside NCHWc | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["models"].values():
        lines += [table_row(row, run, figures) for run, figures in row["runs"].items()]
    skipped = [f"{row['label']} {group_label(g)}: {g['skipped']}" for row in data["models"].values()
               for g in row["groups"] if "skipped" in g]  # fmt: skip
    end = env.get("load_average_end", ["?"])[0]
    footer = (f"onnxruntime {env['onnxruntime']} {env['provider']}, {env['cpu_count']} cores "
              f"(load average {env['load_average'][0]} at start, {end} at end), "
              f"wall {data.get('wall_seconds', '?')} s.")  # fmt: skip
    return "\n".join([*lines, "", footer, *(["Not timed: " + "; ".join(skipped) + "."] if skipped else [])])


def environment(threads: list[int]) -> dict[str, Any]:
    """What the figures were measured on."""
    return {"onnxruntime": ort.__version__, "provider": CPU_PROVIDER, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "threads": threads,
            "load_average": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    parser.add_argument("--models", nargs="*", help="file stems to run (default: all): digits_cnn conv25m")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--runs", type=int, default=20, help="least timed runs per model and group")
    parser.add_argument("--max-runs", type=int, default=2000)
    extra = "extra target runs of the conv nets at these --channel-multiple values (none: --multiples)"
    parser.add_argument("--multiples", type=int, nargs="*", default=[8], help=extra)
    extra = "extra tolerance runs of the conv nets at these --channel-multiple values (default: none)"
    parser.add_argument("--tolerance-multiples", type=int, nargs="*", default=[], help=extra)
    parser.add_argument("--seconds", type=float, default=4.0, help="aim of one group's timed runs")
    parser.add_argument("--from-json", type=Path, help="only print the table of an earlier latency.json")
    return parser.parse_args()


def write(out: Path, data: dict[str, Any], started: float) -> dict[str, Any]:
    """Stamp the load average and wall time into ``data`` and write it to ``out`` (JSON)."""
    data["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    data["wall_seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> int:
    """Command-line entry point."""
    args = parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        for row in data["models"].values():
            summarise(row)  # the verdict logic of this file, on the recorded timings
        print(markdown(data))
        return 0
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    started, data = time.perf_counter(), {"environment": environment(args.threads), "models": {}}
    with tempfile.TemporaryDirectory(prefix="latency-table-") as scratch:
        for label, file in (*REAL_MODELS, *EXTRA_MODELS):
            if args.models and file.removesuffix(".onnx") not in args.models:
                continue
            row = run_model(label, file, Path(scratch), args)
            if row is not None:
                data["models"][file] = row
                write(args.out, data, started)  # after every model: a long run's figures so far
    print(markdown(write(args.out, data, started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
