"""analysis.kde: binned FFT KDE against scikit-learn, basins, snapping, bandwidths.

See docs/method.md, "Hashing".
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.neighbors import KernelDensity

from red_onnx.analysis import kde
from red_onnx.analysis.kde import (
    Basins,
    Density,
    KdeInputError,
    bandwidth_ladder,
    binned_kde,
    find_basins,
    hash_weights,
    scott_bandwidth,
    snap,
)
from red_onnx.errors import InputError

SETTINGS = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
#: |K''(u)| <= 1.62/h² · K_{√2·h}(u), so linear binning is off by at most 1.62·δ²/(8h²) of the peak;
#: the extra 1.25 covers the kernel's change across one cell (δ <= h/5).
BINNING_BOUND = 1.62 * 1.25 / 8


def mixture(seed: int, n: int) -> np.ndarray:
    """Three unequal, partly overlapping Gaussian modes (negative and positive values)."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n, [0.5, 0.2, 0.3])
    parts = [rng.normal(c, s, m) for c, s, m in zip((-3.0, 1.0, 4.0), (0.5, 0.2, 1.0), sizes, strict=True)]
    return np.concatenate(parts)


def planted(seed: int, k: int, per_mode: int, sigma: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``k`` Gaussian modes of width ``sigma``, 12-20 σ apart, around 0; returns (weights, centres)."""
    rng = np.random.default_rng(seed)
    centres = np.cumsum(rng.uniform(12.0, 20.0, k)) * sigma
    centres -= centres.mean()
    weights = np.concatenate([rng.normal(c, sigma, per_mode) for c in centres])
    return rng.permutation(weights), centres


def sklearn_density(weights: np.ndarray, h: float, points: np.ndarray) -> np.ndarray:
    model = KernelDensity(kernel="gaussian", bandwidth=h).fit(weights.reshape(-1, 1))
    return np.exp(model.score_samples(points.reshape(-1, 1)))


def basin_bounds(basins: Basins) -> np.ndarray:
    return np.concatenate(([-np.inf], basins.edges, [np.inf]))


# --- binned_kde ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [40, 500, 2000])
@pytest.mark.parametrize("h", [0.01, 0.05, 0.3, 1.5])
def test_binned_kde_matches_sklearn(n: int, h: float) -> None:
    weights = mixture(n, n)
    density = binned_kde(weights, h)
    step = float(density.grid[1] - density.grid[0])
    reference = sklearn_density(weights, h, density.grid)
    peak = float(reference.max())
    error = float(np.abs(density.values - reference).max())
    assert error <= 1e-2 * peak
    assert error <= BINNING_BOUND * (step / h) ** 2 * peak + 1e-12
    assert math.isclose(float(density.values.sum()) * step, 1.0, abs_tol=5e-3)
    assert density.bandwidth == h


def test_grid_covers_three_bandwidths_and_resolves_kernel() -> None:
    weights = mixture(0, 300)
    for h, grid_size in ((0.5, 2048), (1e-3, 2048), (0.5, 100)):
        density = binned_kde(weights, h, grid_size=grid_size)
        grid = density.grid
        assert grid.size >= grid_size
        assert grid[0] == pytest.approx(weights.min() - 3 * h)
        assert grid[-1] == pytest.approx(weights.max() + 3 * h)
        np.testing.assert_allclose(np.diff(grid), grid[1] - grid[0], rtol=1e-9)
        assert grid[1] - grid[0] <= h / kde.GRID_STEPS_PER_BANDWIDTH * (1 + 1e-9)
    assert binned_kde(weights, 1e-3).grid.size > 2048  # refined


def test_grid_cap_is_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kde, "MAX_GRID_SIZE", 4096)
    with caplog.at_level(logging.WARNING, logger="red_onnx.analysis.kde"):
        density = binned_kde(np.array([0.0, 1.0]), 1e-4)
    assert density.grid.size == 4096
    assert "capped" in caplog.text


def test_binned_kde_flattens_and_accepts_float32() -> None:
    weights = mixture(3, 600).reshape(4, 5, 30)
    as64 = binned_kde(weights, 0.1)
    as32 = binned_kde(weights.astype(np.float32), 0.1)
    flat = binned_kde(weights.ravel(), 0.1)
    np.testing.assert_array_equal(as64.values, flat.values)
    np.testing.assert_allclose(as32.values, as64.values, atol=1e-4 * as64.values.max())


def test_all_equal_weights_give_one_centred_gaussian() -> None:
    density = binned_kde(np.full(100, 0.25, dtype=np.float32), 0.1)
    step = float(density.grid[1] - density.grid[0])
    assert density.grid[np.argmax(density.values)] == pytest.approx(0.25, abs=step)
    np.testing.assert_allclose(density.values, density.values[::-1], atol=1e-6 * density.values.max())
    assert math.isclose(float(density.values.sum()) * step, 1.0, abs_tol=5e-3)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_bandwidth_raises(bandwidth: float) -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        binned_kde(np.arange(5.0), bandwidth)
    with pytest.raises(InputError):
        hash_weights(np.arange(5.0), bandwidth)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        binned_kde(np.array([]), 0.1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        binned_kde(np.array([0.0, np.nan]), 0.1)
    with pytest.raises(ValueError, match="grid_size"):
        binned_kde(np.arange(5.0), 0.1, grid_size=4)
    with pytest.raises(ValueError, match="representative"):
        hash_weights(np.arange(5.0), 0.1, representative="median")
    with pytest.raises(ValueError, match="too small"):
        binned_kde(np.full(2, 1e6), 1e-12, grid_size=8)


# --- basins and snap -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("representative", ["mean", "mode"])
def test_planted_modes_give_exactly_k_basins(k: int, representative: str) -> None:
    sigma = 0.05
    weights, centres = planted(10 + k, k, 3000, sigma)
    shaped = weights.astype(np.float32).reshape(k, 30, 100)
    snapped, basins = hash_weights(shaped, sigma, representative=representative)
    assert basins.counts.size == k
    assert basins.edges.size == k - 1
    assert np.all(np.abs(basins.representatives - centres) < 0.1 * sigma)
    assert np.all(basins.edges > centres[:-1] + 5 * sigma)
    assert np.all(basins.edges < centres[1:] - 5 * sigma)
    np.testing.assert_array_equal(basins.counts, np.full(k, 3000))
    assert snapped.shape == shaped.shape
    assert snapped.dtype == np.float32
    assert np.unique(snapped).size == k
    np.testing.assert_array_equal(snap(shaped, basins), snapped)


def test_find_basins_and_snap_compose_like_hash_weights() -> None:
    weights, _ = planted(1, 4, 500)
    density = binned_kde(weights, 0.03)
    basins = find_basins(weights, density, representative="mode")
    snapped, hashed = hash_weights(weights, 0.03, representative="mode")
    np.testing.assert_array_equal(hashed.edges, basins.edges)
    np.testing.assert_array_equal(hashed.representatives, basins.representatives)
    np.testing.assert_array_equal(snap(weights, basins), snapped)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    size=st.integers(1, 4000),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    offset=st.sampled_from([0.0, 1.0, 1e4]),
    decimals=st.sampled_from([None, 1, 3]),
    factor=st.floats(0.005, 2.0),
    representative=st.sampled_from(["mean", "mode"]),
)
def test_hash_weights_cell_assignment_equals_find_basins_on_the_same_density(
    seed: int, size: int, scale: float, offset: float, decimals: int | None, factor: float,
    representative: str,
) -> None:  # fmt: skip
    """hash_weights reads basins off the binning cells: bit for bit what the density's basins give."""
    values = np.random.default_rng(seed).standard_normal(size)
    if decimals is not None:  # many equal weights, some on cell edges
        values = np.round(values, decimals)
    weights = (offset + scale * values).astype(np.float32 if seed % 2 else np.float64)
    bandwidth = factor * scale
    try:
        density = binned_kde(weights, bandwidth)
    except KdeInputError:  # a bandwidth too fine for the offset: hash_weights refuses it as well
        with pytest.raises(KdeInputError):
            hash_weights(weights, bandwidth)
        return
    expected = find_basins(weights, density, representative=representative)
    snapped, basins = hash_weights(weights, bandwidth, representative=representative)
    np.testing.assert_array_equal(basins.edges, expected.edges)
    np.testing.assert_array_equal(basins.representatives, expected.representatives)
    np.testing.assert_array_equal(basins.counts, expected.counts)
    np.testing.assert_array_equal(snapped, snap(weights, expected))


def test_empty_gap_is_cut_at_its_centre() -> None:
    rng = np.random.default_rng(2)
    weights = np.concatenate([rng.normal(-100.0, 1.0, 500), rng.normal(100.0, 1.0, 500)])
    basins = hash_weights(weights, 1.0)[1]
    assert basins.counts.size == 2
    gap_centre = 0.5 * (weights[weights < 0].max() + weights[weights > 0].min())
    assert abs(float(basins.edges[0]) - gap_centre) < 1.0


def test_plateau_minimum_counts_once_at_its_centre() -> None:
    values = np.array([0.0, 2.0, 1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 0.5, 0.5, 3.0, 0.0])
    density = Density(grid=np.arange(values.size, dtype=np.float64), values=values, bandwidth=1.0)
    weights = np.array([0.5, 1.0, 5.5, 6.0, 6.5, 10.0, 11.0])
    basins = find_basins(weights, density)
    np.testing.assert_array_equal(basins.edges, [3.0, 8.5])  # runs 2..4 and 8..9; the ends are no minima
    np.testing.assert_array_equal(basins.counts, [2, 3, 2])
    np.testing.assert_allclose(basins.representatives, [0.75, 6.0, 10.5])


def test_empty_basins_are_dropped_keeping_the_deepest_cut() -> None:
    values = np.array([0.0, 3.0, 1.0, 2.0, 0.5, 2.0, 1.5, 3.0, 0.0])
    density = Density(grid=np.arange(values.size, dtype=np.float64), values=values, bandwidth=1.0)
    weights = np.array([0.5, 1.0, 7.0, 7.5])  # basins (2, 4) and (4, 6) are empty
    basins = find_basins(weights, density)
    np.testing.assert_array_equal(basins.edges, [4.0])
    np.testing.assert_array_equal(basins.counts, [2, 2])


def test_mode_representative_lies_inside_the_basin_range() -> None:
    weights = np.array([0.0, 0.001, 5.0])  # a lone weight: its mode is the weight itself
    for h in (0.01, 0.5):
        _, basins = hash_weights(weights, h, representative="mode")
        assert basins.counts.size == 2
        assert 0.0 <= basins.representatives[0] <= 0.001
        assert basins.representatives[1] == 5.0


def test_all_equal_weights_give_one_basin() -> None:
    weights = np.full((3, 7), -0.125, dtype=np.float32)
    for representative in ("mean", "mode"):
        snapped, basins = hash_weights(weights, 0.01, representative=representative)
        assert basins.counts.tolist() == [21]
        assert basins.edges.size == 0
        np.testing.assert_array_equal(snapped, weights)
        assert snapped.dtype == np.float32


def test_single_weight() -> None:
    snapped, basins = hash_weights(np.array([3.5]), 0.2)
    assert snapped.tolist() == [3.5]
    assert basins.counts.tolist() == [1]
    assert basins.representatives.tolist() == [3.5]


def test_negative_and_positive_weights() -> None:
    rng = np.random.default_rng(4)
    weights = np.concatenate([rng.normal(-0.5, 0.01, 400), rng.normal(0.5, 0.01, 400)])
    snapped, basins = hash_weights(weights, 0.01)
    assert basins.counts.tolist() == [400, 400]
    assert basins.representatives[0] < 0 < basins.representatives[1]
    assert abs(float(basins.edges[0])) < 0.1
    np.testing.assert_array_equal(np.sign(snapped), np.sign(weights))


def test_a_far_outlier_keeps_its_own_basin_among_many_weights() -> None:
    rng = np.random.default_rng(5)
    weights = rng.normal(0.0, 1.0, 200_000).astype(np.float32)
    weights[123] = 40.0
    snapped, basins = hash_weights(weights, 0.5)
    assert snapped[123] == 40.0
    assert basins.counts[-1] == 1


def test_fast_assignment_matches_searchsorted() -> None:
    rng = np.random.default_rng(6)
    edges = np.unique(np.round(rng.normal(0.0, 1.0, 500), 3))
    edges = np.concatenate((edges, edges[-1] + np.array([1e-12, 1e-9])))  # edges closer than the table
    weights = np.concatenate([rng.normal(0.0, 1.5, 100_000), edges, np.nextafter(edges, -np.inf), [-9, 9]])
    expected = np.searchsorted(edges, weights, side="right")
    np.testing.assert_array_equal(kde._assign(weights, edges), expected)


# --- properties ----------------------------------------------------------------------------------

ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
    elements=st.floats(-10.0, 10.0, width=32),
)


