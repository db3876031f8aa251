"""Gaussian kernel density of a layer's weights and its basins: the core of weight hashing.

docs/method.md, "Hashing": estimate the density of the weights with a Gaussian kernel of bandwidth
``h``, cut the weight axis at the local minima of that density, and replace every weight by one value
per basin (the basin's mean, or its mode). Pure numpy, O(n + G log G) for n weights and a G-point grid:

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
  are dropped; of the cuts between two kept basins the deepest one is kept. ``hash_weights`` reads a
  weight's basin off its binning cell and compares only the weights of the few cells a cut may cross
  (``_cell_basins``); the result is the same.

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
_EPS = float(np.finfo(np.float64).eps)
#: Most weights whose per-cell counts ``_basin_counts`` takes from the binned shares (exact up to here).
_CELL_COUNT_MAX = 2**24


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
    return _bin(weights, bandwidth, grid_size).density


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

    The same results as those three, faster: the binning's grid cell of each weight is reused to
    assign it to its basin (an exact comparison only near the cuts, see ``_cell_basins``).

    Returns:
        The snapped weights (same shape, float dtype kept) and the basins.
    """
    array = np.asarray(weights)
    binned = _bin(array, bandwidth, grid_size)
    _check_representative(representative)
    basins, index = _cell_basins(binned, representative, _float_dtype(array.dtype))
    return basins.representatives[index].reshape(array.shape), basins


def scott_bandwidth(weights: np.ndarray) -> float:
    """Scott's rule ``1.06·σ·n^(-1/5)`` (sample σ); far too wide for trained weights (module doc).

    When all weights are equal (σ = 0) any bandwidth gives one basin; returns
    ``1e-3·max(|w|, 1)`` so callers still get a usable positive value.
    """
    flat = np.asarray(weights).reshape(-1)
    return _scott(flat, _spreads(flat)[1])


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
    flat = np.asarray(weights).reshape(-1)
    population, sample = _spreads(flat)
    high = _scott(flat, sample)
    if count == 1:
        return np.array([high])
    floor = LADDER_STD_FRACTION * population
    low = max(floor, _distinct_gap(flat, floor))
    low = min(low, LADDER_MAX_LOW * high) if low > 0 else LADDER_MAX_LOW * high
    return np.geomspace(low, high, count)


# --- bandwidth internals -------------------------------------------------------------------------


def _spreads(flat: np.ndarray) -> tuple[float, float]:
    """``np.std`` and ``np.std(ddof=1)`` (0.0 for one weight) of the flat weights as float64, bit for bit.

    numpy's ``_var`` operations (pairwise sum, mean, squared deviations, pairwise sum), done once for both,
    in the float64 copy of the weights when there is one.

    Raises:
        KdeInputError: empty, or NaN or infinite weights.
    """
    if flat.size == 0:
        _as_vector(flat)  # raises
    w = flat.astype(np.float64, copy=False)
    total = np.add.reduce(w, keepdims=True)
    if not np.isfinite(total[0]):  # NaN or infinite weights, or finite ones whose sum overflows
        _as_vector(w)  # raises on the former
    deviations = np.subtract(w, total / np.intp(w.size), out=None if w is flat else w)
    np.square(deviations, out=deviations)
    squares = np.add.reduce(deviations)
    population = float(np.sqrt(squares / np.intp(w.size)))
    return population, float(np.sqrt(squares / np.intp(w.size - 1))) if w.size > 1 else 0.0


def _scott(flat: np.ndarray, sigma: float) -> float:
    """Scott's rule for the flat weights of sample standard deviation ``sigma`` (see ``scott_bandwidth``)."""
    if sigma > 0:
        return 1.06 * sigma * flat.size ** (-0.2)
    return 1e-3 * max(abs(float(flat[0])), 1.0)


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


# --- KDE internals -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binned:
    """A density with what the binning learnt about each weight (for ``_cell_basins``)."""

    density: Density
    weights: np.ndarray  # flat, float32 or float64 (exact as float64)
    cells: np.ndarray  # grid cell of each weight: c with grid[c] <= w < grid[c + 1] up to rounding
    filling: np.ndarray  # per cell (G - 1): its weights' summed shares, > 0 iff it holds weights
    slack: float  # rounding slack of ``cells``: see ``_cell_cut_counts``
    scratch: tuple[np.ndarray, np.ndarray]  # two float64 work arrays of the weights' size, free for reuse


