"""A group's merges as one value: a list of :class:`Merge`, or the refit's dense form (analysis, pure).

λ-merges delete each source atom into one kept target. The least-squares refit deletes each removed
atom into *every* kept one (``V'_K = V_K + A·V_R``): as ``Merge`` objects that is ``|R|·|K|`` of them
(a 3072-neuron FFN at half its width: 2.4M objects a level), so the refit is held as
:class:`DenseMerges` — the removed atoms, the kept ones, ``A`` and the intercepts — and every reader of
a plan (the editor, the simulator, the local estimate, the MACs counter, the search's caches) takes
either form through the functions here. May import ``red_onnx.analysis.redundancy`` only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeAlias

import numpy as np

from red_onnx.analysis.redundancy import Merge


@dataclass(frozen=True, eq=False)
class DenseMerges:
    """Atoms ``sources`` go; kept atom ``targets[i]`` gains ``mix[i, j]`` times source ``j``'s consumer rows.

    ``offsets[j]`` (the refit's intercept for source ``j``) is folded into the consumers' biases as a
    constant input on source ``j``'s rows: what one merge per source with ``offset`` does. Equivalent
    to the :class:`Merge` list of :meth:`as_merges`; ``len`` counts the removed atoms.

    With ``block > 1`` (an attention head: D consumer rows per atom, refit row by row) ``mix`` and
    ``offsets`` are over rows: row ``b`` of atom ``a`` is row ``a·block + b`` of the atom's consumer
    slices, and :meth:`as_rows` is the same plan with every row an atom of its own. With ``taps`` the
    rows of a channel are a k×k Conv consumer's kernel taps (``block`` of them): row ``b`` is
    ``W[:, c, tap b]`` (the refit of every tap on its own, from the consumer's input patches).

    Attributes:
        sources: ``[R]`` removed atoms, distinct.
        targets: ``[K]`` kept atoms that compensate, distinct and disjoint from ``sources``.
        mix: ``[K·block, R·block]`` float64 scales.
        offsets: ``[R·block]`` float64 constants.
        block: Consumer rows per atom the mix is over.
        taps: Whether those rows are a Conv consumer's kernel taps (no offsets then).
    """

    sources: np.ndarray
    targets: np.ndarray
    mix: np.ndarray
    offsets: np.ndarray
    block: int = 1
    taps: bool = False

    def __post_init__(self) -> None:
        """Check shapes and disjointness (a plan that cannot be applied fails here, not in the editor)."""
        sources, targets = np.asarray(self.sources), np.asarray(self.targets)
        rows, columns = targets.size * self.block, sources.size * self.block
        if self.block < 1 or self.mix.shape != (rows, columns) or self.offsets.shape != (columns,):
            raise ValueError(
                f"dense merges of {sources.size} sources into {targets.size} targets, {self.block} rows "
                f"each, need mix [{rows}, {columns}] and offsets [{columns}], got {self.mix.shape} and "
                f"{self.offsets.shape}"
            )
        if np.unique(sources).size != sources.size or np.intersect1d(sources, targets).size:
            raise ValueError("dense merges need distinct sources, disjoint from the targets")
        if self.taps and np.any(self.offsets != 0.0):
            raise ValueError("dense merges over kernel taps take no offsets (a padded border sees none)")

    def __len__(self) -> int:
        """The number of removed atoms."""
        return int(self.sources.size)

    @cached_property
    def key(self) -> tuple[str, str]:
        """A hashable digest of the content (caches of measured errors use it)."""
        digest = hashlib.blake2b(digest_size=16)
        for array in (self.sources, self.targets, self.mix, self.offsets):
            digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(str(array.shape).encode())
        digest.update(b"taps" if self.taps else b"rows")
        return "dense", digest.hexdigest()

    def as_rows(self) -> DenseMerges:
        """The same plan over rows: row ``b`` of atom ``a`` is atom ``a·block + b`` (block 1)."""
        if self.block == 1:
            return self
        return DenseMerges(
            atom_rows(self.sources, self.block), atom_rows(self.targets, self.block), self.mix, self.offsets
        )

    def as_merges(self) -> list[Merge]:
        """The same plan as :class:`Merge` objects: one per nonzero scale, the offset on each source's first.

        A source with no nonzero scale still gets one merge (scale 0, into the first target). Block 1
        only (a row-wise mix is no merge of whole atoms).
        """
        if self.block != 1:
            raise ValueError(f"dense merges over {self.block} rows per atom have no Merge list")
        merges = []
        for j, source in enumerate(self.sources.tolist()):
            rows = np.flatnonzero(self.mix[:, j])
            if rows.size == 0:
                rows = np.zeros(1, np.int64)
            for k, i in enumerate(rows.tolist()):
                offset = float(self.offsets[j]) if k == 0 else 0.0
                merges.append(Merge(source, int(self.targets[i]), float(self.mix[i, j]), offset))
        return merges


@dataclass(frozen=True, eq=False)
class ConsumerMerges:
    """One removal with a refit of its own for each consumer of the group.

    Where a group's consumers read different tensors, or are of kinds one refit cannot serve together
    (a k×k Conv refit tap by tap beside a 1×1 one), each is refit on its own input's Gram: ``plans[i]``
    is the plan of the group's consumer ``i`` (``ChannelGroup.consumers`` order), over the removed
    atoms it reads (none: an empty list). The editor and the simulator give each consumer its own
    (:func:`of_consumer`).

    Attributes:
        sources: ``[R]`` the removed atoms, distinct.
        plans: One plan per consumer, removing only atoms of ``sources``.
    """

    sources: np.ndarray
    plans: tuple[Sequence[Merge] | DenseMerges, ...]

    def __post_init__(self) -> None:
        """Check that every consumer's plan removes atoms of ``sources`` only."""
        sources = np.asarray(self.sources)
        if np.unique(sources).size != sources.size:
            raise ValueError("consumer merges need distinct sources")
        for plan in self.plans:
            if np.setdiff1d(removed_atoms(plan), sources).size:
                raise ValueError("a consumer's plan removes an atom the group's removal keeps")

    def __len__(self) -> int:
        """The number of removed atoms."""
        return int(np.asarray(self.sources).size)

    @cached_property
    def key(self) -> tuple[str, tuple]:
        """A hashable digest of the content (caches of measured errors use it)."""
        return "consumers", (
            tuple(np.asarray(self.sources).tolist()),
            tuple(merge_key(p) for p in self.plans),
        )


#: What one consumer is given: a list of :class:`Merge`, or the refit's dense form.
ConsumerPlan: TypeAlias = Sequence[Merge] | DenseMerges
#: One group's merges in any form.
MergeList: TypeAlias = Sequence[Merge] | DenseMerges | ConsumerMerges


def of_consumer(merges: MergeList, index: int) -> ConsumerPlan:
    """The plan consumer ``index`` of the group is given (the group's plan, unless per consumer)."""
    return merges.plans[index] if isinstance(merges, ConsumerMerges) else merges


def atom_rows(atoms: np.ndarray, block: int) -> np.ndarray:
    """The row ids ``a·block + b`` of ``atoms``, atom by atom (int64)."""
    a = np.asarray(atoms, np.int64).reshape(-1)
    return (a[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def row_local(local: np.ndarray, block: int) -> np.ndarray:
    """Local row of each row id ``a·block + b`` in a tensor whose atom ``a`` is channel ``local[a]``."""
    rows = np.where(local[:, None] >= 0, local[:, None] * block + np.arange(block)[None, :], -1)
    return rows.reshape(-1).astype(np.int64)


def to_rows(merges: ConsumerPlan, block: int) -> ConsumerPlan:
    """The same plan over the ``block`` rows of every atom, each row an atom (``a·block + b``).

    A merge of whole atoms moves each row of the source into the same row of the target; dense merges
    over rows (:meth:`DenseMerges.as_rows`) already are.
    """
    if isinstance(merges, DenseMerges) and merges.taps:
        raise ValueError("dense merges over kernel taps have no rows of whole channels")
    if block == 1:
        return merges
    if isinstance(merges, DenseMerges):
        if merges.block == block:
            return merges.as_rows()
        if merges.block != 1:
            raise ValueError(f"dense merges over {merges.block} rows per atom read in blocks of {block}")
        mix = np.kron(merges.mix, np.eye(block))
        offsets = np.repeat(np.asarray(merges.offsets, np.float64), block)
        return DenseMerges(atom_rows(merges.sources, block), atom_rows(merges.targets, block), mix, offsets)
    rows = range(block)
    return [
        Merge(m.source * block + b, m.target * block + b, m.scale, m.offset) for m in merges for b in rows
    ]


def removed_atoms(merges: MergeList) -> np.ndarray:
    """The atoms the merges delete, ascending (int64)."""
    if isinstance(merges, (DenseMerges, ConsumerMerges)):
        return np.sort(np.asarray(merges.sources, np.int64))
    return np.unique(np.array([m.source for m in merges], np.int64))


def has_offsets(merges: MergeList) -> bool:
    """Whether any merge carries a constant into the consumers' biases."""
    if isinstance(merges, ConsumerMerges):
        return any(has_offsets(plan) for plan in merges.plans)
    if isinstance(merges, DenseMerges):
        return bool(np.any(merges.offsets != 0.0))
    return any(m.offset != 0.0 for m in merges)


def merge_key(merges: MergeList) -> tuple:
    """A hashable key of the merges' content."""
    return merges.key if isinstance(merges, (DenseMerges, ConsumerMerges)) else tuple(merges)


def local_offsets(merges: ConsumerPlan, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero offsets on channels a tensor carries: (local channel, value) arrays, one per merge.

    Dense merges over ``block`` rows give a value per row: ``[channels, block]``.

    Args:
        merges: The merges one consumer is given.
        local: Local channel index of each atom in the tensor (-1: absent).
    """
    if isinstance(merges, DenseMerges) and merges.block > 1:
        channels = local[merges.sources]
        values = np.asarray(merges.offsets, np.float64).reshape(-1, merges.block)
        picked = (channels >= 0) & np.any(values != 0.0, axis=1)
        return channels[picked].astype(np.int64), values[picked]
    if isinstance(merges, DenseMerges):
        channels, values = local[merges.sources], np.asarray(merges.offsets, np.float64)
    else:
        channels = np.array([local[m.source] for m in merges], np.int64)
        values = np.array([m.offset for m in merges], np.float64)
    picked = (channels >= 0) & (values != 0.0)
    return channels[picked].astype(np.int64), values[picked]
