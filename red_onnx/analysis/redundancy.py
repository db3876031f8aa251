"""Which channels of a group are redundant: exact duplicates, positive multiples (analysis, pure).

Every atom of a group gets two vectors: ``scaled`` — what must be *proportional* between two channels
(producer rows and biases, additive per-channel constants, depthwise biases) — and ``equal`` — what
must be *identical* (multiplicative per-channel constants, depthwise kernels, normalisation scales).
Two atoms with equal ``equal`` and ``scaled_j = λ·scaled_i`` (λ = 1 unless the whole group is
positively homogeneous, λ > 0) compute ``y_j = λ·y_i`` in every tensor of the group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import ChannelGroup, regions
from red_onnx.analysis.weights import block_rows, channel_rows, consumer_axis, producer_bias, producer_rows
from red_onnx.io.graph import expect_constant, is_empty_input

#: Relative residual under which ``scaled_j`` counts as ``λ·scaled_i`` in exact mode (fp32 rounding).
EXACT_SCALE_RTOL = 1e-6


@dataclass
class AtomParams:
    """Per-atom comparison vectors of a group (rows indexed by atom)."""

    scaled: np.ndarray
    equal: np.ndarray
    signature: np.ndarray  # class id: atoms present in the same set of tensors
    outgoing: np.ndarray | None = None  # per atom: L2 norm of every consumer slice that reads it

    @property
    def producer_norm(self) -> np.ndarray:
        """L2 norm of each atom's scaled vector."""
        return np.linalg.norm(self.scaled, axis=1).astype(np.float64)


@dataclass(frozen=True)
class Merge:
    """Delete atom ``source``; its consumers' slices are added, times ``scale``, into ``target``'s.

    ``offset`` (approximate merges fitted on activations: ``y_source ≈ scale·y_target + offset``) is
    folded into the consumers' biases like a constant channel.
    """

    source: int
    target: int
    scale: float
    offset: float = 0.0


def _by_atom(group: ChannelGroup, tensor: str, rows: np.ndarray) -> np.ndarray:
    """Per-channel rows of ``tensor`` as per-atom rows (zeros where the atom is absent).

    A tensor holding each atom in k regions (a fused QKV projection: ``regions``) gives each atom its
    k rows side by side, region by region, so that atoms compare slot by slot.
    """
    atoms = group.tensors[tensor].atoms
    count = regions(atoms) or 1
    if count > 1:
        width = len(atoms) // count
        rows = rows.reshape(count, width, rows.shape[1]).transpose(1, 0, 2).reshape(width, -1)
        atoms = atoms[:width]
    out = np.zeros((group.n_atoms, rows.shape[1]), np.result_type(rows.dtype, np.float32))
    out[atoms] = rows
    return out


def per_channel_constant(values: np.ndarray, out_rank: int, axis: int, channels: int) -> np.ndarray | None:
    """A constant broadcast against a tensor, as ``[channels, k]`` rows (None when not per channel)."""
    shape = (1,) * (out_rank - values.ndim) + values.shape
    values = values.reshape(shape)
    if shape[axis] != channels or channels == 1:
        return None
    return channel_rows(values.astype(np.float64), axis)


def _path_params(group: ChannelGroup, node: gs.Node, ranks: dict[str, int]) -> tuple[list, list]:
    """(equal rows, scaled rows) contributed by one path node, each ``[channels, k]`` per tensor name."""
    equal: list[tuple[str, np.ndarray]] = []
    scaled: list[tuple[str, np.ndarray]] = []
    out = node.outputs[0].name
    if out not in group.tensors:
        return equal, scaled
    member = group.tensors[out]
    if node.op == "Conv":  # depthwise, multiplier 1
        weight = expect_constant(node.inputs[1]).astype(np.float64)
        equal.append((out, weight.reshape(weight.shape[0], -1)))
        if not is_empty_input(node, 2):
            scaled.append((out, expect_constant(node.inputs[2]).astype(np.float64).reshape(-1, 1)))
    elif node.op == "BatchNormalization":
        scale, bias, mean, var = (expect_constant(t).astype(np.float64) for t in node.inputs[1:5])
        factor = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        equal.append((out, factor.reshape(-1, 1)))
        scaled.append((out, (bias - mean * factor).reshape(-1, 1)))
    elif node.op in ("InstanceNormalization", "PRelu"):
        for tensor in node.inputs[1:]:
            rows = (
                per_channel_constant(expect_constant(tensor), ranks[out], member.axis, member.channels)
                if member.block == 1  # a block's values side by side (an attention head's D columns)
                else block_rows(
                    expect_constant(tensor), ranks[out], member.axis, member.channels, member.block
                )
            )
            if rows is not None:
                equal.append((out, rows))
    else:
        multiplicative = node.op in ("Mul", "Div", "Pow")
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                values = np.asarray(tensor.values)
                rows = (
                    per_channel_constant(values, ranks[out], member.axis, member.channels)
                    if member.block == 1
                    else block_rows(values, ranks[out], member.axis, member.channels, member.block)
                )
                if rows is not None:
                    (equal if multiplicative else scaled).append((out, rows))
    return equal, scaled


