"""The >2 GB route (external data, verification and checks by path), exercised with lowered limits.

Allocating 2 GB in a test is not an option on this machine; the limits are module constants, so the
same code paths run with them lowered to a few kilobytes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from red_onnx import cli
from red_onnx.demo import demo_path
from red_onnx.io import files as io
from red_onnx.runtime import sessions


@pytest.fixture
def tiny_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_PROTO_BYTES", 10_000)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)


def test_large_model_is_verified_by_path_and_saved_with_external_data(tiny_limits, tmp_path) -> None:
    source = tmp_path / "big.onnx"
    io.save_model(onnx.load(demo_path()), source)
    assert (tmp_path / "big.onnx.data").is_file()
    out = tmp_path / "out.onnx"
    assert cli.main([str(source), str(out), "--exact", "-q", "--json", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "out.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    feed = {"image": np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)}
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_large_model_proto_is_verified_by_path(tiny_limits) -> None:
    import red_onnx

    result = red_onnx.compress(onnx.load(demo_path()), exact=True)
    assert result.verified
    assert result.report.verification["outputs"][0]["name"] == "logits"
