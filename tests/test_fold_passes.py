"""Normalisation passes: FoldBatchNorm and FoldAffine, through import_model → pass → export_model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from red_onnx.io.graph import export_model, import_model
from red_onnx.passes.fold_affine import FoldAffine
from red_onnx.passes.fold_batchnorm import FoldBatchNorm
from red_onnx.passes.infra import Pass, PassResult

OPSET = 17
C = 4  # output channels of the producers below
BN_INPUTS = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]


# ----------------------------------------------------------------------------------------------
# builders


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _make(
    nodes: list[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[tuple[str, Sequence[int | str]]],
    inits: dict[str, np.ndarray],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn_params(rng: np.random.Generator, channels: int = C) -> dict[str, np.ndarray]:
    return {
        "bn.scale": _f32(rng.uniform(-2, 2, channels)),
        "bn.bias": _f32(rng.standard_normal(channels)),
        "bn.mean": _f32(rng.standard_normal(channels)),
        "bn.var": _f32(rng.uniform(0.1, 3, channels)),
    }


def _bn(x: str, y: str, epsilon: float = 1e-3) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *BN_INPUTS], [y], name="bn", epsilon=epsilon)


def conv_bn(seed: int = 0, bias: bool = True, bn: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    rng = _rng(seed)
    inits = {"conv.w": _f32(rng.standard_normal((C, 3, 3, 3)))}
    if bias:
        inits["conv.b"] = _f32(rng.standard_normal(C))
    inits.update(bn if bn is not None else _bn_params(rng))
    nodes = [
        helper.make_node("Conv", ["x", *inits.keys()][: 3 if bias else 2], ["h"], name="conv", pads=[1] * 4),
        _bn("h", "y"),
    ]
    return _make(nodes, [("x", ["N", 3, 6, 6])], [("y", ["N", C, 6, 6])], inits)


def conv_transpose_bn(seed: int = 0, group: int = 1) -> onnx.ModelProto:
    rng = _rng(seed)
    inits = {
        "deconv.w": _f32(rng.standard_normal((4, C // group, 3, 3))),
        "deconv.b": _f32(rng.standard_normal(C)),
        **_bn_params(rng),
    }
    nodes = [
        helper.make_node(
            "ConvTranspose", ["x", "deconv.w", "deconv.b"], ["h"], name="deconv", strides=[2, 2], group=group
        ),
        _bn("h", "y"),
    ]
    return _make(nodes, [("x", [1, 4, 5, 5])], [("y", [1, C, 11, 11])], inits)


def gemm_bn(
    trans_b: int, alpha: float = 1.0, beta: float = 1.0, c_shape: Sequence[int] | None = (C,), seed: int = 0
) -> onnx.ModelProto:
    rng = _rng(seed)
    k = 6
    inits = {"fc.w": _f32(rng.standard_normal((C, k) if trans_b else (k, C)))}
    if c_shape is not None:
        inits["fc.c"] = _f32(rng.standard_normal(tuple(c_shape)))
    inits.update(_bn_params(rng))
    gemm_inputs = ["x", "fc.w"] + (["fc.c"] if c_shape is not None else [])
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["h"], name="fc", transB=trans_b, alpha=alpha, beta=beta),
        _bn("h", "y"),
    ]
    return _make(nodes, [("x", [3, k])], [("y", [3, C])], inits)


def conv_then(op: str, constant: np.ndarray, constant_first: bool, seed: int = 0) -> onnx.ModelProto:
    """Conv (no bias) → ``op`` with a constant operand on either side."""
    rng = _rng(seed)
    inits = {"conv.w": _f32(rng.standard_normal((C, 3, 3, 3))), "k": _f32(constant)}
    operands = ["k", "h"] if constant_first else ["h", "k"]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["h"], name="conv", pads=[1] * 4),
        helper.make_node(op, operands, ["y"], name="affine"),
    ]
    return _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5])], inits)


# ----------------------------------------------------------------------------------------------
# helpers


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or 2 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = _f32(rng.standard_normal(dims))
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _apply(model: onnx.ModelProto, pass_: Pass) -> tuple[onnx.ModelProto, PassResult]:
    working = import_model(model)
    result = pass_(working)
    out = export_model(working)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def _assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    for seed in (1, 2):
        feeds = _feeds(before, seed)
        for ref, got in zip(_run(before, feeds), _run(after, feeds), strict=True):
            scale = max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _assert_folded(model: onnx.ModelProto, pass_: Pass, gone: str, stat: str = "folded") -> PassResult:
    out, result = _apply(model, pass_)
    assert gone not in _ops(out)
    assert result.modified
    assert result.stats[stat] == 1
    assert not result.skips
    _assert_same_outputs(model, out)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    return result


def _assert_kept(model: onnx.ModelProto, pass_: Pass, kept: str, reason: str | None) -> PassResult:
    out, result = _apply(model, pass_)
    assert _ops(out).count(kept) == _ops(model).count(kept)
    assert not result.modified
    if reason is not None:
        assert len(result.skips) == 1
        assert reason in result.skips[0].reason, result.skips[0].reason
    _assert_same_outputs(model, out)
    return result


# ----------------------------------------------------------------------------------------------
# FoldBatchNorm


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_exactly(bias: bool) -> None:
    model = conv_bn(bias=bias)
    _assert_folded(model, FoldBatchNorm(), "BatchNormalization")
    out, _ = _apply(model, FoldBatchNorm())
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3  # a bias appears when the BN shift needs one


def test_conv_transpose_bn_folds_exactly() -> None:
    _assert_folded(conv_transpose_bn(), FoldBatchNorm(), "BatchNormalization")


def test_grouped_conv_transpose_bn_is_kept_with_reason() -> None:
    _assert_kept(conv_transpose_bn(group=2), FoldBatchNorm(), "BatchNormalization", "grouped ConvTranspose")


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)])
@pytest.mark.parametrize("c_shape", [(C,), (1, C), (1,), None], ids=["c", "c1xN", "c_scalar", "no_c"])
def test_gemm_bn_folds_exactly(
    trans_b: int, alpha: float, beta: float, c_shape: Sequence[int] | None
) -> None:
    _assert_folded(gemm_bn(trans_b, alpha, beta, c_shape), FoldBatchNorm(), "BatchNormalization")


def test_gemm_with_full_matrix_c_is_kept() -> None:
    _assert_kept(gemm_bn(1, c_shape=(3, C)), FoldBatchNorm(), "BatchNormalization", "full matrix")


def test_bn_with_second_reader_is_kept() -> None:
    rng = _rng(0)
    inits = {"conv.w": _f32(rng.standard_normal((C, 3, 3, 3))), **_bn_params(rng)}
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["h"], name="conv", pads=[1] * 4),
        _bn("h", "y"),
        helper.make_node("Relu", ["h"], ["z"], name="other_reader"),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5]), ("z", [1, C, 5, 5])], inits)
    _assert_kept(model, FoldBatchNorm(), "BatchNormalization", "other readers")


def test_bn_whose_producer_output_is_a_graph_output_is_kept() -> None:
    rng = _rng(0)
    inits = {"conv.w": _f32(rng.standard_normal((C, 3, 3, 3))), **_bn_params(rng)}
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["h"], name="conv", pads=[1] * 4),
        _bn("h", "y"),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5]), ("h", [1, C, 5, 5])], inits)
    _assert_kept(model, FoldBatchNorm(), "BatchNormalization", "other readers")


def test_bn_on_graph_input_is_kept() -> None:
    model = _make([_bn("x", "y")], [("x", [1, C, 5, 5])], [("y", [1, C, 5, 5])], _bn_params(_rng(0)))
    _assert_kept(model, FoldBatchNorm(), "BatchNormalization", "graph input")


def test_bn_after_concat_is_kept() -> None:
    rng = _rng(0)
    inits = {
        "a.w": _f32(rng.standard_normal((2, 3, 3, 3))),
        "b.w": _f32(rng.standard_normal((2, 3, 3, 3))),
        **_bn_params(rng),
    }
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["ha"], name="a", pads=[1] * 4),
        helper.make_node("Conv", ["x", "b.w"], ["hb"], name="b", pads=[1] * 4),
        helper.make_node("Concat", ["ha", "hb"], ["h"], name="cat", axis=1),
        _bn("h", "y"),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5])], inits)
    _assert_kept(model, FoldBatchNorm(), "BatchNormalization", "Concat")


def test_bn_with_shared_conv_weight_is_kept() -> None:
    rng = _rng(0)
    inits = {"w": _f32(rng.standard_normal((C, 3, 3, 3))), **_bn_params(rng)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1] * 4),
        _bn("h", "y"),
        helper.make_node("Conv", ["x", "w"], ["z"], name="twin", pads=[1] * 4),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5]), ("z", [1, C, 5, 5])], inits)
    _assert_kept(model, FoldBatchNorm(), "BatchNormalization", "constant of its own")


def test_bn_fold_leaves_the_input_model_untouched() -> None:
    model = conv_bn()
    before = model.SerializeToString()
    _apply(model, FoldBatchNorm())
    assert model.SerializeToString() == before


_channel_floats = hnp.arrays(np.float32, C, elements=st.floats(-3, 3, width=32))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    scale=_channel_floats,
    bias=_channel_floats,
    mean=_channel_floats,
    var=hnp.arrays(np.float32, C, elements=st.floats(0.015625, 10, width=32)),
    seed=st.integers(0, 2**16),
)
def test_conv_bn_fold_random_parameters(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, seed: int
) -> None:
    params = dict(zip(BN_INPUTS, (scale, bias, mean, var), strict=True))
    model = conv_bn(seed=seed, bn=params)
    _assert_folded(model, FoldBatchNorm(), "BatchNormalization")


# ----------------------------------------------------------------------------------------------
# FoldAffine

_PER_CHANNEL = np.array([0.5, -2.0, 3.0, 0.25], np.float32).reshape(C, 1, 1)
_CONSTANTS = {
    "scalar": np.float32(1.5),
    "scalar_1": np.array([-0.75], np.float32),
    "c11": _PER_CHANNEL,
    "1c11": _PER_CHANNEL.reshape(1, C, 1, 1),
}


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
@pytest.mark.parametrize("constant_first", [False, True], ids=["x_op_c", "c_op_x"])
@pytest.mark.parametrize("kind", list(_CONSTANTS))
def test_affine_folds_exactly(op: str, constant_first: bool, kind: str) -> None:
    model = conv_then(op, _CONSTANTS[kind], constant_first)
    _assert_folded(model, FoldAffine(), op)


@pytest.mark.parametrize("kind", list(_CONSTANTS))
def test_div_by_constant_folds_exactly(kind: str) -> None:
    _assert_folded(conv_then("Div", _CONSTANTS[kind], constant_first=False), FoldAffine(), "Div")


def test_constant_divided_by_conv_is_not_folded() -> None:
    _assert_kept(conv_then("Div", _PER_CHANNEL, constant_first=True), FoldAffine(), "Div", None)


def test_affine_fold_into_conv_with_bias() -> None:
    rng = _rng(3)
    inits = {
        "conv.w": _f32(rng.standard_normal((C, 3, 3, 3))),
        "conv.b": _f32(rng.standard_normal(C)),
        "m": _PER_CHANNEL,
        "a": _f32(rng.standard_normal((C, 1, 1))),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["h"], name="conv", pads=[1] * 4),
        helper.make_node("Mul", ["h", "m"], ["hm"], name="mul"),
        helper.make_node("Sub", ["a", "hm"], ["y"], name="sub"),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5])], inits)
    out, result = _apply(model, FoldAffine())
    assert _ops(out) == ["Conv"]
    assert result.stats["folded"] == 2
    _assert_same_outputs(model, out)


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_affine_with_spatial_constant_is_not_folded(op: str) -> None:
    constant = _f32(_rng(5).standard_normal((1, C, 5, 5)))
    _assert_kept(conv_then(op, constant, constant_first=False), FoldAffine(), op, "not per channel")


def test_affine_on_conv_with_other_reader_is_not_folded() -> None:
    rng = _rng(0)
    inits = {"conv.w": _f32(rng.standard_normal((C, 3, 3, 3))), "m": _PER_CHANNEL}
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["h"], name="conv", pads=[1] * 4),
        helper.make_node("Mul", ["h", "m"], ["y"], name="mul"),
        helper.make_node("Relu", ["h"], ["z"], name="relu"),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5]), ("z", [1, C, 5, 5])], inits)
    _assert_kept(model, FoldAffine(), "Mul", None)


def test_affine_constant_that_broadcasts_to_a_new_shape_is_not_folded() -> None:
    # Conv1d output [1, C, L] times a [C, 1, 1] constant broadcasts to [C, C, L]: not per channel
    rng = _rng(0)
    inits = {"conv.w": _f32(rng.standard_normal((C, 3, 3))), "m": _PER_CHANNEL}
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["h"], name="conv", pads=[1, 1]),
        helper.make_node("Mul", ["h", "m"], ["y"], name="mul"),
    ]
    model = _make(nodes, [("x", [1, 3, 7])], [("y", [C, C, 7])], inits)
    _assert_kept(model, FoldAffine(), "Mul", "not per channel")


def test_bn_fold_copies_a_shared_bias() -> None:
    rng = _rng(0)
    inits = {
        "a.w": _f32(rng.standard_normal((C, 3, 3, 3))),
        "b.w": _f32(rng.standard_normal((C, 3, 3, 3))),
        "shared.b": _f32(rng.standard_normal(C)),
        **_bn_params(rng),
    }
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "shared.b"], ["h"], name="a", pads=[1] * 4),
        _bn("h", "y"),
        helper.make_node("Conv", ["x", "b.w", "shared.b"], ["z"], name="b", pads=[1] * 4),
    ]
    model = _make(nodes, [("x", [1, 3, 5, 5])], [("y", [1, C, 5, 5]), ("z", [1, C, 5, 5])], inits)
    _assert_folded(model, FoldBatchNorm(), "BatchNormalization")
