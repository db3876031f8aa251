"""The same planted redundancy through the ops whose signatures changed across opsets (9 .. newest)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import red_onnx

NEWEST = onnx.defs.onnx_opset_version()
OPSETS = sorted({9, 10, 11, 13, 17, 18, NEWEST})


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _split_node(opset: int, inits: list) -> onnx.NodeProto:
    if opset < 13:
        return helper.make_node("Split", ["r"], ["s0", "s1"], axis=1, split=[4, 4], name="split")
    if opset < 18:
        inits.append(_init("split_sizes", np.array([4, 4], np.int64)))
        return helper.make_node("Split", ["r", "split_sizes"], ["s0", "s1"], axis=1, name="split")
    return helper.make_node("Split", ["r"], ["s0", "s1"], axis=1, num_outputs=2, name="split")


def _clip_node(opset: int, inits: list) -> onnx.NodeProto:
    if opset < 11:
        return helper.make_node("Clip", ["c0"], ["k0"], min=0.0, max=6.0, name="clip")
    inits += [_init("lo", np.array(0.0, np.float32)), _init("hi", np.array(6.0, np.float32))]
    return helper.make_node("Clip", ["c0", "lo", "hi"], ["k0"], name="clip")


def build(opset: int) -> onnx.ModelProto:
    """conv(8, channels 1 = 0 and 5 = 4) → Relu → Split(4, 4) → [Clip → conv, conv] → Concat → conv → GAP."""
    rng = np.random.default_rng(opset)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    w[1], b[1], w[5], b[5] = w[0], b[0], w[4], b[4]
    inits = [_init("w", w), _init("b", b)]
    for name, cin in (("wa", 4), ("wb", 4), ("wc", 16)):
        inits.append(_init(name, rng.standard_normal((8, cin, 1, 1)).astype(np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        _split_node(opset, inits),
        helper.make_node("Identity", ["s0"], ["c0"], name="ident"),
        _clip_node(opset, inits),
        helper.make_node("Conv", ["k0", "wa"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["s1", "wb"], ["bb"], name="conv_b"),
        helper.make_node("Concat", ["a", "bb"], ["cat"], axis=1, name="concat"),
        helper.make_node("Conv", ["cat", "wc"], ["z"], name="conv_c"),
        helper.make_node("GlobalAveragePool", ["z"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "opsets",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(onnx.IR_VERSION, 10) if opset >= 21 else 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", OPSETS)
def test_planted_channels_go_at_every_opset(opset: int) -> None:
    model = build(opset)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:
        pytest.skip(f"onnxruntime {ort.__version__} cannot run opset {opset}: {str(error)[:80]}")
    result = red_onnx.compress(model, exact=True)
    layers = {layer.name: layer for layer in result.report.layers}
    assert (layers["conv"].channels_before, layers["conv"].channels_after) == (8, 6)
    assert layers["conv_a"].channels_after == 8  # consumers keep their outputs
    assert result.verified
    assert result.model.opset_import[0].version == opset
    onnx.checker.check_model(result.model, full_check=True)
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert split.name == "split"
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "n"
