"""Data-free compression of the bundled digits model: MACs, errors and test accuracy.

At the default channel multiple of ``--target-macs`` (16), with the pixels' range given
(``--input-range image:0,1``, no sample of real data), each target is run twice: red_onnx's default
there (the activation rankings and the refit fitted on synthetic draws in that range, the plans
measured on other draws) and ranked on the weights alone (``activations=False``, the ablation); and
once on N(0, 1) draws, what a run told nothing about the input gets. Test accuracy is on the bundled
360-image split, which no run sees.

Usage: ``python bench/approx_digits.py`` (about a minute on 2 cores; writes
``bench/results/data_free_digits.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` and `red_onnx` from a checkout

import red_onnx
from red_onnx.demo import accuracy, demo_path
from red_onnx.options import InputSpec

SPEC = InputSpec(ranges={"image": (0.0, 1.0)})
TARGETS = (0.8, 0.65, 0.55, 0.5)
#: (key, heading, input spec, activations setting)
RUNS: tuple[tuple[str, str, InputSpec, bool | None], ...] = (
    ("range", "in [0, 1] (default)", SPEC, None),
    ("range_weights", "in [0, 1], weights only", SPEC, False),
    ("normal", "N(0, 1) (default)", InputSpec(), None),
)
RESULTS = Path(__file__).parent / "results" / "data_free_digits.json"


def measure(targets: tuple[float, ...] = TARGETS) -> dict[str, Any]:
    """Every run of ``RUNS`` at every target: MACs kept, search and held-out errors, test accuracy."""
    from bench.refit_grid import red_onnx_commit

    started = time.perf_counter()
    before, samples = accuracy(demo_path())
    rows = []
    for target in targets:
        cells = {}
        for key, _, spec, activations in RUNS:
            result = red_onnx.compress(demo_path(), target_macs=target, input_spec=spec,
                                       activations=activations, raise_on_failure=False,
                                       latency_check=False)  # fmt: skip
            budget = result.report.budget or {}
            after, _ = accuracy(result.model)
            cells[key] = {"macs": result.report.macs_after / result.report.macs_before,
                          "search_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
                          "measured_on": budget.get("measured_on"), "accuracy": after}  # fmt: skip
            print(f"{target} {key}: {cells[key]}", flush=True)
        rows.append({"target": target, "cells": cells})
    seconds = round(time.perf_counter() - started, 1)
    return {"accuracy_before": before, "test_samples": samples, "rows": rows,
            "red_onnx_commit": red_onnx_commit(), "seconds": seconds}  # fmt: skip


def table(data: dict[str, Any]) -> str:
    """One markdown row per target: MACs kept and accuracy of each run."""
    heads = " | ".join(f"{head}: MACs / accuracy" for _, head, _, _ in RUNS)
    lines = [f"| `--target-macs` | {heads} |", "|---" * (len(RUNS) + 1) + "|"]
    for row in data["rows"]:
        cells = [row["cells"].get(key) for key, _, _, _ in RUNS]
        shown = [f"{c['macs']:.3f} / {c['accuracy']:.4f}" if c else "—" for c in cells]
        lines.append(f"| {row['target']} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data = measure()
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
