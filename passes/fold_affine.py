"""Fold per-channel Mul/Div/Add/Sub by constants into the Conv, ConvTranspose or Gemm that feeds them."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.redundancy import per_channel_constant
from red_onnx.io.graph import WorkingModel, expect_constant
from red_onnx.passes.infra import Pass, PassResult, Skip

from .fold_batchnorm import bypass, scale_producer, sole_producer

AFFINE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})


def _variable_side(node: gs.Node) -> int | None:
    """Index of the one variable input of a binary op with a constant on the other side."""
    if len(node.inputs) != 2:
        return None
    constant = [isinstance(t, gs.Constant) for t in node.inputs]
    if constant == [False, True]:
        return 0
    if constant == [True, False] and node.op != "Div":
        return 1
    return None


def _affine(node: gs.Node, side: int, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(factor, shift) per channel of ``node`` as a function of its variable input, or why not."""
    values = expect_constant(node.inputs[1 - side]).astype(np.float64)
    if values.ndim > rank:
        return "its constant is not per channel (more dims than the conv output)"
    if values.size == 1:
        column = np.full(channels, float(values.reshape(-1)[0]))
    else:
        rows = per_channel_constant(values, rank, 1, channels)
        if rows is None or rows.shape[1] != 1:
            return "its constant is not per channel (nor a scalar)"
        column = rows[:, 0]
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return column, zeros
    if node.op == "Div":
        return (1.0 / column, zeros) if np.all(column != 0) else "its divisor has zeros"
    if node.op == "Add":
        return ones, column
    return (ones, -column) if side == 0 else (-ones, column)  # x - c, or c - x


class FoldAffine(Pass):
    """Fold ``producer → Mul/Div/Add/Sub(constant per channel or scalar)`` into the producer."""

    name = "fold_affine"

    def call(self, model: WorkingModel) -> PassResult:
        """Fold and report the count."""
        graph = model.graph
        outputs = {t.name for t in graph.outputs}
        folded, skips = 0, []
        for node in [n for n in graph.nodes if n.op in AFFINE_OPS]:
            side = _variable_side(node)
            if side is None:
                continue
            producer = sole_producer(node, outputs, side)
            if not isinstance(producer, gs.Node) or producer.op != "Conv":
                continue  # Gemm/ConvTranspose outputs rarely meet a per-channel affine op: left alone
            weight = expect_constant(producer.inputs[1])
            affine = _affine(node, side, weight.shape[0], weight.ndim)
            if isinstance(affine, str):
                skips.append(Skip(node.name, f"{node.op} not folded: {affine}"))
                continue
            scale_producer(producer, *affine)
            bypass(graph, node, side)
            folded += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, folded > 0, {"folded": folded}, skips)
