"""``red_onnx.analysis.similarity``: distances, neighbour candidates, merge resolution and per-atom MACs.

Pure analysis tests: groups are built directly as :class:`AtomParams` (rows with planted
near-duplicates at known noise levels among random rows), or taken from the channel analysis of
small graphs whose MACs ``red_onnx.measure.metrics.measure`` counts independently.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
from graphs import Net, depthwise_m1, residual_identity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from red_onnx.analysis import similarity
from red_onnx.analysis.redundancy import AtomParams, Merge
from red_onnx.analysis.similarity import Candidates, atom_macs, near_candidates, pair_distance, resolve_merges
from red_onnx.io import graph as graph_utils
from red_onnx.measure import metrics
from red_onnx.options import InputSpec
from red_onnx.passes.merge_near import analyse_model
from red_onnx.runtime.shapes import ShapeService
from red_onnx.verify.inputs import make_inputs


def _params(
    scaled: np.ndarray, equal: np.ndarray | None = None, signature: np.ndarray | None = None
) -> AtomParams:
    n = scaled.shape[0]
    equal = np.zeros((n, 0)) if equal is None else equal
    signature = np.zeros(n, np.int64) if signature is None else signature
    return AtomParams(np.asarray(scaled, np.float64), np.asarray(equal, np.float64), signature)


def _idx(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


# ----------------------------------------------------------------------------------------------
# pair_distance


def test_exact_positive_multiples_have_their_scale_and_zero_distance() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 10))
    scaled = np.vstack([base, 2.0 * base[0], 0.25 * base[1], 1.0 * base[2]])
    params = _params(scaled, equal=np.tile(rng.standard_normal(4), (6, 1)))
    scale, distance = pair_distance(params, _idx(3, 4, 5), _idx(0, 1, 2), homogeneous=True)
    np.testing.assert_allclose(scale, [2.0, 0.25, 1.0], rtol=1e-12)
    np.testing.assert_allclose(distance, 0.0, atol=1e-7)


def test_blocked_pairs_equal_one_direct_computation() -> None:
    """``pair_distance`` gathers PAIR_CHUNK pairs at a time; more pairs than that give the plain formula."""
    rng = np.random.default_rng(11)
    scaled = rng.standard_normal((40, 30))
    scaled[20:] = scaled[:20] * rng.uniform(0.5, 2.0, (20, 1)) + 0.05 * rng.standard_normal((20, 30))
    params = _params(scaled)
    count = 3 * similarity.PAIR_CHUNK + 5
    source, target = rng.integers(0, 40, count), rng.integers(0, 40, count)
    scale, distance = pair_distance(params, source, target, homogeneous=True)
    s_j, s_i = scaled[source], scaled[target]
    expected_scale = np.einsum("ij,ij->i", s_j, s_i) / np.einsum("ij,ij->i", s_i, s_i)
    residual = s_j - expected_scale[:, None] * s_i
    expected = np.sqrt(np.einsum("ij,ij->i", residual, residual) / np.einsum("ij,ij->i", s_j, s_j))
    expected[expected_scale <= 0] = np.inf
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-12)
    np.testing.assert_allclose(distance, expected, rtol=1e-10)


def test_scale_is_the_projection_coefficient() -> None:
    rng = np.random.default_rng(1)
    scaled = rng.standard_normal((6, 12))
    scaled[3:] = np.abs(scaled[3:]) + 0.1  # rows 3..5 mutually positive: λ > 0
    scaled[:3] = scaled[3:] * [[1.5], [0.7], [3.0]] + 0.2 * rng.standard_normal((3, 12))
    params = _params(scaled)
    source, target = _idx(0, 1, 2), _idx(3, 4, 5)
    scale, distance = pair_distance(params, source, target, homogeneous=True)
    s_j, s_i = scaled[source], scaled[target]
    expected = (s_j * s_i).sum(1) / (s_i * s_i).sum(1)
    np.testing.assert_allclose(scale, expected, rtol=1e-12)
    residual = np.linalg.norm(s_j - expected[:, None] * s_i, axis=1) / np.linalg.norm(s_j, axis=1)
    np.testing.assert_allclose(distance, residual, rtol=1e-12)
    assert (distance > 0).all()


def test_non_homogeneous_scale_is_one() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((2, 8))
    params = _params(np.vstack([base, 2.0 * base[0], base[1]]))
    scale, distance = pair_distance(params, _idx(2, 3), _idx(0, 1), homogeneous=False)
    np.testing.assert_array_equal(scale, [1.0, 1.0])
    # 2·s vs s with λ fixed at 1: residual ‖s‖, relative to ‖2s‖ = 1/2
    np.testing.assert_allclose(distance, [0.5, 0.0], atol=1e-12)


def test_negative_scale_and_other_signature_are_infinitely_far() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 8))
    scaled = np.vstack([base, -2.0 * base[0], base[1] + 1e-3])
    params = _params(scaled, signature=_idx(0, 0, 0, 1))
    _, distance = pair_distance(params, _idx(2, 3), _idx(0, 1), homogeneous=True)
    assert np.isinf(distance).all()
    # the same pairs, same signature, are finite (the negative one still infinite)
    _, distance = pair_distance(_params(scaled), _idx(2, 3), _idx(0, 1), homogeneous=True)
    assert np.isinf(distance[0]) and distance[1] < 1e-2


def test_equal_part_enters_the_distance_hand_computed() -> None:
    scaled = np.array([[1.0, 0.0], [2.0, 0.5], [0.0, 3.0]])
    equal = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])  # row norms 5, 1, 2: median 2
    params = _params(scaled, equal)
    scale, distance = pair_distance(params, _idx(1), _idx(0), homogeneous=True)
    # λ = <(2, .5), (1, 0)> / 1 = 2; residual (0, .5): .25 / ‖s_j‖² = .25 / 4.25
    # equal gap (0, 1) - (3, 4) = (-3, -3): 18 / 2² = 4.5
    assert scale[0] == pytest.approx(2.0)
    assert distance[0] == pytest.approx(math.sqrt(0.25 / 4.25 + 4.5), rel=1e-12)
    # non-homogeneous: λ = 1, residual (1, .5): 1.25 / 4.25
    _, flat = pair_distance(params, _idx(1), _idx(0), homogeneous=False)
    assert flat[0] == pytest.approx(math.sqrt(1.25 / 4.25 + 4.5), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# near_candidates

#: (source, target, λ, noise) planted in the group of :func:`_planted_group`.
PLANTED = ((20, 3, 2.0, 1e-5), (21, 7, 0.5, 1e-4), (22, 11, 1.0, 1e-3), (23, 15, 4.0, 1e-2))


def _planted_group(seed: int = 0, n: int = 30, dim: int = 24) -> np.ndarray:
    """Random rows; rows 20..23 = λ·row i + noise·‖row i‖·unit (noise levels 10× apart)."""
    rng = np.random.default_rng(seed)
    scaled = rng.standard_normal((n, dim))
    for j, i, lam, noise in PLANTED:
        direction = rng.standard_normal(dim)
        direction /= np.linalg.norm(direction)
        scaled[j] = lam * scaled[i] + noise * lam * np.linalg.norm(scaled[i]) * direction
    return scaled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_pairs_come_first_sorted_with_the_right_target(seed: int) -> None:
    scaled = _planted_group(seed)
    found = near_candidates(_params(scaled), True, np.ones(len(scaled), bool))
    first = 2 * len(PLANTED)  # both directions of each planted pair
    partner = {j: i for j, i, _, _ in PLANTED} | {i: j for j, i, _, _ in PLANTED}
    assert set(found.source[:first].tolist()) == set(partner)
    for src, tgt in zip(found.source[:first], found.target[:first], strict=True):
        assert partner[int(src)] == int(tgt)
    assert (np.diff(found.cost) >= 0).all()  # ranked by cost = d · ‖s_j‖ (· ‖V_j‖ when known)
    np.testing.assert_allclose(found.cost, found.distance * np.linalg.norm(scaled[found.source], axis=1))
    assert found.distance[:first].max() < 0.05 < found.distance[first:].min()
    # pairs come in the order of their noise levels; λ recovered (both ways)
    lams = {j: lam for j, _, lam, _ in PLANTED} | {i: 1 / lam for j, i, lam, _ in PLANTED}
    pair_rank = [next(k for k, p in enumerate(PLANTED) if int(s) in p[:2]) for s in found.source[:first]]
    assert pair_rank == sorted(pair_rank)
    np.testing.assert_allclose(found.scale[:first], [lams[int(s)] for s in found.source[:first]], rtol=0.03)


def test_consumer_weight_norms_weigh_the_ranking() -> None:
    rng = np.random.default_rng(4)
    scaled = rng.standard_normal((16, 12))
    for j, i, noise in ((14, 0, 1e-4), (15, 1, 1e-3)):
        scaled[j] = scaled[i] + noise * np.linalg.norm(scaled[i]) * rng.standard_normal(12) / np.sqrt(12)
    outgoing = np.ones(16)
    outgoing[[0, 14]] = 100.0  # the closer pair feeds much heavier consumer weights
    params = AtomParams(scaled, np.zeros((16, 0)), np.zeros(16, np.int64), outgoing)
    found = near_candidates(params, True, np.ones(16, bool))
    assert set(found.source[:2].tolist()) == {1, 15} and set(found.source[2:4].tolist()) == {0, 14}
    assert found.distance[0] > found.distance[2]  # ranked by cost, not by distance alone
    norms = np.linalg.norm(scaled[found.source], axis=1)
    np.testing.assert_allclose(found.cost, found.distance * norms * outgoing[found.source])


def _first_targets(found: Candidates) -> dict[int, int]:
    """Each source's first (cheapest) target: the entry ``resolve_merges`` uses unless it makes a cycle."""
    best: dict[int, int] = {}
    for source, target in zip(found.source.tolist(), found.target.tolist(), strict=True):
        best.setdefault(source, target)
    return best


