"""Near-duplicate channels of a group: which atom could merge into which, at what cost (analysis, pure).

For atoms j, i of a group, with ``s`` the proportional part and ``e`` the equal part of their vectors
(``red_onnx.analysis.redundancy``): the merge ``j → i`` uses ``λ = ⟨s_j, s_i⟩ / ‖s_i‖²`` (λ = 1 when the group
is not positively homogeneous) and costs the relative distance

    d(j → i) = sqrt( ‖s_j − λ·s_i‖² / ‖s_j‖²  +  ‖e_j − e_i‖² / ē² ),   ē = median row norm of e,

the compensation being ``V_i += λ·V_j`` in every consumer, as for exact merges. Candidates come from a
neighbour search on normalised rows (``_nearest``: blocked matrix products), never from all pairs,
re-ranked by the exact distance. They are ranked by the
perturbation a merge causes downstream, ``d(j → i)·‖s_j‖·‖V_j‖`` (‖V_j‖: the consumers' weights that read
j): on the digits model this ordering cut the error of removing 8 of 64 channels from 0.21 to 0.14.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from red_onnx.analysis.channels import ChannelGroup
from red_onnx.analysis.constants import offset_atoms
from red_onnx.analysis.redundancy import AtomParams, Merge

#: Neighbours examined per atom; the best by exact distance wins.
NEIGHBOURS = 4


@dataclass(frozen=True)
class Candidates:
    """Merges of each eligible atom into its nearest neighbours, by increasing cost ``d·‖s_j‖·‖V_j‖``.

    An atom appears once per neighbour; ``resolve_merges`` takes its first usable entry.
    """

    source: np.ndarray
    target: np.ndarray
    scale: np.ndarray
    distance: np.ndarray
    cost: np.ndarray
    offset: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)


def _median_norm(rows: np.ndarray) -> float:
    if rows.shape[1] == 0:
        return 1.0
    return _median_positive(np.linalg.norm(rows, axis=1))


def _median_positive(norms: np.ndarray) -> float:
    """Median of the positive ``norms`` (1 when there are none)."""
    positive = norms[norms > 0]
    return float(np.median(positive)) if len(positive) else 1.0


#: Matrix elements converted to float64 at a time by ``_features`` and ``pair_distance``: blocks of
#: 2**16 float64 (0.5 MB) stay in cache, where converting whole 2048 × 2564 groups went through memory.
BLOCK_ELEMENTS = 2**16


def _float64_rows(matrix: np.ndarray, rows: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """``matrix[rows]`` as float64, a cache-sized block at a time: ``(positions in rows, block)``."""
    step = max(1, BLOCK_ELEMENTS // max(matrix.shape[1], 1))
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        yield part, matrix[rows[part]].astype(np.float64)


def _features(params: AtomParams, atoms: np.ndarray, homogeneous: bool) -> np.ndarray:
    """Normalised rows for the neighbour search, as float32.

    Normalised in float64 a cache-sized block at a time (row by row, the same values as whole float64
    copies), then rounded. The neighbours found are re-ranked exactly (float64) by ``pair_distance``;
    float32 made the search 1.5× faster on a 512 × 4608 group.
    """
    width = params.scaled.shape[1]
    features = np.empty((len(atoms), width + params.equal.shape[1]), np.float32)
    divisor: float | np.ndarray = 1.0 if homogeneous else _median_positive(_row_norms(params.scaled, atoms))
    for part, rows in _float64_rows(params.scaled, atoms):
        if homogeneous:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            divisor = np.where(norms > 0, norms, 1.0)
        features[part, :width] = rows / divisor
    equal = params.equal[atoms]
    features[:, width:] = equal.astype(np.float64) / _median_norm(equal)
    return features


def _row_norms(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``np.linalg.norm`` of each row of ``matrix[rows]`` in float64."""
    found = np.empty(len(rows))
    for part, block in _float64_rows(matrix, rows):
        found[part] = np.linalg.norm(block, axis=1)
    return found


