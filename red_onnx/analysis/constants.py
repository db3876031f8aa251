"""Constant and unused channels of a group (analysis, pure).

A producer row of zeros emits its bias everywhere. Whether that constant survives to the consumers is
decided op by op along the path (padding breaks it, a product with a non-constant tensor breaks it).
A channel can go when every consumer either reads nothing from it (its slice is zero) or sees a
constant it can fold into its bias (Gemm, MatMul, Conv without padding, ConvTranspose at stride 1 with
full padding; never a consumer whose bias is not a constant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import ChannelGroup
from red_onnx.analysis.reasons import Reason
from red_onnx.analysis.redundancy import per_channel_constant
from red_onnx.analysis.weights import consumer_axis, conv_has_padding, producer_bias, producer_rows
from red_onnx.errors import InternalError
from red_onnx.io.graph import constant_values, expect_constant, is_empty_input

MAPPING_OPS = frozenset(
    {
        "Concat",
        "Split",
        "Slice",
        "Transpose",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Dropout",
        "MaxPool",
        "GlobalMaxPool",
        "GlobalAveragePool",
        "Resize",
        "Upsample",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
    }
)


def _hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)


UNARY: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {
    "Relu": lambda x, a: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x),
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a: _hard_swish(x),
    "Tanh": lambda x, a: np.tanh(x),
    "Abs": lambda x, a: np.abs(x),
    "Neg": lambda x, a: -x,
    "Exp": lambda x, a: np.exp(x),
    "Elu": lambda x, a: np.where(x > 0, x, a.get("alpha", 1.0) * (np.exp(x) - 1.0)),
    "Softplus": lambda x, a: np.logaddexp(0.0, x),
}
BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sum": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Max": np.maximum,
    "Min": np.minimum,
    "Pow": np.power,
}


@dataclass
class ChannelConstants:
    """Constant value of each channel of each group tensor (NaN: not constant) and why not."""

    values: dict[str, np.ndarray]
    reasons: dict[str, np.ndarray]
    zero_rows: np.ndarray  # per atom: every producer row of the atom is zero


def analyse_constants(group: ChannelGroup, order: dict[int, int]) -> ChannelConstants:
    """Propagate constant channels from zero producer rows through the path, in graph order."""
    values = {name: np.full(m.channels, np.nan) for name, m in group.tensors.items()}
    reasons = {name: np.full(m.channels, None, object) for name, m in group.tensors.items()}
    zero_rows = np.zeros(group.n_atoms, bool)
    present = np.zeros(group.n_atoms, bool)
    nonzero = np.zeros(group.n_atoms, bool)
    for producer in group.producers:
        rows = producer_rows(producer.node)
        is_zero = ~rows.any(axis=1)
        bias = producer_bias(producer.node, rows.shape[0])
        values[producer.tensor] = np.where(is_zero, bias, np.nan)
        atoms = group.tensors[producer.tensor].atoms
        present[atoms] = True
        nonzero[atoms[~is_zero]] = True
    zero_rows = present & ~nonzero
    for node in sorted(group.path, key=lambda n: order[id(n)]):
        _propagate(group, node, values, reasons)
    return ChannelConstants(values, reasons, zero_rows)


def _propagate(group: ChannelGroup, node: gs.Node, values: dict, reasons: dict) -> None:
    inputs = [t.name for t in node.inputs if t.name in group.tensors]
    outputs = [t.name for t in node.outputs if t.name in group.tensors]
    if (
        node.op in MAPPING_OPS
        or (node.op == "Pad" and _pad_keeps(node))
        or (node.op == "AveragePool" and (not _avgpool_pads(node)))
    ):
        _map_by_atoms(group, inputs, outputs, values, reasons)
        return
    source = values[inputs[0]] if inputs else None
    for out in outputs:
        result, why = _evaluate(group, node, source, out, values)
        finite_before = np.isfinite(source) if source is not None else np.zeros(len(result), bool)
        lost = ~np.isfinite(result) & finite_before
        reasons[out] = reasons[inputs[0]].copy() if inputs else reasons[out]
        reasons[out][lost] = why.format(op=node.op, node=node.name)
        values[out] = result


def _map_by_atoms(group: ChannelGroup, inputs: list, outputs: list, values: dict, reasons: dict) -> None:
    atom_value = np.full(group.n_atoms, np.nan)
    atom_reason = np.full(group.n_atoms, None, object)
    for name in inputs:
        atoms = group.tensors[name].atoms
        atom_value[atoms] = values[name]
        atom_reason[atoms] = reasons[name]
    for name in outputs:
        atoms = group.tensors[name].atoms
        values[name] = atom_value[atoms]
        reasons[name] = atom_reason[atoms]


def _pad_keeps(node: gs.Node) -> bool:
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return mode != "constant"


def _avgpool_pads(node: gs.Node) -> bool:
    return int(node.attrs.get("count_include_pad", 0)) == 1 and any(node.attrs.get("pads", []))


def _evaluate(
    group: ChannelGroup, node: gs.Node, source: np.ndarray | None, out: str, values: dict
) -> tuple[np.ndarray, str]:
    """Output constants of one path node and the reason where constants are lost."""
    member = group.tensors[out]
    with np.errstate(all="ignore"):
        if node.op in BINARY or node.op == "Mean":
            return _binary(group, node, member, values), Reason.CONST_MIXED
        if source is None:  # only a binary op's output joins a group without any of its inputs
            raise InternalError(f"{node.op} node {node.name!r} has no input in its channel group")
        if node.op in UNARY:
            return UNARY[node.op](source, node.attrs), Reason.CONST_UNKNOWN_OP
        if node.op == "Clip":
            return _clip(node, source), Reason.CONST_UNKNOWN_OP
        if node.op in ("Pad", "AveragePool"):
            pad_value = 0.0 if node.op == "AveragePool" else _pad_constant(node)
            return np.where(source == pad_value, source, np.nan), Reason.CONST_PADDED
        if node.op == "BatchNormalization":
            scale, bias, mean, var = (expect_constant(t).astype(np.float64) for t in node.inputs[1:5])
            factor = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            return factor * (source - mean) + bias, Reason.CONST_UNKNOWN_OP
        if node.op == "InstanceNormalization":
            bias = expect_constant(node.inputs[2]).astype(np.float64)
            return np.where(np.isfinite(source), bias, np.nan), Reason.CONST_UNKNOWN_OP
        if node.op == "PRelu":
            slope = _per_channel(node.inputs[1], member)
            return np.where(source >= 0, source, slope * source), Reason.CONST_UNKNOWN_OP
        if node.op == "Conv":
            return _depthwise(node, source), Reason.CONST_PADDED
    return np.full(member.channels, np.nan), Reason.CONST_UNKNOWN_OP


def _clip(node: gs.Node, x: np.ndarray) -> np.ndarray:
    low = node.attrs.get("min", -np.inf)
    high = node.attrs.get("max", np.inf)
    if not is_empty_input(node, 1):
        low = float(expect_constant(node.inputs[1]))
    if not is_empty_input(node, 2):
        high = float(expect_constant(node.inputs[2]))
    return np.clip(x, low, high)


def _pad_constant(node: gs.Node) -> float:
    if "value" in node.attrs:
        return float(node.attrs["value"])
    if not is_empty_input(node, 2):
        return float(expect_constant(node.inputs[2]).reshape(-1)[0])
    return 0.0


def _per_channel(tensor: gs.Tensor, member) -> np.ndarray:
    values = expect_constant(tensor).astype(np.float64)
    if values.size == 1:
        return np.full(member.channels, float(values.reshape(-1)[0]))
    rows = per_channel_constant(values, member.rank, member.axis, member.channels)
    if rows is None or (rows.shape[1] != 1 and not np.all(rows == rows[:, :1])):
        return np.full(member.channels, np.nan)
    return rows[:, 0]


def _depthwise(node: gs.Node, x: np.ndarray) -> np.ndarray:
    weight = expect_constant(node.inputs[1]).astype(np.float64)
    kernel = weight.reshape(weight.shape[0], -1)
    bias = np.zeros(len(kernel)) if is_empty_input(node, 2) else expect_constant(node.inputs[2]).astype(float)
    zero_kernel = ~kernel.any(axis=1)
    through = x * kernel.sum(axis=1) + bias
    if conv_has_padding(node):
        through = np.where(x == 0.0, bias, np.nan)
    return np.where(zero_kernel, bias, through)


def _binary(group: ChannelGroup, node: gs.Node, member, values: dict) -> np.ndarray:
    operands = []
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant):
            operands.append(_per_channel(tensor, member))
        elif tensor.name in group.tensors:
            operands.append(values[tensor.name])
        else:
            operands.append(np.full(member.channels, np.nan))  # broadcast variable: not constant
    if node.op == "Mean":
        return np.mean(operands, axis=0)
    result = operands[0]
    for operand in operands[1:]:
        result = BINARY[node.op](result, operand)
    if node.op == "Mul":  # a zero factor makes the product 0 whatever the other is
        zero = np.any([np.asarray(o) == 0.0 for o in operands], axis=0)
        result = np.where(zero, 0.0, result)
    return result


def consumer_absorbs(node: gs.Node) -> bool:
    """Whether a consumer can fold a constant input channel into its bias exactly."""
    return consumer_absorb_problem(node) is None


def consumer_absorb_problem(node: gs.Node) -> str | None:
    """Why a consumer cannot fold a constant input channel into its bias exactly (None: it can).

    Gemm and MatMul (an Add is inserted) always can, a Conv without padding can, a ConvTranspose only
    where every output position receives every kernel tap (:func:`conv_transpose_full_taps`); none can
    whose bias is not a constant (a graph input, an overridable initializer, a computed tensor).
    """
    if not takes_bias(node):
        return Reason.CONST_VARIABLE_BIAS.format(op=node.op, node=node.name, tensor=node.inputs[2].name)
    if node.op == "Conv" and conv_has_padding(node):
        return Reason.CONST_CONSUMER.format(op=node.op, node=node.name)
    if node.op == "ConvTranspose" and not conv_transpose_full_taps(node):
        return Reason.CONST_CONV_TRANSPOSE.format(node=node.name)
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return Reason.CONST_CONSUMER.format(op=node.op, node=node.name)
    return None


def takes_bias(node: gs.Node) -> bool:
    """Whether a per-output-channel constant can be added to what a consumer computes.

    Its bias input (Conv, ConvTranspose: B; Gemm: C) is absent or a constant; MatMul has none (the
    editor inserts an Add of its own after it).
    """
    if node.op == "MatMul" or is_empty_input(node, 2):
        return True
    return constant_values(node.inputs[2]) is not None


def offset_atoms(group: ChannelGroup) -> np.ndarray:
    """Per atom: whether every consumer reading it can take a bias (a merge offset, a folded constant)."""
    ok = np.ones(group.n_atoms, bool)
    for consumer in group.consumers:
        if not takes_bias(consumer.node):
            ok[group.tensors[consumer.tensor].atoms] = False
    return ok


def conv_transpose_full_taps(node: gs.Node) -> bool:
    """Whether every output position of a ConvTranspose receives every kernel tap.

    At stride 1 the full output is ``u = i + k·d`` (input ``i`` in ``[0, n-1]``, tap ``k`` in
    ``[0, K-1]``), cropped by ``pads`` on each side: output ``t`` receives tap ``k`` iff
    ``0 <= t + pad_begin - k·d <= n-1``, for every ``k`` and every ``t`` iff ``pad_begin >= d·(K-1)``
    and ``pad_end >= d·(K-1)``. Then a constant input ``c_j`` adds ``c_j·Σ_taps W[j, o]`` at every
    position. With a stride above 1, output ``u`` receives only the taps with ``u - k·d ≡ 0 (mod s)``
    (a periodic contribution); ``output_padding`` appends positions past the last tap. ``auto_pad``
    SAME or VALID pads ``d·(K-1)`` in total at stride 1 (split between the sides), and an
    ``output_shape`` attribute overrides ``pads``: those qualify only for 1-tap kernels (SAME, VALID)
    or not at all (``output_shape``, whose padding depends on the input size).
    """
    weight = constant_values(node.inputs[1])
    if weight is None or "output_shape" in node.attrs:
        return False
    spatial = weight.ndim - 2
    strides = list(node.attrs.get("strides", [1] * spatial))
    output_padding = list(node.attrs.get("output_padding", [0] * spatial))
    if any(int(s) != 1 for s in strides) or any(int(p) != 0 for p in output_padding):
        return False
    dilations = np.array(node.attrs.get("dilations", [1] * spatial), np.int64)
    reach = dilations * (np.array(weight.shape[2:], np.int64) - 1)  # d·(K-1) per spatial axis
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad != "NOTSET":
        return not reach.any()
    pads = np.array(node.attrs.get("pads", [0] * (2 * spatial)), np.int64)
    return bool(np.all(pads[:spatial] >= reach) and np.all(pads[spatial:] >= reach))


def consumer_slices_zero(group: ChannelGroup, node: gs.Node, tensor: str) -> np.ndarray:
    """Per local channel of ``tensor``: whether the consumer's weight slice for it is all zero."""
    member = group.tensors[tensor]
    weight = expect_constant(node.inputs[1])
    moved = np.moveaxis(weight, consumer_axis(node), 0)
    rows = moved.reshape(member.channels, -1)
    # numpy's stubs allow a scalar for any() with an axis; a 2-D array gives a 1-D one
    return ~rows.any(axis=1)  # type: ignore[return-value]
