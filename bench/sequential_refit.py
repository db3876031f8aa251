"""One-shot against sequential reconstruction, outside the pipeline.

red_onnx fits every refit on activations captured once on the original model (one-shot). The
alternative (He et al. 2017's sequential correction) fits each layer on the inputs it receives *after*
the earlier layers were compressed, towards the original layer's output. This script measures it on
the sentence encoder ``bench/text_encoder.py`` uses:

1. compresses the encoder with ``red_onnx.compress(target_macs=T, input_spec=InputSpec(npz=...))``
   on the benchmark's calibration sentences (one-shot: what the library does);
2. then, for every output projection and FFN output MatMul whose input lost channels, in graph order:
   captures its input on the compressed model (earlier corrections applied) and the original
   model's output of the same MatMul, at the real tokens of 3/4 of the calibration sentences, and
   refits the weight by ridge regression towards the current one (``λ = α·mean diag`` of the centred
   Gram) with a free intercept folded into the bias Add that follows; the other quarter validates;
3. measures the test sentences' mean-pooled embedding cosine and top-5 overlap for each ``α``.

With ``--cnn MODEL:TARGET:N ...`` it measures the same on convolutional models of
``bench/refit_grid.py`` (their tasks, test sets and N calibration samples; red_onnx run as the grid's
``refit_N`` cell), with ``red_onnx.search.correction.correct_sequentially`` (what ``--sequential-refit``
runs): every 1×1 ungrouped Conv and Gemm that lost input channels and kept its outputs is corrected in
graph order towards the BatchNorm-folded original's output of the same node, fitted on 3/4 of the
calibration images (the rest validate; k×k and grouped Convs stay as they are). ``--alphas cv``
chooses α per node among ``CORRECTION_ALPHAS`` on the validation images; every α leaves a node
unchanged where it does not lower its validation error. Unlike ``--sequential-refit`` this applies the
correction whatever it does to the model's output.

Usage::

    python bench/sequential_refit.py --target 0.8 --alphas 0.001 0.01 0.1 --calibration 128
    python bench/sequential_refit.py --cnn mobilenetv2:0.9:128 mobilenetv2:0.85:128 ppocr_cls:0.8:128 \\
        digits:0.6:256 mnist1d:0.6:128 --alphas 0.01 0.1 1 cv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx import numpy_helper

from bench import text_encoder as te

RESULTS = Path(__file__).resolve().parent / "results" / "sequential_refit.json"
RESULTS_CNN = RESULTS.with_name("sequential_refit_cnn.json")
#: The convolutional models of ``bench/refit_grid.py`` this script also measures (their 1×1 Convs and Gemms).
CNNS = ("mobilenetv2", "ppocr_cls", "digits", "mnist1d")
BATCH = 16


def _capture(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[np.ndarray]:
    from red_onnx.runtime.tensor_values import run_tensors

    runs = run_tensors(model, names, feeds)
    return [np.concatenate([run[k] for run in runs]) for k in range(len(names))]


def _bias_after(model: onnx.ModelProto, tensor: str) -> str:
    """The constant of the Add that reads ``tensor`` (the bias the intercept goes into)."""
    constants = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Add" and tensor in node.input:
            other = next(t for t in node.input if t != tensor)
            if other in constants:
                return other
    raise RuntimeError(f"no bias Add reads {tensor}")


def _fitted(
    alpha: float | None, folds: list[Any], validation: Any, matrix: np.ndarray
) -> tuple[float, np.ndarray, dict]:
    """``(α, change, errors)`` of one layer: at a fixed ``alpha`` (applied whatever it does), or None:
    ``red_onnx``'s choice per layer (``cross_validated_change`` over the ``folds`` of the fit rows:
    the least held-back error, none if none helps); the errors on the ``validation`` rows."""
    from red_onnx.analysis.correction import cross_validated_change, ridge_change

    if alpha is None:
        chosen = cross_validated_change(folds, matrix)
        change, alpha = chosen.change, chosen.alpha
    else:
        change = ridge_change(sum(folds[1:], start=folds[0]), matrix, alpha)
    errors = {
        "validation_before": validation.error(matrix),
        "validation_after": validation.error(matrix + change),
    }
    return alpha, change, errors


def correct(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    calibration: dict[str, np.ndarray],
    alpha: float | None,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The sequentially corrected copy of ``compressed`` and, per layer, its validation error before/after.

    ``alpha`` None: chosen per layer as ``red_onnx.analysis.correction.cross_validated_change`` does,
    over folds of the fit sentences.
    """
    from red_onnx.analysis.correction import LinearStats
    from red_onnx.search.correction import CORRECTION_FOLDS

    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    mask = calibration["attention_mask"].astype(bool)
    order = np.random.default_rng(0).permutation(len(mask))
    fit_rows = order[: len(order) * 3 // 4]
    sentence = np.repeat(np.arange(len(mask))[:, None], mask.shape[1], axis=1)[mask]
    fit = np.isin(sentence, fit_rows)
    feeds = [{k: v[i : i + BATCH] for k, v in calibration.items()} for i in range(0, len(mask), BATCH)]
    pairs = _changed_matmuls(original, model)
    targets = _capture(original, [o.output[0] for _, o in pairs], feeds)
    layers = []
    for (node, _), wanted in zip(pairs, targets, strict=True):
        weights = {i.name: i for i in model.graph.initializer}
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        bias = _bias_after(model, node.output[0])
        matrix = np.vstack([weight, numpy_helper.to_array(weights[bias]).astype(np.float64)[None, :]])
        (x,) = _capture(model, [node.input[0]], feeds)
        x, wanted = x[mask], wanted[mask]
        folds = [LinearStats.empty(*weight.shape) for _ in range(CORRECTION_FOLDS)]
        fold_of = sentence % CORRECTION_FOLDS  # by sentence: its tokens stay together
        for index, stats in enumerate(folds):
            chosen_rows = fit & (fold_of == index)
            stats.add(x[chosen_rows], wanted[chosen_rows])
        validation = LinearStats.empty(*weight.shape)
        validation.add(x[~fit], wanted[~fit])
        chosen, change, errors = _fitted(alpha, folds, validation, matrix)
        layers.append({"layer": node.name, "alpha": chosen, **errors})
        updated = matrix + change
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array(updated[:-1].astype(np.float32), node.input[1])
        )
        weights[bias].CopyFrom(numpy_helper.from_array(updated[-1].astype(np.float32), bias))
    return model, layers


