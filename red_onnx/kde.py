"""Gaussian kernel density of a layer's weights and its basins: the core of weight hashing.

method.md, "Hashing": estimate the density of the weights with a Gaussian kernel of bandwidth ``h``,
cut the weight axis at the local minima of that density, and replace every weight by one value per
basin (the basin's mean, or its mode). Pure numpy, O(n + G log G) for n weights and a G-point grid:

* **Linear binning.** Each weight splits its unit mass between the two grid points around it, in
  proportion to its distance to each. Smoothing the binned masses with the *sampled* kernel gives, at
  every grid point, the exact KDE of the weights with the kernel replaced by its piecewise-linear
  interpolant on the grid. The interpolation error of one sample is at most ``f(1 - f)·δ²/2·|K''|``
  (``f`` its position in the cell, ``δ`` the grid step), so the whole estimate is off by at most
  ``δ²/(8h²)·K(0)`` in absolute terms, ``K(0) = 1/(h√(2π))``; relative to the peak of the density this
  is ``δ²/(8h²)`` for concentrated data and ``≈ 1.6·δ²/(8h²)`` at worst for spread data (``|K''|`` is
  bounded by ``1.62/h²`` times the kernel of width ``√2·h``, whose smoothing never raises the peak).
* **Grid.** ``G`` evenly spaced points over ``[min(w) - 3h, max(w) + 3h]``; ``grid_size`` is a floor:
  when the step would exceed ``h / GRID_STEPS_PER_BANDWIDTH`` (= ``h/5``, which keeps the binning error
  under ``1.62/200 ≈ 0.8 %`` of the peak; measured ≤ 0.3 %) the grid is refined, up to
  ``MAX_GRID_SIZE`` (2**20) points; past that cap the kernel is under-resolved (logged) and the
  narrowest basins the grid can show are one step wide.
* **FFT convolution.** The kernel is sampled out to ±8h (``e^-32`` of its peak beyond) and convolved
  with the masses through a zero-padded real FFT (no wrap-around). Values under the FFT's round-off
  floor (``64·eps·‖masses‖₂·‖kernel‖₂``) are set to exactly 0, so that an empty stretch between two
  groups of weights is one flat minimum, cut at its centre, instead of a row of noise minima.
* **Basins.** Cuts are the strict local minima of the sampled density; a run of equal values lower
  than both neighbouring runs is one minimum at its centre. A weight ``w`` belongs to basin ``b`` when
  ``edges[b-1] <= w < edges[b]`` (``np.searchsorted(edges, w, side="right")``). Basins without weights
  are dropped; of the cuts between two kept basins the deepest one is kept.

Scott's rule (``scott_bandwidth``) is far too wide for trained weights (1-4 basins per layer on a small
CNN, every row identical); the bandwidth must be searched per layer, over ``bandwidth_ladder``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from red_onnx.errors import InputError

log = logging.getLogger(__name__)

#: The grid covers ``[min(w) - GRID_MARGIN·h, max(w) + GRID_MARGIN·h]``.
GRID_MARGIN = 3.0
#: The grid step is refined until it is at most ``h / GRID_STEPS_PER_BANDWIDTH``.
GRID_STEPS_PER_BANDWIDTH = 5
#: Largest grid the refinement builds (a larger explicit ``grid_size`` is honoured).
MAX_GRID_SIZE = 2**20
#: Smallest ``grid_size`` accepted.
MIN_GRID_SIZE = 8
#: The sampled kernel is truncated at ±KERNEL_REACH·h.
KERNEL_REACH = 8.0
#: Multiple of ``eps·‖masses‖₂·‖kernel‖₂`` under which density values count as 0 (FFT round-off).
NOISE_FLOOR_FACTOR = 64.0
#: Basin representatives ``find_basins`` knows.
REPRESENTATIVES = ("mean", "mode")
#: Weights sampled by ``bandwidth_ladder`` to see whether they are continuous before sorting them all.
GAP_SAMPLE = 100_000

#: The lowest rung of ``bandwidth_ladder``: this fraction of the weights' standard deviation, or the
#: median gap between sorted distinct weights when larger, and at most LADDER_MAX_LOW·(Scott's h).
LADDER_STD_FRACTION = 1e-3
LADDER_MAX_LOW = 0.1
#: Below this many weights, basin assignment uses a plain ``np.searchsorted``.
_SEARCHSORTED_MAX = 65536
#: Cells of the lookup table that speeds up basin assignment of many weights.
_LOOKUP_MAX_CELLS = 2**20


class KdeInputError(InputError, ValueError):
    """A weight array or KDE parameter that cannot be used (an ``InputError`` and a ``ValueError``)."""


@dataclass(frozen=True)
class Density:
    """A kernel density estimate sampled on an evenly spaced grid."""

    grid: np.ndarray  # G evenly spaced points over [min(w) - 3h, max(w) + 3h]
    values: np.ndarray  # estimated density at the grid points (integrates to ~1)
    bandwidth: float


@dataclass(frozen=True)
class Basins:
    """Intervals of the weight axis between density minima, and one value per interval."""

    edges: np.ndarray  # sorted cut points between basins, len k - 1 (float64)
    representatives: np.ndarray  # one value per basin, len k (the weights' float dtype)
    counts: np.ndarray  # weights per basin, len k (all > 0)


def binned_kde(weights: np.ndarray, bandwidth: float, *, grid_size: int = 2048) -> Density:
    """Gaussian KDE of ``weights`` by linear binning and FFT convolution, O(n + G log G).

    Args:
        weights: any shape (flattened), any real dtype; finite, at least one value.
        bandwidth: the kernel's standard deviation ``h`` (> 0).
        grid_size: the least number of grid points; raised so the step is at most ``h/5``
            (up to ``MAX_GRID_SIZE``), see the module docstring.

    Returns:
        The density on ``G >= grid_size`` points over ``[min(w) - 3h, max(w) + 3h]``.

    Raises:
        KdeInputError: empty or non-finite weights, ``bandwidth <= 0``, ``grid_size < 8``, or a
            bandwidth too small to be resolved next to the weights' magnitude.
    """
    w = _as_vector(weights)
    h = _check_bandwidth(bandwidth)
    lo, hi = float(w.min()) - GRID_MARGIN * h, float(w.max()) + GRID_MARGIN * h
    size = _grid_size(hi - lo, h, grid_size)
    step = (hi - lo) / (size - 1)
    if not step > 0 or lo + step == lo or hi - step == hi:
        raise KdeInputError(
            f"bandwidth {h:g} is too small next to weights of magnitude {max(abs(lo), abs(hi)):g} "
            "for float64 arithmetic; use a larger bandwidth"
        )
    grid = lo + step * np.arange(size, dtype=np.float64)
    values = _smooth(_linear_bin(w, lo, step, size), step, h)
    return Density(grid=grid, values=values, bandwidth=h)


def find_basins(weights: np.ndarray, density: Density, *, representative: str = "mean") -> Basins:
    """Basins of ``weights`` between consecutive strict local minima of ``density``.

    Args:
        weights: the weights (any shape) the density was estimated from.
        density: their density, from ``binned_kde``.
        representative: ``"mean"`` (mean of the basin's weights) or ``"mode"`` (the grid point of
            largest density in the basin, clipped into the range of the basin's weights).

    Returns:
        The non-empty basins, in increasing order of value.

    Raises:
        KdeInputError: empty or non-finite weights, or an unknown ``representative``.
    """
    basins, _ = _basins_and_index(weights, density, representative)
    return basins


def snap(weights: np.ndarray, basins: Basins) -> np.ndarray:
    """Every weight replaced by its basin's representative; same shape and (float) dtype.

    The basin of ``w`` is ``np.searchsorted(basins.edges, w, side="right")``. A non-float input
    comes back as float64.
    """
    array = np.asarray(weights)
    flat = array.reshape(-1).astype(np.float64, copy=False)
    index = _assign(flat, np.asarray(basins.edges, dtype=np.float64))
    dtype = _float_dtype(array.dtype)
    return basins.representatives.astype(dtype, copy=False)[index].reshape(array.shape)


def hash_weights(
    weights: np.ndarray, bandwidth: float, *, representative: str = "mean", grid_size: int = 2048
) -> tuple[np.ndarray, Basins]:
    """``binned_kde`` + ``find_basins`` + ``snap`` in one pass (weights assigned once).

    Returns:
        The snapped weights (same shape, float dtype kept) and the basins.
    """
    array = np.asarray(weights)
    density = binned_kde(array, bandwidth, grid_size=grid_size)
    basins, index = _basins_and_index(array, density, representative)
    return basins.representatives[index].reshape(array.shape), basins


def scott_bandwidth(weights: np.ndarray) -> float:
    """Scott's rule ``1.06·σ·n^(-1/5)`` (sample σ); far too wide for trained weights (module doc).

    When all weights are equal (σ = 0) any bandwidth gives one basin; returns
    ``1e-3·max(|w|, 1)`` so callers still get a usable positive value.
    """
    w = _as_vector(weights)
    sigma = float(np.std(w, ddof=1)) if w.size > 1 else 0.0
    if sigma > 0:
        return 1.06 * sigma * w.size ** (-0.2)
    return 1e-3 * max(abs(float(w[0])), 1.0)


def bandwidth_ladder(weights: np.ndarray, count: int = 12) -> np.ndarray:
    """``count`` geometrically spaced bandwidths, increasing, ending at ``scott_bandwidth``.

    The lowest rung is ``1e-3·σ`` or the median gap between sorted distinct weights, whichever is
    larger, but at most a tenth of Scott's bandwidth (so the ladder spans at least a decade). The gap is
    first taken on a seeded sample of the weights; all of them are sorted (0.5 s for 5 million) only when
    the sample's gap is not already below ``1e-3·σ`` (weights with few distinct values).

    Raises:
        KdeInputError: ``count < 1``, or empty or non-finite weights.
    """
    if count < 1:
        raise KdeInputError(f"bandwidth ladder needs count >= 1, got {count}; pass a positive count")
    w = _as_vector(weights)
    high = scott_bandwidth(w)
    if count == 1:
        return np.array([high])
    floor = LADDER_STD_FRACTION * float(np.std(w))
    low = max(floor, _distinct_gap(np.asarray(weights).reshape(-1), floor))
    low = min(low, LADDER_MAX_LOW * high) if low > 0 else LADDER_MAX_LOW * high
    return np.geomspace(low, high, count)


# --- KDE internals -------------------------------------------------------------------------------


def _distinct_gap(values: np.ndarray, floor: float) -> float:
    """Median gap between the sorted distinct ``values``, or a sample's when that is below ``floor``.

    A sample's gaps are sums of the full set's, so its median gap is in practice the larger: when it is
    already under ``floor`` the caller (which takes the larger of the two) does not sort every weight.
    """
    if values.size > GAP_SAMPLE:
        sample = np.random.default_rng(0).choice(values, GAP_SAMPLE, replace=False)
        gap = _median_gap(sample)
        if gap < floor:
            return gap
    return _median_gap(values)


def _median_gap(values: np.ndarray) -> float:
    distinct = np.unique(values)
    return float(np.median(np.diff(distinct.astype(np.float64)))) if distinct.size > 1 else 0.0


def _as_vector(weights: np.ndarray) -> np.ndarray:
    """``weights`` flattened to float64; rejects empty and non-finite arrays."""
    w = np.asarray(weights).reshape(-1)
    if w.size == 0:
        raise KdeInputError("cannot estimate the density of an empty weight array; pass at least one value")
    w = w.astype(np.float64, copy=False)
    if not np.isfinite(w).all():
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise KdeInputError(f"{bad} of {w.size} weights are NaN or infinite; clean the weights first")
    return w


def _float_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _check_bandwidth(bandwidth: float) -> float:
    h = float(bandwidth)
    if not (math.isfinite(h) and h > 0):
        raise KdeInputError(f"bandwidth must be a finite number > 0, got {bandwidth!r}; pass a positive h")
    return h


def _grid_size(span: float, h: float, requested: int) -> int:
    """``requested``, raised so the step ``span / (G - 1)`` is at most ``h/5`` (capped)."""
    if requested < MIN_GRID_SIZE:
        raise KdeInputError(f"grid_size must be >= {MIN_GRID_SIZE}, got {requested}; use a larger grid")
    needed = math.ceil(GRID_STEPS_PER_BANDWIDTH * span / h) + 1
    if needed <= requested:
        return int(requested)
    if needed > MAX_GRID_SIZE:
        log.warning(
            "KDE grid capped at %d points: span %.3g / bandwidth %.3g needs %d for a step <= h/%d; "
            "the density is under-resolved",
            MAX_GRID_SIZE, span, h, needed, GRID_STEPS_PER_BANDWIDTH,
        )  # fmt: skip
        return max(int(requested), MAX_GRID_SIZE)
    return needed


def _linear_bin(w: np.ndarray, lo: float, step: float, size: int) -> np.ndarray:
    """Mass fractions on the grid: each weight split linearly between its two neighbours."""
    pos = (w - lo) / step
    left = np.clip(np.floor(pos), 0, size - 2).astype(np.intp)
    right_share = np.clip(pos - left, 0.0, 1.0)
    mass = np.bincount(left, weights=1.0 - right_share, minlength=size)
    mass += np.bincount(left + 1, weights=right_share, minlength=size)
    return mass / w.size


def _smooth(mass: np.ndarray, step: float, h: float) -> np.ndarray:
    """``mass`` convolved with the Gaussian sampled at the grid step (zero-padded real FFT)."""
    size = mass.size
    reach = min(size - 1, math.ceil(KERNEL_REACH * h / step))
    offsets = np.arange(-reach, reach + 1, dtype=np.float64) * (step / h)
    kernel = np.exp(-0.5 * offsets**2) / (h * math.sqrt(2.0 * math.pi))
    n_fft = 1 << (size + 2 * reach - 1).bit_length()  # >= full convolution length size + 2·reach
    spectrum = np.fft.rfft(mass, n_fft) * np.fft.rfft(kernel, n_fft)
    values = np.fft.irfft(spectrum, n_fft)[reach : reach + size]
    floor = NOISE_FLOOR_FACTOR * np.finfo(np.float64).eps * np.linalg.norm(mass) * np.linalg.norm(kernel)
    values[values < floor] = 0.0
    return values


# --- basin internals -----------------------------------------------------------------------------


def _basins_and_index(
    weights: np.ndarray, density: Density, representative: str
) -> tuple[Basins, np.ndarray]:
    """The non-empty basins of ``weights`` and each weight's basin index."""
    if representative not in REPRESENTATIVES:
        raise KdeInputError(f"unknown basin representative {representative!r}; use one of {REPRESENTATIVES}")
    dtype = _float_dtype(np.asarray(weights).dtype)
    w = _as_vector(weights)
    cuts, depths = _density_minima(density)
    edges, index = _drop_empty(w, cuts, depths)
    counts = np.bincount(index, minlength=edges.size + 1)
    values = _representatives(w, index, counts, edges, density, representative)
    return Basins(edges=edges, representatives=values.astype(dtype), counts=counts), index


def _density_minima(density: Density) -> tuple[np.ndarray, np.ndarray]:
    """Centres and values of the strict local minima (flat runs count once) of the density."""
    values, grid = density.values, density.grid
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change - 1, [values.size - 1]))
    level = values[starts]
    is_min = np.zeros(level.size, dtype=bool)
    is_min[1:-1] = (level[1:-1] < level[:-2]) & (level[1:-1] < level[2:])
    centres = 0.5 * (grid[starts[is_min]] + grid[ends[is_min]])
    return centres, level[is_min]


