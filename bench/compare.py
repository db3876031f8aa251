"""RED (approximate merging, with and without KDE hashing) against the onnxsim pruning baseline at equal MACs.

Usage (from the repository root; needs the bench models — ``python bench/models/train_mnist1d.py``,
``python bench/models/export_mobilenetv2.py`` — and ``pip install onnxsim==0.8.1 scikit-image``)::

    python bench/compare.py                         # all three models, the default grid
    python bench/compare.py --models digits mnist1d --grid 0.9 0.8

Models the method was not tuned on (``--stem compare_unseen`` writes ``compare_unseen.json``):
``digits_b`` (``python bench/models/train_digits_variant.py``), ``mnist1d_b``
(``python bench/models/train_mnist1d.py --seed 1 --channels 24 48 64 96 --kernel 3 --name mnist1d_b``)
and ``ppocr_cls``, PP-OCR's MobileNetV3-style text-direction classifier
(``python bench/zoo.py && python bench/models/export_ppocr_cls.py``; fidelity: top-1 agreement with
the original on 106 detected text-line crops, upright and turned).

Fidelity: test accuracy (digits: the bundled split, mnist1d: its generated test split) or top-1
agreement with the original (MobileNetV2, natural-image views). Each cell is measured at the MACs the
method reached; RED is asked for the grid's fraction with ``target_macs`` and the baseline is bisected
to the same fraction. Paired 95% bootstrap intervals compare RED with the baseline on the same
samples. Prints a markdown table and writes ``STEM.png`` and ``STEM.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baseline import evaluate, prune_to_macs
from bench.data import (
    cache_dir,
    load_digits_test,
    load_mnist1d_test,
    natural_image_views,
    paired_bootstrap_ci,
)
from red_onnx import compress
from red_onnx.demo import demo_path
from red_onnx.errors import InputError, RedOnnxError
from red_onnx.options import InputSpec

GRID = (0.9, 0.8, 0.7, 0.6, 0.5)
#: Models whose fidelity is top-1 agreement with the original (no labels).
AGREEMENT = frozenset({"mobilenetv2", "ppocr_cls"})
UNSEEN_HINTS = {
    "digits_b": "python bench/models/train_digits_variant.py",
    "mnist1d_b": "python bench/models/train_mnist1d.py --seed 1 --channels 24 48 64 96 --kernel 3 "
    "--name mnist1d_b",
    "ppocr_cls": "python bench/zoo.py && python bench/models/export_ppocr_cls.py",
}


def _models(names: list[str]) -> dict[str, dict]:
    found = {}
    if "digits" in names:
        images, labels = load_digits_test()
        found["digits"] = {"path": demo_path(), "x": images, "labels": labels,
                           "spec": InputSpec(ranges={"image": (0.0, 1.0)})}  # fmt: skip
    if "mnist1d" in names:
        signals, labels = load_mnist1d_test()
        found["mnist1d"] = {"path": cache_dir() / "mnist1d_cnn.onnx", "x": signals, "labels": labels,
                            "spec": InputSpec()}  # fmt: skip
    if "mobilenetv2" in names:
        found["mobilenetv2"] = {"path": cache_dir() / "mobilenetv2.onnx", "x": natural_image_views(),
                                "labels": None, "spec": InputSpec()}  # fmt: skip
    found |= _unseen_models(names)
    return found


def _cached(name: str, file: str) -> Path:
    path = cache_dir() / file
    if not path.is_file():
        raise InputError(f"{path} is missing; run `{UNSEEN_HINTS[name]}` first")
    return path


def _unseen_models(names: list[str]) -> dict[str, dict]:
    """The models of the same families that the method was not tuned on (module docstring)."""
    found = {}
    if "digits_b" in names:
        images, labels = load_digits_test()
        found["digits_b"] = {"path": _cached("digits_b", "digits_b_cnn.onnx"), "x": images, "labels": labels,
                             "spec": InputSpec(ranges={"image": (0.0, 1.0)})}  # fmt: skip
    if "mnist1d_b" in names:
        path = _cached("mnist1d_b", "mnist1d_b_cnn.onnx")
        signals, labels = load_mnist1d_test()
        found["mnist1d_b"] = {"path": path, "x": signals, "labels": labels, "spec": InputSpec()}
    if "ppocr_cls" in names:
        path = _cached("ppocr_cls", "ppocr_cls.onnx")
        with np.load(_cached("ppocr_cls", "ppocr_cls_views.npz")) as views:
            lines = views["x"]
        found["ppocr_cls"] = {"path": path, "x": lines, "labels": None,
                              "spec": InputSpec(ranges={"x": (-1.0, 1.0)})}  # fmt: skip
    return found


def _correct(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    target = reference.argmax(axis=1) if labels is None else labels
    return (logits.argmax(axis=1) == target).astype(np.int8)


def _red(item: dict, fraction: float, hashing: bool) -> tuple[onnx.ModelProto, dict]:
    started = time.perf_counter()
    result = compress(item["path"], target_macs=fraction, channel_multiple=1, hashing=hashing,
                      input_spec=item["spec"], raise_on_failure=False)  # fmt: skip
    budget = result.report.budget or {}
    kept = result.report.macs_after / result.report.macs_before
    info = {"macs": kept, "synthetic_error": budget.get("error"),
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    return result.model, info


def run_model(name: str, item: dict, grid: tuple[float, ...]) -> list[dict]:
    """Every method at every grid point on one model."""
    original = onnx.load(str(item["path"]))
    reference = evaluate(original, item["x"])
    base_correct = _correct(reference, reference, item["labels"])
    folded = compress(original, exact=True).model  # BN folded: onnxsim only prunes folded chains
    rows = []
    for fraction in grid:
        cells: dict[str, dict] = {}
        for label, hashing in (("red", True), ("red_no_hash", False)):
            try:
                model, info = _red(item, fraction, hashing)
                info["correct"] = _correct(evaluate(model, item["x"]), reference, item["labels"])
            except RedOnnxError as error:
                info = {"error": str(error)}
            cells[label] = info
        try:
            pruned, sparsity, reached = prune_to_macs(folded, fraction, tolerance=0.02)
            correct = _correct(evaluate(pruned, item["x"]), reference, item["labels"])
            cells["baseline"] = {"macs": reached, "sparsity": sparsity, "correct": correct}
        except RedOnnxError as error:
            cells["baseline"] = {"error": str(error)}
        rows.append(_summarise(name, fraction, cells, base_correct))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "cells"}), flush=True)
    return rows


def _summarise(name: str, fraction: float, cells: dict, base_correct: np.ndarray) -> dict:
    row = {"model": name, "target": fraction, "samples": len(base_correct),
           "original": float(base_correct.mean()), "cells": {}}  # fmt: skip
    for label, info in cells.items():
        entry = {k: v for k, v in info.items() if k != "correct"}
        if "correct" in info:
            entry["fidelity"] = float(info["correct"].mean())
        row["cells"][label] = entry
    if "correct" in cells.get("red", {}) and "correct" in cells.get("baseline", {}):
        row["red_minus_baseline"] = list(
            paired_bootstrap_ci(cells["red"]["correct"], cells["baseline"]["correct"])
        )
    if "correct" in cells.get("red", {}):
        row["red_minus_original"] = list(paired_bootstrap_ci(cells["red"]["correct"], base_correct))
    return row


def _cell(row: dict, label: str) -> str:
    entry = row["cells"].get(label, {})
    if "fidelity" not in entry:
        return "—"
    return f"{entry['fidelity']:.3f} @ {entry['macs']:.2f}"


def markdown(rows: list[dict]) -> str:
    """The README table."""
    lines = [
        "| model (n) | MACs target | original | RED | RED without hashing | baseline "
        "| RED − baseline (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ci = row.get("red_minus_baseline")
        interval = f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else "—"
        lines.append(
            f"| {row['model']} ({row['samples']}) | {row['target']:.2f} | {row['original']:.3f} | "
            f"{_cell(row, 'red')} | {_cell(row, 'red_no_hash')} | {_cell(row, 'baseline')} | {interval} |"
        )
    return "\n".join(lines)


def predictiveness(rows: list[dict]) -> str:
    """How well the synthetic-input error (what the search sees) predicts the real fidelity loss."""
    lines = ["| model | RED runs | Spearman ρ(synthetic error, real loss) | synthetic error → real loss |",
             "|---|---|---|---|"]  # fmt: skip
    for name in sorted({r["model"] for r in rows}):
        cells = [
            (r, cell)
            for r in rows
            if r["model"] == name
            for key, cell in r["cells"].items()
            if key.startswith("red") and "fidelity" in cell and cell.get("synthetic_error") is not None
        ]
        pairs = [(cell["synthetic_error"], r["original"] - cell["fidelity"]) for r, cell in cells]
        if len(pairs) < 3:
            continue
        errors, losses = (np.array(column) for column in zip(*pairs, strict=True))
        rho = np.corrcoef(np.argsort(np.argsort(errors)), np.argsort(np.argsort(losses)))[0, 1]
        shown = ", ".join(f"{e:.2f}→{loss:+.3f}" for e, loss in sorted(pairs)[:: max(1, len(pairs) // 5)])
        lines.append(f"| {name} | {len(pairs)} | {rho:.2f} | {shown} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Fidelity against MACs kept, one panel per model."""
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        for label, style in (("red", "o-"), ("red_no_hash", "s--"), ("baseline", "x:")):
            points = sorted((r["cells"][label]["macs"], r["cells"][label]["fidelity"]) for r in rows
                            if r["model"] == name and "fidelity" in r["cells"].get(label, {}))  # fmt: skip
            if points:
                axis.plot(*zip(*points, strict=True), style, label=label)
        axis.set_title(name)
        axis.set_xlabel("fraction of MACs kept")
        axis.set_ylabel("top-1 agreement" if name in AGREEMENT else "accuracy")
        axis.invert_xaxis()
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "mnist1d", "mobilenetv2"])
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--stem", default="compare", help="writes STEM.json and STEM.png into --out")
    parser.add_argument("--no-plot", action="store_true", help="write no STEM.png")
    parser.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                        help="only redraw the table and plot from earlier compare.json files")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.render:
        rows = [row for path in args.render for row in json.loads(path.read_text())]
    for name, item in ({} if args.render else _models(args.models)).items():
        rows += run_model(name, item, tuple(args.grid))
    (args.out / f"{args.stem}.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    if not args.no_plot:
        plot(rows, args.out / f"{args.stem}.png")
    print(markdown(rows))
    print()
    print(predictiveness(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