def atom_params(group: ChannelGroup, ranks: dict[str, int]) -> AtomParams:
    """Build the comparison vectors of every atom of ``group``.

    Args:
        group: A (not frozen) channel group.
        ranks: Rank of each group tensor.
    """
    scaled_parts = [np.zeros((group.n_atoms, 0), np.float32)]
    equal_parts = [np.zeros((group.n_atoms, 0), np.float32)]
    for producer in group.producers:
        rows = producer_rows(producer.node)
        bias = producer_bias(producer.node, rows.shape[0])
        scaled_parts.append(_by_atom(group, producer.tensor, rows))
        scaled_parts.append(_by_atom(group, producer.tensor, bias[:, None].astype(rows.dtype)))
    for node in group.path:
        node_equal, node_scaled = _path_params(group, node, ranks)
        equal_parts += [_by_atom(group, name, rows) for name, rows in node_equal]
        scaled_parts += [_by_atom(group, name, rows) for name, rows in node_scaled]
    membership = np.zeros((group.n_atoms, len(group.tensors)), bool)
    for column, member in enumerate(group.tensors.values()):
        membership[member.atoms, column] = True
    _, signature = np.unique(membership, axis=0, return_inverse=True)
    if group.side_inputs:  # per-head slices of a computed tensor: never provably equal, so never identical
        equal_parts.append(np.eye(group.n_atoms, dtype=np.float32))
    scaled, equal = np.hstack(scaled_parts), np.hstack(equal_parts)
    return AtomParams(scaled, equal, signature.reshape(-1), outgoing_norms(group))


def outgoing_norms(group: ChannelGroup) -> np.ndarray:
    """Per atom: the L2 norm of all consumer weight slices that read it (how much it matters downstream)."""
    squared = np.zeros(group.n_atoms)
    for consumer in group.consumers:
        member = group.tensors[consumer.tensor]
        weight = expect_constant(consumer.node.inputs[1])
        rows = np.moveaxis(weight, consumer_axis(consumer.node), 0).reshape(member.channels, -1)
        np.add.at(squared, member.atoms, np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    return np.sqrt(squared)


def exact_merges(params: AtomParams, homogeneous: bool, excluded: np.ndarray) -> list[Merge]:
    """Merges that preserve the function exactly: identical atoms, and positive multiples.

    Args:
        params: The group's atom vectors.
        homogeneous: Whether scaled merges are exact in this group.
        excluded: Atoms that must not take part (already deleted by another rule).

    Returns:
        Merges, each deleting a distinct source atom into a kept target atom.
    """
    candidates = np.flatnonzero(~excluded)
    full = np.hstack([params.equal, params.scaled])

    def identical(rep: int, others: np.ndarray) -> np.ndarray:
        same = (full[others] == full[rep]).all(axis=1)
        return same & (params.signature[others] == params.signature[rep])

    pairs = _cluster(candidates, project(full)[candidates], identical)
    merges = [Merge(s, t, 1.0) for s, t in pairs]
    if not homogeneous:
        return merges
    removed = {m.source for m in merges}
    norms = params.producer_norm
    remaining = np.array([a for a in candidates if a not in removed and norms[a] > 0], np.int64)

    def scaled(rep: int, others: np.ndarray) -> np.ndarray:
        scale = norms[others] / norms[rep]
        reference = params.scaled[rep].astype(np.float64)
        residual = params.scaled[others].astype(np.float64) - scale[:, None] * reference
        close = np.linalg.norm(residual, axis=1) <= EXACT_SCALE_RTOL * norms[others]
        same = (params.equal[others] == params.equal[rep]).all(axis=1)
        return close & same & (params.signature[others] == params.signature[rep])

    unit_projection = project(params.scaled)[remaining] / norms[remaining]
    for source, target in _cluster(remaining, unit_projection, scaled):
        merges.append(Merge(source, target, float(norms[source] / norms[target])))
    return merges


def project(vectors: np.ndarray, *, chunk_elements: int = 1 << 22) -> np.ndarray:
    """Projection of every row on one fixed random direction, accumulated in float64 (chunked)."""
    direction = np.random.default_rng(0).standard_normal(vectors.shape[1])
    step = max(1, chunk_elements // max(1, vectors.shape[1]))
    out = np.empty(vectors.shape[0])
    for start in range(0, vectors.shape[0], step):
        out[start : start + step] = vectors[start : start + step].astype(np.float64) @ direction
    return out


def _cluster(
    atoms: np.ndarray, projection: np.ndarray, matches: Callable[[int, np.ndarray], np.ndarray]
) -> list[tuple[int, int]]:
    """Pairs ``(source, target)`` of atoms that ``matches`` says are interchangeable.

    Candidates are found by sorting a random projection of the atoms' vectors and cutting runs
    where consecutive projections differ by more than a rounding margin: O(n·D + n log n), never
    all pairs. Within a run, each atom is checked exactly against the run's first unmatched atom.
    """
    if len(atoms) < 2:
        return []
    order = np.argsort(projection, kind="stable")
    sorted_projection = projection[order]
    margin = 1e-6 * (np.abs(sorted_projection).max() + 1e-30)
    breaks = np.flatnonzero(np.diff(sorted_projection) > margin) + 1
    pairs: list[tuple[int, int]] = []
    for run in np.split(atoms[order], breaks):
        pending = np.sort(run)
        while len(pending) > 1:
            rep, others = pending[0], pending[1:]
            hit = matches(int(rep), others)
            pairs += [(int(s), int(rep)) for s in others[hit]]
            pending = others[~hit]
    return pairs