def _changed_matmuls(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[tuple[Any, Any]]:
    """(compressed node, original node) of every MatMul with a constant ``[inputs, outputs]`` weight that
    lost inputs and kept its outputs, in graph order (nodes matched by their output)."""
    before = {n.output[0]: n for n in original.graph.node if n.output}
    weights = {i.name: i for i in original.graph.initializer}
    now = {i.name: i for i in compressed.graph.initializer}
    found = []
    for node in compressed.graph.node:
        if node.op_type != "MatMul" or node.output[0] not in before or node.input[1] not in now:
            continue
        old, new = weights.get(before[node.output[0]].input[1]), now[node.input[1]]
        if old is not None and old.dims[0] != new.dims[0] and old.dims[1] == new.dims[1]:
            found.append((node, before[node.output[0]]))
    return found


def correct_linear(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    images: np.ndarray,
    input_name: str,
    alpha: float | None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The sequentially corrected copy of a compressed CNN (``red_onnx.search.correction``).

    Every image is fitted on; ``alpha`` None: per node, the ``CORRECTION_ALPHAS`` value with the least
    error over the folds held back, or no change where none lowers it; a fixed ``alpha``: that one,
    where it lowers that error.
    """
    from red_onnx.analysis.correction import CORRECTION_ALPHAS
    from red_onnx.search.correction import correct_sequentially

    feeds = [{input_name: images[i : i + BATCH]} for i in range(0, len(images), BATCH)]
    alphas = CORRECTION_ALPHAS if alpha is None else (alpha,)
    done = correct_sequentially(original, compressed, feeds, alphas=alphas)
    layers = [
        {"layer": layer["node"], **{k: v for k, v in layer.items() if k != "node"}} for layer in done.layers
    ]
    return done.model, {"layers": layers, "corrected": len(done.weights), "skipped": len(done.skipped)}


def _cnn(name: str, target: float, samples: int, alphas: list[float | None]) -> dict[str, Any]:
    """One-shot against sequential on a CNN of ``bench/refit_grid.py``, as its ``refit_N`` cell."""
    from bench import refit_grid
    from bench.baseline import evaluate
    from red_onnx import InputSpec, compress

    task = refit_grid.TASKS[name](samples)
    original = compress(str(task.path), exact=True).model  # BatchNorm folded, as the compressed model
    reference = evaluate(original, task.test)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibration.npz"
        np.savez(path, **{task.input_name: task.calibration})
        start = time.perf_counter()
        result = compress(str(task.path), target_macs=target, channel_multiple=task.channel_multiple,
                          force_target=True, latency_check=False, raise_on_failure=False,
                          input_spec=InputSpec(npz=path), sequential_refit=False)  # fmt: skip
        seconds = time.perf_counter() - start

    def figures(model: onnx.ModelProto) -> dict[str, Any]:
        outputs = evaluate(model, task.test)
        if task.scorer is not None:  # the zoo models: their own figures (agreement with the original)
            return task.scorer(outputs, reference)[0] | {
                "rel_l2": refit_grid.score(outputs, reference, None)[0]["rel_l2"]
            }
        found, _ = refit_grid.score(outputs, reference, task.labels)
        return found

    found: dict[str, Any] = {
        "model": name, "target": target, "samples": samples, "calibration": len(task.calibration),
        "test": len(task.test), "test_source": task.test_source, "compress_seconds": round(seconds, 1),
        "macs": result.report.macs_after / result.report.macs_before,
        "one_shot": figures(result.model), "sequential": {},
    }  # fmt: skip
    print(name, target, "one-shot", found["one_shot"], flush=True)
    for alpha in alphas:
        corrected, about = correct_linear(original, result.model, task.calibration, task.input_name, alpha)
        label = str(alpha or "cv")
        found["sequential"][label] = {**figures(corrected), **about}
        print(f"sequential alpha={label}", {k: v for k, v in found["sequential"][label].items()
                                            if k != "layers"}, flush=True)  # fmt: skip
    return found


def _alpha(text: str) -> float | None:
    return None if text == "cv" else float(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cnn",
        nargs="+",
        metavar="MODEL:TARGET:N",
        default=None,
        help=f"measure these CNN runs instead of the encoder (MODEL one of {', '.join(CNNS)})",
    )
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument(
        "--alphas",
        type=_alpha,
        nargs="+",
        default=[0.001, 0.01, 0.1],
        help="ridge strengths; 'cv' (CNNs): per node, on the validation images",
    )
    ap.add_argument("--calibration", type=int, default=te.N_CALIBRATION)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS.name}, or {RESULTS_CNN.name}")
    args = ap.parse_args(argv)  # fmt: skip
    if args.cnn:
        started = time.perf_counter()
        from bench.refit_grid import red_onnx_commit

        runs = []
        for spec in args.cnn:
            name, target, samples = spec.split(":")
            runs.append(_cnn(name, float(target), int(samples), args.alphas))
        found = {"runs": runs, "red_onnx_commit": red_onnx_commit(),
                 "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        (args.out or RESULTS_CNN).write_text(json.dumps(found, indent=2, default=float) + "\n")
        return 0
    args.out = args.out or RESULTS
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
                          raise_on_failure=False, input_spec=InputSpec(npz=path),
                          sequential_refit=False)  # fmt: skip
        seconds = time.perf_counter() - start
    found: dict[str, Any] = {
        "target": args.target, "calibration": len(calib_pairs), "test": len(test_pairs),
        "compress_seconds": round(seconds, 1),
        "one_shot": te.compare(reference, te.embed(result.model, test)), "sequential": {},
    }  # fmt: skip
    print("one-shot", found["one_shot"], flush=True)
    for alpha in args.alphas:
        corrected, layers = correct(original, result.model, calibration, alpha)
        label = str(alpha or "cv")
        found["sequential"][label] = {**te.compare(reference, te.embed(corrected, test)), "layers": layers}
        shown = {k: v for k, v in found["sequential"][label].items() if k != "layers"}
        print(f"sequential alpha={label}", shown, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
