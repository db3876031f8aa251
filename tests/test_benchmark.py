"""``--benchmark``: latency before/after per batch, through the CLI and the API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx import cli
from red_onnx.benchmark import benchmark
from red_onnx.verify import InputSpec


def conv_relu(batch: int | str) -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 16, 16])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_batch_is_measured_at_1_and_16() -> None:
    model = conv_relu("N")
    figures = benchmark(model, model, InputSpec(), runs=3, threads=1)
    assert set(figures.batches) == {"1", "16"} and not figures.skipped
    for row in figures.batches.values():
        assert row["before_ms"] > 0 and row["after_ms"] > 0
        assert row["ratio"] == pytest.approx(row["after_ms"] / row["before_ms"], rel=1e-2)
    assert figures.threads == 1 and figures.runs == 3 and figures.provider == "CPUExecutionProvider"


def test_static_batch_says_why_16_is_not_measured() -> None:
    model = conv_relu(1)
    figures = benchmark(model, model, InputSpec(), runs=2)
    assert list(figures.batches) == ["1"]
    assert figures.skipped == {"16": "no input has a dynamic batch axis"}


def test_cli_benchmark_reports_latency(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source, report = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(conv_relu("N"), source)
    code = cli.main([str(source), str(tmp_path / "o.onnx"), "--exact", "--benchmark", "--threads", "1",
                     "--json", str(report)])  # fmt: skip
    out = capfd.readouterr().out
    assert code == 0
    assert "latency (onnxruntime CPUExecutionProvider, threads 1, median of 20 runs" in out
    latency = json.loads(report.read_text())["latency"]
    assert set(latency["batches"]) == {"1", "16"}


def test_cli_bad_thread_count_is_a_usage_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(conv_relu("N"), source)
    code = cli.main([str(source), str(tmp_path / "o.onnx"), "--benchmark", "--threads", "0"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and "--threads" in err and "\n" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_batch_the_model_cannot_run_is_skipped_with_onnxruntimes_reason() -> None:
    model = conv_relu("N")  # its axis 0 is dynamic, but a Reshape hard-codes batch 1 (as some exports do)
    shape = numpy_helper.from_array(np.array([1, 8 * 16 * 16], np.int64), "flat_shape")
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("Reshape", ["y", "flat_shape"], ["flat"], name="flatten"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 8 * 16 * 16]))
    figures = benchmark(model, model, InputSpec(), runs=2, threads=1)
    assert list(figures.batches) == ["1"]
    assert figures.skipped["16"].startswith("onnxruntime could not run this batch: ")
    assert "\n" not in figures.skipped["16"]
