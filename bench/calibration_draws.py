"""How much one calibration draw moves a calibrated result: the same target on several random draws.

A calibrated run sees N samples, and which N it sees moves its result. This script draws ``--draws`` sets of
``--samples`` rows from one larger calibration pool of ``bench/refit_grid.py``'s task (``TASKS[model]
(pool)``: for MobileNetV2 the views of the same calibration pictures, ``pool / 29`` views each), runs
red_onnx's refit at one MACs target on each (as ``refit_grid``'s ``refit_N`` cells: ``force_target``, no
latency check, the task's channel multiple) and scores every result on the task's one test set. The
spread over draws is the noise a single grid cell carries from its calibration samples.

Usage (from the repository root; MobileNetV2 as ``bench/refit_grid.py`` says)::

    python bench/calibration_draws.py --model mobilenetv2 --target 0.9 --draws 3 --samples 128 \\
        --pool 512 --out bench/results/calibration_draws_mobilenetv2.json
    python bench/calibration_draws.py --sensitivity measured --out measured.json   # every level measured
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import refit_grid
from red_onnx.options import SENSITIVITY_MODES

#: Seed of draw k: DRAW_SEED + k.
DRAW_SEED = 100
#: The figures kept per draw (those the task's scorer gives, where present).
KEPT = ("macs", "agreement", "agreement_confident", "confident_views", "top5", "kl", "accuracy",
        "rel_l2", "search_error", "heldout_error", "seconds")  # fmt: skip


def draw_rows(pool: int, samples: int, draw: int) -> np.ndarray:
    """Sorted row indices of draw ``draw``: ``samples`` of ``pool`` rows without replacement, seeded."""
    return np.sort(np.random.default_rng(DRAW_SEED + draw).choice(pool, samples, replace=False))


def run(model: str, target: float, draws: int, samples: int, pool: int, sensitivity: str = "auto") -> dict:
    """Every draw's figures at ``target`` on the task's test set (``sensitivity``: red_onnx's).

    The result also holds the original model's figures on the test set (``original``).
    """
    task = dataclasses.replace(refit_grid.TASKS[model](pool), settings={"sensitivity": sensitivity})
    if len(task.calibration) < pool:
        raise SystemExit(f"{model}'s calibration pool has {len(task.calibration)} rows, fewer than {pool}")
    rows, original = [], {}
    for draw in range(draws):
        picked = dataclasses.replace(
            task, calibration=np.ascontiguousarray(task.calibration[draw_rows(pool, samples, draw)])
        )
        result = refit_grid.run_task(picked, [target], [samples], ["refit"])
        cell, original = result["rows"][0]["cells"][f"refit_{samples}"], result["original"]
        rows.append({"draw": draw} | {key: cell[key] for key in KEPT if key in cell})
        print(f"draw {draw}: {json.dumps(rows[-1])}", flush=True)
    return {"model": model, "target": target, "samples": samples, "pool": pool, "draw_seed": DRAW_SEED,
            "sensitivity": sensitivity, "original": original,
            "test_samples": len(task.test), "test_source": task.test_source,
            "calibration_source": task.calibration_source, "draws": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(refit_grid.TASKS), default="mobilenetv2")
    parser.add_argument("--target", type=float, default=0.9, help="MACs fraction kept")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128, help="calibration rows per draw")
    parser.add_argument("--pool", type=int, default=512, help="rows the draws are taken from")
    parser.add_argument("--sensitivity", choices=SENSITIVITY_MODES, default="auto", help="red_onnx's")
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration_draws_mobilenetv2.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args.model, args.target, args.draws, args.samples, args.pool, args.sensitivity)
    result |= {
        "red_onnx_commit": refit_grid.red_onnx_commit(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