def _bin(weights: np.ndarray, bandwidth: float, grid_size: int) -> _Binned:
    """``binned_kde``, keeping each weight's grid cell."""
    w, smallest, largest = _finite_vector(weights)
    h = _check_bandwidth(bandwidth)
    lo, hi = smallest - GRID_MARGIN * h, largest + GRID_MARGIN * h
    size = _grid_size(hi - lo, h, grid_size)
    step = (hi - lo) / (size - 1)
    if not step > 0 or lo + step == lo or hi - step == hi:
        raise KdeInputError(
            f"bandwidth {h:g} is too small next to weights of magnitude {max(abs(lo), abs(hi)):g} "
            "for float64 arithmetic; use a larger bandwidth"
        )
    grid = lo + step * np.arange(size, dtype=np.float64)
    last_position = (largest - lo) / step  # the largest weight's grid position, as _linear_bin computes it
    mass, cells, filling, scratch = _linear_bin(w, lo, step, size, clip=last_position >= size - 1)
    density = Density(grid=grid, values=_smooth(mass, step, h), bandwidth=h)
    return _Binned(density, w, cells, filling, 8.0 * _EPS * (abs(lo) + abs(hi)), scratch)


def _finite_vector(weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``weights`` flattened (float32 and float64 kept, others to float64), its min and max.

    Raises:
        KdeInputError: empty, or NaN or infinite values (as float64).
    """
    w = np.asarray(weights).reshape(-1)
    if w.size == 0:
        raise KdeInputError("cannot estimate the density of an empty weight array; pass at least one value")
    if w.dtype != np.float32 and w.dtype != np.float64:
        w = w.astype(np.float64)
    smallest, largest = float(w.min()), float(w.max())  # NaN propagates; inf is the min or the max
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        _as_vector(w)  # raises with the count of bad weights
    return w, smallest, largest


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


def _check_representative(representative: str) -> None:
    if representative not in REPRESENTATIVES:
        raise KdeInputError(f"unknown basin representative {representative!r}; use one of {REPRESENTATIVES}")


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


def _linear_bin(
    w: np.ndarray, lo: float, step: float, size: int, *, clip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Mass fractions on the grid (each weight split linearly between its two neighbours).

    ``lo <= min(w)``, so every position ``(w - lo) / step`` is >= 0; ``clip`` (the largest position
    reaches the last grid point) puts the weights there in the last cell with all their mass on the right.

    Returns:
        The masses (G), each weight's cell (its left grid point, <= G - 2), the summed shares of each
        cell's weights (G - 1; see ``_basin_counts``), and the two float64 work arrays used (free for reuse).
    """
    position = np.subtract(w, lo, dtype=np.float64)
    position /= step
    floor = np.floor(position)
    cells = floor.astype(np.intp)
    right_share = np.subtract(position, floor, out=position)  # exact (x - floor(x) for x >= 0)
    if clip:
        past = np.flatnonzero(cells > size - 2)
        cells[past] = size - 2
        right_share[past] = 1.0
    on_right = np.bincount(cells, weights=right_share, minlength=size)
    # float64 with weights, though bincount's stubs say intp
    mass: np.ndarray = np.bincount(
        cells, weights=np.subtract(1.0, right_share, out=right_share), minlength=size
    )
    filling = mass[:-1] + on_right[:-1]  # a weight gives 1 - r > 0, or r = 1, to its own cell
    mass[1:] += on_right[:-1]
    mass /= w.size
    return mass, cells, filling, (position, floor)


def _smooth(mass: np.ndarray, step: float, h: float) -> np.ndarray:
    """``mass`` convolved with the Gaussian sampled at the grid step (zero-padded real FFT)."""
    size = mass.size
    reach = min(size - 1, math.ceil(KERNEL_REACH * h / step))
    offsets = np.arange(-reach, reach + 1, dtype=np.float64) * (step / h)
    kernel = np.exp(-0.5 * offsets**2) / (h * math.sqrt(2.0 * math.pi))
    n_fft = 1 << (size + 2 * reach - 1).bit_length()  # >= full convolution length size + 2·reach
    spectrum = np.fft.rfft(mass, n_fft) * np.fft.rfft(kernel, n_fft)
    values = np.fft.irfft(spectrum, n_fft)[reach : reach + size]
    floor = NOISE_FLOOR_FACTOR * _EPS * np.linalg.norm(mass) * np.linalg.norm(kernel)
    values[values < floor] = 0.0
    return values


# --- basin internals -----------------------------------------------------------------------------


def _basins_and_index(
    weights: np.ndarray, density: Density, representative: str
) -> tuple[Basins, np.ndarray]:
    """The non-empty basins of ``weights`` and each weight's basin index (any density)."""
    _check_representative(representative)
    dtype = _float_dtype(np.asarray(weights).dtype)
    w = _as_vector(weights)
    cuts, depths = _density_minima(density)
    raw = _assign(w, cuts)
    edges, renumber = _kept_edges(cuts, depths, np.bincount(raw, minlength=cuts.size + 1) > 0)
    index = raw if renumber is None else renumber[raw]
    counts = np.bincount(index, minlength=edges.size + 1)
    low = np.full(counts.size, np.inf)
    high = np.full(counts.size, -np.inf)
    np.minimum.at(low, index, w)
    np.maximum.at(high, index, w)
    values = _representatives(w, index, counts, edges, density, representative)
    values = np.clip(values, low, high)
    return Basins(edges=edges, representatives=values.astype(dtype), counts=counts), index


def _cell_basins(binned: _Binned, representative: str, dtype: np.dtype) -> tuple[Basins, np.ndarray]:
    """``_basins_and_index`` for the weights just binned, from their grid cells.

    A cell no cut can fall in (up to rounding) gives its weights' basin without looking at them; only the
    weights of the cells that a cut may cross, and of the occupied cells next to those and at both ends
    (where every basin's smallest and largest weight lie), are compared with the cuts one by one.
    """
    w, cells = binned.weights, binned.cells
    cuts, depths = _density_minima(binned.density)
    first, last = _cell_cut_counts(binned.density.grid, cuts, binned.slack)
    code = np.where(_special_cells(first, last, binned.filling > 0), -1, first)
    index = np.take(code, cells, out=binned.scratch[0].view(np.intp), mode="clip")  # in range: no checks
    picked = np.flatnonzero(index < 0)
    picked_weights = w[picked].astype(np.float64)
    picked_index = _cut_index(picked_weights, cells[picked], first, last, cuts)
    index[picked] = picked_index
    counts = _basin_counts(binned.filling, code, index, picked_index, cuts.size + 1)
    edges, renumber = _kept_edges(cuts, depths, counts > 0)
    if renumber is not None:  # empty basins (rare: a gap between groups of weights)
        index, counts, picked_index = renumber[index], counts[counts > 0], renumber[picked_index]
    low = np.full(counts.size, np.inf)
    high = np.full(counts.size, -np.inf)
    np.minimum.at(low, picked_index, picked_weights)
    np.maximum.at(high, picked_index, picked_weights)
    if w.dtype != np.float64:  # bincount would make the float64 copy; reuse a work array
        np.copyto(binned.scratch[1], w)
        w = binned.scratch[1]
    values = np.clip(_representatives(w, index, counts, edges, binned.density, representative), low, high)
    return Basins(edges=edges, representatives=values.astype(dtype), counts=counts), index


def _cell_cut_counts(grid: np.ndarray, cuts: np.ndarray, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, how many cuts are <= all of its weights (``first``) and <= some of them, at most (``last``).

    A weight ``w`` of cell ``c`` (``floor(fl(fl(w - lo) / step))``) lies in ``[grid[c], grid[c + 1]]`` but for
    rounding: ``w - lo`` and the division are each off by at most ``u = eps/2`` relatively, and so is the
    computed ``grid[c]``, which moves ``w`` off its cell by at most ``5·u·(|lo| + |hi|)``; the cells are
    widened by ``slack = 16·u·(|lo| + |hi|)``, the first and last to infinity (the clipped weights).
    """
    lower = grid[:-1] - slack
    upper = grid[1:] + slack
    lower[0], upper[-1] = -np.inf, np.inf
    counts = []
    for bounds in (lower, upper):  # cut c is <= bounds[j] for j >= searchsorted(bounds, c, "left")
        reached = np.bincount(np.searchsorted(bounds, cuts, side="left"), minlength=bounds.size + 1)
        counts.append(np.cumsum(reached[:-1]))
    return counts[0], counts[1]


def _basin_counts(
    filling: np.ndarray, code: np.ndarray, index: np.ndarray, picked_index: np.ndarray, size: int
) -> np.ndarray:
    """Weights per basin of the cuts (``np.bincount(index)``), from the cells' weights when they are exact.

    A cell's ``filling`` sums ``1 - r`` (rounded: off by ``u = eps/2`` at most) and ``r`` over its ``m``
    weights; both sums are off by at most ``(m - 1)·u·m`` (sequential summation of terms <= 1), so the total
    is within ``2·m²·u + 3·m·u < 1/8`` of ``m`` for ``m <= 2**24``, and rounds to it exactly.
    """
    if index.size > _CELL_COUNT_MAX:
        return np.bincount(index, minlength=size)
    sure = code >= 0
    counts = np.bincount(code[sure], weights=np.rint(filling[sure]), minlength=size).astype(np.intp)
    return counts + np.bincount(picked_index, minlength=size)


def _special_cells(first: np.ndarray, last: np.ndarray, occupied: np.ndarray) -> np.ndarray:
    """Cells whose weights ``_cell_basins`` compares one by one (a bool per cell).

    The cells a cut may cross, and the nearest occupied cells on either side of those and at both ends of
    the axis: a basin's smallest (largest) weight is in the cells of the cut below (above) it or in the
    first occupied cell past them, and all weights of equal value share a cell.
    """
    special = last > first
    filled = np.flatnonzero(occupied)
    crossed = np.flatnonzero(special)
    after = np.searchsorted(filled, crossed, side="right")
    before = np.searchsorted(filled, crossed, side="left") - 1
    special[filled[after[after < filled.size]]] = True
    special[filled[before[before >= 0]]] = True
    special[filled[[0, -1]]] = True
    return special


def _cut_index(
    w: np.ndarray, cells: np.ndarray, first: np.ndarray, last: np.ndarray, cuts: np.ndarray
) -> np.ndarray:
    """``np.searchsorted(cuts, w, side="right")`` for float64 weights ``w`` of grid cells ``cells``."""
    index = first[cells]
    crossing = last[cells] - index
    one = np.flatnonzero(crossing == 1)  # the one cut a cell may hold: compare with it
    index[one] += w[one] >= cuts[index[one]]
    many = np.flatnonzero(crossing > 1)  # only when the slack exceeds the step (huge |w| next to h)
    index[many] = np.searchsorted(cuts, w[many], side="right")
    return index


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


def _kept_edges(
    cuts: np.ndarray, depths: np.ndarray, occupied: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Edges of the ``occupied`` basins (deepest cut between neighbours) and the basins' new numbers.

    Returns:
        The edges, and per basin of ``cuts`` its number among the occupied ones (``None``: all are).
    """
    kept = np.flatnonzero(occupied)
    if kept.size == occupied.size:
        return cuts, None
    segment = np.searchsorted(kept, np.arange(cuts.size), side="right") - 1  # kept[seg] <= cut < next
    candidates = np.flatnonzero((segment >= 0) & (segment < kept.size - 1))
    candidates = candidates[np.lexsort((depths[candidates], segment[candidates]))]
    first = np.ones(candidates.size, dtype=bool)
    first[1:] = segment[candidates[1:]] != segment[candidates[:-1]]
    return cuts[candidates[first]], np.cumsum(occupied) - 1


def _representatives(
    w: np.ndarray,
    index: np.ndarray,
    counts: np.ndarray,
    edges: np.ndarray,
    density: Density,
    representative: str,
) -> np.ndarray:
    """One value per basin (float64), before clipping into the range of the basin's weights."""
    values = np.bincount(index, weights=w, minlength=counts.size) / counts
    if representative == "mode":
        gid = np.searchsorted(edges, density.grid, side="right")
        order = np.lexsort((-density.values, gid))
        first = np.ones(order.size, dtype=bool)
        first[1:] = gid[order[1:]] != gid[order[:-1]]
        values[gid[order[first]]] = density.grid[order[first]]  # basins without grid points keep the mean
    return values


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