def test_no_pair_twice_and_finite_distances() -> None:
    scaled = _planted_group(5)
    signature = np.zeros(len(scaled), np.int64)
    signature[23] = 1  # alone in its class: nothing may merge with it
    found = near_candidates(_params(scaled, signature=signature), True, np.ones(len(scaled), bool))
    pairs = set(zip(found.source.tolist(), found.target.tolist(), strict=True))
    assert len(pairs) == len(found.source)  # a source appears once per neighbour, never twice for one
    assert (found.source != found.target).all()
    assert np.isfinite(found.distance).all() and (found.scale > 0).all()
    assert 23 not in found.source and 23 not in found.target


def test_ineligible_atoms_never_appear() -> None:
    scaled = _planted_group(6)
    eligible = np.ones(len(scaled), bool)
    eligible[[3, 21]] = False  # one end of two planted pairs
    found = near_candidates(_params(scaled), True, eligible)
    used = set(found.source.tolist()) | set(found.target.tolist())
    assert not used & {3, 21}
    # the two intact planted pairs still come first; the broken ones lost their partner
    assert set(found.source[:4].tolist()) == {11, 22, 15, 23}
    assert found.distance[4:].min() > 0.05


def test_equal_part_decides_between_equally_close_rows() -> None:
    rng = np.random.default_rng(7)
    scaled = rng.standard_normal((12, 16))
    scaled[1] = scaled[0] * (1 + 1e-6)  # scaled part identical up to rounding ...
    scaled[2] = scaled[0] + 1e-3 * rng.standard_normal(16)
    equal = np.tile(rng.standard_normal(3), (12, 1)) + 0.01 * rng.standard_normal((12, 3))
    equal[1] += 5.0  # ... but a very different equal part
    equal[2] = equal[0]
    found = near_candidates(_params(scaled, equal), True, np.ones(12, bool))
    best = _first_targets(found)
    assert best[0] == 2 and best[2] == 0


