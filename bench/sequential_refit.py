"""One-shot against sequential reconstruction (a measurement, not a feature).

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
``refit_N`` cell): every 1×1 ungrouped Conv and Gemm that lost input channels and kept its outputs is
corrected in graph order towards the BatchNorm-folded original's output of the same node, at up to
``CONV_ROWS`` positions of 3/4 of the calibration images (the rest validate; k×k and grouped Convs stay
as they are). ``--alphas cv`` chooses α per node among ``CV_ALPHAS`` on the validation images, and
leaves a node unchanged where no α lowers its validation error.

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
#: The ridge strengths (× mean centred diagonal) tried per node with ``--alphas cv``.
CV_ALPHAS = (0.01, 0.1, 1.0, 10.0)
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


def ridge_change(
    xs: np.ndarray, wanted: np.ndarray, current: np.ndarray, fit: np.ndarray, alpha: float
) -> tuple[np.ndarray, dict[str, float]]:
    """The weight change (last row: the intercept) that moves ``current`` towards ``wanted``.

    Ridge regression of the residual on ``xs`` (inputs with a ones column last) over the ``fit`` rows,
    towards no change (``λ = α·mean diag`` of the centred Gram; the intercept free); with the relative
    error on the other rows before and after.
    """
    residual = (wanted - current).astype(np.float64)
    gram = xs[fit].T @ xs[fit]
    centred = np.diag(gram)[:-1] - xs[fit, :-1].sum(axis=0) ** 2 / fit.sum()
    penalty = np.full(len(gram), alpha * float(np.mean(centred)))
    penalty[-1] = 0.0  # the intercept is free
    change = np.linalg.solve(gram + np.diag(penalty), xs[fit].T @ residual[fit])
    scale = np.linalg.norm(wanted[~fit])
    return change, {
        "validation_before": float(np.linalg.norm(residual[~fit]) / scale),
        "validation_after": float(np.linalg.norm(residual[~fit] - xs[~fit] @ change) / scale),
    }


def chosen_change(
    xs: np.ndarray, wanted: np.ndarray, current: np.ndarray, fit: np.ndarray, alpha: float | None
) -> tuple[float, np.ndarray, dict[str, float]]:
    """``(α, change, errors)`` of :func:`ridge_change` at ``alpha``; None: the ``CV_ALPHAS`` value with
    the least validation error, or α 0 and no change where none lowers it."""
    tried = [(a, *ridge_change(xs, wanted, current, fit, a)) for a in ([alpha] if alpha else CV_ALPHAS)]
    chosen, change, errors = min(tried, key=lambda item: item[2]["validation_after"])
    if alpha is None and errors["validation_after"] >= errors["validation_before"]:
        return 0.0, np.zeros_like(change), errors  # no α helps on the validation rows: unchanged
    return chosen, change, errors


def correct(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    calibration: dict[str, np.ndarray],
    alpha: float | None,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The sequentially corrected copy of ``compressed`` and, per layer, its validation error before/after.

    ``alpha`` None: chosen per layer as :func:`chosen_change` says.
    """
    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    mask = calibration["attention_mask"].astype(bool)
    order = np.random.default_rng(0).permutation(len(mask))
    fit_rows = order[: len(order) * 3 // 4]
    sentence = np.repeat(np.arange(len(mask))[:, None], mask.shape[1], axis=1)[mask]
    fit = np.isin(sentence, fit_rows)
    feeds = [{k: v[i : i + BATCH] for k, v in calibration.items()} for i in range(0, len(mask), BATCH)]
    pairs, _ = _changed_linear(original, model, ("MatMul",))
    targets = _capture(original, [o.output[0] for _, o in pairs], feeds)
    layers = []
    for (node, _), wanted in zip(pairs, targets, strict=True):
        weights = {i.name: i for i in model.graph.initializer}
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        x, current = _capture(model, [node.input[0], node.output[0]], feeds)
        xs = np.hstack([x[mask].astype(np.float64), np.ones((int(mask.sum()), 1))])
        chosen, change, errors = chosen_change(xs, wanted[mask], current[mask], fit, alpha)
        layers.append({"layer": node.name, "alpha": chosen, **errors})
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array((weight + change[:-1]).astype(np.float32), node.input[1])
        )
        bias = _bias_after(model, node.output[0])
        values = numpy_helper.to_array(weights[bias]).astype(np.float64) + change[-1]
        weights[bias].CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias))
    return model, layers


#: Input positions per layer the CNN correction fits and validates on at most (a seeded subset of the
#: positions, the same in every image; all where there are fewer).
CONV_ROWS = 200_000


