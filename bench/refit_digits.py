"""The least-squares refit against merges only, on the bundled digits model with real calibration images.

Calibration: the first N images of scikit-learn's digits training split (the split the bundled test
split was held out from: ``models/train_digits.py``, seed 0, 20% test), so calibration and test images
never overlap. Each target is run with the refit ranking and without it (``--no-refit``), the same
samples and options otherwise; accuracy is on the 360 held-out test images.

Usage: ``python bench/refit_digits.py [--samples 256] [--out bench/results/refit_digits.json]``
(about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import red_onnx
from red_onnx.demo import accuracy, demo_path
from red_onnx.options import InputSpec

TARGETS = (0.8, 0.7, 0.6, 0.5)
SEED, TEST_SIZE = 0, 0.2  # as models/train_digits.py


def calibration_images(count: int) -> np.ndarray:
    """The first ``count`` images of the digits training split, [count, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    train, _ = train_test_split(images, test_size=TEST_SIZE, random_state=SEED, stratify=digits.target)
    return train[:count]


def run(samples: int) -> dict[str, object]:
    """Every target with and without the refit: MACs kept, search and held-out error, test accuracy."""
    before, tested = accuracy(demo_path())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "calibration.npz"
        np.savez(path, image=calibration_images(samples))
        spec = InputSpec(npz=path)
        for target in TARGETS:
            for refit in (True, False):
                result = red_onnx.compress(
                    demo_path(), target_macs=target, channel_multiple=1, input_spec=spec, refit=refit,
                    latency_check=False, force_target=True,
                )  # fmt: skip
                budget = result.report.budget or {}
                after, _ = accuracy(result.model)
                rows.append({
                    "target": target, "refit": refit,
                    "macs_kept": round(result.report.macs_after / result.report.macs_before, 4),
                    "search_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
                    "accuracy": after,
                    "rankings": [g["ordering"] for g in budget.get("groups", []) if g["removed"]],
                })  # fmt: skip
    return {"samples": samples, "test_images": tested, "accuracy_before": before, "rows": rows}


def markdown(results: dict) -> str:
    """The results as a markdown table."""
    lines = [
        f"| target | rule | MACs kept | error (search / held out) | test accuracy (before "
        f"{results['accuracy_before']:.4f}, n={results['test_images']}) |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        rule = "refit" if row["refit"] else "merges only"
        errors = f"{row['search_error']:.3g} / {row['heldout_error']:.3g}"
        lines.append(
            f"| {row['target']} | {rule} | {row['macs_kept']:.3f} | {errors} | {row['accuracy']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="calibration images")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refit_digits.json")
    args = parser.parse_args()
    results = run(args.samples)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
