"""Per-group merge options of the budget search (pure): removal levels, candidate rankings, the result.

A group may lose channels in steps (``removal_levels``: fractions of its channels, kept counts on the
channel multiple, per segment: ``ChannelSteps``); at each step its merges come from one of several
rankings of its candidates (``Ordering``: the weights as they are, or KDE-hashed at a few bandwidths, or
fitted activations), or from the least-squares refit on captured activations (``RefitOrdering``).
The search (``red_onnx.search.budget``) records per group the error of each level
(``GroupOption``) and returns a ``BudgetResult``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from red_onnx.analysis.kde import bandwidth_ladder, hash_weights
from red_onnx.analysis.merge_sets import ConsumerMerges, DenseMerges, MergeList, atom_rows
from red_onnx.analysis.redundancy import AtomParams, Merge
from red_onnx.analysis.refit import (
    augmented_gram,
    choose_lambda_gram,
    greedy_obs,
    greedy_obs_joint,
    lambda_scale,
    mixing,
    output_energy,
)
from red_onnx.analysis.similarity import (
    Candidates,
    merge_cost,
    near_candidates,
    pair_distance,
    resolve_merges,
    taken_entries,
)
from red_onnx.errors import InternalError
from red_onnx.passes.merge_near import GroupCandidates
from red_onnx.search.channel_steps import ChannelSteps

#: Fractions of a group's channels tried as removal levels (rounded to the channel multiple).
LEVEL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)
#: Rungs of a HASH_LADDER-step bandwidth ladder (tiny ... Scott) tried as hashed rankings.
HASH_LADDER = 8
HASH_RUNGS = (2, 4, 6)

Counts = dict[str, int]


@dataclass
class GroupOption:
    """One group's removal levels with their measured error alone and estimated MACs saved."""

    name: str
    n_atoms: int
    levels: list[int]
    macs_saved: list[float]
    errors: list[float] = field(default_factory=list)
    orderings: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    bandwidths: dict[str, float] = field(default_factory=dict)
    basins: dict[str, int] = field(default_factory=dict)
    unit: str = "channels"  # what an atom is: "heads" for the group of an attention block


@dataclass(frozen=True)
class Ordering:
    """One ranking of a group's merge candidates: by the weights, or by the KDE-hashed weights.

    Hashing (``red_onnx.analysis.kde``) snaps each weight to its basin's representative at ``bandwidth``; rows
    that hashing makes identical or close rank first. The merges themselves always use the original
    weights: hashing chooses *which* neurons merge, it never replaces a kept neuron's weights.
    """

    label: str
    bandwidth: float
    basins: int
    candidates: Candidates
    steps: ChannelSteps | None = None

    def merges(self, count: int) -> list[Merge]:
        """The first ``count`` merges of this ranking (with ``steps``: every segment kept on its step)."""
        if self.steps is None or not self.steps.constrained:
            return resolve_merges(self.candidates, count)
        return self.steps.select(self.candidates, count)

    def allowed(self) -> set[int] | None:
        """The merge counts this ranking may stop at (None: any, without ``steps``)."""
        if self.steps is None:
            return None
        caps = self.steps.available(self.candidates) if self.steps.constrained else None
        return set(self.steps.totals(caps).tolist())

    def achievable(self, n_atoms: int) -> int:
        """How many merges this ranking can make at most (one per entry taken: no merge composed)."""
        return len(taken_entries(self.candidates, [n_atoms]))


#: Groups wider than this get no refit ranking: its Gram is kept for every level (channels² float64:
#: 134 MB at 4096; a 3072-neuron FFN's, 75 MB) and its greedy path costs O(channels³).
REFIT_MAX_ATOMS = 4096
#: Groups wider than this take the greedy OBS path in OBS_WIDE_STEPS joint steps (``greedy_obs``'s
#: ``batch``), up to the deepest of LEVEL_FRACTIONS: each step touches all of ``H⁻¹``, so one channel a
#: step is memory-bound there (a 3072-neuron FFN: 3072 steps, 17 s; 64 steps, 5 s).
OBS_SINGLE_MAX = 1024
OBS_WIDE_STEPS = 64
#: The ridge strength is chosen (``choose_lambda_gram``, half the samples fit, half validate) for the
#: removal of this fraction of the group, and used at every level.
REFIT_LAMBDA_AT = 0.25
#: Seed of the fit/validation split of the captured positions.
REFIT_SPLIT_SEED = 7


