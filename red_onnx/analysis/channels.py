"""Channel dependency analysis: which tensors, producers and consumers share a channel axis.

Pure: reads the graph, never edits it. For every producer (Conv, ConvTranspose, Gemm, MatMul with a
constant weight) it builds the *group* of tensors tied to its output channels through per-channel ops
(activations, pooling, BatchNormalization, per-channel constants, depthwise convs), couplings (residual
Add/Sum, Mul of two variable tensors) and index maps (Concat/Split/Slice offsets, Flatten blocks,
Transpose axes), up to the *consumers* that read those channels as the input axis of a weight.

Channels of all tensors of a group are numbered into *atoms*: an atom is the set of (tensor, index)
positions that must be deleted together. A group that touches anything not understood is frozen, with
the reason.

Attention (docs/method.md, "Attention heads"): a Q, K or V projection whose output is reshaped to
``[.., heads, D]`` starts its group in channels of D columns, so that one channel, and one atom, is a
head; the heads stay apart on a batch axis of the MatMuls of two computed tensors. A tensor coupled to
the heads from outside the block (a position bias shared by every layer) is a *side input*: sliced to
the kept heads in front of the node that reads it, instead of joining the group.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis import channel_ops
from red_onnx.analysis.channel_ops import Link, Reason
from red_onnx.analysis.components import component_labels
from red_onnx.io.graph import WorkingModel, subgraph_outer_references

logger = logging.getLogger(__name__)


@dataclass
class GroupTensor:
    """A tensor of a group: its channel axis and the atom of each channel index.

    Attributes:
        tensor: The graph tensor.
        axis: The channel axis.
        block: Consecutive elements per channel along the axis (Flatten of [C,H,W] gives H*W).
        base: First slot id of this tensor while the group is being built.
        channels: Number of channels.
        rank: Rank of the tensor.
        atoms: Atom id of each channel index (filled once the group is complete).
    """

    tensor: gs.Tensor
    axis: int
    block: int
    base: int
    channels: int
    rank: int
    atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Producer:
    """A node whose output channels start in the group."""

    node: gs.Node
    tensor: str


@dataclass
class Consumer:
    """A node that reads the group's channels along its weight's input axis."""

    node: gs.Node
    tensor: str


@dataclass(frozen=True)
class SideInput:
    """A tensor from outside the group read per channel by a path node: sliced, not a member.

    Attributes:
        node: The path node (an elementwise binary op) that reads it.
        index: Its input position on ``node``.
        axis: Its channel axis (a head axis of rank >= 3 tensors).
        member: The group tensor (``node``'s output) whose kept channels select its slices.
    """

    node: gs.Node
    index: int
    axis: int
    member: str


@dataclass
class ChannelGroup:
    """Tensors, producers, consumers and path ops tied to one channel space.

    Attributes:
        index: Group number, in discovery order (topological).
        tensors: Member tensors by name.
        producers: Producer nodes, output tensor in the group.
        consumers: Consumer nodes reading a group tensor.
        path: Per-channel ops inside the group (their kinds in ``path_kinds``).
        n_atoms: Number of atoms.
        homogeneous: Whether every op of the group is positively homogeneous per channel, so that
            scaled merges are exact.
        frozen: The reason the group may not change, or None.
        origin: Name of the node whose output seeded the group.
        side_inputs: Tensors from outside the group read on a head axis (the editor slices them to
            the kept channels; :class:`SideInput`).
    """

    index: int
    tensors: dict[str, GroupTensor] = field(default_factory=dict)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    path: list[gs.Node] = field(default_factory=list)
    n_atoms: int = 0
    homogeneous: bool = True
    frozen: str | None = None
    origin: str = ""
    side_inputs: list[SideInput] = field(default_factory=list)

    def freeze(self, reason: str) -> None:
        """Freeze the group; the first reason is kept."""
        if self.frozen is None:
            self.frozen = reason

    @property
    def atom_width(self) -> int:
        """Producer output channels per atom: an attention head's D, else 1 (kept-count steps use it)."""
        return max(
            (self.tensors[p.tensor].block for p in self.producers if p.tensor in self.tensors), default=1
        )

    @property
    def name(self) -> str:
        """A readable name: the producers' node names."""
        names = [p.node.name for p in self.producers] or [self.origin]
        return "+".join(names)

    def atom_index(self, tensor: str) -> np.ndarray:
        """Local index of each atom in ``tensor`` (-1 where the atom is absent)."""
        member = self.tensors[tensor]
        index = np.full(self.n_atoms, -1, np.int64)
        index[member.atoms] = np.arange(member.channels)
        return index


@dataclass
class ChannelAnalysis:
    """All channel groups of a graph."""

    groups: list[ChannelGroup]

    @property
    def frozen(self) -> list[ChannelGroup]:
        """Groups that may not change."""
        return [g for g in self.groups if g.frozen]


class _GroupBuilder:
    """Breadth-first collection of one group, then atom numbering by connected components."""

    def __init__(self, index: int, context: channel_ops.GraphContext) -> None:
        self.group = ChannelGroup(index=index)
        self.context = context
        self.queue: deque[str] = deque()
        self.visited_nodes: set[tuple[int, str]] = set()  # (id(node), member tensor name)
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_slots = 0
        self.heads = False  # seeded in blocks (attention heads): side inputs allowed
        self.pending: dict[tuple[int, int], tuple[GroupTensor, channel_ops.Relation, SideInput]] = {}

    def add(self, link: Link) -> GroupTensor | None:
        """Add a tensor (or check it is consistent) and queue it for exploration."""
        members = self.group.tensors
        name = link.tensor.name
        if name in members:
            member = members[name]
            if (member.axis, member.block) != (link.axis, link.block):
                self.group.freeze(Reason.AXIS_CONFLICT.format(tensor=name))
            return member
        channels = self.context.channels(link.tensor, link.axis, link.block)
        if channels is None:
            self.group.freeze(Reason.UNKNOWN_SHAPE.format(tensor=name))
            return None
        rank = self.context.rank(link.tensor) or 0
        member = GroupTensor(link.tensor, link.axis, link.block, self.n_slots, channels, rank)
        self.n_slots += channels
        members[name] = member
        self.queue.append(name)
        return member

    def relate(self, a: GroupTensor, a_index: np.ndarray, b: GroupTensor, b_index: np.ndarray) -> None:
        """Tie channel ``a_index`` of ``a`` to channel ``b_index`` of ``b``, elementwise."""
        self.pairs.append((a.base + a_index, b.base + b_index))

    def run(self, seed: Link) -> ChannelGroup:
        """Explore from a producer's output link and number the atoms."""
        self.heads = seed.block > 1
        self.add(seed)
        while self.queue:
            name = self.queue.popleft()
            member = self.group.tensors[name]
            self._explore(member)
        self._settle_side_inputs()
        self._number_atoms()
        return self.group

    def _side_input(self, node: gs.Node, member: GroupTensor, relation: channel_ops.Relation) -> bool:
        """Defer a coupled input of a binary op on a head axis that is not (yet) a member; True if so."""
        tensor = relation.link.tensor
        rank = self.context.rank(tensor)
        if (
            not self.heads
            or node.op not in channel_ops.BINARY_OPS
            or tensor.name in self.group.tensors
            or isinstance(tensor, gs.Constant)
            or rank is None
            or relation.link.block != 1
            or relation.link.axis > rank - 3
            or not node.outputs
            or node.outputs[0].name not in self.group.tensors
        ):
            return False
        index = next((i for i, t in enumerate(node.inputs) if t is tensor), None)
        if index is None:
            return False
        side = SideInput(node, index, relation.link.axis, node.outputs[0].name)
        self.pending.setdefault((id(node), index), (member, relation, side))
        return True

    def _settle_side_inputs(self) -> None:
        """Side inputs that joined the group by another route are coupled as usual; the rest stay aside."""
        for member, relation, side in self.pending.values():
            other = self.group.tensors.get(relation.link.tensor.name)
            if other is None:
                self.group.side_inputs.append(side)
                continue
            if (other.axis, other.block) != (relation.link.axis, relation.link.block):
                self.group.freeze(Reason.AXIS_CONFLICT.format(tensor=other.tensor.name))
            self.relate(member, relation.own_index, other, relation.other_index)

    def _explore(self, member: GroupTensor) -> None:
        tensor = member.tensor
        context = self.context
        if tensor.name in context.graph_outputs:
            self.group.freeze(Reason.GRAPH_OUTPUT.format(tensor=tensor.name))
        if tensor.name in context.outer_refs:
            self.group.freeze(Reason.SUBGRAPH_READ.format(tensor=tensor.name))
        if not tensor.inputs:
            self.group.freeze(Reason.GRAPH_INPUT.format(tensor=tensor.name))
        for node in [*tensor.inputs, *tensor.outputs]:
            self._visit(node, member)

    def _visit(self, node: gs.Node, member: GroupTensor) -> None:
        key = (id(node), member.tensor.name)
        if key in self.visited_nodes:
            return
        self.visited_nodes.add(key)
        outcome = channel_ops.visit(node, member, self.context)
        if isinstance(outcome, str):
            self.group.freeze(outcome)
            return
        if outcome.role == "producer":
            self.group.producers.append(Producer(node, member.tensor.name))
        elif outcome.role == "consumer":
            self.group.consumers.append(Consumer(node, member.tensor.name))
        elif all(node is not p for p in self.group.path):
            self.group.path.append(node)
        if not outcome.homogeneous:
            self.group.homogeneous = False
        for relation in outcome.relations:
            if self._side_input(node, member, relation):
                continue
            other = self.add(relation.link)
            if other is not None:
                self.relate(member, relation.own_index, other, relation.other_index)

    def _number_atoms(self) -> None:
        group = self.group
        n = max(self.n_slots, 1)
        if self.pairs:
            rows = np.concatenate([a for a, _ in self.pairs])
            cols = np.concatenate([b for _, b in self.pairs])
        else:
            rows = cols = np.zeros(0, np.int64)
        labels = component_labels(n, rows, cols)
        _, atoms = np.unique(labels[: self.n_slots], return_inverse=True)
        group.n_atoms = int(atoms.max()) + 1 if self.n_slots else 0
        read = {consumer.tensor for consumer in group.consumers}
        several = []
        for member in group.tensors.values():
            member.atoms = atoms[member.base : member.base + member.channels]
            if len(np.unique(member.atoms)) != member.channels:
                if member.tensor.name in read or not self.heads or regions(member.atoms) is None:
                    group.freeze(Reason.SELF_COUPLED.format(tensor=member.tensor.name))
                several.append(member)
        if several and group.frozen is None:
            problem = _several_per_atom_problem(group, several)
            if problem:
                group.freeze(problem)


def regions(atoms: np.ndarray) -> int | None:
    """How many channels per atom a tensor holds laid out as k regions, each every atom once in one order.

    A fused QKV projection's output holds each head three times: ``[q heads | k heads | v heads]``.
    Returns k, or None for any other layout.
    """
    count = len(np.unique(atoms))
    if count == 0 or len(atoms) % count:
        return None
    laid = atoms.reshape(len(atoms) // count, count)
    return laid.shape[0] if bool((laid == laid[0]).all()) else None


def _several_per_atom_problem(group: ChannelGroup, several: list[GroupTensor]) -> str | None:
    """Why tensors holding several channels per atom are unsafe here, or None.

    Such a tensor (no consumer reads it) may only pass elementwise ops that keep its layout, and Split
    or Slice cuts on whole regions (each piece then holds its region's channels: one q head, one k head,
    ...), so that rows compared slot by slot (``redundancy.atom_params``) are those of the same region.
    The constant rule (``constants.analyse_constants``) maps a piece's channels by atom and would give
    every piece the values of the last region: the pieces must reach the consumers only through a
    MatMul of two computed tensors, where no constant survives.
    """
    tensors = group.tensors
    pieces: list[str] = []
    for member in several:
        name = member.tensor.name
        width = member.channels // cast(int, regions(member.atoms))
        for node in group.path:
            if all(t is not member.tensor for t in node.inputs) or node.op == "Shape":
                continue
            ends = _piece_bounds(node, member, tensors)
            if ends is None:
                inside = [tensors[t.name] for t in [*node.inputs, *node.outputs] if t.name in tensors]
                if any(not np.array_equal(m.atoms, member.atoms) for m in inside):
                    return Reason.SELF_COUPLED.format(tensor=name)
                continue
            if any(end % width for end in ends):
                return Reason.SELF_COUPLED.format(tensor=name)
            pieces += [t.name for t in node.outputs if t.name in tensors]
    read = {consumer.tensor for consumer in group.consumers}
    reached = _downstream(group, pieces)
    hit = next((name for name in reached if name in read), None)
    return Reason.SELF_COUPLED.format(tensor=hit) if hit else None


def _piece_bounds(node: gs.Node, member: GroupTensor, tensors: Mapping[str, GroupTensor]) -> list[int] | None:
    """Channel bounds of the pieces a Split or Slice cuts from ``member`` on its channel axis (else None)."""
    if node.op == "Split" and int(node.attrs.get("axis", 0)) % member.rank == member.axis:
        sizes = [tensors[t.name].channels if t.name in tensors else -1 for t in node.outputs]
        return [-1] if min(sizes) < 0 else np.cumsum(sizes).tolist()
    if node.op != "Slice":
        return None
    params = channel_ops.slice_params(node, member.rank)
    if params is None or member.axis not in params[2]:
        return None
    k = params[2].index(member.axis)
    total = member.channels * member.block
    start, stop, _ = slice(int(params[0][k]), int(params[1][k])).indices(total)
    if start % member.block or stop % member.block:
        return [-1]
    return [start // member.block, max(start, stop) // member.block]


def _downstream(group: ChannelGroup, names: list[str]) -> set[str]:
    """Group tensors reached from ``names`` along path nodes, stopping at MatMuls of two computed tensors."""
    readers: dict[str, list[gs.Node]] = {}
    for node in group.path:
        if node.op == "MatMul" and all(not isinstance(t, gs.Constant) for t in node.inputs[:2]):
            continue
        for tensor in node.inputs:
            readers.setdefault(tensor.name, []).append(node)
    seen = set(names)
    todo = list(names)
    while todo:
        for node in readers.get(todo.pop(), []):
            for out in node.outputs:
                if out.name in group.tensors and out.name not in seen:
                    seen.add(out.name)
                    todo.append(out.name)
    return seen


def analyse(
    graph: gs.Graph,
    shapes: Mapping[str, tuple[int, ...] | None],
    *,
    outer_refs: set[str] | frozenset[str] = frozenset(),
    freeze: Sequence[str] = (),
) -> ChannelAnalysis:
    """Build every channel group of ``graph``.

    Args:
        graph: The graph (not modified).
        shapes: Static shapes by tensor name, for concrete input shapes.
        outer_refs: Tensors read implicitly by If/Loop bodies (their groups freeze).
        freeze: Node-name glob patterns whose producer groups must not change.

    Returns:
        The groups, in topological order of their first producer.
    """
    context = channel_ops.GraphContext(graph, shapes, frozenset(outer_refs))
    groups: list[ChannelGroup] = []
    claimed: set[str] = set()
    for node in graph.nodes:
        seed = channel_ops.producer_seed(node, context)
        if seed is None or seed.tensor.name in claimed:
            continue
        builder = _GroupBuilder(len(groups), context)
        builder.group.origin = node.name
        group = builder.run(seed)
        claimed |= set(group.tensors)
        _apply_user_freeze(group, freeze)
        groups.append(group)
    return ChannelAnalysis(groups)


def user_frozen(node: str, patterns: Sequence[str]) -> str | None:
    """The ``--freeze`` reason when a pattern matches the node's name, else None."""
    pattern = next((p for p in patterns if fnmatch.fnmatchcase(node, p)), None)
    return None if pattern is None else Reason.USER_FROZEN.format(node=node, pattern=pattern)


def _apply_user_freeze(group: ChannelGroup, patterns: Sequence[str]) -> None:
    for producer in group.producers:
        reason = user_frozen(producer.node.name, patterns)
        if reason:
            group.freeze(reason)


def analyse_model(
    model: WorkingModel, shapes: Mapping[str, tuple[int, ...] | None], freeze: Sequence[str] = ()
) -> ChannelAnalysis:
    """Channel analysis of a working model, with its If/Loop bodies' outer reads frozen."""
    return analyse(model.graph, shapes, outer_refs=subgraph_outer_references(model.graph), freeze=freeze)
