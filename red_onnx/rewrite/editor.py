"""The one place that deletes and merges channels of a group and rewires its consumers.

Given a :class:`GroupPlan` (which atoms go, which are merged into which kept atom with which scale,
which constant values deleted atoms carry into which consumer), it edits the producers' rows, every
per-channel parameter on the path, index-carrying attributes (depthwise group, Split sizes, Slice
bounds, Reshape targets) and the consumers' input slices.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.channel_ops import slice_params, target_entry
from red_onnx.analysis.channels import ChannelGroup, Consumer, GroupTensor
from red_onnx.analysis.merge_sets import (
    ConsumerPlan,
    DenseMerges,
    MergeList,
    local_offsets,
    of_consumer,
    removed_atoms,
    row_local,
)
from red_onnx.analysis.weights import consumer_axis, output_scale, producer_axis, producer_block
from red_onnx.errors import InternalError, RewriteError
from red_onnx.io.graph import expect_constant, is_empty_input, set_constant_input

logger = logging.getLogger(__name__)

SUFFIX = "red"


@dataclass
class GroupPlan:
    """What to do with one group.

    Attributes:
        group: The group.
        delete: Boolean mask over atoms: True for every atom that goes.
        merges: Merges (each source atom is also in ``delete``): a list, or the refit's dense form.
        constants: Per consumer tensor name, the constant value of each of its channels (NaN where
            not constant); deleted non-merged atoms with a finite value are folded into the consumer's
            bias; where the value is NaN the consumer slice must be zero (unused channel).
    """

    group: ChannelGroup
    delete: np.ndarray
    merges: MergeList = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        """Number of atoms deleted."""
        return int(self.delete.sum())


def apply_plan(plan: GroupPlan) -> None:
    """Apply a plan to the graph in place (consumers first, then producers and path ops)."""
    group = plan.group
    if plan.removed == 0:
        return
    if plan.removed >= group.n_atoms:
        raise RewriteError(f"plan deletes all {group.n_atoms} channels of group {group.name}")
    for index, consumer in enumerate(group.consumers):
        _rewire_consumer(plan, consumer, of_consumer(plan.merges, index))
    for producer in group.producers:
        keep = _keep(plan, group.tensors[producer.tensor])
        _delete_producer_channels(producer.node, keep)
        added = _inserted_bias_add(producer.node)
        if added is not None and not any(node is added for node in group.path):
            _take_bias_add(added, keep)  # inserted by an earlier plan of this round: not on the path
    for node in group.path:
        _rewrite_path_node(plan, node)


def _keep(plan: GroupPlan, member: GroupTensor) -> np.ndarray:
    """Local indices of ``member`` that stay, in order."""
    return np.flatnonzero(~plan.delete[member.atoms])


def _take(values: np.ndarray, keep: np.ndarray, axis: int, block: int = 1) -> np.ndarray:
    if block != 1:
        keep = (keep[:, None] * block + np.arange(block)).reshape(-1)
    return np.take(values, keep, axis=axis)


def _rewire_consumer(plan: GroupPlan, consumer: Consumer, merges: ConsumerPlan) -> None:
    """Edit one consumer's weight (and bias) by ``merges``, its share of the plan, then drop the rows."""
    node = consumer.node
    member = plan.group.tensors[consumer.tensor]
    weight = expect_constant(node.inputs[1])
    axis = consumer_axis(node)
    moved = np.moveaxis(weight, axis, 0)
    rows = moved.reshape(member.channels, member.block, *moved.shape[1:]).copy()
    local = plan.group.atom_index(consumer.tensor)
    add_merged_rows(rows.reshape(member.channels, -1), local, merges)
    _absorb_constants(plan, consumer, rows, local, merges)
    keep = _keep(plan, member)
    new = np.moveaxis(rows[keep].reshape(-1, *moved.shape[1:]), 0, axis).astype(weight.dtype)
    set_constant_input(node, 1, new, suffix=SUFFIX)