@SETTINGS
@given(weights=ARRAYS, bandwidth=st.floats(1e-3, 5.0), representative=st.sampled_from(["mean", "mode"]))
def test_snap_properties(weights: np.ndarray, bandwidth: float, representative: str) -> None:
    snapped, basins = hash_weights(weights, bandwidth, representative=representative)
    flat, out = weights.ravel().astype(np.float64), snapped.ravel().astype(np.float64)
    assert snapped.shape == weights.shape and snapped.dtype == weights.dtype
    assert np.all(np.diff(basins.edges) > 0)
    assert basins.representatives.size == basins.counts.size == basins.edges.size + 1
    assert np.all(basins.counts > 0) and basins.counts.sum() == weights.size
    assert set(out.tolist()) <= set(basins.representatives.astype(np.float64).tolist())
    assert np.unique(snapped).size == basins.counts.size
    bounds = basin_bounds(basins)
    index = np.searchsorted(basins.edges, flat, side="right")
    assert np.all((bounds[index] <= flat) & (flat < bounds[index + 1]))
    np.testing.assert_array_equal(out, basins.representatives[index].astype(np.float64))
    np.testing.assert_array_equal(np.bincount(index, minlength=basins.counts.size), basins.counts)
    low = np.full(basins.counts.size, np.inf)
    high = np.full(basins.counts.size, -np.inf)
    np.minimum.at(low, index, flat)
    np.maximum.at(high, index, flat)
    assert np.all(np.abs(out - flat) <= (high - low)[index])
    np.testing.assert_array_equal(snap(weights, basins), snapped)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 5),
    per_mode=st.integers(20, 300),
    sigma=st.floats(0.01, 3.0),
    factors=st.lists(st.floats(0.05, 4.0), min_size=2, max_size=4, unique=True),
)
def test_smaller_bandwidth_never_gives_fewer_basins(
    seed: int, k: int, per_mode: int, sigma: float, factors: list[float]
) -> None:
    weights, _ = planted(seed, k, per_mode, sigma)
    counts = [hash_weights(weights, f * sigma)[1].counts.size for f in sorted(factors)]
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert counts[-1] >= 1