def _drop_empty(w: np.ndarray, cuts: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the non-empty basins (deepest cut between neighbours) and each weight's basin."""
    raw = _assign(w, cuts)
    counts = np.bincount(raw, minlength=cuts.size + 1)
    kept = np.flatnonzero(counts)
    if kept.size == counts.size:
        return cuts, raw
    segment = np.searchsorted(kept, np.arange(cuts.size), side="right") - 1  # kept[seg] <= cut < next
    candidates = np.flatnonzero((segment >= 0) & (segment < kept.size - 1))
    candidates = candidates[np.lexsort((depths[candidates], segment[candidates]))]
    first = np.ones(candidates.size, dtype=bool)
    first[1:] = segment[candidates[1:]] != segment[candidates[:-1]]
    renumber = np.cumsum(counts > 0) - 1
    return cuts[candidates[first]], renumber[raw]


def _representatives(
    w: np.ndarray,
    index: np.ndarray,
    counts: np.ndarray,
    edges: np.ndarray,
    density: Density,
    representative: str,
) -> np.ndarray:
    """One value per basin (float64), always inside the range of the basin's weights."""
    low = np.full(counts.size, np.inf)
    high = np.full(counts.size, -np.inf)
    np.minimum.at(low, index, w)
    np.maximum.at(high, index, w)
    values = np.bincount(index, weights=w, minlength=counts.size) / counts
    if representative == "mode":
        gid = np.searchsorted(edges, density.grid, side="right")
        order = np.lexsort((-density.values, gid))
        first = np.ones(order.size, dtype=bool)
        first[1:] = gid[order[1:]] != gid[order[:-1]]
        values[gid[order[first]]] = density.grid[order[first]]  # basins without grid points keep the mean
    return np.clip(values, low, high)


def _assign(w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``np.searchsorted(edges, w, side="right")``, in O(n) for many weights (lookup table + fix-up)."""
    if edges.size == 0:
        return np.zeros(w.size, dtype=np.intp)
    if w.size <= _SEARCHSORTED_MAX or edges.size == 1:
        return np.searchsorted(edges, w, side="right")
    span = float(edges[-1] - edges[0])
    cells = min(_LOOKUP_MAX_CELLS, math.ceil(span / max(float(np.diff(edges).min()), 1e-300)) + 1)
    width = span / cells if span > 0 else 1.0
    table = np.searchsorted(edges, edges[0] + width * np.arange(cells + 1), side="right")
    index = table[np.clip((w - edges[0]) / width, 0.0, cells).astype(np.intp)]
    bounds = np.concatenate(([-np.inf], edges, [np.inf]))  # basin b is bounds[b] <= w < bounds[b + 1]
    todo = np.flatnonzero(w < bounds[index])
    while todo.size:  # exact comparisons fix the table's guesses (off by a few at most)
        index[todo] -= 1
        todo = todo[w[todo] < bounds[index[todo]]]
    todo = np.flatnonzero(w >= bounds[index + 1])
    while todo.size:
        index[todo] += 1
        todo = todo[w[todo] >= bounds[index[todo] + 1]]
    return index
