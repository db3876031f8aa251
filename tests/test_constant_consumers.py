"""Constant channels and merge offsets at consumers that cannot take them everywhere.

A constant channel folds into a consumer's bias only where that is exact: a ConvTranspose at stride 1
whose padding gives every output position every tap (``conv_transpose_full_taps``), and never a consumer
whose bias is not a constant (a graph input, an initializer a caller may override). Elsewhere the
channel stays with its reason, and approximate merges with an offset are not planned into such
consumers. Every rewrite is checked against onnxruntime on seeded inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import Net, assert_outputs_close, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx.analysis.constants import conv_transpose_full_taps
from red_onnx.analysis.reasons import Reason

SEEDS = (0, 1, 2)
CONSTANT = 0.7  # conv1's planted constant channel 3 (a zero row with this bias, through a Relu)


def _layer_counts(result: red_onnx.Result) -> dict[str, tuple[int, int]]:
    return {layer.name: (layer.channels_before, layer.channels_after) for layer in result.report.layers}


def _kept_reason(result: red_onnx.Result, channel: str) -> str:
    return next(k["reason"] for k in result.report.kept_zero_channels if k["channel"] == channel)


def _reason_prefix(template: str) -> str:
    """The text of a reason template before its first field."""
    return template.split("{")[0]


def _outputs_match(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, extra: dict[str, np.ndarray] | None = None
) -> None:
    for seed in SEEDS:
        feeds = {**random_feeds(original, seed), **(extra or {})}
        assert_outputs_close(run(original, feeds), run(rewritten, feeds), rtol=1e-5, atol_frac=1e-6)


def _overridable(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with initializer ``name`` also listed as a graph input (IR >= 4: a caller may feed it)."""
    init = next(i for i in model.graph.initializer if i.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------------------------
# ConvTranspose consumers


def conv_then_conv_transpose(
    stride: int = 1,
    pads: Sequence[int] = (2, 2, 2, 2),
    k: int = 3,
    dilation: int = 1,
    duplicate: bool = False,
    bias_input: bool = False,
    bias: bool = True,
) -> onnx.ModelProto:
    """conv1 (8 channels, row 3 zero with bias 0.7) → Relu → ConvTranspose(W[8, 5, k, k]).

    ``duplicate`` also plants conv1 row 5 = row 1; ``bias_input`` lists the ConvTranspose bias as a
    graph input too; ``bias=False`` leaves the ConvTranspose without one.
    """
    net = Net(0)
    x = net.input("x", [1, 4, 6, 6])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    net.arrays["convT.W"] = net.he([8, 5, k, k], 8 * k * k)
    if bias:
        net.arrays["convT.B"] = net.small([5])
    y = net.op(
        "ConvTranspose",
        [h, "convT.W", "convT.B"] if bias else [h, "convT.W"],
        "convT",
        kernel_shape=[k, k],
        strides=[stride, stride],
        dilations=[dilation, dilation],
        pads=list(pads),
    )
    net.zero_row("conv1", 3, CONSTANT)
    if duplicate:
        net.plant("conv1", 5, 1)
    model = net.build([y])
    return _overridable(model, "convT.B") if bias_input else model


@pytest.mark.parametrize(
    "stride,pads,k,dilation,bias",
    [
        (1, (2, 2, 2, 2), 3, 1, True),  # pads = d·(k-1): every output position receives every tap
        (1, (2, 2, 2, 2), 3, 1, False),  # the bias is created
        (1, (3, 2, 2, 3), 3, 1, True),  # more padding than needed: still every tap
        (1, (4, 4, 4, 4), 3, 2, True),  # dilation 2: d·(k-1) = 4
        (1, (0, 0, 0, 0), 1, 1, True),  # a 1x1 kernel needs no padding
    ],
)
def test_constant_channel_folds_into_a_full_tap_conv_transpose(
    stride: int, pads: tuple[int, ...], k: int, dilation: int, bias: bool
) -> None:
    """Kept before (ConvTranspose consumers never absorbed); now folded as c·Σ_taps W[j, o]."""
    model = conv_then_conv_transpose(stride, pads, k, dilation, bias=bias)
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["conv1"] == (8, 7)
    assert result.verified
    onnx.checker.check_model(result.model, full_check=True)
    _outputs_match(model, result.model)


@pytest.mark.parametrize(
    "stride,pads,k,dilation",
    [
        (2, (2, 2, 2, 2), 3, 1),  # stride 2: a periodic contribution
        (2, (0, 0, 0, 0), 3, 1),
        (1, (0, 0, 0, 0), 3, 1),  # no padding: the borders receive fewer taps
        (1, (2, 1, 2, 2), 3, 1),  # one side short
        (1, (2, 2, 2, 2), 3, 2),  # dilation 2 needs 4
    ],
)
def test_constant_channel_stays_before_a_non_uniform_conv_transpose(
    stride: int, pads: tuple[int, ...], k: int, dilation: int
) -> None:
    model = conv_then_conv_transpose(stride, pads, k, dilation)
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["conv1"] == (8, 8)
    assert _kept_reason(result, "conv1[3]") == Reason.CONST_CONV_TRANSPOSE.format(node="convT")
    assert result.verified
    _outputs_match(model, result.model)


def test_identical_channels_still_merge_before_a_strided_conv_transpose() -> None:
    model = conv_then_conv_transpose(stride=2, duplicate=True)
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["conv1"] == (8, 7)  # row 5 = row 1 goes, the constant row 3 stays
    _outputs_match(model, result.model)


def _single_conv_transpose(cin: int, spatial: int, weight: np.ndarray, **attrs: object) -> onnx.ModelProto:
    bias = np.linspace(-0.5, 0.5, weight.shape[1]).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="convT", **attrs)
    graph = helper.make_graph(
        [node],
        "convT",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, spatial, spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _uniform_response(model: onnx.ModelProto, weight: np.ndarray, spatial: int) -> bool:
    """Whether a constant input gives ``c·Σ_taps W[j, o] + b_o`` at every output position (onnxruntime)."""
    constant = np.full((1, weight.shape[0], 1, 1), 0.75, np.float32)
    y = run(model, {"x": np.broadcast_to(constant, (1, weight.shape[0], spatial, spatial)).copy()})["y"]
    bias = numpy_helper.to_array(model.graph.initializer[1])
    expected = 0.75 * weight.sum(axis=(0, 2, 3)) + bias
    return bool(np.allclose(y, expected[None, :, None, None], rtol=1e-5, atol=1e-5))


PADS = ((0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (2, 4, 4, 2), (4, 4, 4, 4))
CONV_T_SETTINGS = [
    {"strides": [s, s], "dilations": [d, d], "pads": list(p)}
    for s, d, p in itertools.product((1, 2), (1, 2), PADS)
] + [
    {"strides": [2, 2], "output_padding": [1, 1], "pads": [2, 2, 2, 2]},  # onnxruntime wants it < stride
    {"strides": [1, 1], "auto_pad": "SAME_UPPER"},
    {"strides": [1, 1], "auto_pad": "VALID"},
    {"strides": [1, 1], "output_shape": [7, 7]},
]  # fmt: skip


@pytest.mark.parametrize("attrs", CONV_T_SETTINGS, ids=str)
@pytest.mark.parametrize("k", [1, 3])
def test_full_taps_rule_matches_onnxruntime(attrs: dict, k: int) -> None:
    """``conv_transpose_full_taps`` is sound (never true where onnxruntime gives a non-uniform response)
    and, with explicit pads, complete (true wherever the response is uniform)."""
    weight = np.random.default_rng(k).standard_normal((3, 2, k, k)).astype(np.float32)
    model = _single_conv_transpose(3, 10, weight, kernel_shape=[k, k], **attrs)
    graph = gs.import_onnx(model)
    node = graph.nodes[0]
    claimed = conv_transpose_full_taps(node)
    uniform = _uniform_response(model, weight, 10)
    if claimed:
        assert uniform, f"{attrs}: folded, but onnxruntime's response is not uniform"
    if "auto_pad" not in attrs and "output_shape" not in attrs:
        assert claimed == uniform, f"{attrs}: rule {claimed}, onnxruntime uniform {uniform}"


@pytest.mark.parametrize("stride", [1, 2])
def test_approximate_run_with_an_idle_channel_before_a_conv_transpose(stride: int) -> None:
    """The idle (constant) channel merges with λ = 0 and an offset: the offset goes into the
    ConvTranspose bias as ``c·Σ_taps W / Π strides`` (it was added as a [out, k, k] array: a crash)."""
    model = conv_then_conv_transpose(stride=stride)
    result = red_onnx.compress(model, tolerance=0.05, channel_multiple=1, hashing=False, activations=True)
    assert result.verified
    onnx.checker.check_model(result.model, full_check=True)
    bias = next(i for i in result.model.graph.initializer if i.name.startswith("convT.B"))
    assert tuple(bias.dims) == (5,)


# ----------------------------------------------------------------------------------------------
# Consumers whose bias is not a constant


def conv_then_conv(
    bias: str = "overridable", duplicate: bool = False, consumer_bias: str = "conv2.B"
) -> onnx.ModelProto:
    """conv1 (8 channels, row 3 zero with bias 0.7) → Relu → unpadded conv2, whose bias is ``bias``:

    ``overridable`` (an initializer also listed as a graph input) or ``input`` (fed at run time).
    """
    net = Net(0)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    y = net.conv("conv2", h, 8, 6, pad=0)
    net.zero_row("conv1", 3, CONSTANT)
    if duplicate:
        net.plant("conv1", 5, 1)
    if bias == "input":
        del net.arrays["conv2.B"]
        net.input("conv2.B", [6])
        return net.build([y])
    return _overridable(net.build([y]), consumer_bias)


OTHER_BIAS = {"conv2.B": np.linspace(-2.0, 2.0, 6).astype(np.float32)}


@pytest.mark.parametrize("bias", ["overridable", "input"])
def test_constant_channel_stays_before_a_conv_with_a_variable_bias(bias: str) -> None:
    """Crashed before (InternalError: the bias is not a constant where one was established)."""
    model = conv_then_conv(bias)
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["conv1"] == (8, 8)
    expected = Reason.CONST_VARIABLE_BIAS.format(op="Conv", node="conv2", tensor="conv2.B")
    assert _kept_reason(result, "conv1[3]") == expected
    assert result.verified
    extra = OTHER_BIAS if bias == "input" else {}
    _outputs_match(model, result.model, extra)
    if bias == "overridable":
        _outputs_match(model, result.model, OTHER_BIAS)  # still overridable, same function


@pytest.mark.parametrize("bias", ["overridable", "input"])
def test_identical_channels_merge_before_a_conv_with_a_variable_bias(bias: str) -> None:
    """Merging identical channels adds weights only (V_i += V_j): the variable bias is left as it is."""
    model = conv_then_conv(bias, duplicate=True)
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["conv1"] == (8, 7)
    assert result.verified
    _outputs_match(model, result.model, OTHER_BIAS)


def test_approximate_run_before_a_conv_with_a_variable_bias() -> None:
    """No merge with an offset is planned into conv2: it crashed folding the idle channel's offset."""
    model = conv_then_conv("overridable", duplicate=True)
    result = red_onnx.compress(model, tolerance=0.05, channel_multiple=1, hashing=False, activations=True)
    assert result.verified
    assert "conv2.B" in {i.name for i in result.model.graph.input}  # still a caller's to override
    bias = next(i for i in result.model.graph.initializer if i.name == "conv2.B")
    np.testing.assert_array_equal(numpy_helper.to_array(bias), net_bias(model, "conv2.B"))


def net_bias(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The values of initializer ``name`` of ``model``."""
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_constant_channel_stays_before_a_full_tap_conv_transpose_with_a_variable_bias() -> None:
    model = conv_then_conv_transpose(bias_input=True)
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["conv1"] == (8, 8)
    expected = Reason.CONST_VARIABLE_BIAS.format(op="ConvTranspose", node="convT", tensor="convT.B")
    assert _kept_reason(result, "conv1[3]") == expected
    _outputs_match(model, result.model, {"convT.B": np.linspace(-1.0, 1.0, 5).astype(np.float32)})


def _matmul_chain(consumer: str) -> onnx.ModelProto:
    """fc1 (MatMul + Add, column 3 zero with bias 0.7) → Relu → fc2: ``matmul`` (MatMul + Add of an
    overridable bias) or ``gemm`` (Gemm with an overridable C)."""
    net = Net(0)
    x = net.input("x", [2, 8])
    h = net.act("Relu", net.matmul("fc1", x, 8, 6), "relu1")
    y = net.matmul("fc2", h, 6, 5) if consumer == "matmul" else net.gemm("fc2", h, 6, 5)
    net.zero_row("fc1", 3, CONSTANT)
    return _overridable(net.build([y]), "fc2.B" if consumer == "matmul" else "fc2.C")


def test_constant_channel_folds_before_a_matmul_whose_add_has_a_variable_bias() -> None:
    """MatMul has no bias input: the constant goes into an Add of its own, the variable Add stays."""
    model = _matmul_chain("matmul")
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["fc1"] == (6, 5)
    assert result.verified
    _outputs_match(model, result.model, {"fc2.B": np.linspace(-1.0, 1.0, 5).astype(np.float32)})


def test_gemm_consumer_with_a_variable_c_freezes_its_group() -> None:
    """A Gemm whose C is not a constant freezes its groups (producer or consumer): nothing to fold into."""
    model = _matmul_chain("gemm")
    result = red_onnx.compress(model, exact=True, channel_multiple=1)
    assert _layer_counts(result)["fc1"] == (6, 6)
    expected = Reason.VARIABLE_PARAMETER.format(op="Gemm", node="fc2", tensor="fc2.C")
    assert any(f.reason == expected for f in result.report.frozen), result.report.frozen
    _outputs_match(model, result.model, {"fc2.C": np.linspace(-1.0, 1.0, 5).astype(np.float32)})
