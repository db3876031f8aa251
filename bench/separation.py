"""Uneven depthwise separation on real models: why it fires or not, and what it is worth on this CPU.

Three tables (markdown to stdout, JSON to ``bench/results/separation.json``):

1. **Per-conv probe table** for every group-1 k×k conv of the bundled digits model, YOLOv8n (nudenet
   3.4.2) and MobileNetV2's stem: channels, the break-even U (below it the separated form has fewer
   MACs), U of the trained weights, the smallest U that KDE hashing reaches while the layer's weights
   move by at most ``--weight-error`` (5%), the least weight error *any* separation below break-even
   must pay (per input channel, the best rank-u approximation of its O×K kernel matrix bounds every
   u-kernel factorisation from below), and the measured onnxruntime latency ratio of the best case
   (u_c = 1, kernels planted) against the conv, at the shape the model runs at.
2. **End to end**: MACs and latency (median of ``--runs``, batch 1 and 16, CPU provider) of the original
   and of the ``--tolerance 0.02`` result, with the number of convs the pipeline separated.
3. **Where it fires**: convs at YOLOv8n's shapes with planted repeated kernels (u_c = 1, 2, 4) through the
   pass with the real latency service: decision, MACs ratio, latency ratio.

Usage: ``python bench/separation.py [--models digits yolov8n mobilenetv2] [--runs 20]`` (the zoo and the
MobileNetV2 export must be present: ``python bench/zoo.py``, ``python bench/models/export_mobilenetv2.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import red_onnx
from red_onnx.analysis.kde import bandwidth_ladder, hash_weights
from red_onnx.analysis.separation import break_even_units, factor_kernels
from red_onnx.io import graph as graph_utils
from red_onnx.measure.latency import LatencyService
from red_onnx.options import InputSpec
from red_onnx.passes.separate_depthwise import SeparateDepthwise, probe_models
from red_onnx.runtime.shapes import ShapeService
from red_onnx.verify.inputs import make_inputs

RESULTS = Path(__file__).resolve().parent / "results"
ZOO = Path(os.environ.get("RED_ONNX_ZOO", Path.home() / ".cache" / "red-onnx" / "zoo"))
BENCH = Path.home() / ".cache" / "red-onnx" / "bench"
MODELS = {
    "digits": (Path(red_onnx.__file__).resolve().parent.parent / "models" / "digits_cnn.onnx", None),
    "yolov8n": (ZOO / "yolov8n_320n.onnx", [1, 3, 320, 320]),
    "mobilenetv2": (BENCH / "mobilenetv2.onnx", None),
}


def kxk_convs(path: Path, input_shape: list[int] | None) -> tuple[graph_utils.WorkingModel, dict, list]:
    """The exact-rewritten model (BN folded, exact merges), its shapes, and its group-1 k×k convs."""
    model = onnx.load(str(path))
    spec = _spec(model, input_shape)
    exact = red_onnx.compress(model, exact=True, separation=False, input_spec=spec).model
    working = graph_utils.import_model(exact)
    shapes = ShapeService(make_inputs(exact, spec, 0))(working)
    convs = [
        n
        for n in working.graph.nodes
        if n.op == "Conv"
        and isinstance(n.inputs[1], gs.Constant)
        and int(n.attrs.get("group", 1)) == 1
        and math.prod(n.inputs[1].values.shape[2:]) > 1
    ]
    return working, shapes, convs


def _spec(model: onnx.ModelProto, input_shape: list[int] | None) -> InputSpec:
    """Verification inputs at ``input_shape`` for the model's first input (its declared shape if None)."""
    return InputSpec(shapes={model.graph.input[0].name: tuple(input_shape)}) if input_shape else InputSpec()


