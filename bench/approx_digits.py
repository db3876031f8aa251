"""Experimental approximate merging on the bundled digits model: MACs, error and test accuracy.

Usage: ``python bench/approx_digits.py`` (prints the README table; about a minute on 2 cores).
"""

from __future__ import annotations

import red_onnx
from red_onnx.demo import accuracy, demo_path
from red_onnx.options import InputSpec

SPEC = InputSpec(ranges={"image": (0.0, 1.0)})
RUNS = [
    ("`--tolerance 0.1`", {"tolerance": 0.1, "channel_multiple": 1}),
    ("`--tolerance 0.2`", {"tolerance": 0.2, "channel_multiple": 1}),
    ("`--tolerance 0.3`", {"tolerance": 0.3, "channel_multiple": 1}),
    ("`--target-macs 0.7` (multiple 8)", {"target_macs": 0.7, "channel_multiple": 8}),
]


def main() -> None:
    """Print one markdown row per run."""
    before, samples = accuracy(demo_path())
    header = f"test accuracy (before {before:.4f}, n={samples})"
    print(f"| run | MACs kept | error (search / held out) | {header} |")
    print("|---|---|---|---|")
    for label, options in RUNS:
        result = red_onnx.compress(demo_path(), input_spec=SPEC, raise_on_failure=False, **options)
        budget = result.report.budget
        kept = result.report.macs_after / result.report.macs_before
        after, _ = accuracy(result.model)
        errors = f"{budget['error']:.3g} / {budget['heldout_error']:.3g}"
        print(f"| {label} | {kept:.3f} | {errors} | {after:.4f} |")


if __name__ == "__main__":
    main()