# --- bandwidths ----------------------------------------------------------------------------------


def test_scott_bandwidth_on_standard_normal() -> None:
    for n in (1000, 20_000):
        weights = np.random.default_rng(n).normal(size=n)
        assert scott_bandwidth(weights) == pytest.approx(1.06 * n**-0.2, rel=0.05)
    assert scott_bandwidth(np.full(10, 2.0)) > 0


def test_bandwidth_ladder_sample_shortcut_matches_the_full_sort() -> None:
    """Above GAP_SAMPLE weights the gap is first taken on a sample; the lowest rung is the full sort's."""
    rng = np.random.default_rng(8)
    continuous = rng.normal(0.0, 0.02, kde.GAP_SAMPLE * 3)
    coarse = np.round(continuous * 1e4) / 1e4  # few distinct values: the gap (1e-4) beats 1e-3·σ = 2e-5
    for weights in (continuous, coarse):
        distinct = np.unique(weights)
        gap = float(np.median(np.diff(distinct)))
        expected = min(
            max(kde.LADDER_STD_FRACTION * weights.std(), gap), kde.LADDER_MAX_LOW * scott_bandwidth(weights)
        )
        assert bandwidth_ladder(weights)[0] == pytest.approx(expected, rel=1e-12)
    assert bandwidth_ladder(coarse)[0] == pytest.approx(1e-4, rel=1e-6)


def test_bandwidth_ladder_is_increasing_and_ends_at_scott() -> None:
    rng = np.random.default_rng(7)
    for weights in (rng.normal(0.0, 0.02, 50_000), rng.normal(0.0, 1.0, 30), np.full(8, 1.0)):
        ladder = bandwidth_ladder(weights)
        assert ladder.size == 12
        assert np.all(np.diff(ladder) > 0)
        assert ladder[-1] == scott_bandwidth(weights)
        assert ladder[0] <= kde.LADDER_MAX_LOW * ladder[-1] * (1 + 1e-12)
    weights = rng.normal(0.0, 0.02, 50_000)
    assert bandwidth_ladder(weights)[0] == pytest.approx(1e-3 * weights.std())  # the gap is far smaller
    assert bandwidth_ladder(weights, count=1).tolist() == [scott_bandwidth(weights)]
    with pytest.raises(ValueError, match="count"):
        bandwidth_ladder(weights, count=0)