@dataclass(frozen=True)
class RefitOrdering:
    """Channels removed in greedy structured-OBS order, the kept ones refit by ridge least squares.

    On the captured activations ``X`` of the tensor the group's first consumer reads, removing the set
    ``R`` refits the kept channels' consumer weights: ``V'_K = V_K + A·V_R`` with
    ``A = (G_c,KK + λ·I)⁻¹·G_c,KR`` (``red_onnx.analysis.refit.mixing``) and the intercept into the
    bias. That is a merge of each removed atom into every kept atom with scale ``A_ij`` (the intercept as
    its offset), held as one ``DenseMerges``, which the simulator and the one editor of channels apply
    as they apply λ-merges. The order is the greedy OBS path on ``H = G_c + λ·I`` with that consumer's
    weights; the search measures every level on the model's outputs like the other rankings, and keeps
    it only where it measures better.
    """

    label: str
    order: np.ndarray  # atoms, cheapest removal first
    atoms: np.ndarray  # the atoms of the captured tensor, in the order of ``gram``'s rows
    gram: np.ndarray  # G1 of the captured activations, [atoms·block + 1, atoms·block + 1]
    lam: float
    free_bias: bool
    steps: ChannelSteps | None = None
    bandwidth: float = 0.0
    basins: int = 0
    block: int = 1  # rows of ``gram`` per atom (an attention head's D, refit row by row)
    extra: np.ndarray | None = None  # G1 of the cv rows (float32), added by the final refit
    taps: bool = False  # the rows are a k×k Conv consumer's kernel taps (its input patches' Gram)
    weight: np.ndarray | None = None  # the consumers' weight rows (float32), for estimated_error

    def estimated_error(self, merges: MergeList) -> float:
        """The relative change of the consumers' output a plan of this ranking makes, on the patches.

        ``‖Δy‖² = tr(Dᵀ·G·D)`` with ``D`` the plan's change of the weight rows and ``G`` the patch Gram
        of the rows the search measures on (``extra`` where it measures on the cv rows), over
        ``‖y‖² = tr(Vᵀ·G·V)``: what the local estimate gives the other rankings, taken on the patches
        (it reads channel Grams, which a plan over kernel taps does not fit).
        """
        if self.weight is None:
            raise InternalError(f"ranking {self.label!r} keeps no weight rows to estimate a plan with")
        if not isinstance(merges, DenseMerges) or len(merges) == 0:
            return 0.0
        squared = plan_change(self._measured, self.weight, merges, self._position, self.block)
        energy = self._output_energy
        return math.sqrt(squared / energy) if energy > 0.0 else 0.0

    @cached_property
    def _measured(self) -> np.ndarray:
        """The Gram :meth:`estimated_error` reads: of the rows the search measures on (float64)."""
        return np.asarray(self.extra if self.extra is not None else self.gram, np.float64)

    @cached_property
    def _output_energy(self) -> float:
        """``tr(Vᵀ·G·V)``: the same for every plan of this ranking."""
        assert self.weight is not None
        return output_energy(self._measured, self.weight)

    @cached_property
    def _position(self) -> np.ndarray:
        """The row block of each atom in ``gram`` (-1: not captured)."""
        return atom_positions(self.atoms)

    def final_merges(self, count: int) -> MergeList:
        """:meth:`merges`, the kept atoms refit on the fitted rows and ``extra``'s rows together.

        The plan written once a search that measured on the cv rows has chosen ``count``: the same
        removals, their refit on a quarter more samples (the ridge strength rescaled to the summed Gram).
        """
        if self.extra is None:
            return self.merges(count)
        gram, lam = with_cv_rows(self.gram, self.extra, self.lam, self.free_bias)
        return dataclasses.replace(self, gram=gram, lam=lam, extra=None).merges(count)

    def merges(self, count: int) -> MergeList:
        """The first ``count`` removals of the OBS order, each merged into every kept atom (dense form)."""
        if count <= 0:
            return []
        removed = np.sort(self._position[self.order[:count]])
        kept = np.setdiff1d(np.arange(self.atoms.size), removed)
        a, intercept = mixing(self.gram, atom_rows(kept, self.block), self.lam, free_bias=self.free_bias)
        return DenseMerges(self.atoms[removed], self.atoms[kept], a, intercept, self.block, self.taps)

    def allowed(self) -> set[int] | None:
        """The removal counts this ranking may stop at (None: any, without ``steps``)."""
        return None if self.steps is None else set(self.steps.totals(None).tolist())

    def achievable(self, n_atoms: int) -> int:
        """How many atoms this ranking can remove at most."""
        del n_atoms
        return int(self.order.size)