def _squared_norms(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``⟨x, x⟩`` of each row of ``matrix[rows]`` in float64, by ``_scaled_residual``'s einsum."""
    found = np.empty(len(rows))
    for part, block in _float64_rows(matrix, rows):
        found[part] = np.einsum("ij,ij->i", block, block)
    return found


#: Pairs gathered at a time by ``pair_distance``: small float64 blocks stay in cache and reuse their
#: pages (one gather of every pair of a 512 × 4608 group took 0.4 s, chunks of 64 take 0.03 s).
PAIR_CHUNK = 64


def pair_distance(
    params: AtomParams, source: np.ndarray, target: np.ndarray, homogeneous: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, distance)`` of merging each ``source`` atom into the matching ``target`` atom."""
    used, position = np.unique(np.concatenate([source, target]), return_inverse=True)
    squared = _squared_norms(params.scaled, used)  # once per atom, not per pair
    norm_j, norm_i = squared[position[: len(source)]], squared[position[len(source) :]]
    scale, relative = np.ones(len(source)), np.empty(len(source))
    for start in range(0, len(source), PAIR_CHUNK):
        block = slice(start, start + PAIR_CHUNK)
        pairs = (source[block], target[block], norm_j[block], norm_i[block])
        scale[block], relative[block] = _scaled_residual(params.scaled, *pairs, homogeneous)
    e_gap = params.equal[source].astype(np.float64) - params.equal[target]
    equal_term = np.einsum("ij,ij->i", e_gap, e_gap) / _median_norm(params.equal) ** 2
    distance = np.sqrt(relative + equal_term)
    distance[(scale <= 0) | (params.signature[source] != params.signature[target])] = np.inf
    return scale, distance


def _scaled_residual(
    scaled: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    norm_j: np.ndarray,
    norm_i: np.ndarray,
    homogeneous: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """λ and ``‖s_j − λ·s_i‖² / ‖s_j‖²`` for a few pairs (float64; ``norm_*``: the rows' ``‖s‖²``).

    The residual is formed explicitly: ``‖s_j‖² − 2λ⟨s_j, s_i⟩ + λ²‖s_i‖²`` would cancel for the
    near-duplicates whose exact distances the ranking needs.
    """
    s_j = scaled[source].astype(np.float64)
    s_i = scaled[target].astype(np.float64)
    scale = np.ones(len(source))
    if homogeneous:
        scale = np.einsum("ij,ij->i", s_j, s_i) / np.where(norm_i > 0, norm_i, np.inf)
        s_i *= scale[:, None]
    s_j -= s_i
    return scale, np.einsum("ij,ij->i", s_j, s_j) / np.where(norm_j > 0, norm_j, 1.0)


#: Rows of the squared-distance matrix computed at once by ``_nearest`` (512 × 2048 float32: 4 MB).
NEAREST_BLOCK = 512


def _nearest(features: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows, nearest first (equal computed distances: lower row first).

    Brute force by matrix products in blocks of NEAREST_BLOCK rows: ``‖a‖² + ‖b‖² − 2·a·b``. On
    conv25m's 2048 × 4608 group this took 0.27 s where scikit-learn's ``NearestNeighbors`` took 0.55 s
    (and 0.7 s more to import); the neighbours found are re-ranked exactly by ``pair_distance``. The
    products stay gathered row blocks: numpy computes ``F @ F.T`` by BLAS ``syrk``, 40% faster on
    conv25m but an ulp apart from ``gemm`` on some float64 shapes (OpenBLAS 0.3.31), which can change
    which of two near-equal neighbours is found (as can the number of rows in a block).
    """
    squared = np.einsum("ij,ij->i", features, features)
    found = np.empty((len(features), k), np.int64)
    for start in range(0, len(features), NEAREST_BLOCK):
        rows = np.arange(start, min(start + NEAREST_BLOCK, len(features)))
        distance = features[rows] @ features.T
        distance *= -2.0  # (‖a‖² + ‖b‖²) + (−2·a·b): the same rounding as ‖a‖² + ‖b‖² − 2·a·b
        distance += squared[rows, None] + squared[None, :]
        distance[np.arange(len(rows)), rows] = np.inf  # a row is not its own neighbour
        found[rows] = _smallest(distance, k)
    return found


def _smallest(distance: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of its ``k`` smallest entries, smallest first, equal ones by column.

    ``k`` passes of ``argmin`` (about 100× faster than ``argpartition`` per pass). Where the ``k``-th
    and ``(k+1)``-th smallest values are equal (or NaN) the set is not unique: those rows keep
    ``argpartition``'s choice, as before. Overwrites picked entries of ``distance`` and restores them.
    """
    rows = np.arange(len(distance))
    picked = np.empty((len(distance), k), np.int64)
    values = np.empty((len(distance), k), distance.dtype)
    for column in range(k):
        picked[:, column] = np.argmin(distance, axis=1)
        values[:, column] = distance[rows, picked[:, column]]
        distance[rows, picked[:, column]] = np.inf
    beyond = distance.min(axis=1)
    ambiguous = np.flatnonzero((values[:, -1] == beyond) | np.isnan(values).any(axis=1) | np.isnan(beyond))
    if len(ambiguous):
        for column in reversed(range(k)):  # an entry picked twice (all left ∞) ends with its first value
            distance[ambiguous, picked[ambiguous, column]] = values[ambiguous, column]
        tied = distance[ambiguous]
        picked[ambiguous] = np.argpartition(tied, k - 1, axis=1)[:, :k]
        values[ambiguous] = np.take_along_axis(tied, picked[ambiguous], axis=1)
    order = np.lexsort((picked, values), axis=1)
    return np.take_along_axis(picked, order, axis=1)


def merge_cost(params: AtomParams, source: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The ranking cost ``d(j → i)·‖s_j‖·‖V_j‖`` of merges of ``source`` atoms at ``distance``."""
    cost = distance * params.producer_norm[source]
    if params.outgoing is not None:
        cost = cost * params.outgoing[source]
    return cost


def near_candidates(params: AtomParams, homogeneous: bool, eligible: np.ndarray) -> Candidates:
    """Merge candidates of every eligible atom into each of its nearest neighbours (exact distances).

    Args:
        params: The group's atom vectors.
        homogeneous: Whether scaled merges are valid in this group.
        eligible: Boolean mask of atoms that may take part.
    """
    atoms = np.flatnonzero(eligible)
    if len(atoms) < 2:
        empty = np.zeros(0, np.int64)
        return Candidates(empty, empty, np.zeros(0), np.zeros(0), np.zeros(0))
    features = _features(params, atoms, homogeneous)
    k = min(NEIGHBOURS, len(atoms) - 1)
    neighbours = _nearest(features, k)
    source = np.repeat(atoms, k)
    target = atoms[neighbours].reshape(-1)
    scale, distance = pair_distance(params, source, target, homogeneous)
    pick = np.flatnonzero(np.isfinite(distance))  # every neighbour: the next best stands in for a cycle
    cost = merge_cost(params, source[pick], distance[pick])
    order = np.argsort(cost, kind="stable")
    pick = pick[order]
    return Candidates(source[pick], target[pick], scale[pick], distance[pick], cost[order])


def taken_entries(
    candidates: Candidates, quotas: Sequence[int], segment: np.ndarray | None = None
) -> np.ndarray:
    """The candidate entries that become merges, in ranking order (indices into ``candidates``).

    Each source atom is taken once (its first entry); a target already merged is followed to the kept
    atom it went into, and an entry that would close a cycle is skipped. At most ``quotas[s]`` entries
    are taken per segment ``s`` of the source (``segment``: per atom; None: one segment).
    """
    merged_into: dict[int, int] = {}
    left, remaining, taken = list(quotas), sum(quotas), []
    pairs = zip(candidates.source.tolist(), candidates.target.tolist(), strict=True)
    for index, (source, target) in enumerate(pairs):
        part = 0 if segment is None else int(segment[source])
        if remaining <= 0:
            break
        if source in merged_into or left[part] <= 0:
            continue
        while target in merged_into:
            target = merged_into[target]
        if target != source:
            merged_into[source] = target
            left[part] -= 1
            remaining -= 1
            taken.append(index)
    return np.array(taken, np.int64)


def resolve_merges(candidates: Candidates, count: int) -> list[Merge]:
    """The first ``count`` candidates as merges into kept atoms (chains composed, cycles skipped).

    A candidate ``j → i`` whose target was already merged into ``r`` becomes ``j → r`` with the scales
    multiplied; earlier merges into ``j`` follow ``j`` the same way. Returns fewer than ``count`` merges
    when cycles are skipped (the entries: ``taken_entries``).
    """
    parent: dict[int, tuple[int, float]] = {}

    def root(atom: int) -> tuple[int, float]:
        scale = 1.0
        while atom in parent:
            atom, step = parent[atom]
            scale *= step
        return atom, scale

    offsets = candidates.offset if candidates.offset is not None else np.zeros(len(candidates))
    shift: dict[int, float] = {}
    for index in taken_entries(candidates, [count]).tolist():
        source = int(candidates.source[index])
        target, through = root(int(candidates.target[index]))
        parent[source] = (target, float(candidates.scale[index]) * through)
        shift[source] = float(offsets[index])
    return [_composed(source, parent, shift) for source in parent]


def _composed(source: int, parent: dict[int, tuple[int, float]], shift: dict[int, float]) -> Merge:
    """Follow ``source`` to its kept root: y_s ≈ λ_s·y_p + c_s and y_p ≈ λ_p·y_r + c_p compose."""
    scale, offset, atom = 1.0, 0.0, source
    while atom in parent:
        atom_next, step = parent[atom]
        offset += scale * shift.get(atom, 0.0)
        scale *= step
        atom = atom_next
    return Merge(source, atom, scale, offset)


def atom_macs(group: ChannelGroup, layer_macs: dict[str, int]) -> np.ndarray:
    """MACs each atom costs: its share of every producer, consumer, depthwise conv and attention MatMul.

    An attention MatMul (of two computed tensors: ``Q·Kᵀ``, ``P·V``) on the path runs once per head.
    """
    cost = np.zeros(group.n_atoms)
    touching = [(p.node.name, p.tensor) for p in group.producers]
    touching += [(c.node.name, c.tensor) for c in group.consumers]
    touching += [(n.name, n.outputs[0].name) for n in group.path if n.op in ("Conv", "MatMul")]
    for name, tensor in touching:
        member = group.tensors.get(tensor)
        if member is None or name not in layer_macs or member.channels == 0:
            continue
        np.add.at(cost, member.atoms, layer_macs[name] / member.channels)
    return cost


def activation_candidates(
    group: ChannelGroup, tensor: str, samples: np.ndarray, outgoing: np.ndarray, segment: np.ndarray
) -> Candidates:
    """Merge candidates fitted on a group tensor's sampled activations (synthetic inputs).

    For atoms j, i with activation rows a_j, a_i the merge fits ``a_j ≈ λ·a_i + c`` by least squares
    (c goes into the consumers' biases); its cost is the residual energy times ‖V_j‖². Channels that
    never vary on these inputs cost nothing: they merge into the most active channel of their segment
    with λ = 0. A merge with ``c ≠ 0`` is left out where a consumer reading j cannot take a bias (its
    bias is not a constant: ``constants.offset_atoms``). Only atoms of one segment (the same set of
    tensors, ``AtomParams.signature``) pair up: a consumer reading the source but not the target could
    not take the compensation.

    Args:
        group: The group.
        tensor: A group tensor the consumers read (rows of ``samples`` follow its channels).
        samples: ``[channels, samples]`` activations of ``tensor``.
        outgoing: Per atom, the norm of the consumer slices reading it.
        segment: Per atom, its segment (``AtomParams.signature``).
    """
    local = group.atom_index(tensor)
    atoms = np.flatnonzero(local >= 0)
    if len(atoms) < 2:
        empty = np.zeros(0, np.int64)
        return Candidates(empty, empty, np.zeros(0), np.zeros(0), np.zeros(0))
    rows = samples[local[atoms]]
    means = rows.mean(axis=1)
    centred = rows - means[:, None]
    spread = np.linalg.norm(centred, axis=1)
    live = spread > 1e-12 * max(float(spread.max()), 1e-30)
    found = [_dead_merges(atoms, live, spread, segment[atoms])] if (~live).any() else []
    if live.sum() >= 2:
        found.append(_live_merges(atoms[live], centred[live], spread[live]))
    if not found:
        empty = np.zeros(0, np.int64)
        return Candidates(empty, empty, np.zeros(0), np.zeros(0), np.zeros(0))
    source, target, scale = (np.concatenate(parts) for parts in zip(*found, strict=True))
    same = segment[source] == segment[target]
    source, target, scale = source[same], target[same], scale[same]
    row_of = np.full(group.n_atoms, -1)
    row_of[atoms] = np.arange(len(atoms))
    j, i = row_of[source], row_of[target]
    offset = means[j] - scale * means[i]
    takes = (offset == 0.0) | offset_atoms(group)[source]  # an offset needs every reader to take a bias
    source, target, scale, offset, j, i = (a[takes] for a in (source, target, scale, offset, j, i))
    gap = centred[j] - scale[:, None] * centred[i]  # the offset absorbs the means
    residual = np.einsum("ij,ij->i", gap, gap)
    cost = residual * outgoing[source] ** 2
    order = np.argsort(cost, kind="stable")
    distance = np.sqrt(residual) / np.where(spread[j] > 0, spread[j], 1.0)
    return Candidates(source[order], target[order], scale[order], distance[order], cost[order], offset[order])


def _dead_merges(
    atoms: np.ndarray, live: np.ndarray, spread: np.ndarray, segment: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Each idle atom into the most active atom of its own segment, with λ = 0."""
    order = np.lexsort((-spread, segment))  # by segment, most active first
    first = order[np.r_[True, segment[order[1:]] != segment[order[:-1]]]]
    anchor_of = dict(zip(segment[first].tolist(), atoms[first].tolist(), strict=True))
    dead = np.flatnonzero(~live)
    anchors = np.array([anchor_of[key] for key in segment[dead].tolist()], np.int64)
    keep = anchors != atoms[dead]  # a segment with no active atom: its first idle one stays
    return atoms[dead][keep], anchors[keep], np.zeros(int(keep.sum()))


def _live_merges(atoms: np.ndarray, centred: np.ndarray, spread: np.ndarray) -> tuple[np.ndarray, ...]:
    features = centred / spread[:, None]
    k = min(NEIGHBOURS, len(atoms) - 1)
    neighbours = _nearest(features, k)
    source = np.repeat(np.arange(len(atoms)), k)
    target = neighbours.reshape(-1)
    scale = np.einsum("ij,ij->i", centred[source], centred[target]) / spread[target] ** 2
    return atoms[source], atoms[target], scale
