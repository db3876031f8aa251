"""KDE hashing inside the budget search: the hashed rankings, their choice per level, the ablation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from test_budget import conv_net, deep_net

import red_onnx
from red_onnx.analysis.redundancy import AtomParams
from red_onnx.analysis.similarity import pair_distance
from red_onnx.io import graph as graph_utils
from red_onnx.options import InputSpec
from red_onnx.passes.merge_near import GroupCandidates, candidates_of, mergeable_groups
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.budget import BudgetSearch, hashed_orderings
from red_onnx.verify.inputs import make_inputs


def _search(model: onnx.ModelProto, *, hashing: bool, activations: bool = False) -> BudgetSearch:
    base = red_onnx.compress(model, exact=True).model
    spec = InputSpec()
    shapes = ShapeService(make_inputs(model, spec, 0))
    return BudgetSearch(base, model, spec, shapes, hashing=hashing, activations=activations)


def test_hashed_orderings_are_valid_rankings() -> None:
    model = deep_net()
    working = graph_utils.import_model(red_onnx.compress(model, exact=True).model)
    shapes = ShapeService(make_inputs(model, InputSpec(), 0))(working)
    for item in map(candidates_of, mergeable_groups(working, shapes, ())):
        orderings = hashed_orderings(item)
        assert len(orderings) == 3
        bandwidths = [o.bandwidth for o in orderings]
        assert bandwidths == sorted(bandwidths) and bandwidths[0] > 0
        assert [o.basins for o in orderings] == sorted((o.basins for o in orderings), reverse=True)
        for ordering in orderings:
            candidates = ordering.candidates
            assert np.isfinite(candidates.distance).all() and (candidates.source != candidates.target).all()
            merges = ordering.merges(item.group.n_atoms)
            sources = [m.source for m in merges]
            assert len(set(sources)) == len(sources)
            assert not {m.target for m in merges} & set(sources)  # targets are kept atoms
            assert "basins" in ordering.label


def test_search_keeps_the_better_ranking_per_level() -> None:
    search = _search(deep_net(), hashing=True)
    search._sensitivity(cap=10.0)
    for option in search.options:
        for position, level in enumerate(option.levels[1 : len(option.errors)], start=1):
            tried = [search.plan_error({option.name: o.merges(level)}) for o in search.orderings[option.name]]
            assert option.errors[position] == pytest.approx(min(tried))
            assert option.orderings[position] in [o.label for o in search.orderings[option.name]]


def test_ablation_uses_the_weights_only() -> None:
    search = _search(deep_net(), hashing=False)
    search._sensitivity(cap=10.0)
    assert all(len(search.orderings[o.name]) == 1 for o in search.options)
    assert {label for o in search.options for label in o.orderings[1:]} <= {"weights"}


@pytest.mark.parametrize("hashing", [True, False])
def test_compress_reports_the_ranking_it_used(hashing: bool) -> None:
    result = red_onnx.compress(
        conv_net(1e-3), tolerance=0.05, channel_multiple=1, hashing=hashing, activations=False
    )
    groups = result.report.budget["groups"]
    used = {g["ordering"] for g in groups if g["removed"]}
    assert used, "the planted near-duplicates should be merged"
    if not hashing:
        assert used == {"weights"}
    assert result.report.options["hashing"] is hashing
    assert result.verified


def test_plot_writes_the_curve_and_densities(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    from red_onnx import cli

    model_path = tmp_path / "net.onnx"
    onnx.save(conv_net(1e-3), model_path)
    argv = [str(model_path), str(tmp_path / "out.onnx"), "--tolerance", "0.05", "--channel-multiple", "1"]
    assert cli.main([*argv, "--plot", str(tmp_path / "plots"), "-q"]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written[0] == "budget_curve.png" and any(name.startswith("density_") for name in written)
    assert all((tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in written)


def test_activation_rankings_join_the_search() -> None:
    search = _search(deep_net(), hashing=False, activations=True)
    labels = {o.name: [ordering.label for ordering in search.orderings[o.name]] for o in search.options}
    # a one-segment group also gets the least-squares refit (tap by tap for a k×k Conv consumer)
    refits = (["weights", "activations", "refit"], ["weights", "activations", "refit taps"])
    assert all(found in (["weights", "activations"], *refits) for found in labels.values()), labels
    assert any(found in refits for found in labels.values()), labels


def test_hash_identical_rows_merge_into_their_truly_nearest_mate() -> None:
    # Rows 0-3 differ by less than the coarse bandwidth, so hashing makes them identical; their true
    # distances differ: row 2's nearest is row 3, row 3's is row 2 (index order would pick row 0).
    rng = np.random.default_rng(0)
    base = rng.normal(size=24)
    noise = rng.normal(size=(4, 24))
    cluster = base + noise * np.array([3e-3, 1e-3, 0.0, 2e-4])[:, None]
    scaled = np.vstack([cluster, rng.normal(size=(28, 24))])
    params = AtomParams(scaled, np.zeros((32, 0)), np.zeros(32, np.int64))
    item = GroupCandidates(SimpleNamespace(homogeneous=False, n_atoms=32), None, params)  # type: ignore[arg-type]
    coarsest = hashed_orderings(item)[-1].candidates
    for source in range(4):
        entries = np.flatnonzero(coarsest.source == source)
        assert coarsest.cost[entries[0]] == 0.0  # hash-identical to its first target
        mates = np.array([m for m in range(4) if m != source])
        _, true_distance = pair_distance(params, np.full(3, source), mates, False)
        assert coarsest.target[entries[0]] == mates[np.argmin(true_distance)]
    tied = coarsest.cost == 0.0  # hash ties come first, by the true cost of the merge
    assert tied[: tied.sum()].all()
    true_cost = coarsest.distance[tied] * params.producer_norm[coarsest.source[tied]]
    assert (np.diff(true_cost) >= 0).all()
