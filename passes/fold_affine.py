"""Fold per-channel Mul/Div/Add/Sub by constants into the Conv, ConvTranspose or Gemm that feeds them."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.graph import WorkingModel, constant_values
from red_onnx.pass_infra import Pass, PassResult, Skip
from red_onnx.redundancy import per_channel_constant

from .fold_batchnorm import bypass, scale_producer, sole_producer

AFFINE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})


def _affine(node: gs.Node, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(factor, shift) per channel for ``x op c``, or None when it is not per channel on axis 1."""
    if len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    values = constant_values(node.inputs[1]).astype(np.float64)
    if values.ndim > rank:
        return None
    if values.size == 1:
        column = np.full(channels, float(values.reshape(-1)[0]))
    else:
        rows = per_channel_constant(values, rank, 1, channels)
        if rows is None or rows.shape[1] != 1:
            return None
        column = rows[:, 0]
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return column, zeros
    if node.op == "Div":
        return (1.0 / column, zeros) if np.all(column != 0) else None
    return (ones, column) if node.op == "Add" else (ones, -column)


class FoldAffine(Pass):
    """Fold ``producer → Mul/Div/Add/Sub(constant per channel or scalar)`` into the producer."""

    name = "fold_affine"

    def call(self, model: WorkingModel) -> PassResult:
        """Fold and report the count."""
        graph = model.graph
        outputs = {t.name for t in graph.outputs}
        folded, skips = 0, []
        for node in [n for n in graph.nodes if n.op in AFFINE_OPS]:
            producer = sole_producer(node, outputs) if node.inputs[0].inputs else None
            if not isinstance(producer, gs.Node):
                continue
            weight = constant_values(producer.inputs[1])
            channels = weight.shape[0] if producer.op == "Conv" else None
            if producer.op != "Conv" or node.outputs[0].dtype != node.inputs[0].dtype:
                continue  # Gemm/ConvTranspose outputs rarely meet a per-channel affine op: left alone
            affine = _affine(node, channels, weight.ndim)
            if affine is None:
                skips.append(Skip(node.name, f"{node.op} not folded: its constant is not per channel"))
                continue
            scale_producer(producer, *affine)
            bypass(graph, node)
            folded += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, folded > 0, {"folded": folded}, skips)