def with_cv_rows(
    gram: np.ndarray, extra: np.ndarray, lam: float, free_bias: bool
) -> tuple[np.ndarray, float]:
    """``gram + extra`` (the fitted and the cv rows together) and the ridge strength rescaled to it."""
    summed = gram + extra
    return summed, lam * lambda_scale(summed, free_bias=free_bias) / lambda_scale(gram, free_bias=free_bias)


def atom_positions(atoms: np.ndarray) -> np.ndarray:
    """Per atom id up to the largest of ``atoms``, its index in ``atoms`` (-1: absent)."""
    position = np.full(int(atoms.max()) + 1, -1)
    position[atoms] = np.arange(atoms.size)
    return position


def plan_change(
    gram: np.ndarray, weight: np.ndarray, merges: DenseMerges, position: np.ndarray, block: int
) -> float:
    """``tr([D; δb]ᵀ·G1·[D; δb])``: the squared change of the consumers' outputs under ``merges``.

    ``D`` is the plan's change of the weight rows ``weight`` (``block`` per atom; ``position``: each
    atom's block), ``δb = V_Rᵀ·c`` the intercepts' change of the bias (none over kernel taps).
    """
    v = np.asarray(weight, np.float64)
    removed = atom_rows(position[merges.sources], block)
    kept = atom_rows(position[merges.targets], block)
    change = np.zeros((v.shape[0] + 1, v.shape[1]))
    change[kept] = merges.mix @ v[removed]
    change[removed] = -v[removed]
    change[-1] = np.asarray(merges.offsets, np.float64) @ v[removed]
    return max(float(np.sum((np.asarray(gram, np.float64) @ change) * change)), 0.0)


def refit_ordering(
    rows: np.ndarray,
    atoms: np.ndarray,
    weight: np.ndarray,
    free_bias: bool,
    validation: np.ndarray | None = None,
    *,
    block: int = 1,
    fit_validation: bool = True,
) -> RefitOrdering | None:
    """The refit ranking of a group from its captured activations and its consumers' weight rows.

    The ridge strength is the one whose refit (at ``REFIT_LAMBDA_AT`` of the group removed, fitted on
    ``rows``) best predicts ``validation``; without it, half the captured positions fit and the other
    half validate, then the strength is rescaled to the whole Gram.

    Args:
        rows: ``[atoms·block, samples]`` activations of the tensor the consumer reads, ``block`` rows per
            atom, atom by atom.
        atoms: The atom of each block of rows.
        weight: ``[atoms·block, outputs]`` the consumers' weight rows of those atoms.
        free_bias: Whether every consumer reading these atoms can take a bias change (the intercept).
        validation: The same tensor on other inputs, rows as ``rows`` (None: split ``rows``).
        block: Rows per atom: an atom goes as a whole and the kept rows are refit one by one.
        fit_validation: Once the strength is chosen, fit on ``rows`` and ``validation`` together (off:
            on ``rows`` only, where ``validation``'s inputs measure the result; ``validation``'s Gram
            is then kept for :meth:`RefitOrdering.final_merges`).

    Returns:
        The ranking; None for a group too wide (``REFIT_MAX_ATOMS`` rows) or too small.
    """
    if atoms.size < 2 or atoms.size * block > REFIT_MAX_ATOMS or rows.shape[1] < 4:
        return None
    gram, fit, val, held = rows_grams(rows, validation)
    return refit_from_grams(gram, fit, val, atoms, weight, free_bias, held=held, block=block,
                            fit_validation=fit_validation)  # fmt: skip


