"""How each ONNX op relates the channel axes of its tensors (used by ``red_onnx.analysis.channels``).

Every handler receives the node and the group member it was reached through, and returns a
:class:`NodeMap` — the node's channel tensors with, for each channel, its position in a common
node-local index space — or a reason string that freezes the group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.reasons import Reason
from red_onnx.analysis.weights import producer_block
from red_onnx.io.graph import constant_values, expect_constant, is_empty_input

if TYPE_CHECKING:
    from red_onnx.analysis.channels import GroupTensor

__all__ = [
    "GraphContext",
    "Link",
    "NodeMap",
    "Reason",
    "Relation",
    "producer_seed",
    "target_entry",
    "visit",
]

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Weighted ops on quantized integers: their groups start, and freeze, so the report names them.
QUANTIZED_OPS = frozenset({"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul"})
#: Per-channel unary ops that commute with a positive scale: f(λx) = λ f(x) for λ > 0.
HOMOGENEOUS_UNARY = frozenset({"Relu", "LeakyRelu", "Identity", "Dropout", "Abs"})
#: Per-channel unary ops that do not: only identical merges pass them.
NONHOMOGENEOUS_UNARY = frozenset(
    {
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Exp",
        "Log",
        "Sqrt",
        "Erf",
        "Gelu",
        "Mish",
        "Neg",
        "Reciprocal",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "ThresholdedRelu",
        "Shrink",
        "Cast",
        "Not",
        "IsNaN",
        "IsInf",
        "Relu6",
    }
)
#: Spatial ops on NCHW tensors (channel axis 1): per channel and positively homogeneous.
SPATIAL_OPS = frozenset(
    {
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "LpPool",
        "GlobalLpPool",
        "Pad",
        "Resize",
        "Upsample",
    }
)
#: onnxruntime's fused transformer ops (its transformer optimizer writes them): heads packed in one
#: weight with ``num_heads`` and ``qkv_hidden_sizes`` attributes, biases moved into the LayerNorm.
ORT_FUSED_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedAttention",
        "SkipLayerNormalization",
        "EmbedLayerNormalization",
        "FastGelu",
        "BiasGelu",
        "Gelu",
        "BiasAdd",
        "QuickGelu",
    }
)
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
REDUCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceSum",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "ReduceSumSquare",
    }
)
HOMOGENEOUS_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2"})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
CHANNEL_MIXERS = frozenset(
    {
        "LRN",
        "LayerNormalization",
        "GroupNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
        "DepthToSpace",
        "SpaceToDepth",
        "RMSNormalization",
    }
)


@dataclass(frozen=True)
class Link:
    """A tensor with its channel axis and block size."""

    tensor: gs.Tensor
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Relation:
    """Channel ``own_index[k]`` of the visited member is tied to ``other_index[k]`` of ``link``."""

    link: Link
    own_index: np.ndarray
    other_index: np.ndarray


@dataclass
class NodeMap:
    """A node's channel tensors placed in one node-local index space.

    Attributes:
        role: ``"producer"``, ``"consumer"`` or ``"path"``.
        links: Each channel tensor and the node-space position of each of its channels.
        homogeneous: Whether the node commutes with a positive per-channel scale.
    """

    role: str
    links: list[tuple[Link, np.ndarray]] = field(default_factory=list)
    homogeneous: bool = True

    def relations(self, member: GroupTensor) -> list[Relation]:
        """Relations from ``member`` to every other tensor of the node (by shared positions)."""
        own = next((pos for link, pos in self.links if link.tensor is member.tensor), None)
        if own is None:
            return []
        size = int(max(int(pos.max()) + 1 if len(pos) else 0 for _, pos in self.links))
        inverse = np.full(size, -1, np.int64)
        inverse[own] = np.arange(len(own))
        result = []
        for link, pos in self.links:
            if link.tensor is member.tensor:
                continue
            mine = inverse[pos]
            hit = mine >= 0
            result.append(Relation(link, mine[hit], np.flatnonzero(hit)))
        return result


@dataclass
class Outcome:
    """What visiting a node adds to a group."""

    role: str
    relations: list[Relation]
    homogeneous: bool


class GraphContext:
    """Read-only facts about the graph that handlers need."""

    def __init__(
        self,
        graph: gs.Graph,
        shapes: Mapping[str, tuple[int, ...] | None],
        outer_refs: frozenset[str],
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.outer_refs = outer_refs
        self.graph_outputs = frozenset(t.name for t in graph.outputs)

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        """Static shape of a tensor, or None."""
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        shape = self.shapes.get(tensor.name)
        if shape is None and tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape):
            shape = tuple(tensor.shape)
        return shape

    def rank(self, tensor: gs.Tensor) -> int | None:
        """Rank of a tensor, or None."""
        shape = self.shape(tensor)
        if shape is not None:
            return len(shape)
        return len(tensor.shape) if tensor.shape is not None else None

    def channels(self, tensor: gs.Tensor, axis: int, block: int = 1) -> int | None:
        """Number of channels of ``tensor`` on ``axis`` with ``block`` elements each."""
        shape = self.shape(tensor)
        if shape is None or axis >= len(shape) or shape[axis] % block:
            return None
        return shape[axis] // block


def _fmt(reason: str, node: gs.Node, **extra: object) -> str:
    return reason.format(op=node.op, node=node.name, **extra)


def producer_seed(node: gs.Node, context: GraphContext) -> Link | None:
    """The output link of a weighted node that starts a group, or None."""
    if node.op in QUANTIZED_OPS and node.outputs:
        rank = context.rank(node.outputs[0])
        return Link(node.outputs[0], rank - 1 if "MatMul" in node.op else 1) if rank else None
    if node.op not in WEIGHTED_OPS or not node.outputs:
        return None
    if node.op == "MatMul":
        if constant_values(node.inputs[1]) is None:
            return None
        rank = context.rank(node.outputs[0])
        return Link(node.outputs[0], rank - 1, producer_block(node)) if rank else None
    if node.op == "Conv" and _depthwise_multiplier(node) == 1:
        return None
    return Link(node.outputs[0], 1)


def _depthwise_multiplier(node: gs.Node) -> int | None:
    """Channel multiplier of a depthwise Conv, or None when the conv is not depthwise."""
    weight = constant_values(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    if weight is None or group == 1 or weight.shape[1] != 1:
        return None
    return weight.shape[0] // group


def _weight_problem(node: gs.Node, index: int) -> str | None:
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        reason = Reason.WEIGHT_NOT_CONSTANT
        if hasattr(tensor, "red_default"):
            return _fmt(Reason.WEIGHT_OVERRIDABLE, node, tensor=tensor.name)
        if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
            return _fmt(Reason.QUANTIZED_WEIGHT, node, source=tensor.inputs[0].name)
        if not tensor.inputs:
            return _fmt(Reason.WEIGHT_GRAPH_INPUT, node, tensor=tensor.name)
        return _fmt(reason, node)
    if len(tensor.outputs) > 1:
        return _fmt(Reason.SHARED_WEIGHT, node, tensor=tensor.name, count=len(tensor.outputs))
    return None


def _arange_map(role: str, *links: Link, channels: int, homogeneous: bool = True) -> NodeMap:
    positions = np.arange(channels)
    return NodeMap(role, [(link, positions) for link in links], homogeneous)


def visit(node: gs.Node, member: GroupTensor, context: GraphContext) -> Outcome | str:
    """Relate ``member`` to the other channel tensors of ``node``.

    Returns:
        The outcome, or a reason string that freezes the group.
    """
    if node.domain == "com.microsoft" and node.op in ORT_FUSED_OPS:
        return _fmt(Reason.ORT_FUSED, node)
    if node.domain not in (None, "", "ai.onnx"):
        return _fmt(Reason.CUSTOM_DOMAIN, node, domain=node.domain)
    if node.op in QUANTIZED_OPS:
        return _fmt(Reason.QUANTIZED_OP, node)
    handler = HANDLERS.get(node.op)
    if handler is None:
        if node.op in CHANNEL_MIXERS:
            return _fmt(Reason.MIXES_CHANNELS, node)
        return _fmt(Reason.UNSUPPORTED_OP, node)
    result = handler(node, member, context)
    if isinstance(result, str):
        return result
    return Outcome(result.role, result.relations(member), result.homogeneous)


def _is_output(node: gs.Node, member: GroupTensor) -> bool:
    return any(t is member.tensor for t in node.outputs)


def _extra_outputs_used(node: gs.Node, context: GraphContext) -> bool:
    return any(t.outputs or t.name in context.graph_outputs for t in node.outputs[1:] if t.name)


def _visit_conv(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    problem = _weight_problem(node, 1)
    if problem:
        return problem
    weight = expect_constant(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    multiplier = _depthwise_multiplier(node)
    if multiplier == 1 and node.op == "Conv":
        if member.axis != 1:
            return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
        if not is_empty_input(node, 2) and constant_values(node.inputs[2]) is None:
            return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[2].name)
        channels = weight.shape[0]
        return _arange_map("path", Link(node.inputs[0], 1), Link(node.outputs[0], 1), channels=channels)
    if multiplier is not None:
        return _fmt(Reason.DEPTHWISE_MULTIPLIER, node, multiplier=multiplier)
    if group != 1:
        return _fmt(Reason.GROUPED_CONV, node, group=group)
    if member.axis != 1 or member.block != 1:
        return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
    if _is_output(node, member):
        if not is_empty_input(node, 2) and constant_values(node.inputs[2]) is None:
            return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[2].name)
        return NodeMap("producer")
    if member.tensor is not node.inputs[0]:
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=member.tensor.name)
    return NodeMap("consumer")


def _visit_gemm(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    problem = _weight_problem(node, 1)
    if problem:
        return problem
    if not is_empty_input(node, 2):
        bias = constant_values(node.inputs[2])
        if bias is None:
            return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[2].name)
        if bias.ndim == 2 and bias.shape[0] != 1:
            return _fmt(Reason.GEMM_FULL_C, node)
    if _is_output(node, member):
        if member.axis != 1:
            return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
        return _producer_block_problem(node, member) or NodeMap("producer")
    if member.tensor is not node.inputs[0]:
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=member.tensor.name)
    expected = 0 if int(node.attrs.get("transA", 0)) else 1
    if member.axis != expected:
        return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
    return NodeMap("consumer")


def _visit_matmul(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    if all(constant_values(t) is None for t in node.inputs[:2]):
        return _batched_matmul(node, member, context)
    weight = constant_values(node.inputs[1])
    if weight is None or weight.ndim != 2 or member.tensor is node.inputs[1]:
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[1].name)
    problem = _weight_problem(node, 1)
    if problem:
        return problem
    rank = context.rank(member.tensor)
    if rank is None or member.axis != rank - 1 or rank < 2:
        return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
    if _is_output(node, member):
        return _producer_block_problem(node, member) or NodeMap("producer")
    return NodeMap("consumer")


def _producer_block_problem(node: gs.Node, member: GroupTensor) -> str | None:
    """A producer's output must be reached in the channels its weight's columns make (one row each)."""
    expected = producer_block(node)
    if member.block == expected:
        return None
    return _fmt(Reason.PRODUCER_BLOCK, node, tensor=member.tensor.name, block=member.block, expected=expected)


def _batched_matmul(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    """MatMul of two computed tensors: its batch axes (numpy broadcasting) tie A, B and the output.

    Attention's ``Q·Kᵀ`` and ``P·V`` keep heads apart on a batch axis; the two matrix axes mix (the
    contraction) or take the other operand whole, and freeze the group.
    """
    out = node.outputs[0]
    ranks = [context.rank(t) for t in (*node.inputs[:2], out)]
    shapes = [context.shape(t) for t in (*node.inputs[:2], out)]
    if any(r is None for r in ranks) or any(s is None for s in shapes):
        return Reason.UNKNOWN_SHAPE.format(tensor=out.name)
    out_rank = cast(int, ranks[2])
    offset = out_rank - member.rank
    out_axis = member.axis + (0 if _is_output(node, member) else offset)
    if member.block != 1 or min(cast(int, r) for r in ranks[:2]) < 2 or out_axis >= out_rank - 2:
        return _fmt(Reason.MATRIX_AXIS, node, tensor=member.tensor.name, axis=member.axis)
    links = [Link(out, out_axis)]
    for tensor, rank, shape in zip(node.inputs[:2], ranks[:2], shapes[:2], strict=True):
        axis = out_axis - (out_rank - cast(int, rank))
        if axis >= 0 and cast(tuple, shape)[axis] != 1:
            links.append(Link(tensor, axis))
    return _arange_map("path", *links, channels=member.channels, homogeneous=False)


def _visit_unary(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    if _extra_outputs_used(node, context):
        return _fmt(Reason.EXTRA_OUTPUT, node)
    if member.tensor is not node.inputs[0] and not _is_output(node, member):
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=member.tensor.name)
    for extra in node.inputs[1:]:
        if extra.name and not isinstance(extra, gs.Constant):
            return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=extra.name)
    homogeneous = node.op in HOMOGENEOUS_UNARY or node.op in SPATIAL_OPS
    if node.op in SPATIAL_OPS:
        problem = _spatial_problem(node, member, context)
        if problem:
            return problem
        homogeneous = _pad_value(node) == 0.0
    if node.op == "PRelu":
        return _prelu_map(node, member, context)
    channels = member.channels
    links = (
        Link(node.inputs[0], member.axis, member.block),
        Link(node.outputs[0], member.axis, member.block),
    )
    return _arange_map("path", *links, channels=channels, homogeneous=homogeneous)


def _pad_value(node: gs.Node) -> float:
    if node.op != "Pad":
        return 0.0
    if "value" in node.attrs:
        return float(node.attrs["value"])
    value = constant_values(node.inputs[2]) if not is_empty_input(node, 2) else None
    return float(value.reshape(-1)[0]) if value is not None and value.size else 0.0


def _spatial_problem(node: gs.Node, member: GroupTensor, context: GraphContext) -> str | None:
    if member.axis != 1 or member.block != 1:
        return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
    in_shape = context.shape(node.inputs[0])
    out_shape = context.shape(node.outputs[0])
    if in_shape is None or out_shape is None or in_shape[:2] != out_shape[:2]:
        return _fmt(Reason.CHANNEL_AXIS_ATTR, node)
    return None


def _prelu_map(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    slope = constant_values(node.inputs[1])
    rank = context.rank(node.inputs[0])
    if slope is None or rank is None or not _broadcasts_per_channel(slope.shape, rank, member):
        return _fmt(Reason.BAD_BROADCAST, node, tensor=node.inputs[1].name)
    links = (
        Link(node.inputs[0], member.axis, member.block),
        Link(node.outputs[0], member.axis, member.block),
    )
    return _arange_map("path", *links, channels=member.channels)


def _broadcasts_per_channel(shape: tuple[int, ...], rank: int, member: GroupTensor | _Axis) -> bool:
    """Whether a constant of ``shape`` is scalar along every axis but the channel axis (or C there).

    On a member whose channels are blocks of its axis (an attention head's D columns) the constant
    holds ``C·block`` values there, sliced a block at a time.
    """
    offset = rank - len(shape)
    for axis, size in enumerate(shape):
        target = axis + offset
        if size != 1 and not (target == member.axis and size == member.channels * member.block):
            return False
    return True


def _visit_norm(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    if member.axis != 1 or member.block != 1:
        return _fmt(Reason.WRONG_AXIS, node, tensor=member.tensor.name, axis=member.axis)
    if _extra_outputs_used(node, context) or int(node.attrs.get("training_mode", 0)):
        return _fmt(Reason.EXTRA_OUTPUT, node)
    for extra in node.inputs[1:]:
        if constant_values(extra) is None:
            return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=extra.name)
    homogeneous = node.op == "BatchNormalization"
    links = (Link(node.inputs[0], 1), Link(node.outputs[0], 1))
    return _arange_map("path", *links, channels=member.channels, homogeneous=homogeneous)


def _visit_binary(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    out = node.outputs[0]
    out_rank = context.rank(out)
    known = [context.rank(t) for t in node.inputs]
    ranks = [r for r in known if r is not None]
    if out_rank is None or len(ranks) < len(known):
        return Reason.UNKNOWN_SHAPE.format(tensor=out.name)
    if _is_output(node, member):
        out_axis = member.axis
    else:
        index = next(i for i, t in enumerate(node.inputs) if t is member.tensor)
        out_axis = member.axis + out_rank - ranks[index]
    out_member = _Axis(out_axis, member)
    links = [Link(out, out_axis, member.block)]
    roles = []
    for tensor, rank in zip(node.inputs, ranks, strict=True):
        axis = out_axis - (out_rank - rank)
        shape = context.shape(tensor)
        if isinstance(tensor, gs.Constant):
            if shape is None or not _broadcasts_per_channel(shape, out_rank, out_member):
                return _fmt(Reason.BAD_BROADCAST, node, tensor=tensor.name)
            roles.append("constant")
        elif shape is None:
            return Reason.UNKNOWN_SHAPE.format(tensor=tensor.name)
        elif axis < 0 or shape[axis] == 1:
            roles.append("broadcast")
        elif member.block != 1 and shape != context.shape(out):
            return _fmt(Reason.BAD_BROADCAST, node, tensor=tensor.name)
        else:
            links.append(Link(tensor, axis, member.block))
            roles.append("coupled")
    homogeneous = _binary_homogeneous(node.op, roles)
    return _arange_map("path", *links, channels=member.channels, homogeneous=homogeneous)


@dataclass
class _Axis:
    """A stand-in member for broadcast checks at an output axis."""

    axis: int
    member: GroupTensor

    @property
    def channels(self) -> int:
        """Channels of the member."""
        return self.member.channels

    @property
    def block(self) -> int:
        """Block of the member."""
        return self.member.block


def _binary_homogeneous(op: str, roles: list[str]) -> bool:
    """Whether y_j = λ·y_i follows from every coupled input scaling by λ (constants scaled alike).

    Add/Sub/Max/Min/Sum/Mean: yes unless a broadcast variable input does not scale. Mul: yes with one
    coupled factor (the others constant or broadcast). Div: yes when only the numerator is coupled.
    """
    if op == "Pow":
        return False
    if op == "Mul":
        return roles.count("coupled") <= 1
    if op == "Div":
        return roles[1] != "coupled"
    return "broadcast" not in roles


def _offset_map(
    node: gs.Node, member: GroupTensor, context: GraphContext, whole: gs.Tensor, parts: list[gs.Tensor]
) -> NodeMap | str:
    """Concat/Split: ``whole`` is ``parts`` laid end to end on the node's axis."""
    rank = context.rank(whole)
    if rank is None:
        return Reason.UNKNOWN_SHAPE.format(tensor=whole.name)
    axis = int(node.attrs.get("axis", 0)) % rank
    if any(isinstance(t, gs.Constant) for t in [whole, *parts]):
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[0].name)
    if axis != member.axis:  # joined along another axis: channel c of every piece is channel c
        same = [Link(t, member.axis, member.block) for t in [whole, *parts]]
        return _arange_map("path", *same, channels=member.channels)
    known = [context.channels(t, axis, member.block) for t in parts]
    counts = [c for c in known if c is not None]
    if len(counts) < len(known):
        return Reason.UNKNOWN_SHAPE.format(tensor=whole.name)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    links = [(Link(t, axis, member.block), offsets[k] + np.arange(counts[k])) for k, t in enumerate(parts)]
    links.append((Link(whole, axis, member.block), np.arange(int(offsets[-1]))))
    return NodeMap("path", links)


