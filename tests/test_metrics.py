"""``red_onnx.measure.metrics.measure``: MACs against hand-computed formulas, and the parameter count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx.errors import InputError
from red_onnx.measure.metrics import count_params, measure

OPSET = 17


def _model(
    nodes: list[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    output: str,
    inits: Sequence[tuple[str, np.ndarray]] = (),
    out_rank: int = 4,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [f"d{i}" for i in range(out_rank)])],
        [numpy_helper.from_array(array, name) for name, array in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize(("group", "stride"), [(1, 1), (2, 2), (4, 1), (1, 3)])
def test_conv_macs_with_group_and_stride(group: int, stride: int) -> None:
    n, cin, cout, size, k, pad = 2, 4, 8, 10, 3, 1
    model = _model(
        [
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["y"],
                name="conv",
                group=group,
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        ],
        [("x", ["N", cin, size, size])],
        "y",
        [("w", _weights(cout, cin // group, k, k)), ("b", _weights(cout))],
    )
    figures = measure(model, {"x": (n, cin, size, size)})
    out = _conv_out(size, k, stride, pad)
    expected = n * cout * out * out * (cin // group) * k * k
    layer = figures.layers["conv"]
    assert (layer.op, layer.channels, layer.macs) == ("Conv", cout, expected)
    assert figures.macs == expected


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_macs(group: int) -> None:
    n, cin, per_group, size, k, stride = 1, 4, 3, 5, 3, 2
    model = _model(
        [
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], name="deconv", group=group, strides=[stride, stride]
            )
        ],
        [("x", [n, cin, size, size])],
        "y",
        [("w", _weights(cin, per_group, k, k))],
    )
    figures = measure(model, {"x": (n, cin, size, size)})
    # every input element is multiplied by one (Cout/group, k, k) kernel slice
    expected = n * cin * size * size * per_group * k * k
    layer = figures.layers["deconv"]
    assert (layer.channels, layer.macs) == (per_group * group, expected)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_macs(trans_b: int) -> None:
    m, k, n = 3, 6, 5
    weight = _weights(n, k) if trans_b else _weights(k, n)
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=trans_b, alpha=0.5)],
        [("x", [m, k])],
        "y",
        [("w", weight), ("c", _weights(n))],
        out_rank=2,
    )
    layer = measure(model, {"x": (m, k)}).layers["fc"]
    assert (layer.channels, layer.macs) == (n, m * n * k)


def test_matmul_with_constant_b() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["B", 3, 6])],
        "y",
        [("w", _weights(6, 5))],
        out_rank=3,
    )
    layer = measure(model, {"x": (2, 3, 6)}).layers["mm"]
    assert (layer.channels, layer.macs) == (5, 2 * 3 * 5 * 6)


def test_matmul_with_batched_constant_b() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", [2, 3, 6])],
        "y",
        [("w", _weights(2, 6, 5))],
        out_rank=3,
    )
    layer = measure(model, {"x": (2, 3, 6)}).layers["mm"]
    assert layer.macs == 2 * 3 * 5 * 6


def test_matmul_with_variable_b() -> None:
    model = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="attn")],
        [("a", [2, 4, 6]), ("b", [2, 6, 7])],
        "y",
        out_rank=3,
    )
    figures = measure(model, {"a": (2, 4, 6), "b": (2, 6, 7)})
    layer = figures.layers["attn"]
    assert (layer.channels, layer.macs) == (7, 2 * 4 * 7 * 6)
    assert figures.params == 0


def test_macs_sum_over_layers_and_follow_input_shapes() -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
        ],
        [("x", ["N", 3, "H", "W"])],
        "y",
        [("w1", _weights(8, 3, 3, 3)), ("w2", _weights(4, 8, 1, 1))],
    )
    small = measure(model, {"x": (1, 3, 8, 8)})
    big = measure(model, {"x": (2, 3, 16, 8)})
    per_pixel = 8 * 27 + 4 * 8
    assert small.macs == 64 * per_pixel
    assert big.macs == 2 * 128 * per_pixel
    assert set(small.layers) == {"c1", "c2"}


def test_params_count_float_initializers_and_constant_nodes_not_shapes() -> None:
    scale = numpy_helper.from_array(_weights(1, 4, 1, 1), "s_value")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape_value")
    model = _model(
        [
            helper.make_node("Cast", ["b"], ["b32"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Conv", ["x", "w", "b32"], ["h"], name="conv"),
            helper.make_node("Constant", [], ["s"], name="scale", value=scale),
            helper.make_node("Mul", ["h", "s"], ["m"], name="mul"),
            helper.make_node("Constant", [], ["shape"], name="shape", value=shape),
            helper.make_node("Reshape", ["m", "shape"], ["y"], name="flat"),
        ],
        [("x", [1, 3, 5, 5])],
        "y",
        [
            ("w", _weights(4, 3, 3, 3)),
            ("b", _weights(4).astype(np.float16)),
            ("steps", np.arange(7, dtype=np.int64)),
        ],
        out_rank=2,
    )
    expected = 4 * 27 + 4 + 4  # conv weight, float16 bias, Constant scale; int64 tensors excluded
    assert count_params(model) == expected
    figures = measure(model, {"x": (1, 3, 5, 5)})
    assert figures.params == expected
    assert figures.layers["conv"].macs == 4 * 3 * 3 * 27


def test_measured_shapes_fill_in_where_inference_stops() -> None:
    """A Reshape to a runtime shape stops ONNX inference; the shape service's measured shapes count."""
    weight = np.ones((6, 5), np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
            onnx.helper.make_node("MatMul", ["r", "w"], ["y"], name="fc"),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4]),
            onnx.helper.make_tensor_value_info("target", onnx.TensorProto.INT64, [2]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    shapes = {"x": [2, 3, 4], "target": [2]}
    assert measure(model, shapes).macs == 0  # inference cannot tell the shape of r
    assert measure(model, shapes, {"y": (4, 5)}).macs == 4 * 5 * 6


def test_a_tensor_inference_cannot_type_is_not_a_scalar() -> None:
    """After an op ONNX inference does not know, a tensor of unknown rank takes its measured shape.

    It was recorded as shape ``()``, which overrode the measured one: every MatMul after a fused
    ``com.microsoft`` Gelu counted 0 MACs.
    """
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft"),
            onnx.helper.make_node("MatMul", ["g", "w"], ["y"], name="fc"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((6, 5), np.float32), "w")],
    )
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    assert measure(model, {"x": [2, 6]}, {"g": (2, 6), "y": (2, 5)}).macs == 2 * 5 * 6


def test_measure_refuses_a_negative_dimension() -> None:
    """A declared ``-1`` batch taken as a size gave negative MACs; it is refused with the shape named."""
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["N", 4])],
        "y",
        [("w", _weights(4, 3))],
        2,
    )
    assert measure(model, {"x": [2, 4]}).macs == 2 * 4 * 3
    with pytest.raises(InputError, match=r"input 'x' has shape \[-1, 4\]; give every dimension a size >= 0"):
        measure(model, {"x": [-1, 4]})
    assert measure(model, {"x": [0, 4]}).macs == 0  # a 0 dim is a size: an empty batch
