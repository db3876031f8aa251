"""Kept channel counts on hardware-friendly steps, per segment of a group (pure).

onnxruntime's CPU convolutions run in a blocked NCHWc layout when channel counts are multiples of the
block; a conv whose input or output falls off it is reordered (measured: up to 1.34× slower here). The
search keeps every group's kept count on ``--channel-multiple``, narrow groups on a smaller power of two
(``effective_multiple``), and every *segment* (a Split chunk, a Concat part) on its own step
(``ChannelSteps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from red_onnx.analysis.redundancy import Merge
from red_onnx.analysis.similarity import Candidates, resolve_merges, taken_entries


def effective_multiple(n_atoms: int, multiple: int) -> int:
    """The step a group (or segment) of ``n_atoms`` channels keeps its channel count on.

    ``multiple`` where it has at least twice as many channels; a smaller one falls back to the largest
    power of two ``p < multiple`` with ``n_atoms >= 2p`` (24 channels at 16 keep multiples of 8, 12 at 8
    multiples of 4), so that a narrow layer stays in onnxruntime's blocked NCHWc layout; 1 (free) when
    not even ``p = 2`` fits. The one rule of the kept counts: levels, the target refinement and
    ``ChannelSteps`` all ask here.
    """
    if multiple <= 1 or n_atoms >= 2 * multiple:
        return max(multiple, 1)
    step = 1
    while 2 * step < multiple and n_atoms >= 4 * step:
        step *= 2
    return step


@dataclass(frozen=True)
class ChannelSteps:
    """The kept channel counts a group may have: each *segment* on its own step.

    A segment is the atoms present in the same set of the group's tensors (``AtomParams.signature``):
    one C2f ``Split`` chunk, one ``Concat`` part, or the whole group when it has neither. Every group
    tensor is a union of segments, so kept counts on each segment's step put every tensor — each chunk a
    conv reads, not only the tensor feeding the Split — on the steps too.

    Attributes:
        segment: Per atom, its segment.
        sizes: Atoms per segment.
        steps: Per segment, ``effective_multiple(size, multiple)``.
    """

    segment: np.ndarray
    sizes: tuple[int, ...]
    steps: tuple[int, ...]

    @classmethod
    def of(cls, signature: np.ndarray, multiple: int) -> ChannelSteps:
        """The steps of a group whose atoms have these segment ids, at ``multiple``."""
        sizes = tuple(int(n) for n in np.bincount(signature))
        return cls(np.asarray(signature), sizes, tuple(effective_multiple(n, multiple) for n in sizes))

    @classmethod
    def whole(cls, n_atoms: int, multiple: int) -> ChannelSteps:
        """The steps of a group that is one segment."""
        return cls.of(np.zeros(n_atoms, np.int64), multiple)

    @property
    def constrained(self) -> bool:
        """Whether merges must be counted per segment (several segments, not all free)."""
        return len(self.sizes) > 1 and max(self.steps) > 1

    def removals(self, segment: int, cap: int | None = None) -> np.ndarray:
        """The removal counts a segment allows (0, then kept counts on its step, at least one step kept)."""
        size, step = self.sizes[segment], self.steps[segment]
        last = size - step if cap is None else min(size - step, cap)
        return np.array([0, *range(size % step or step, last + 1, step)], np.int64)

    def totals(self, caps: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Every group removal count the segments allow together (``caps``: at most so many per segment)."""
        reach = np.zeros(sum(self.sizes) + 1, bool)
        reach[0] = True
        for segment in range(len(self.sizes)):
            grown = np.zeros_like(reach)
            for removed in self.removals(segment, None if caps is None else int(caps[segment])):
                grown[removed:] |= reach[: len(reach) - removed]
            reach = grown
        return np.flatnonzero(reach)

    def available(self, candidates: Candidates) -> np.ndarray:
        """Per segment: how many merges the candidates can make in it at most."""
        taken = self._walk(candidates, None)
        return np.bincount(self.segment[candidates.source[taken]], minlength=len(self.sizes))

    def select(self, candidates: Candidates, count: int) -> list[Merge]:
        """The merges of ``count`` atoms with every segment on its step, cheapest by the ranking's cost.

        How many atoms each segment gives (an allowed removal count per segment, summing to ``count``)
        minimises the summed cost of its first merges in ranking order; the candidates are then resolved
        as ``resolve_merges`` does, each segment stopping at its share. Where no split sums to ``count``,
        the largest total below it (fewer merges, as ``resolve_merges`` returns when it runs out).
        """
        taken = self._walk(candidates, None)
        masks = [self.segment[candidates.source[taken]] == s for s in range(len(self.sizes))]
        costs = [np.concatenate([[0.0], np.cumsum(candidates.cost[taken[mask]])]) for mask in masks]
        quotas = self.quotas(costs, [int(mask.sum()) for mask in masks], count)
        taken = self._walk(candidates, quotas)
        offset = candidates.offset
        subset = Candidates(
            candidates.source[taken],
            candidates.target[taken],
            candidates.scale[taken],
            candidates.distance[taken],
            candidates.cost[taken],
            None if offset is None else offset[taken],
        )
        return resolve_merges(subset, len(taken))

    def _walk(self, candidates: Candidates, quotas: Sequence[int] | None) -> np.ndarray:
        """The candidate entries ``resolve_merges`` would take, in order, each segment up to its quota."""
        return taken_entries(candidates, self.sizes if quotas is None else quotas, self.segment)

    def quotas(self, costs: list[np.ndarray], caps: list[int], count: int) -> list[int]:
        """Per segment, how many atoms it gives: the cheapest allowed split of the largest total <= count.

        ``costs[s][k]``: the cost of segment ``s`` giving its first ``k`` atoms (``caps[s]`` at most).
        """
        best = np.full(count + 1, np.inf)
        picks: list[np.ndarray] = []
        best[0] = 0.0
        for segment, cumulative in enumerate(costs):
            grown, pick = np.full(count + 1, np.inf), np.zeros(count + 1, np.int64)
            for removed in self.removals(segment, caps[segment]):
                if removed > count:
                    break
                tried = best[: count + 1 - removed] + cumulative[removed]
                better = tried < grown[removed:]
                grown[removed:][better], pick[removed:][better] = tried[better], removed
            best, picks = grown, [*picks, pick]
        total = int(np.flatnonzero(np.isfinite(best))[-1])
        quotas = []
        for pick in reversed(picks):
            quotas.append(int(pick[total]))
            total -= quotas[-1]
        return quotas[::-1]