def _visit_concat(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    return _offset_map(node, member, context, node.outputs[0], list(node.inputs))


def _visit_split(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    if len(node.inputs) > 1 and node.inputs[1].name and member.tensor is node.inputs[1]:
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[1].name)
    return _offset_map(node, member, context, node.inputs[0], list(node.outputs))


def slice_params(node: gs.Node, rank: int) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Starts, ends, axes (normalised) and steps of a Slice, or None when not constant."""
    if "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = [constant_values(t) if t.name else None for t in node.inputs[1:5]]
        if any(v is None for v in values[:2]) or any(
            v is None and k < len(node.inputs) - 1 and node.inputs[k + 1].name for k, v in enumerate(values)
        ):
            return None
        # both constant: checked just above
        starts, ends = cast(np.ndarray, values[0]).tolist(), cast(np.ndarray, values[1]).tolist()
        axes = values[2].tolist() if len(values) > 2 and values[2] is not None else list(range(len(starts)))
        steps = values[3].tolist() if len(values) > 3 and values[3] is not None else [1] * len(starts)
    return starts, ends, [a % rank for a in axes], steps


def _visit_slice(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    rank = context.rank(node.inputs[0])
    params = slice_params(node, rank) if rank else None
    if params is None or (member.tensor is not node.inputs[0] and not _is_output(node, member)):
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[0].name)
    starts, ends, axes, steps = params
    if member.axis not in axes:
        links = (
            Link(node.inputs[0], member.axis, member.block),
            Link(node.outputs[0], member.axis, member.block),
        )
        return _arange_map("path", *links, channels=member.channels)
    k = axes.index(member.axis)
    block = member.block
    total = context.channels(node.inputs[0], member.axis, block)
    if steps[k] != 1 or total is None:
        return _fmt(Reason.CHANNEL_AXIS_ATTR, node)
    start, stop, _ = slice(int(starts[k]), int(ends[k])).indices(total * block)
    stop = max(start, stop)
    if start % block or stop % block:  # a block (an attention head) cut in two
        return _fmt(Reason.CHANNEL_AXIS_ATTR, node)
    positions = [
        (Link(node.inputs[0], member.axis, block), np.arange(total)),
        (Link(node.outputs[0], member.axis, block), np.arange(start // block, stop // block)),
    ]
    return NodeMap("path", positions)


def _visit_transpose(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    rank = context.rank(node.inputs[0])
    if rank is None:
        return Reason.UNKNOWN_SHAPE.format(tensor=node.inputs[0].name)
    perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
    if member.block != 1:
        return _fmt(Reason.RESHAPE, node)
    if _is_output(node, member):
        in_axis, out_axis = perm[member.axis], member.axis
    else:
        in_axis, out_axis = member.axis, perm.index(member.axis)
    links = (Link(node.inputs[0], in_axis), Link(node.outputs[0], out_axis))
    return _arange_map("path", *links, channels=member.channels)


def reshape_axis(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int, block: int
) -> tuple[int, int] | None:
    """Where channel axis ``axis`` (with ``block``) of ``in_shape`` lands in ``out_shape``.

    Three forms keep each channel one run of consecutive elements on one axis: the axis stays
    (same size, same trailing size), it is flattened with the trailing dims (the block grows by their
    size), or its blocks are unflattened into trailing dims (``[.., H·D] → [.., H, D]``: block D
    becomes block 1, the D elements moving to the new trailing axis).

    Returns:
        ``(out_axis, out_block)``, or None when the reshape splits or mixes the channel axis, or
        changes the dims before it.
    """
    size, post = in_shape[axis], math.prod(in_shape[axis + 1 :])
    channels = size // block
    for out_axis in range(len(out_shape)):
        if tuple(out_shape[:out_axis]) != tuple(in_shape[:axis]):
            continue  # leading dims (batch) must stay as they are, or a dim of 1 could hide a mix
        out_post = math.prod(out_shape[out_axis + 1 :])
        if out_shape[out_axis] == size and out_post == post:
            return out_axis, block
        if out_shape[out_axis] == size * post and out_post == 1:
            return out_axis, block * post
        if block > 1 and out_shape[out_axis] == channels and out_post == block * post:
            return out_axis, 1
    return None


def target_entry(concat: gs.Node, from_end: int) -> tuple[int, int | None]:
    """Where entry ``from_end`` (counted back from the last) of a Concat-built Reshape target lies.

    Counted back over the Concat's inputs from the last, which must be constants up to the entry.

    Returns:
        ``(input index, position in that input)``; the position is None where that input, or one after
        it, is not a constant (the index then names it); ``(-1, None)`` when the inputs are too few.
    """
    for index in range(len(concat.inputs) - 1, -1, -1):
        values = constant_values(concat.inputs[index])
        if values is None:
            return index, None
        if from_end < values.size:
            return index, values.size - 1 - from_end
        from_end -= values.size
    return -1, None


def _target_problem(node: gs.Node, out_axis: int, out_rank: int, context: GraphContext) -> str | None:
    """Why a Reshape's target cannot follow the channel count, or None.

    A constant target is rewritten by the editor. A target built at run time must be a Concat (axis 0)
    whose piece holding the channel axis' entry is a constant (rewritten: a copy where it is shared),
    ``-1`` (inferred) or ``0`` (copied from the input's same axis, which changes alike), with only
    constants after it, so that the editor finds the entry without the shapes; the other pieces may
    be anything computed at run time (batch and sequence sizes read with Shape: a Shape of a group
    tensor is checked not to read its channel axis).
    """
    target = node.inputs[1]
    if isinstance(target, gs.Constant):
        return None
    source = target.inputs[0] if target.inputs else None
    if source is None or source.op != "Concat" or int(source.attrs.get("axis", 0)) not in (0, -1):
        described = f"{source.op} node '{source.name}'" if source is not None else "a graph input"
        return _fmt(Reason.RESHAPE_TARGET_SOURCE, node, tensor=target.name, source=described)
    from_end = out_rank - 1 - out_axis
    for piece in reversed(source.inputs):
        shape = context.shape(piece)
        if shape is None or len(shape) != 1:
            return Reason.UNKNOWN_SHAPE.format(tensor=piece.name)
        if isinstance(piece, gs.Constant):
            if from_end < shape[0]:
                return None
        elif from_end < shape[0]:
            return _fmt(Reason.RESHAPE_TARGET_ENTRY, node, axis=out_axis, tensor=piece.name)
        else:
            return _fmt(Reason.RESHAPE_TARGET_AFTER, node, axis=out_axis, tensor=piece.name)
        from_end -= shape[0]
    return Reason.UNKNOWN_SHAPE.format(tensor=target.name)


def _make_reshape_handler() -> Callable[[gs.Node, GroupTensor, GraphContext], NodeMap | str]:
    def handler(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
        in_shape, out_shape = context.shape(node.inputs[0]), context.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            return Reason.UNKNOWN_SHAPE.format(tensor=node.outputs[0].name)
        if member.tensor is not node.inputs[0] and not _is_output(node, member):
            return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=member.tensor.name)
        candidates = [(member.axis, member.block)]
        if _is_output(node, member):  # the input's axis holding the same channel count, any block
            channels = member.channels
            candidates = [
                (a, n // channels) for a, n in enumerate(in_shape) if channels and n % channels == 0
            ]
        for axis, block in candidates:
            landed = reshape_axis(in_shape, out_shape, axis, block)
            if landed is None:
                continue
            if _is_output(node, member) and landed != (member.axis, member.block):
                continue
            if node.op == "Reshape":
                problem = _target_problem(node, landed[0], len(out_shape), context)
                if problem:
                    return problem
            links = (Link(node.inputs[0], axis, block), Link(node.outputs[0], *landed))
            return _arange_map("path", *links, channels=member.channels)
        return _reshape_split_reason(node, member, in_shape, out_shape) or _fmt(Reason.RESHAPE, node)

    return handler


def _reshape_split_reason(
    node: gs.Node, member: GroupTensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> str | None:
    """The reason naming a reshape that splits the channel axis of its input into several trailing axes."""
    if _is_output(node, member) or member.axis != len(in_shape) - 1:
        return None
    lead = tuple(in_shape[: member.axis])
    if tuple(out_shape[: len(lead)]) != lead or len(out_shape) - len(lead) < 2:
        return None
    dims = list(out_shape[len(lead) :])
    return _fmt(Reason.RESHAPE_SPLIT, node, tensor=member.tensor.name, dims=dims)


def _reduce_axes(node: gs.Node, rank: int) -> list[int] | None:
    if "axes" in node.attrs:
        return [a % rank for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_values(node.inputs[1])
        return None if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    if int(node.attrs.get("noop_with_empty_axes", 0)):
        return []
    return list(range(rank))


def _visit_reduce(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    rank = context.rank(node.inputs[0])
    axes = _reduce_axes(node, rank) if rank else None
    if rank is None or axes is None:
        return _fmt(Reason.VARIABLE_PARAMETER, node, tensor=node.inputs[0].name)
    keep = int(node.attrs.get("keepdims", 1))
    if member.block != 1:
        return _fmt(Reason.RESHAPE, node)
    if _is_output(node, member):
        kept = [a for a in range(rank) if keep or a not in axes]
        in_axis = kept[member.axis] if keep == 0 else member.axis
    else:
        in_axis = member.axis
    if in_axis in axes:
        return _fmt(Reason.MIXES_CHANNELS, node)
    out_axis = in_axis if keep else in_axis - sum(a < in_axis for a in axes)
    links = (Link(node.inputs[0], in_axis), Link(node.outputs[0], out_axis))
    return _arange_map("path", *links, channels=member.channels, homogeneous=node.op in HOMOGENEOUS_REDUCE)


def _visit_softmax(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    rank = context.rank(node.inputs[0])
    if rank is None:
        return Reason.UNKNOWN_SHAPE.format(tensor=node.inputs[0].name)
    opset = context.graph.opset
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % rank
    mixes = member.axis == axis if opset >= 13 else member.axis >= axis
    if mixes or member.block != 1:
        return _fmt(Reason.MIXES_CHANNELS, node)
    links = (Link(node.inputs[0], member.axis), Link(node.outputs[0], member.axis))
    return _arange_map("path", *links, channels=member.channels, homogeneous=False)


def _visit_shape(node: gs.Node, member: GroupTensor, context: GraphContext) -> NodeMap | str:
    """Shape of a group tensor: allowed while only dims other than the channel axis are read from it.

    Exports read the batch and sequence sizes this way (``Gather(Shape(x), 0)``) to build Reshape
    targets; those do not change when channels go. Unless opset 15's ``start``/``end`` attributes
    leave the channel axis out, every reader of the Shape's output must be a Gather or a Slice with
    constant indices that miss it. The node has no channel tensor of its own: a path node, no relation.
    """
    dims = np.arange(member.rank)[slice(node.attrs.get("start", 0), node.attrs.get("end"))]
    if member.axis not in dims:  # its start/end leave the channel axis out: whatever reads it
        return NodeMap("path")
    out = node.outputs[0]
    readers: list[tuple[str, np.ndarray | None]] = [(reader.name, _shape_entries(reader, out, len(dims)))
                                                    for reader in out.outputs]  # fmt: skip
    if out.name in context.graph_outputs:
        readers.append((out.name, None))
    for reader, entries in readers:
        if entries is None or member.axis in dims[entries]:
            return _fmt(Reason.SHAPE_READ, node, axis=member.axis, tensor=member.tensor.name, reader=reader)
    return NodeMap("path")


def _shape_entries(reader: gs.Node, shape: gs.Tensor, length: int) -> np.ndarray | None:
    """The entries of a Shape output ``shape`` (``length`` of them) that ``reader`` reads (None: any)."""
    if not reader.inputs or reader.inputs[0] is not shape or any(t is shape for t in reader.inputs[1:]):
        return None
    if reader.op == "Gather" and int(reader.attrs.get("axis", 0)) in (0, -1):
        indices = constant_values(reader.inputs[1])
        if indices is None or indices.dtype.kind not in "iu":
            return None
        return np.asarray(indices, np.int64).reshape(-1) % max(length, 1)
    if reader.op == "Slice":
        params = slice_params(reader, 1)
        if params is None:
            return None
        starts, ends, axes, steps = params
        if axes != [0]:
            return None
        return np.arange(length)[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
    return None


HANDLERS: dict[str, Callable[[gs.Node, GroupTensor, GraphContext], NodeMap | str]] = {
    "Conv": _visit_conv,
    "ConvTranspose": _visit_conv,
    "Gemm": _visit_gemm,
    "MatMul": _visit_matmul,
    "PRelu": _visit_unary,
    "BatchNormalization": _visit_norm,
    "InstanceNormalization": _visit_norm,
    "Concat": _visit_concat,
    "Split": _visit_split,
    "Slice": _visit_slice,
    "Transpose": _visit_transpose,
    "Shape": _visit_shape,
    **{op: _make_reshape_handler() for op in RESHAPE_OPS},
    **{op: _visit_unary for op in HOMOGENEOUS_UNARY | NONHOMOGENEOUS_UNARY | SPATIAL_OPS},
    **{op: _visit_binary for op in BINARY_OPS},
    **{op: _visit_reduce for op in REDUCE_OPS},
    **{op: _visit_softmax for op in SOFTMAX_OPS},
}
