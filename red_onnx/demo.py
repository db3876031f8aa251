"""The bundled demo model (``red_onnx/data/``): a digits CNN and its held-out test split."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DEMO_MODEL = "digits_cnn.onnx"
DEMO_SPLIT = "digits_test.npz"


def demo_path(name: str = DEMO_MODEL) -> Path:
    """Path of a bundled demo file (works from a source checkout and from an install)."""
    path = Path(str(resources.files("red_onnx.data").joinpath(name)))
    if not path.is_file():
        from red_onnx.errors import InputError

        raise InputError(f"the bundled demo file {name} is missing from {path.parent}; reinstall red-onnx")
    return path


def accuracy(model: onnx.ModelProto | Path) -> tuple[float, int]:
    """Top-1 accuracy of a digits model on the bundled test split, and the number of samples."""
    split = np.load(demo_path(DEMO_SPLIT))
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: split["image"]})[0]
    correct = (logits.argmax(axis=1) == split["label"]).sum()
    return float(correct / len(split["label"])), len(split["label"])
