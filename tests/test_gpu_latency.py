"""The GPU latency script's pure logic (``bench/gpu_latency.py``): skeletons, refills, shapes, tables.

Nothing here needs torch or a GPU: the models run in onnxruntime, the timing figures are hand-made.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.gpu_latency import (
    KEPT_VALUES,
    constants_as_initializers,
    refilled,
    shapes_at,
    skeleton,
    summarise,
    table,
    with_conv_ranks,
)

INDICES = 2048  # an integer tensor larger than KEPT_VALUES: kept whole


def _float(values: np.ndarray, name: str = "") -> onnx.TensorProto:
    return numpy_helper.from_array(values.astype(np.float32), name)


def _conv_bn_relu() -> onnx.ModelProto:
    """x → Conv (initializer weight) → BatchNormalization (scale: a small Constant) → Relu → Conv (Constant
    weight) → flattened → Gather of int64 indices; both weights have more than KEPT_VALUES values."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0.05, 0.2, (16, 8, 3, 3)), rng.normal(-0.02, 0.1, (16, 16, 3, 3))
    assert w1.size > KEPT_VALUES and w2.size > KEPT_VALUES
    channels = {"bn_bias": rng.normal(size=16), "bn_mean": rng.normal(size=16)}
    channels["bn_var"] = rng.uniform(0.5, 2, 16)
    initializers = [_float(w1, "w1"), *(_float(v, k) for k, v in channels.items())]
    initializers += [numpy_helper.from_array(np.array([-1]), "flat")]
    initializers += [numpy_helper.from_array(rng.integers(0, 4096, INDICES), "indices")]
    nodes = [
        helper.make_node("Constant", [], ["bn_scale"], value=_float(rng.uniform(0.5, 2, 16))),
        helper.make_node("Constant", [], ["w2"], value=_float(w2)),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("Conv", ["relu", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "flat"], ["flattened"]),
        helper.make_node("Gather", ["flattened", "indices"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [INDICES])
    graph = helper.make_graph(nodes, "conv_bn_relu", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tensors(model: onnx.ModelProto, leave_out: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every initializer and Constant value by name (a Constant's by its output), but ``leave_out``."""
    tensors = {t.name: t for t in model.graph.initializer}
    tensors |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    return {name: numpy_helper.to_array(t) for name, t in tensors.items() if name not in leave_out}


def _run(model: onnx.ModelProto) -> np.ndarray:
    feed = {"x": np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


WEIGHTS = (("w1", "w1"), ("Constant:w2", "w2"))  # (skeleton key, tensor name)


def test_skeleton_strips_only_large_float_tensors_and_records_their_statistics() -> None:
    model = _conv_bn_relu()
    before = _tensors(model)
    stripped = skeleton(model)
    assert set(stripped) == {key for key, _ in WEIGHTS}
    for key, name in WEIGHTS:
        values, figures = before[name], stripped[key]
        assert figures["dims"] == list(values.shape) and figures["dtype"] == "float32"
        assert figures["mean"] == pytest.approx(values.mean()) and figures["std"] == pytest.approx(
            values.std()
        )
    weights = [t for t in model.graph.initializer if t.name == "w1"]
    weights += [n.attribute[0].t for n in model.graph.node if n.output[0] == "w2"]
    assert [list(t.dims) for t in weights] == [[16, 8, 3, 3], [16, 16, 3, 3]]
    assert not any(t.raw_data or t.float_data for t in weights)
    kept = _tensors(model, leave_out=("w1", "w2"))
    assert set(kept) == set(before) - {"w1", "w2"} and kept["indices"].size == INDICES
    for name, values in kept.items():  # small floats (BN, the Constant scale) and int64 tensors intact
        np.testing.assert_array_equal(values, before[name])


def test_refilled_restores_dims_and_statistics_and_runs(tmp_path: Path) -> None:
    original = _conv_bn_relu()
    model = copy.deepcopy(original)
    stripped = skeleton(model)
    onnx.save(model, str(tmp_path / "m.onnx"))
    refill = refilled(tmp_path, {"file": "m.onnx", "stripped": stripped}, seed=0)
    tensors = _tensors(refill)
    for key, name in WEIGHTS:
        values, figures = tensors[name], stripped[key]
        assert list(values.shape) == figures["dims"] and values.dtype == np.float32
        assert values.mean() == pytest.approx(figures["mean"], abs=0.1 * figures["std"])
        assert values.std() == pytest.approx(figures["std"], rel=0.1)
    shapes = {name: values.shape for name, values in _tensors(original).items()}
    assert {name: values.shape for name, values in tensors.items()} == shapes
    assert _run(refill).shape == _run(original).shape == (INDICES,)


def test_constants_as_initializers_keeps_the_outputs() -> None:
    original = _conv_bn_relu()
    model = constants_as_initializers(copy.deepcopy(original))
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    assert {"w2", "bn_scale"} <= {t.name for t in model.graph.initializer}
    np.testing.assert_allclose(_run(model), _run(original), rtol=1e-6)


def test_with_conv_ranks_gives_an_unranked_conv_output_its_weight_rank() -> None:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128]),
              helper.make_tensor_value_info("shape", TensorProto.INT64, ["n"])]  # fmt: skip
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Conv", ["r", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]  # fmt: skip
    weight = numpy_helper.from_array(np.zeros((4, 2, 3, 3), np.float32), "w")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]  # no shape: nothing ranks "c"
    graph = helper.make_graph(nodes, "g", inputs, outputs, [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shaped = [v.name for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")]
    assert "c" not in shaped
    ranked = with_conv_ranks(model)
    conv = [v for v in ranked.graph.value_info if v.name == "c"]
    assert len(conv) == 1 and len(conv[0].type.tensor_type.shape.dim) == 4


def test_shapes_at_prepared_batches_scaled_64_and_skipped() -> None:
    one = {"x": {"shape": [1, 3, 16, 16], "dtype": "float32"}}
    state = {"shape": [2, 16], "dtype": "int64"}  # no batch axis: axis 0 is not 16
    sixteen = {"x": {"shape": [16, 3, 16, 16], "dtype": "float32"}, "state": state}
    entry = {"inputs": {"1": one, "16": sixteen}}
    assert shapes_at(entry, 1) == one and shapes_at(entry, 16) == sixteen
    assert shapes_at(entry, 64) == {"x": {"shape": [64, 3, 16, 16], "dtype": "float32"}, "state": state}
    no_batch = {"inputs": {"1": one, "16": {"skipped": "no batch axis"}}}
    assert shapes_at(no_batch, 16) == shapes_at(no_batch, 64) == {"skipped": "no batch axis"}
    assert "skipped" in shapes_at({"inputs": {"1": one}}, 64)


def test_summarise_ratios_noise_and_the_rewrites_of_slower_runs() -> None:
    fast, slow = {"macs_ratio": 0.5, "rewrites": ["prune"]}, {"macs_ratio": 0.9, "rewrites": ["merge"]}
    figures = {"fast": fast, "slow": slow}
    summary = summarise([10.0, 8.0, 12.0, 10.5], ["fast", "slow"], figures)
    assert summary["original_ms"] == 10.0 and summary["aa_ms"] == 10.5 and summary["aa_noise"] == 0.05
    faster = {"ms": 8.0, "latency_ratio": 0.8, "macs_ratio": 0.5, "slower_because_of": []}
    assert summary["after"]["fast"] == faster  # faster: no rewrite to blame
    slower = summary["after"]["slow"]
    assert slower["latency_ratio"] == 1.2 and slower["slower_because_of"] == ["merge"]  # beyond the 5% noise
    # 4% slower: beyond the 3% floor when the A/A runs agree, within the noise when they differ by 10%
    assert summarise([10.0, 10.4, 10.0], ["slow"], figures)["after"]["slow"]["slower_because_of"] == ["merge"]
    assert summarise([10.0, 10.4, 11.0], ["slow"], figures)["after"]["slow"]["slower_because_of"] == []
    assert summarise([10.0, 10.2, 10.0], ["slow"], figures)["after"]["slow"]["slower_because_of"] == []


def test_table_row_cells(tmp_path: Path) -> None:
    def row(dtype: str, batch: int, ms: float, ratio: float, noise: float) -> dict[str, Any]:
        after = {"target 0.8": {"ms": ms * ratio, "latency_ratio": ratio, "macs_ratio": 0.6134}}
        return dict(model="net", dtype=dtype, batch=batch, original_ms=ms, aa_noise=noise, after=after)

    eager = [row("float32", 1, 2.0, 0.8, 0.01), row("float32", 16, 9.0, 0.9, 0.05)]
    eager += [row("float32", 64, 30.0, 1.0, 0.02), row("float16", 1, 1.5, 0.7, 0.0)]
    eager += [{"model": "net", "dtype": "float16", "batch": 16, "skipped": "a float16 kernel"}]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"eager": eager}))
    lines = table(results).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model | run | MACs ratio |")
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    # f16 batch 16 skipped and batch 64 absent: "—"; the noise is the model's largest
    expected = ["net", "target 0.8", "0.613", "2.00 / 30.00", "0.80 / 0.90 / 1.00", "0.70 / — / —", "±5.0%"]
    assert cells == expected
