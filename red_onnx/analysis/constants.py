"""Constant and unused channels of a group (analysis, pure).

A producer row of zeros emits its bias everywhere. Whether that constant survives to the consumers is
decided op by op along the path (padding breaks it, a product with a non-constant tensor breaks it).
A channel can go when every consumer either reads nothing from it (its slice is zero) or sees a
constant it can fold into its bias (Gemm, MatMul, Conv without padding).
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
from red_onnx.io.graph import expect_constant, is_empty_input

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
    if node.op == "Conv":
        return not conv_has_padding(node)
    return node.op in ("Gemm", "MatMul")


def consumer_slices_zero(group: ChannelGroup, node: gs.Node, tensor: str) -> np.ndarray:
    """Per local channel of ``tensor``: whether the consumer's weight slice for it is all zero."""
    member = group.tensors[tensor]
    weight = expect_constant(node.inputs[1])
    moved = np.moveaxis(weight, consumer_axis(node), 0)
    rows = moved.reshape(member.channels, -1)
    # numpy's stubs allow a scalar for any() with an axis; a 2-D array gives a 1-D one
    return ~rows.any(axis=1)  # type: ignore[return-value]