def test_non_homogeneous_group_merges_with_unit_scale() -> None:
    scaled = _planted_group(8)
    found = near_candidates(_params(scaled), False, np.ones(len(scaled), bool))
    np.testing.assert_array_equal(found.scale, 1.0)
    best = _first_targets(found)
    assert best[22] == 11 and best[11] == 22  # the λ = 1 pair is still a pair


def test_two_atoms_and_fewer_than_two_eligible() -> None:
    scaled = np.array([[1.0, 2.0, 3.0], [1.1, 2.0, 2.9]])
    found = near_candidates(_params(scaled), True, np.ones(2, bool))
    assert sorted(zip(found.source.tolist(), found.target.tolist(), strict=True)) == [(0, 1), (1, 0)]
    assert (found.distance < 0.1).all()
    one = near_candidates(_params(scaled), True, np.array([True, False]))
    assert len(one) == 0 and one.source.dtype.kind == "i"
    single = near_candidates(_params(scaled[:1]), True, np.ones(1, bool))
    assert len(single) == 0


def test_identical_rows_never_target_themselves() -> None:
    rng = np.random.default_rng(0)
    scaled = rng.standard_normal((6, 4))
    scaled[1] = scaled[0]
    found = near_candidates(_params(scaled), True, np.ones(6, bool))
    assert (found.source != found.target).all(), list(zip(found.source, found.target, strict=True))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 700), d=st.integers(1, 12), k=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_nearest_matches_a_float64_sort(n: int, d: int, k: int, seed: int) -> None:
    """The blocked matrix-product search finds each row's k nearest others, nearest first (ties aside)."""
    k = min(k, n - 1)
    features = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    found = similarity._nearest(features, k)
    exact = ((features[:, None, :].astype(np.float64) - features[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(exact, np.inf)
    assert found.shape == (n, k) and (found != np.arange(n)[:, None]).all()
    got = np.take_along_axis(exact, found, axis=1)
    want = np.sort(exact, axis=1)[:, :k]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # the same distances, in order


def test_nearest_breaks_exact_ties_by_row() -> None:
    rows = np.repeat(np.random.default_rng(3).standard_normal((3, 5)).astype(np.float32), 3, axis=0)
    found = similarity._nearest(rows, 2)
    assert found[:3].tolist() == [[1, 2], [0, 2], [0, 1]]


# ----------------------------------------------------------------------------------------------
# resolve_merges


def _cands(rows: list[tuple[int, int, float]]) -> Candidates:
    """Candidates in the given order (any ranking field besides these four is zero)."""
    columns = list(zip(*rows, strict=True)) if rows else [(), (), ()]
    given = {
        "source": np.asarray(columns[0], np.int64),
        "target": np.asarray(columns[1], np.int64),
        "scale": np.asarray(columns[2], float),
    }
    fields = {f.name: given.get(f.name, np.zeros(len(rows))) for f in dataclasses.fields(Candidates)}
    return Candidates(**fields)


def test_chain_composes_scales_either_order() -> None:
    forward = resolve_merges(_cands([(2, 1, 2.0), (1, 0, 3.0)]), 2)
    assert sorted(forward, key=lambda m: m.source) == [Merge(1, 0, 3.0), Merge(2, 0, 6.0)]
    backward = resolve_merges(_cands([(1, 0, 3.0), (2, 1, 2.0)]), 2)
    assert sorted(backward, key=lambda m: m.source) == [Merge(1, 0, 3.0), Merge(2, 0, 6.0)]
    longer = resolve_merges(_cands([(3, 2, 0.5), (2, 1, 2.0), (1, 0, 3.0)]), 3)
    assert {m.source: (m.target, m.scale) for m in longer} == {1: (0, 3.0), 2: (0, 6.0), 3: (0, 3.0)}


def test_cycles_are_skipped_and_count_respected() -> None:
    cands = _cands([(0, 1, 2.0), (1, 0, 0.5), (2, 3, 1.0), (3, 2, 1.0), (4, 0, 1.5)])
    merges = resolve_merges(cands, 10)
    assert {(m.source, m.target) for m in merges} == {(0, 1), (2, 3), (4, 1)}
    assert {m.source: m.scale for m in merges}[4] == pytest.approx(3.0)
    assert len(resolve_merges(cands, 1)) == 1 and resolve_merges(cands, 1)[0] == Merge(0, 1, 2.0)
    assert len(resolve_merges(cands, 2)) == 2  # the skipped cycle does not use up the count
    assert resolve_merges(cands, 0) == []
    assert resolve_merges(_cands([]), 3) == []


@st.composite
def _consistent_candidates(draw: st.DrawFn) -> tuple[np.ndarray, Candidates, int]:
    """Candidates among n atoms with values a > 0 and λ_ji = a_j / a_i (so chains stay consistent)."""
    n = draw(st.integers(2, 12))
    values = np.array(draw(st.lists(st.floats(0.125, 8.0), min_size=n, max_size=n)))
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1]),
            max_size=3 * n,
        )
    )
    rows = [(j, i, values[j] / values[i]) for j, i in pairs]
    return values, _cands(rows), draw(st.integers(0, 3 * n + 2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_consistent_candidates())
def test_resolve_merges_invariants(case: tuple[np.ndarray, Candidates, int]) -> None:
    values, cands, count = case
    merges = resolve_merges(cands, count)
    sources = [m.source for m in merges]
    assert len(merges) <= count
    assert len(set(sources)) == len(sources)
    assert not {m.target for m in merges} & set(sources)  # every target is kept
    assert set(sources) <= set(cands.source.tolist())
    for m in merges:  # composed scales: source = scale · target along the chain
        assert m.scale == pytest.approx(values[m.source] / values[m.target], rel=1e-9)
    # Ordering.achievable counts the entries taken instead of composing the merges
    assert len(similarity.taken_entries(cands, [count])) == len(merges)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 20), st.data())