def hashed_units(weight: np.ndarray, max_error: float) -> tuple[int, float]:
    """U and weight change at the widest KDE bandwidth whose relative weight change is <= ``max_error``."""
    chosen = (factor_kernels(weight).size, 0.0)
    for bandwidth in bandwidth_ladder(weight.reshape(-1)):  # ascending: coarser hashing, more error
        hashed, _ = hash_weights(weight, float(bandwidth))
        error = float(np.linalg.norm(hashed - weight) / np.linalg.norm(weight))
        if error > max_error:
            break
        chosen = (factor_kernels(hashed.astype(np.float32)).size, error)
    return chosen


def low_rank_floor(weight: np.ndarray, units_per_channel: int) -> float:
    """Least relative weight error of any factorisation with ``units_per_channel`` kernels per channel."""
    out_channels, in_channels = weight.shape[:2]
    per_channel = weight.reshape(out_channels, in_channels, -1).transpose(1, 0, 2).astype(np.float64)
    singular = np.linalg.svd(per_channel, compute_uv=False)
    return float(np.sqrt((singular[:, units_per_channel:] ** 2).sum() / (singular**2).sum()))


def best_case_ratio(conv: gs.Node, shapes: dict, service: LatencyService) -> tuple[float, float]:
    """(MACs ratio, latency ratio) of the separated form with u_c = 1 (planted) against the conv."""
    weight = conv.inputs[1].values
    planted = weight[:, :, :1, :1] * np.ones_like(weight)  # every kernel of channel c a scaled constant
    planted = planted * np.random.default_rng(0).standard_normal(weight.shape[2:]).astype(weight.dtype)
    basis = factor_kernels(planted)
    probe = gs.Node(
        "Conv", conv.name, dict(conv.attrs), [conv.inputs[0], gs.Constant("w", planted)], [conv.outputs[0]]
    )
    before, after = probe_models(probe, basis, shapes[conv.inputs[0].name])
    feed = {"x": np.random.default_rng(1).standard_normal(shapes[conv.inputs[0].name]).astype(np.float32)}
    t_before, t_after = service.compare(before, after, feed)
    out, inp, *kernel = weight.shape
    size = math.prod(kernel)
    return (basis.size * size + out * basis.size) / (out * inp * size), t_after / t_before


