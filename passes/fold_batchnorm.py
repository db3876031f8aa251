"""Fold BatchNormalization (inference) into the Conv, ConvTranspose or Gemm that feeds it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.weights import producer_axis
from red_onnx.errors import PassContractError
from red_onnx.io.graph import (
    WorkingModel,
    constant_values,
    expect_constant,
    is_empty_input,
    set_constant_input,
)
from red_onnx.passes.infra import Pass, PassResult, Skip

FOLDABLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm"})
SUFFIX = "bnfold"


def sole_producer(node: gs.Node, graph_outputs: set[str], index: int = 0) -> gs.Node | str:
    """The weighted producer whose output only ``node`` reads (as input ``index``), or why there is none."""
    source = node.inputs[index]
    if not source.inputs:
        return "its input is a graph input"
    producer = source.inputs[0]
    if producer.op not in FOLDABLE_PRODUCERS:
        return f"its input comes from {producer.op} '{producer.name}'"
    if len(source.outputs) != 1 or source.name in graph_outputs:
        return f"the output of '{producer.name}' has other readers"
    weight = producer.inputs[1]
    if not isinstance(weight, gs.Constant) or len(weight.outputs) != 1:
        return f"the weight of '{producer.name}' is not a constant of its own"
    if producer.op == "ConvTranspose" and int(producer.attrs.get("group", 1)) != 1:
        return f"'{producer.name}' is a grouped ConvTranspose"
    if not is_empty_input(producer, 2) and constant_values(producer.inputs[2]) is None:
        return f"the bias of '{producer.name}' is not a constant"
    return producer


def scale_producer(producer: gs.Node, factor: np.ndarray, shift: np.ndarray) -> None:
    """Make ``producer`` compute ``factor·y + shift`` per output channel, y its current output."""
    weight = expect_constant(producer.inputs[1])
    axis = producer_axis(producer)
    shape = [1] * weight.ndim
    shape[axis] = -1
    if producer.op == "ConvTranspose" and int(producer.attrs.get("group", 1)) == 1:
        shape = [1, -1] + [1] * (weight.ndim - 2)
    new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
    bias = _effective_bias(producer, len(factor))
    new_bias = (bias * factor + shift).astype(weight.dtype)
    set_constant_input(producer, 1, new_weight, suffix=SUFFIX)
    if producer.op == "Gemm":
        producer.attrs["beta"] = 1.0
    set_constant_input(producer, 2, new_bias, suffix=SUFFIX)


def _effective_bias(producer: gs.Node, channels: int) -> np.ndarray:
    if is_empty_input(producer, 2):
        return np.zeros(channels)
    bias = expect_constant(producer.inputs[2]).astype(np.float64)
    if producer.op == "Gemm":
        bias = bias * float(producer.attrs.get("beta", 1.0))
    return np.broadcast_to(bias.reshape(-1), (channels,)).astype(np.float64)


def bypass(graph: gs.Graph, node: gs.Node, index: int = 0) -> None:
    """Remove a node by making the producer of its input ``index`` write the node's output tensor."""
    source, target = node.inputs[index], node.outputs[0]
    producer = source.inputs[0]
    producer.outputs[producer.outputs.index(source)] = target
    node.inputs.clear()
    node.outputs.clear()


class FoldBatchNorm(Pass):
    """Fold every foldable inference BatchNormalization into its producer's weight and bias."""

    name = "fold_batchnorm"

    def call(self, model: WorkingModel) -> PassResult:
        """Fold and report how many BatchNormalization nodes went, and why others stayed."""
        graph = model.graph
        outputs = {t.name for t in graph.outputs}
        folded, skips = 0, []
        for node in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            reason = self._problem(node, outputs)
            producer = reason if isinstance(reason, gs.Node) else None
            if producer is None:
                skips.append(Skip(node.name, f"BatchNormalization not folded: {reason}"))
                continue
            scale, bias, mean, var = (expect_constant(t).astype(np.float64) for t in node.inputs[1:5])
            factor = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            scale_producer(producer, factor, bias - mean * factor)
            bypass(graph, node)
            folded += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, folded > 0, {"folded": folded, "kept": len(skips)}, skips)

    def ensures(self, model: WorkingModel) -> None:
        """Every BatchNormalization left has a reason to stay (the pass folds all others)."""
        outputs = {t.name for t in model.graph.outputs}
        for node in [n for n in model.graph.nodes if n.op == "BatchNormalization"]:
            if isinstance(self._problem(node, outputs), gs.Node):
                raise PassContractError(f"BatchNormalization {node.name!r} was foldable but is still there")

    @staticmethod
    def _problem(node: gs.Node, outputs: set[str]) -> gs.Node | str:
        if int(node.attrs.get("training_mode", 0)) or any(t.outputs for t in node.outputs[1:]):
            return "it runs in training mode"
        if any(constant_values(t) is None for t in node.inputs[1:5]):
            return "its parameters are not constants"
        if any(expect_constant(t).ndim != 1 for t in node.inputs[1:5]):
            return "its parameters are not per-channel vectors (spatial=0)"
        producer = sole_producer(node, outputs)
        if (
            isinstance(producer, gs.Node)
            and producer.op == "Gemm"
            and not is_empty_input(producer, 2)
            and expect_constant(producer.inputs[2]).size not in (1, len(expect_constant(node.inputs[1])))
        ):
            return f"the C of Gemm '{producer.name}' is a full matrix"
        return producer