def test_resolve_merges_forest_takes_exactly_count(n: int, data: st.DataObject) -> None:
    """Unique sources, each pointing to a lower atom: no cycles, so exactly min(count, len) merges."""
    sources = data.draw(st.lists(st.integers(1, n - 1), unique=True))
    rows = [(j, data.draw(st.integers(0, j - 1)), 1.0) for j in sources]
    count = data.draw(st.integers(0, n))
    assert len(resolve_merges(_cands(rows), count)) == min(count, len(rows))


# ----------------------------------------------------------------------------------------------
# atom_macs


def _groups(model: onnx.ModelProto) -> tuple[dict, dict[str, int]]:
    working = graph_utils.import_model(model)
    service = ShapeService(make_inputs(model, InputSpec(), 0))
    analysis = analyse_model(working, service(working), ())
    by_name = {g.name: g for g in analysis.groups if g.producers}
    layers = metrics.measure(model, service.input_shapes).layers
    return by_name, {name: layer.macs for name, layer in layers.items()}


def _conv_chain() -> onnx.ModelProto:
    net = Net(0)
    x = net.input("x", [1, 3, 10, 12])
    h = net.act("Relu", net.conv("conv1", x, 3, 8), "relu1")
    h = net.act("Relu", net.conv("conv2", h, 8, 6, k=1, stride=2), "relu2")
    y = net.conv("conv3", h, 6, 4)
    return net.build([y])


def _mlp() -> onnx.ModelProto:
    net = Net(0)
    x = net.input("x", [3, 10])
    h = net.act("Relu", net.gemm("fc1", x, 10, 16), "relu1")
    y = net.gemm("fc2", h, 16, 5)
    return net.build([y])


@pytest.mark.parametrize(
    ("build", "group", "touched"),
    [
        (_conv_chain, "conv1", ("conv1", "conv2")),
        (_conv_chain, "conv2", ("conv2", "conv3")),
        (_mlp, "fc1", ("fc1", "fc2")),
        (lambda: depthwise_m1().model, "conv1", ("conv1", "dw", "conv2")),
        (lambda: residual_identity().model, "conv0+convB", ("conv0", "convB", "convA", "conv_out")),
    ],
)
def test_atom_macs_sum_to_the_layers_touched(build, group: str, touched: tuple[str, ...]) -> None:
    model = build()
    groups, layer_macs = _groups(model)
    cost = atom_macs(groups[group], layer_macs)
    assert cost.shape == (groups[group].n_atoms,)
    assert cost.sum() == pytest.approx(sum(layer_macs[name] for name in touched), rel=1e-12)
    np.testing.assert_allclose(cost, cost[0], rtol=1e-12)  # every channel costs the same here