def probe_table(name: str, args: argparse.Namespace, service: LatencyService) -> list[dict]:
    """Table 1 rows for one model."""
    path, input_shape = MODELS[name]
    _, shapes, convs = kxk_convs(path, input_shape)
    if name == "mobilenetv2":
        convs = convs[:1]  # the stem: every other k×k conv of MobileNetV2 is depthwise already
    rows = []
    for conv in convs:
        weight = conv.inputs[1].values
        out, inp, *kernel = weight.shape
        size = math.prod(kernel)
        even = break_even_units(out, inp, size)
        units, error = hashed_units(weight, args.weight_error)
        macs_ratio, latency_ratio = best_case_ratio(conv, shapes, service)
        rows.append({
            "model": name, "conv": conv.name, "shape": [out, inp, *kernel],
            "input": list(shapes[conv.inputs[0].name]), "break_even_U": round(even, 1),
            "U_trained": factor_kernels(weight).size, "U_hashed": units, "hash_weight_error": round(error, 4),
            "least_error_below_break_even": round(low_rank_floor(weight, max(int(even // inp), 1)), 3),
            "best_case_macs_ratio": round(macs_ratio, 3), "best_case_latency_ratio": round(latency_ratio, 3),
        })  # fmt: skip
    return rows


def end_to_end(name: str, args: argparse.Namespace) -> dict:
    """Table 2 row: the --tolerance 0.02 pipeline, latency before/after at batch 1 and 16."""
    path, input_shape = MODELS[name]
    model = onnx.load(str(path))
    spec = _spec(model, input_shape)
    result = red_onnx.compress(model, tolerance=0.02, input_spec=spec)
    separation = next(p for p in result.report.passes if p.name == "separate_depthwise")
    row = {
        "model": name, "macs_ratio": round(result.report.macs_after / result.report.macs_before, 4),
        "separated": separation.stats["separated"], "kxk_convs": separation.stats["candidates"],
    }  # fmt: skip
    service = LatencyService(runs=args.runs)
    for batch in (1, 16):
        shape = list(make_inputs(model, spec, 0)[model.graph.input[0].name].shape)
        shape[0] = batch
        feed = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        before, after = service.time_sessions([service.session(model), service.session(result.model)], feed)
        row[f"latency_ratio_b{batch}"] = round(after / before, 3)
        row[f"latency_before_ms_b{batch}"] = round(before * 1e3, 3)
    return row


def where_it_fires(args: argparse.Namespace, service: LatencyService) -> list[dict]:
    """Table 3: YOLOv8n-shaped convs (64->64 at 40x40, 128->128 at 20x20) with planted repeated kernels."""
    rows = []
    for channels, size in ((64, 40), (128, 20)):
        for per_channel in (1, 2, 4):
            rng = np.random.default_rng(per_channel)
            units = rng.standard_normal((channels, per_channel, 3, 3))
            pick = rng.integers(0, per_channel, (channels, channels))
            weight = (
                units[np.arange(channels)[None, :], pick] * rng.standard_normal((channels, channels, 1, 1))
            ).astype(np.float32)
            model = _single_conv(weight, [1, channels, size, size])
            working = graph_utils.import_model(model)
            shapes = ShapeService(make_inputs(model, InputSpec(), 0))
            result = SeparateDepthwise(shapes=shapes, latency=service)(working)
            row = result.stats["convs"][0]
            error = _max_relative_error(model, graph_utils.export_model(working), [1, channels, size, size])
            rows.append({
                "conv": f"{channels}->{channels} 3x3 at {size}x{size}", "u_c": per_channel, "U": row["units"],
                "macs_ratio": round(row["macs_after"] / row["macs_before"], 3),
                "latency_ratio": round(row["latency_after_ms"] / row["latency_before_ms"], 3)
                if row["latency_before_ms"] else None,
                "separated": row["separated"], "max_rel_err_vs_conv": f"{error:.1e}",
            })  # fmt: skip
    return rows


def _max_relative_error(model: onnx.ModelProto, rewritten: onnx.ModelProto, shape: list[int]) -> float:
    """Largest |y' - y| / max|y| of the rewritten model against the model (onnxruntime, seeded input)."""
    feed = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, feed)[0]
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _single_conv(weight: np.ndarray, shape: list[int]) -> onnx.ModelProto:
    source = gs.Variable("x", dtype=np.float32, shape=shape)
    output = gs.Variable("y", dtype=np.float32)
    node = gs.Node("Conv", "conv", {"pads": [1, 1, 1, 1]}, [source, gs.Constant("w", weight)], [output])
    return gs.export_onnx(gs.Graph(nodes=[node], inputs=[source], outputs=[output], opset=17))


def markdown(rows: list[dict]) -> str:
    """A markdown table of dict rows (same keys)."""
    if not rows:
        return "(none)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency median (>= 20)")
    parser.add_argument("--weight-error", type=float, default=0.05, help="hashing budget per layer (table 1)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    service = LatencyService(runs=args.runs)
    present = [m for m in args.models if MODELS[m][0].exists()]
    for missing in sorted(set(args.models) - set(present)):
        print(f"skipped {missing}: {MODELS[missing][0]} absent", file=sys.stderr)
    results = {"probe": [row for name in present for row in probe_table(name, args, service)]}
    print("## Per-conv probe table\n\n" + markdown(results["probe"]) + "\n")
    results["fires"] = where_it_fires(args, service)
    print(
        "## Where it fires (planted repeated kernels, YOLOv8n shapes)\n\n" + markdown(results["fires"]) + "\n"
    )
    if not args.skip_end_to_end:
        results["end_to_end"] = [end_to_end(name, args) for name in present]
        print("## End to end (--tolerance 0.02)\n\n" + markdown(results["end_to_end"]) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "separation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
