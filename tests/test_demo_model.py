"""The bundled demo model (red_onnx/data/digits_cnn.onnx) and its held-out split (digits_test.npz)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).parents[1] / "red_onnx" / "data"
ONNX_PATH = MODELS / "digits_cnn.onnx"
NPZ_PATH = MODELS / "digits_test.npz"

N_DIGITS = 1797  # sklearn load_digits
N_TEST = 360  # stratified 20% split of 1797: ceil(0.2 * 1797)
MIN_ACCURACY = 0.93


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(ONNX_PATH))


@pytest.fixture(scope="module")
def split() -> dict[str, np.ndarray]:
    with np.load(NPZ_PATH) as data:
        return {key: data[key] for key in data.files}


def test_split_arrays(split: dict[str, np.ndarray]) -> None:
    image, label = split["image"], split["label"]
    assert image.dtype == np.float32 and label.dtype == np.int64
    assert image.shape == (N_TEST, 1, 8, 8)
    assert label.shape == (N_TEST,)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(label).tolist()) == set(range(10))


def test_split_matches_sklearn(split: dict[str, np.ndarray]) -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    digits = datasets.load_digits()
    assert len(digits.target) == N_DIGITS
    images = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    _, x_test, _, y_test = model_selection.train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    assert len(y_test) == len(split["label"])
    np.testing.assert_array_equal(split["label"], y_test)
    np.testing.assert_array_equal(split["image"], x_test)


def test_graph_ops(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    counts = collections.Counter(node.op_type for node in model.graph.node)
    assert counts["BatchNormalization"] == 4
    assert counts["Add"] >= 1
    assert counts["Gemm"] == 2
    assert counts["Flatten"] + counts["Reshape"] >= 1
    bns = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    assert all(len(node.output) == 1 for node in bns), "BN must have inference semantics"
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta == {"source": "models/train_digits.py", "dataset": "sklearn load_digits"}


def test_accuracy(split: dict[str, np.ndarray]) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(ONNX_PATH), options, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": split["image"]})[0]
    assert logits.shape == (N_TEST, 10)
    accuracy = float(np.mean(logits.argmax(axis=1) == split["label"]))
    assert accuracy >= MIN_ACCURACY, f"test accuracy {accuracy:.4f} < {MIN_ACCURACY}"


def test_dynamic_batch(split: dict[str, np.ndarray]) -> None:
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    batch = session.run(["logits"], {"image": split["image"][:7]})[0]
    single = session.run(["logits"], {"image": split["image"][3:4]})[0]
    assert batch.shape == (7, 10)
    np.testing.assert_allclose(single[0], batch[3], rtol=1e-5, atol=1e-5)
