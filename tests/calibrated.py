"""Calibration files and held-out checks shared by the refit tests.

Seeded images with neighbouring pixels correlated (as in real images), the held-out rows red_onnx's
split of such a file keeps apart, and the relative L2 error of a written model against the original
on those rows (what the report's held-out error must equal).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import red_onnx
from red_onnx.verify.inputs import split_rows


def smooth_images(path: Path, count: int = 64) -> red_onnx.InputSpec:
    """``count`` seeded 3×10×10 images of smooth noise, saved as ``x`` in ``path``."""
    noise = np.random.default_rng(3).standard_normal((count, 3, 12, 12))
    smooth = sum(noise[:, :, i : i + 10, j : j + 10] for i in range(3) for j in range(3)) / 3.0
    np.savez(path, x=smooth.astype(np.float32))
    return red_onnx.InputSpec(npz=path)


def heldout_rows(spec: red_onnx.InputSpec) -> np.ndarray:
    """The rows of ``spec``'s file (input ``x``) red_onnx keeps for its held-out check."""
    rows = np.load(spec.calibration)["x"]
    return rows[split_rows(len(rows))["heldout"]]


def output_errors(model: onnx.ModelProto, written: onnx.ModelProto, rows: np.ndarray) -> list[float]:
    """Per output, the relative L2 error of ``written`` against ``model`` on ``rows`` (input ``x``)."""
    providers = ["CPUExecutionProvider"]
    outputs = [ort.InferenceSession(m.SerializeToString(), providers=providers).run(None, {"x": rows})
               for m in (model, written)]  # fmt: skip
    return [
        float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))
        for want, got in zip(*outputs, strict=True)
    ]
