"""One-shot against sequential reconstruction on the sentence encoder (a measurement, not a feature).

red_onnx fits every refit on activations captured once on the original model (one-shot). The
alternative (He et al. 2017's sequential correction) fits each layer on the inputs it receives *after*
the earlier layers were compressed, towards the original layer's output. This script measures it on
the model ``bench/text_encoder.py`` uses:

1. compresses the encoder with ``red_onnx.compress(target_macs=T, input_spec=InputSpec(npz=...))``
   on the benchmark's calibration sentences (one-shot: what the library does);
2. then, for every output projection and FFN output MatMul whose input lost channels, in graph order:
   captures its input on the compressed model (earlier corrections applied) and the original
   model's output of the same MatMul, at the real tokens of 3/4 of the calibration sentences, and
   refits the weight by ridge regression towards the current one (``λ = α·mean diag`` of the centred
   Gram) with a free intercept folded into the bias Add that follows; the other quarter validates;
3. measures the test sentences' mean-pooled embedding cosine and top-5 overlap for each ``α``.

Usage::

    python bench/sequential_refit.py --target 0.8 --alphas 0.001 0.01 0.1 --calibration 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import text_encoder as te
from onnx import numpy_helper

RESULTS = Path(__file__).resolve().parent / "results" / "sequential_refit.json"
BATCH = 16


def _capture(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[np.ndarray]:
    from red_onnx.runtime.tensor_values import run_tensors

    runs = run_tensors(model, names, feeds)
    return [np.concatenate([run[k] for run in runs]) for k in range(len(names))]


def _changed_consumers(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[tuple[Any, Any]]:
    """(compressed node, original node) of every MatMul whose weight lost input rows, in graph order."""
    before = {n.name: n for n in original.graph.node}
    weights = {i.name: i for i in original.graph.initializer}
    now = {i.name: i for i in compressed.graph.initializer}
    found = []
    for node in compressed.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in now or node.name not in before:
            continue
        old = weights.get(before[node.name].input[1])
        if old is not None and old.dims[0] != now[node.input[1]].dims[0]:
            found.append((node, before[node.name]))
    return found


def _bias_after(model: onnx.ModelProto, tensor: str) -> str:
    """The constant of the Add that reads ``tensor`` (the bias the intercept goes into)."""
    constants = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Add" and tensor in node.input:
            other = next(t for t in node.input if t != tensor)
            if other in constants:
                return other
    raise RuntimeError(f"no bias Add reads {tensor}")


def correct(
    original: onnx.ModelProto, compressed: onnx.ModelProto, calibration: dict[str, np.ndarray], alpha: float
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The sequentially corrected copy of ``compressed`` and, per layer, its validation error before/after."""
    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    mask = calibration["attention_mask"].astype(bool)
    order = np.random.default_rng(0).permutation(len(mask))
    fit_rows = order[: len(order) * 3 // 4]
    sentence = np.repeat(np.arange(len(mask))[:, None], mask.shape[1], axis=1)[mask]
    fit = np.isin(sentence, fit_rows)
    feeds = [{k: v[i : i + BATCH] for k, v in calibration.items()} for i in range(0, len(mask), BATCH)]
    pairs = _changed_consumers(original, model)
    targets = _capture(original, [o.output[0] for _, o in pairs], feeds)
    layers = []
    for (node, _), wanted in zip(pairs, targets, strict=True):
        weights = {i.name: i for i in model.graph.initializer}
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        x, current = _capture(model, [node.input[0], node.output[0]], feeds)
        xs = np.hstack([x[mask].astype(np.float64), np.ones((int(mask.sum()), 1))])
        residual = (wanted - current)[mask].astype(np.float64)
        gram = xs[fit].T @ xs[fit]
        centred = np.diag(gram)[:-1] - xs[fit, :-1].sum(axis=0) ** 2 / fit.sum()
        penalty = np.full(len(gram), alpha * float(np.mean(centred)))
        penalty[-1] = 0.0  # the intercept is free
        change = np.linalg.solve(gram + np.diag(penalty), xs[fit].T @ residual[fit])
        scale = np.linalg.norm(wanted[mask][~fit])
        layers.append({
            "layer": node.name,
            "validation_before": float(np.linalg.norm(residual[~fit]) / scale),
            "validation_after": float(np.linalg.norm(residual[~fit] - xs[~fit] @ change) / scale),
        })  # fmt: skip
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array((weight + change[:-1]).astype(np.float32), node.input[1])
        )
        bias = _bias_after(model, node.output[0])
        values = numpy_helper.to_array(weights[bias]).astype(np.float64) + change[-1]
        weights[bias].CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias))
    return model, layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument("--calibration", type=int, default=te.N_CALIBRATION)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from red_onnx import InputSpec, compress

    calib_pairs, test_pairs = te.split_sentences(args.calibration)
    calibration = te.tokenize([s for _, s in calib_pairs])
    test = te.tokenize([s for _, s in test_pairs])
    original = onnx.load(str(te.MODEL))
    reference = te.embed(te.MODEL, test)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibration.npz"
        np.savez(path, **calibration)
        start = time.perf_counter()
        result = compress(str(te.MODEL), target_macs=args.target, force_target=True, latency_check=False,
                          raise_on_failure=False, input_spec=InputSpec(npz=path))  # fmt: skip
        seconds = time.perf_counter() - start
    found: dict[str, Any] = {
        "target": args.target, "calibration": len(calib_pairs), "test": len(test_pairs),
        "compress_seconds": round(seconds, 1),
        "one_shot": te.compare(reference, te.embed(result.model, test)), "sequential": {},
    }  # fmt: skip
    print("one-shot", found["one_shot"], flush=True)
    for alpha in args.alphas:
        corrected, layers = correct(original, result.model, calibration, alpha)
        found["sequential"][str(alpha)] = {
            **te.compare(reference, te.embed(corrected, test)),
            "layers": layers,
        }
        print(f"sequential alpha={alpha}", {k: v for k, v in found["sequential"][str(alpha)].items()
                                            if k != "layers"}, flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