def add_merged_rows(flat: np.ndarray, local: np.ndarray, merges: ConsumerPlan) -> np.ndarray:
    """``V_target += scale·V_source`` in place for each merge inside this tensor; the source rows.

    Args:
        flat: A consumer's weight as ``[channels, rest]`` (edited in place; summed in float64 and
            rounded once to its dtype, float16 too).
        local: Local channel index of each atom in the tensor the consumer reads (-1: absent).
        merges: The merges this consumer is given (dense ones: ``V_K += mix·V_R`` as one product).

    Returns:
        The local indices of the merged (source) rows.

    Raises:
        RewriteError: A merge's source is read here but its target is not (atoms of different segments:
            the compensation would land on a wrong row).
    """
    if isinstance(merges, DenseMerges):
        return _add_dense_rows(flat, local, merges)
    inside = [m for m in merges if local[m.source] >= 0]
    if not inside:
        return np.zeros(0, np.int64)
    stray = [m for m in inside if local[m.target] < 0]
    if stray:
        raise RewriteError(
            f"merge of atom {stray[0].source} into atom {stray[0].target}: a consumer reads the source but "
            f"not the target ({len(stray)} such merges); merges must stay within one segment of the group"
        )
    src = np.array([local[m.source] for m in inside])
    dst = np.array([local[m.target] for m in inside])
    targets, slot = np.unique(dst, return_inverse=True)
    moved = np.zeros((len(targets), flat.shape[1]))  # Σ scale·V_src per target, summed in merge order
    np.add.at(moved, slot, np.array([m.scale for m in inside])[:, None] * flat[src].astype(np.float64))
    merged = flat[targets].astype(np.float64) + moved
    flat[targets] = merged.astype(flat.dtype)
    return src