def rows_grams(
    rows: np.ndarray, validation: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The augmented Grams a refit of captured ``rows`` takes: ``(gram, fit, val, held)``.

    With ``validation`` (the same rows on the cv inputs, at least two positions) the strength is fitted
    on ``gram`` and validated on ``held``, its Gram; without it, half the captured positions fit and
    the other half validate (seeded split), and ``held`` is None.
    """
    gram = augmented_gram(rows)
    if validation is not None and validation.shape[1] >= 2:
        held = augmented_gram(validation)
        return gram, gram, held, held
    split = np.random.default_rng(REFIT_SPLIT_SEED).permutation(rows.shape[1])
    return gram, augmented_gram(rows[:, split[::2]]), augmented_gram(rows[:, split[1::2]]), None


def refit_from_grams(
    gram: np.ndarray,
    fit: np.ndarray,
    val: np.ndarray,
    atoms: np.ndarray,
    weight: np.ndarray,
    free_bias: bool,
    *,
    held: np.ndarray | None,
    block: int = 1,
    fit_validation: bool = True,
    taps: bool = False,
) -> RefitOrdering | None:
    """:func:`refit_ordering` from augmented Grams (``analysis.refit.augmented_gram``).

    Args:
        gram: ``G1`` of the rows the refit fits.
        fit: ``G1`` the ridge strength is fitted on (``gram``, or half of its positions).
        val: ``G1`` that strength is validated on.
        atoms: The atom of each block of rows.
        weight: ``[atoms·block, outputs]`` the consumers' weight rows of those atoms.
        free_bias: As in :func:`refit_ordering`.
        held: ``G1`` of the validation inputs (None: ``val`` is half of ``gram``'s own positions).
        block: Rows per atom.
        fit_validation: Fit on ``gram + held`` once the strength is chosen (off: keep ``held`` for
            :meth:`RefitOrdering.final_merges`).
        taps: The rows are a k×k Conv consumer's input patches, ``block`` taps per channel, and
            ``weight`` its ``W[:, c, tap]`` rows (labelled "refit taps"; ``free_bias`` must be off).
    """
    count = atoms.size
    if count < 2 or count * block > REFIT_MAX_ATOMS:
        return None
    batch, deepest = obs_steps(count)
    gram, lam, extra = ridge_strength(gram, fit, val, weight, block, free_bias, held=held, batch=batch,
                                      fit_validation=fit_validation)  # fmt: skip
    path = greedy_obs(gram, weight, deepest, lam, block, free_bias=free_bias, batch=batch)
    label = "refit taps" if taps else "refit"
    kept_weight = weight.astype(np.float32) if taps else None
    return RefitOrdering(label, atoms[path.order], atoms, gram, lam, free_bias, block=block, extra=extra,
                         taps=taps, weight=kept_weight)  # fmt: skip


def obs_steps(count: int) -> tuple[int, int]:
    """The greedy path's channels a step and its depth for a group of ``count`` atoms."""
    if count > OBS_SINGLE_MAX:
        return math.ceil(count / OBS_WIDE_STEPS), math.ceil(max(LEVEL_FRACTIONS) * count)
    return 1, count - 1


def ridge_strength(
    gram: np.ndarray,
    fit: np.ndarray,
    val: np.ndarray,
    weight: np.ndarray,
    block: int,
    free_bias: bool,
    *,
    held: np.ndarray | None,
    batch: int,
    fit_validation: bool,
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """The Gram a refit fits on, its ridge strength, and the cv Gram kept for the final refit.

    The strength is the one whose refit at ``REFIT_LAMBDA_AT`` of the atoms removed (greedy on ``fit``)
    best predicts ``val``, rescaled from ``fit``'s units to the returned Gram's (``gram``, plus ``held``
    with ``fit_validation``). Arguments as in :func:`refit_from_grams`.
    """
    count = weight.shape[0] // block
    probe = max(1, min(count - 1, round(REFIT_LAMBDA_AT * count)))
    unit = lambda_scale(fit, free_bias=free_bias)
    first = greedy_obs(fit, weight, probe, 0.1 * unit, block, free_bias=free_bias, batch=batch)
    keep = atom_rows(np.setdiff1d(np.arange(count), first.order), block)
    chosen = choose_lambda_gram(fit, val, weight, keep, free_bias=free_bias)
    if fit_validation and held is not None:  # fit on every sample
        gram = gram + held
    lam = chosen / unit * lambda_scale(gram, free_bias=free_bias)
    extra = held.astype(np.float32) if not fit_validation and held is not None else None
    return gram, lam, extra


@dataclass(frozen=True)
class SystemGrams:
    """Consumers of a group refit together on one Gram: one system of the per-consumer refit.

    Attributes:
        consumers: Their indices among the group's consumers.
        atoms: The atoms they read, ascending (a Split or Concat segment's, or all).
        gram: ``G1`` of their input rows on the fitted samples (``block`` rows per atom, atom by atom).
        fit: ``G1`` the ridge strength is fitted on (``gram``, or half of its positions).
        val: ``G1`` it is validated on.
        held: ``G1`` of the cv rows (None: ``val`` is half of ``gram``'s positions).
        weight: ``[atoms·block, outputs]`` their weight rows side by side.
        block: Rows per atom (kernel taps, a head's rows, a flattened channel's elements, or 1).
        taps: The rows are k×k Conv kernel taps (no intercept then).
        free_bias: Whether the intercept goes into their biases.
    """

    consumers: tuple[int, ...]
    atoms: np.ndarray
    gram: np.ndarray
    fit: np.ndarray
    val: np.ndarray
    held: np.ndarray | None
    weight: np.ndarray
    block: int
    taps: bool
    free_bias: bool


@dataclass(frozen=True)
class ConsumerFit:
    """One system of a :class:`ConsumerRefitOrdering`: its consumers, atoms, Gram, strength, weight rows."""

    consumers: tuple[int, ...]
    atoms: np.ndarray  # the atoms it reads, ascending: the order of its rows
    gram: np.ndarray  # G1 the refit fits on
    lam: float
    free_bias: bool
    block: int
    taps: bool
    weight: np.ndarray  # float32 [atoms·block, outputs]
    extra: np.ndarray | None  # G1 of the cv rows (float32), added by the final refit

    def plan(self, removed: np.ndarray) -> DenseMerges | list[Merge]:
        """The refit of these consumers when the atoms ``removed`` go (those it reads; none: ``[]``)."""
        gone = np.isin(self.atoms, removed)
        if not gone.any():
            return []
        kept = np.flatnonzero(~gone)
        a, intercept = mixing(self.gram, atom_rows(kept, self.block), self.lam, free_bias=self.free_bias)
        return DenseMerges(self.atoms[gone], self.atoms[kept], a, intercept, self.block, self.taps)

    def final(self) -> ConsumerFit:
        """The same system fitted on the cv rows too (the strength rescaled to the summed Gram)."""
        if self.extra is None:
            return self
        gram, lam = with_cv_rows(self.gram, self.extra, self.lam, self.free_bias)
        return dataclasses.replace(self, gram=gram, lam=lam, extra=None)

    def change(self, merges: MergeList) -> float:
        """``tr([D; δb]ᵀ·G1·[D; δb])``: the squared change of these consumers' outputs under ``merges``.

        ``D`` is the change of the weight rows, ``δb = V_Rᵀ·c`` the intercepts' change of the bias, ``G1``
        the Gram of the rows the search measures on (``extra`` where it measures on the cv rows).
        """
        if not isinstance(merges, DenseMerges) or len(merges) == 0:
            return 0.0
        return plan_change(self._measured, self.weight, merges, self._position, self.block)

    @cached_property
    def energy(self) -> float:
        """``tr(Vᵀ·G·V)`` on the measured rows (the bias left out, as in the local estimate)."""
        return output_energy(self._measured, self.weight)

    @cached_property
    def _position(self) -> np.ndarray:
        return atom_positions(self.atoms)

    @cached_property
    def _measured(self) -> np.ndarray:
        return np.asarray(self.extra if self.extra is not None else self.gram, np.float64)


@dataclass(frozen=True)
class ConsumerRefitOrdering:
    """One removal order for a group whose consumers each take a refit of their own.

    Where a group's consumers read different tensors (both sides of a residual Add, a Split's chunk
    and the Concat of all), or one refit cannot serve them together (a k×k Conv refit tap by tap
    beside a 1×1 one), each system of consumers (:class:`ConsumerFit`) has its own Gram and ridge
    strength. The greedy OBS path is joint (``red_onnx.analysis.refit.greedy_obs_joint``: a channel's
    cost is the sum over the systems reading it) and a removal is written as :class:`ConsumerMerges`,
    every consumer refit on its own input. Where the group's segments keep their counts on steps
    (``steps.constrained``), a removal count is split between the segments as ``ChannelSteps`` splits
    a ranking's (the cheapest allowed split by the path's costs), each segment removing its first
    atoms on the path.
    """

    label: str
    order: np.ndarray  # atoms, cheapest removal first
    cost: np.ndarray  # the path's cumulative cost after each removal
    fits: tuple[ConsumerFit, ...]
    consumers: int  # the group's consumer count
    steps: ChannelSteps | None = None
    bandwidth: float = 0.0
    basins: int = 0

    def merges(self, count: int) -> MergeList:
        """The removal of ``count`` atoms along the joint order, every system refit on its own Gram."""
        return self._merges(count, self.fits)

    def final_merges(self, count: int) -> MergeList:
        """:meth:`merges`, every system refit on the fitted and the cv rows together."""
        return self._merges(count, tuple(fit.final() for fit in self.fits))

    def _merges(self, count: int, fits: tuple[ConsumerFit, ...]) -> MergeList:
        removed = np.sort(self._removed(count))
        if removed.size == 0:
            return []
        plans: list[DenseMerges | list[Merge]] = [[] for _ in range(self.consumers)]
        for fit in fits:
            plan = fit.plan(removed)
            for index in fit.consumers:
                plans[index] = plan
        return ConsumerMerges(removed, tuple(plans))

    def _removed(self, count: int) -> np.ndarray:
        """The atoms ``count`` removals take: a prefix of the order, or each segment's share of it."""
        count = min(max(count, 0), self.order.size)
        if self.steps is None or not self.steps.constrained:
            return self.order[:count]
        segments = self.steps.segment[self.order]
        marginal = np.diff(self.cost, prepend=0.0)
        masks = [segments == segment for segment in range(len(self.steps.sizes))]
        costs = [np.concatenate([[0.0], np.cumsum(marginal[mask])]) for mask in masks]
        quotas = self.steps.quotas(costs, [int(mask.sum()) for mask in masks], count)
        return np.concatenate([self.order[mask][:quota] for mask, quota in zip(masks, quotas, strict=True)])

    def estimated_error(self, merges: MergeList) -> float:
        """The relative change of the consumers' outputs under a plan of this ranking (all systems)."""
        if not isinstance(merges, ConsumerMerges) or len(merges) == 0:
            return 0.0
        energy = sum(fit.energy for fit in self.fits)
        squared = sum(fit.change(merges.plans[fit.consumers[0]]) for fit in self.fits)
        return math.sqrt(squared / energy) if energy > 0.0 else 0.0

    def allowed(self) -> set[int] | None:
        """The removal counts this ranking may stop at (None: any, without ``steps``)."""
        if self.steps is None:
            return None
        if not self.steps.constrained:
            return set(self.steps.totals(None).tolist())
        caps = np.bincount(self.steps.segment[self.order], minlength=len(self.steps.sizes))
        return set(self.steps.totals(caps).tolist())

    def achievable(self, n_atoms: int) -> int:
        """How many atoms this ranking can remove at most."""
        del n_atoms
        return int(self.order.size)


def consumer_refit(
    systems: Sequence[SystemGrams], atoms: int, consumers: int, *, fit_validation: bool = True
) -> ConsumerRefitOrdering | None:
    """The per-consumer refit ranking of a group from its systems' Grams (labelled "refit per consumer").

    Each system's ridge strength is chosen on its own (:func:`ridge_strength`); the removal order is the
    joint greedy OBS path over all systems (``atoms`` in the group). None for a group too small or a
    system too wide.
    """
    if atoms < 2 or any(system.atoms.size * system.block > REFIT_MAX_ATOMS for system in systems):
        return None
    batch, deepest = obs_steps(atoms)
    fits, joint = [], []
    for system in systems:
        count = system.atoms.size
        if count < 2:  # one channel: nothing to refit it from, and it stays (the path keeps one a system)
            return None
        own_batch = obs_steps(count)[0]
        gram, lam, extra = ridge_strength(system.gram, system.fit, system.val, system.weight, system.block,
                                          system.free_bias, held=system.held, batch=own_batch,
                                          fit_validation=fit_validation)  # fmt: skip
        fits.append(ConsumerFit(system.consumers, system.atoms, gram, lam, system.free_bias, system.block,
                                system.taps, system.weight.astype(np.float32), extra))  # fmt: skip
        joint.append((gram, system.weight, lam, system.block, system.free_bias))
    members = [system.atoms for system in systems]
    path = greedy_obs_joint(joint, deepest, batch=batch, members=members, channels=atoms)
    return ConsumerRefitOrdering("refit per consumer", path.order, path.cost, tuple(fits), consumers)


#: A ranking of a group's removals: the merges of its first ``count`` entries, and where it may stop.
Ranking = Ordering | RefitOrdering | ConsumerRefitOrdering


@dataclass
class BudgetResult:
    """What the search chose and what it saw on the way."""

    counts: Counts
    error: float
    heldout_error: float
    macs_fraction: float
    evaluations: int
    curve: list[tuple[float, float]]
    groups: list[GroupOption]
    sensitivity: str = "measured"
    measured_part: str = "search"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "error": self.error,
            "measured_on": self.measured_part,
            "heldout_error": self.heldout_error,
            "macs_fraction": self.macs_fraction,
            "evaluations": self.evaluations,
            "sensitivity": self.sensitivity,
            "curve": [{"macs_fraction": m, "error": e} for m, e in self.curve],
            "groups": [_group_summary(g, self.counts.get(g.name, 0)) for g in self.groups],
        }  # fmt: skip


def _chosen(option: GroupOption, count: int) -> str:
    """The ranking used at the chosen level ("-" when nothing was removed)."""
    if not count or option.levels.index(count) >= len(option.orderings):
        return "-"
    return option.orderings[option.levels.index(count)]


def hashed_orderings(item: GroupCandidates, rungs: Sequence[int] = HASH_RUNGS) -> list[Ordering]:
    """Rankings of the group's candidates on its KDE-hashed atom vectors, at a few bandwidths."""
    params = item.params
    ladder = bandwidth_ladder(params.scaled, HASH_LADDER)
    found = []
    for rung in rungs:
        hashed, basins = hash_weights(params.scaled, float(ladder[rung]))
        view = dataclasses.replace(params, scaled=hashed.astype(params.scaled.dtype))
        ranked = near_candidates(view, item.group.homogeneous, np.ones(item.group.n_atoms, bool))
        candidates = _ranked_by_hash_then_weights(ranked, params, item.group.homogeneous)
        label = f"hashed h={ladder[rung]:.3g} ({len(basins.representatives)} basins)"
        found.append(Ordering(label, float(ladder[rung]), len(basins.representatives), candidates))
    return found


#: Hashed distances below this are hash-identical rows (float64 rounding of λ-scaled duplicates).
HASH_TIE = 1e-6


def _ranked_by_hash_then_weights(ranked: Candidates, params: AtomParams, homogeneous: bool) -> Candidates:
    """Hashed candidates re-ranked: by hashed cost, ties (hash-identical rows) by their true cost.

    Hashing makes many rows identical; among candidates of equal hashed cost, the merge that perturbs
    the true weights least goes first, where index order decided before. Scales and distances are
    the true weights' (the merges use them).
    """
    scale, distance = pair_distance(params, ranked.source, ranked.target, homogeneous)
    usable = np.flatnonzero(np.isfinite(distance))
    source, target = ranked.source[usable], ranked.target[usable]
    hashed_cost = np.where(ranked.distance[usable] < HASH_TIE, 0.0, ranked.cost[usable])
    order = np.lexsort((merge_cost(params, source, distance[usable]), hashed_cost))
    pick = usable[order]
    return Candidates(source[order], target[order], scale[pick], distance[pick], hashed_cost[order])


def _group_summary(option: GroupOption, count: int) -> dict[str, object]:
    """One group in the report: channels before/after, the ranking used, its own error share."""
    position = option.levels.index(count) if count in option.levels else 0
    return {
        "group": option.name, "producers": option.producers, "channels": option.n_atoms, "removed": count,
        "unit": option.unit,
        "ordering": _chosen(option, count), "bandwidth": option.bandwidths.get(_chosen(option, count), 0.0),
        "basins": option.basins.get(_chosen(option, count), 0),
        "error_alone": option.errors[position] if position < len(option.errors) else None,
        "levels": option.levels, "errors": option.errors, "orderings": option.orderings,
    }  # fmt: skip


def removal_levels(
    n_atoms: int,
    available: int | Sequence[int],
    multiple: int,
    fractions: Sequence[float] = LEVEL_FRACTIONS,
    *,
    steps: ChannelSteps | None = None,
) -> list[int]:
    """Removal counts to try: 0, then fractions of ``n_atoms`` with kept counts on the steps.

    Each fraction gives the largest count the candidates can make, at most ``round(n_atoms * fraction)``,
    that keeps every segment of ``steps`` on its step (default: the group as one segment on
    ``effective_multiple(n_atoms, multiple)``).

    Args:
        n_atoms: The group's channels (atoms).
        available: How many merges the candidates can make: in all, or per segment of ``steps``.
        multiple: The channel multiple.
        fractions: Fractions of the group's channels to remove.
        steps: The group's segments and their steps.
    """
    steps = steps or ChannelSteps.whole(n_atoms, multiple)
    if np.ndim(available) == 0:
        possible = steps.totals()
        possible = possible[possible <= int(available)]  # type: ignore[arg-type]
    else:
        possible = steps.totals(available)  # type: ignore[arg-type]
    levels = {0}
    for fraction in fractions:
        below = possible[possible <= round(n_atoms * fraction)]
        levels.add(int(below[-1]))
    return sorted(levels)


def achievable(orderings: Sequence[Ranking], n_atoms: int) -> int | list[int]:
    """The most merges any of the group's rankings can make: in all, or per segment where steps differ."""
    steps = orderings[0].steps
    if steps is None or not steps.constrained:
        return max(o.achievable(n_atoms) for o in orderings)
    ranked = [o for o in orderings if isinstance(o, Ordering)]  # a refit ranking needs no steps
    return np.max([steps.available(o.candidates) for o in ranked], axis=0).tolist()