def _changed_linear(
    original: onnx.ModelProto, compressed: onnx.ModelProto, kinds: tuple[str, ...] = ("Conv", "Gemm")
) -> tuple[list[tuple[Any, Any]], int]:
    """(compressed node, original node) of every node of ``kinds`` (1×1 ungrouped Convs, Gemms, MatMuls
    with a constant weight) whose weight lost input channels and kept its outputs, in graph order; and
    how many others lost some (k×k or grouped, or their own outputs merged: left as they are). Nodes
    are matched by their output (names may be empty)."""
    before = {n.output[0]: n for n in original.graph.node if n.output}
    weights = {i.name: i for i in original.graph.initializer}
    now = {i.name: i for i in compressed.graph.initializer}
    found, skipped = [], 0
    for node in compressed.graph.node:
        if node.op_type not in kinds or node.output[0] not in before or node.input[1] not in now:
            continue
        old, new = weights.get(before[node.output[0]].input[1]), now[node.input[1]]
        inputs = 1 if _rows_first(node) else 0
        if old is None or old.dims[inputs] == new.dims[inputs]:
            continue
        outputs = 0 if node.op_type == "Conv" else 1 - inputs
        if (
            old.dims[outputs] != new.dims[outputs]
            or (  # its own outputs merged too: no target to refit to
                node.op_type == "Conv" and (list(new.dims[2:]) != [1, 1] or _attribute(node, "group", 1) != 1)
            )
        ):
            skipped += 1
            continue
        found.append((node, before[node.output[0]]))
    return found, skipped


def _rows_first(node: Any) -> bool:
    """Whether the node's weight holds one row per output (Conv, Gemm with transB), not per input."""
    return node.op_type == "Conv" or (node.op_type == "Gemm" and bool(_attribute(node, "transB", 0)))


def _attribute(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _positions(value: np.ndarray, picked: np.ndarray | None) -> np.ndarray:
    """[N, C, H, W] (or [N, C]) as rows [N·P, C] at the picked flat spatial positions (all: None)."""
    if value.ndim == 2:
        return value
    flat = value.reshape(value.shape[0], value.shape[1], -1)
    flat = flat if picked is None else flat[:, :, picked]
    return flat.transpose(0, 2, 1).reshape(-1, value.shape[1])


def correct_linear(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    images: np.ndarray,
    input_name: str,
    alpha: float | None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The sequentially corrected copy of a compressed CNN: its 1×1 Convs and Gemms, in graph order.

    Each is refit (``ridge_change``) on its input in the corrected model so far towards the original
    model's output of the same node, at up to ``CONV_ROWS`` positions; 3/4 of the images fit, the rest
    validate. The intercept goes into the node's bias. ``alpha`` None: per node, the ``CV_ALPHAS`` value
    with the least validation error, or no change where none lowers it.
    """
    from red_onnx.runtime.tensor_values import run_tensors, tensor_fetch

    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    order = np.random.default_rng(0).permutation(len(images))
    fit_images = np.isin(np.arange(len(images)), order[: len(order) * 3 // 4])
    feeds = [{input_name: images[i : i + BATCH]} for i in range(0, len(images), BATCH)]
    pairs, skipped = _changed_linear(original, model)
    rng = np.random.default_rng(1)
    picks: list[np.ndarray | None] = []
    targets: list[list[np.ndarray]] = [[] for _ in pairs]
    names = [o.output[0] for _, o in pairs]
    fetch = tensor_fetch(original, names)
    for feed in feeds if pairs else []:  # the original's outputs of every node, at the picked positions
        values = fetch(names, feed)
        for k, value in enumerate(values):
            if len(picks) <= k:
                size = int(np.prod(value.shape[2:])) if value.ndim > 2 else 1
                per_image = max(CONV_ROWS // len(images), 1)
                picks.append(
                    None if size <= per_image else np.sort(rng.choice(size, per_image, replace=False))
                )
            targets[k].append(_positions(value, picks[k]))
    layers = []
    for k, (node, _) in enumerate(pairs):
        weights = {i.name: i for i in model.graph.initializer}
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        rows_first = _rows_first(node)
        matrix = weight.reshape(weight.shape[0], -1) if rows_first else weight.T
        bias = numpy_helper.to_array(weights[node.input[2]]).astype(np.float64)
        runs = run_tensors(model, [node.input[0]], feeds)
        x = np.concatenate([_positions(run[0], picks[k]) for run in runs])
        wanted = np.concatenate(targets[k]).astype(np.float64)
        current = x.astype(np.float64) @ matrix.T + bias
        per_image = len(x) // len(images)
        fit = np.repeat(fit_images, per_image)
        xs = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
        chosen, change, errors = chosen_change(xs, wanted, current, fit, alpha)
        layers.append({"layer": node.name, "rows": len(x), "alpha": chosen, **errors})
        matrix = matrix + change[:-1].T
        updated = matrix.reshape(weight.shape) if rows_first else matrix.T
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(updated.astype(np.float32), node.input[1]))
        weights[node.input[2]].CopyFrom(
            numpy_helper.from_array((bias + change[-1]).astype(np.float32), node.input[2])
        )
    return model, {"layers": layers, "corrected": len(pairs), "skipped": skipped}


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
                          input_spec=InputSpec(npz=path))  # fmt: skip
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
        label = str(alpha or "cv")
        found["sequential"][label] = {**te.compare(reference, te.embed(corrected, test)), "layers": layers}
        shown = {k: v for k, v in found["sequential"][label].items() if k != "layers"}
        print(f"sequential alpha={label}", shown, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