def _add_dense_rows(flat: np.ndarray, local: np.ndarray, merges: DenseMerges) -> np.ndarray:
    """:func:`add_merged_rows` of dense merges: ``V_K += mix·V_R`` over the rows this tensor carries.

    Over ``block`` rows per atom, ``flat`` (``[channels, block·rest]``) is edited as its
    ``[channels·block, rest]`` view, each row an atom of its own. Over a Conv consumer's kernel taps
    (``merges.taps``), ``flat`` is ``[channels, outputs·taps]`` and a row is one tap of every output.
    """
    if merges.taps:
        channels, width = flat.shape
        if width % merges.block:
            raise RewriteError(f"dense merges over {merges.block} kernel taps met a consumer row of {width}")
        tapped = flat.reshape(channels, width // merges.block, merges.block).swapaxes(1, 2).copy()
        rows = tapped.reshape(channels * merges.block, -1)  # [channels·taps, outputs], a row per tap
        plain = dataclasses.replace(merges, taps=False)
        _add_dense_rows(rows, row_local(local, merges.block), plain.as_rows())
        flat[...] = tapped.swapaxes(1, 2).reshape(channels, width)
        sources = local[merges.sources]
        return sources[sources >= 0]
    if merges.block > 1:
        if flat.shape[1] % merges.block:
            raise RewriteError(
                f"dense merges over {merges.block} rows per channel met a consumer slice of {flat.shape[1]}"
            )
        view = flat.reshape(flat.shape[0] * merges.block, -1)
        if not np.shares_memory(view, flat):
            raise InternalError("a consumer's rows could not be edited in place (not contiguous)")
        _add_dense_rows(view, row_local(local, merges.block), merges.as_rows())
        sources = local[merges.sources]
        return sources[sources >= 0]
    sources = local[merges.sources]
    inside = sources >= 0
    if not inside.any():
        return np.zeros(0, np.int64)
    targets = local[merges.targets]
    mix = merges.mix[:, inside]
    used = np.any(mix != 0.0, axis=1)
    if (used & (targets < 0)).any():
        atom = int(merges.targets[np.flatnonzero(used & (targets < 0))[0]])
        raise RewriteError(
            f"dense merges into atom {atom}: a consumer reads their sources but not that target; merges "
            "must stay within one segment of the group"
        )
    rows = targets[used]
    moved = mix[used] @ flat[sources[inside]].astype(np.float64)
    flat[rows] = (flat[rows].astype(np.float64) + moved).astype(flat.dtype)
    return sources[inside]


def _absorb_constants(
    plan: GroupPlan, consumer: Consumer, rows: np.ndarray, local: np.ndarray, merges: ConsumerPlan
) -> None:
    """Fold deleted constant channels and merge offsets into the consumer's bias: bias += Σ V_j · c_j."""
    values = plan.constants.get(consumer.tensor)
    merged = set(removed_atoms(plan.merges).tolist())
    channels, offsets = local_offsets(merges, local)  # a value per channel, or per row of a block
    parts = [(channels, offsets)] if channels.size else []
    if values is not None:
        atoms = [a for a in np.flatnonzero(plan.delete) if a not in merged and local[a] >= 0]
        constant = [(local[a], values[local[a]]) for a in atoms if np.isfinite(values[local[a]])]
        picked = [(index, value) for index, value in constant if value != 0.0]
        if picked:
            parts.append((np.array([i for i, _ in picked]), np.array([v for _, v in picked])))
    if not parts:
        return
    contribution = sum(bias_contribution(consumer.node, rows[index], value) for index, value in parts)
    _add_output_bias(consumer.node, np.asarray(contribution))


def bias_contribution(node: gs.Node, rows: np.ndarray, value: np.ndarray) -> np.ndarray:
    """What constant inputs ``value`` on the channels of ``rows`` add to each output of consumer ``node``.

    Args:
        node: The consumer (Conv, ConvTranspose, Gemm or MatMul).
        rows: ``[k, block, *rest]`` the consumer's weight rows of those channels (its input-channel
            axis moved first, split into channels and their blocks).
        value: ``[k]`` the constant of each channel, or ``[k, block]`` one per row of its block.

    Returns:
        The per-output-channel contribution (float64), in the units of Conv's bias and of a bias Add
        after a MatMul (Gemm's ``C`` takes it divided by beta).
    """
    scaled = rows * value.reshape(value.shape + (1,) * (rows.ndim - value.ndim))
    contribution = scaled.sum(axis=(0, 1), dtype=np.float64)  # [out, *kernel] or [N]
    if node.op in ("Conv", "ConvTranspose"):  # both [out, *kernel] here: every tap adds V_j·c_j
        contribution = contribution.reshape(contribution.shape[0], -1).sum(axis=1)
    if node.op == "ConvTranspose":
        contribution = contribution / _positions_per_input(node)
    return contribution * output_scale(node)


def _positions_per_input(node: gs.Node) -> int:
    """Output positions per input position of a ConvTranspose: the product of its strides.

    A constant input ``c_j`` reaches an output position through the taps whose offset matches the
    position's phase modulo the stride, ``c_j·ΣW[j, o]`` over all phases together: the mean over the
    interior is ``c_j·ΣW[j, o] / Π strides``. At stride 1 (the only case exact mode folds, with
    padding that gives every position every tap: ``conv_transpose_full_taps``) it is the value at
    every position; elsewhere it is the best per-channel bias for an approximate merge's offset.
    """
    strides = node.attrs.get("strides")
    return int(np.prod([int(s) for s in strides])) if strides else 1


def _add_output_bias(node: gs.Node, contribution: np.ndarray) -> None:
    """Add a per-output-channel constant to what ``node`` computes."""
    if node.op == "MatMul":
        _add_after_matmul(node, contribution)
        return
    dtype = expect_constant(node.inputs[1]).dtype
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if is_empty_input(node, 2) or beta == 0.0:
            node.attrs["beta"] = 1.0
            set_constant_input(node, 2, contribution.astype(dtype), suffix=SUFFIX)
            return
        bias = np.broadcast_to(expect_constant(node.inputs[2]).reshape(-1), contribution.shape)
        set_constant_input(node, 2, (bias + contribution / beta).astype(dtype), suffix=SUFFIX)
        return
    bias = np.zeros(contribution.shape) if is_empty_input(node, 2) else expect_constant(node.inputs[2])
    set_constant_input(node, 2, (bias + contribution).astype(dtype), suffix=SUFFIX)


def _bias_add_name(node: gs.Node) -> str:
    return f"{node.name}_{SUFFIX}_bias_add"


def _inserted_bias_add(node: gs.Node) -> gs.Node | None:
    """The Add that :func:`_add_after_matmul` put after MatMul ``node``, if any."""
    if node.op != "MatMul" or not node.outputs:
        return None
    return next((n for n in node.outputs[0].outputs if n.name == _bias_add_name(node)), None)


def _take_bias_add(add: gs.Node, keep: np.ndarray) -> None:
    """Keep only the ``keep`` channels of an inserted bias Add (its producer lost the others)."""
    set_constant_input(add, 1, expect_constant(add.inputs[1])[..., keep], suffix=SUFFIX)


def _add_after_matmul(node: gs.Node, contribution: np.ndarray) -> None:
    """Add ``contribution`` after MatMul ``node``: into the bias Add inserted earlier, else a new one.

    The inserted Add is not on the path of the MatMul's own group as analysed this round, so
    :func:`apply_plan` slices its bias when a later plan deletes the MatMul's output channels.
    """
    dtype = expect_constant(node.inputs[1]).dtype
    added = _inserted_bias_add(node)
    if added is not None:  # a second fold (a later round): one Add, one bias
        bias = expect_constant(added.inputs[1])
        set_constant_input(added, 1, (bias + contribution).astype(dtype), suffix=SUFFIX)
        return
    out = node.outputs[0]
    bias = gs.Constant(f"{node.name}_{SUFFIX}_bias", contribution.astype(dtype))
    inner = gs.Variable(f"{out.name}_{SUFFIX}_matmul", dtype=out.dtype)
    node.outputs[0] = inner
    add = gs.Node("Add", name=_bias_add_name(node), inputs=[inner, bias], outputs=[out])
    _graph_of(node).nodes.append(add)


def _graph_of(node: gs.Node) -> gs.Graph:
    graph = getattr(node, "red_graph", None)
    if graph is None:
        raise RewriteError(f"node {node.name} is not attached to a graph; call attach_graph first")
    return graph


def attach_graph(graph: gs.Graph) -> None:
    """Let rewrite helpers that insert nodes find the graph from any node."""
    for node in graph.nodes:
        node.red_graph = graph


def _delete_producer_channels(node: gs.Node, keep: np.ndarray) -> None:
    weight = expect_constant(node.inputs[1])
    block = producer_block(node)  # an attention head's D columns (the analysis checked the member's block)
    set_constant_input(node, 1, _take(weight, keep, producer_axis(node), block), suffix=SUFFIX)
    if node.op == "MatMul" or is_empty_input(node, 2):
        return
    bias = expect_constant(node.inputs[2])
    if bias.size > 1:
        flat = bias.reshape(-1)
        set_constant_input(node, 2, flat[keep].reshape((*bias.shape[:-1], len(keep))), suffix=SUFFIX)


def _rewrite_path_node(plan: GroupPlan, node: gs.Node) -> None:
    group = plan.group
    if node.op in ("Split", "Slice"):
        _rewrite_cut(plan, node, group.tensors[node.inputs[0].name])
        return
    _slice_side_inputs(plan, node)
    out = group.tensors.get(node.outputs[0].name)
    if out is None:
        return
    keep = _keep(plan, out)
    if node.op == "Conv":  # depthwise, multiplier 1
        node.attrs["group"] = len(keep)
    if node.op == "Reshape":
        _rewrite_reshape_target(node, out, len(keep))
        return
    rank = out.rank
    for index, tensor in enumerate(node.inputs):
        if isinstance(tensor, gs.Constant) and tensor.name:
            _delete_param_channels(node, index, out, keep, rank)


def _delete_param_channels(node: gs.Node, index: int, out: GroupTensor, keep: np.ndarray, rank: int) -> None:
    values = expect_constant(node.inputs[index])
    if node.op in ("Conv", "BatchNormalization", "InstanceNormalization"):
        if values.ndim >= 1 and values.shape[0] == out.channels:
            set_constant_input(node, index, values[keep], suffix=SUFFIX)
        return
    axis = out.axis - (rank - values.ndim)
    size = out.channels * out.block  # an attention head's bias: a block of D values per channel
    if axis >= 0 and values.shape[axis] == size and size > 1:
        set_constant_input(node, index, _take(values, keep, axis, out.block), suffix=SUFFIX)


def _rewrite_reshape_target(node: gs.Node, out: GroupTensor, kept: int) -> None:
    if not isinstance(node.inputs[1], gs.Constant):
        _rewrite_built_target(node, out, kept)
        return
    target = expect_constant(node.inputs[1]).astype(np.int64).copy()
    entry = int(target[out.axis])
    if entry in (0, -1):
        return
    target[out.axis] = kept * out.block
    set_constant_input(node, 1, target, suffix=SUFFIX)


def _rewrite_built_target(node: gs.Node, out: GroupTensor, kept: int) -> None:
    """Rewrite the channel entry of a Reshape target built by a Concat at run time.

    The entry lies in a constant input of the Concat (the analysis checked it, and that only constants
    follow it); a Concat another node also reads is copied first, a constant another node reads is
    copied by ``set_constant_input``.
    """
    concat = node.inputs[1].inputs[0]
    index, position = target_entry(concat, out.rank - 1 - out.axis)
    if position is None:
        raise InternalError(f"Reshape {node.name}: its target's channel entry is not in a constant piece")
    piece = expect_constant(concat.inputs[index])
    values = piece.astype(np.int64).reshape(-1).copy()
    if int(values[position]) in (0, -1):
        return
    values[position] = kept * out.block
    target = node.inputs[1]
    if len(target.outputs) > 1:  # a target other reshapes read too: this one gets its own Concat
        copy = gs.Variable(f"{target.name}_{SUFFIX}_{node.name}", dtype=target.dtype, shape=target.shape)
        concat = gs.Node(
            "Concat", f"{node.name}_{SUFFIX}_target", dict(concat.attrs), list(concat.inputs), [copy]
        )
        concat.red_graph = _graph_of(node)
        node.inputs[1] = copy
        _graph_of(node).nodes.append(concat)
    set_constant_input(concat, index, values.reshape(piece.shape).astype(piece.dtype), suffix=SUFFIX)


def _rewrite_cut(plan: GroupPlan, node: gs.Node, source: GroupTensor) -> None:
    """Split sizes or Slice bounds of a cut along the channel axis of ``source``, in blocks of its channels.

    A channel is ``source.block`` elements of the axis (an attention head's D; 1 elsewhere).
    """
    if node.op == "Split":
        if int(node.attrs.get("axis", 0)) % source.rank != source.axis:
            return
        pieces = [plan.group.tensors[t.name] for t in node.outputs]
        sizes = np.array([len(_keep(plan, piece)) * piece.block for piece in pieces], np.int64)
        if "split" in node.attrs:
            node.attrs["split"] = [int(size) for size in sizes]
        elif not is_empty_input(node, 1):
            set_constant_input(node, 1, sizes, suffix=SUFFIX)
        elif len(set(sizes.tolist())) != 1:
            node.attrs.pop("num_outputs", None)
            set_constant_input(node, 1, sizes, suffix=SUFFIX)
        return
    params = slice_params(node, source.rank)
    if params is None:
        raise InternalError(f"Slice {node.name} is on a channel path but its parameters are not constant")
    starts, ends, axes, _ = params
    if source.axis not in axes:
        return
    k = axes.index(source.axis)
    start, stop, _ = slice(int(starts[k]), int(ends[k])).indices(source.channels * source.block)
    first, last = start // source.block, max(start, stop) // source.block
    kept_before = int((~plan.delete[source.atoms[:first]]).sum())
    kept_inside = int((~plan.delete[source.atoms[first:last]]).sum())
    starts[k], ends[k] = kept_before * source.block, (kept_before + kept_inside) * source.block
    if "starts" in node.attrs:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
        return
    set_constant_input(node, 1, np.array(starts, np.int64), suffix=SUFFIX)
    set_constant_input(node, 2, np.array(ends, np.int64), suffix=SUFFIX)


def _heads_name(node: gs.Node, index: int, alone: bool) -> str:
    """The Gather slicing input ``index`` of ``node`` (``alone``: the node's only side input)."""
    return f"{node.name}_{SUFFIX}_heads" if alone else f"{node.name}_{SUFFIX}_heads_{index}"


def _slice_side_inputs(plan: GroupPlan, node: gs.Node) -> None:
    """Slice each side input of ``node`` to the kept channels: a Gather on its head axis in front of it.

    A side input already sliced by an earlier plan (its Gather, named after the node) gets its indices
    narrowed instead of a second Gather.
    """
    sides = [s for s in plan.group.side_inputs if s.node is node]
    for side in sides:
        keep = _keep(plan, plan.group.tensors[side.member]).astype(np.int64)
        tensor = node.inputs[side.index]
        name = _heads_name(node, side.index, len(sides) == 1)
        earlier = tensor.inputs[0] if tensor.inputs else None
        if earlier is not None and earlier.name == name and len(tensor.outputs) == 1:
            set_constant_input(earlier, 1, expect_constant(earlier.inputs[1])[keep], suffix=SUFFIX)
            continue
        indices = gs.Constant(f"{name}_indices", keep)
        sliced = gs.Variable(f"{tensor.name}_{SUFFIX}_{node.name}", dtype=tensor.dtype)
        gather = gs.Node("Gather", name, {"axis": side.axis}, [tensor, indices], [sliced])
        gather.red_graph = _graph_of(node)
        node.inputs[side.index] = sliced
        _graph_of(node).nodes.append(gather)


def replace_linear_weights(node: gs.Node, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Give a Conv or Gemm new weight and bias values of the shapes it has (a correction's refit).

    The values keep the dtype the node's constants hold; a bias is added where the node has none.

    Raises:
        RewriteError: The weight is not a constant of ``weight``'s shape, or the bias one of ``bias``'s.
    """
    current = expect_constant(node.inputs[1]) if isinstance(node.inputs[1], gs.Constant) else None
    if current is None or current.shape != weight.shape:
        raise RewriteError(
            f"node {node.name!r}: its weight is not a constant of shape {weight.shape} (got "
            f"{None if current is None else current.shape}); the correction was made for another model"
        )
    set_constant_input(node, 1, weight.astype(current.dtype), suffix=SUFFIX)
    if bias is None:
        return
    if not is_empty_input(node, 2):
        old = node.inputs[2]
        values = expect_constant(old) if isinstance(old, gs.Constant) else None
        if values is None or values.size != bias.size:
            raise RewriteError(f"node {node.name!r}: its bias is not a constant of {bias.size} values")
        set_constant_input(node, 2, bias.reshape(values.shape).astype(values.dtype), suffix=SUFFIX)
    else:
        if len(node.inputs) > 2:  # the empty placeholder
            del node.inputs[2:]
        set_constant_input(node, 2, bias.reshape(-1).astype(current.dtype), suffix=SUFFIX)
