"""The refit's dense merges (``DenseMerges``) are the same plan as their ``Merge`` list, everywhere.

Every reader of a plan takes the dense form on its own path (the editor's row update, the simulator's
weights and biases, the local estimate, the MACs counter, the search's caches); each must give what
the equivalent ``Merge`` list gives, and the rebuilt model must compute what the simulator computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_simulate import BUILDERS, assert_outputs_close, search_of

from red_onnx.analysis.merge_sets import DenseMerges, has_offsets, local_offsets, merge_key, removed_atoms
from red_onnx.errors import RewriteError
from red_onnx.measure import metrics
from red_onnx.rewrite.editor import add_merged_rows
from red_onnx.search.sensitivity import source_changes

#: Builders whose consumers read every atom of their group (a dense plan may mix any atoms there).
WHOLE_GROUPS = ("conv_net", "residual_net", "deep_net", "flatten_gemm", "nhwc_matmul", "gemm_mlp",
                "matmul_add", "batchnorm_after", "depthwise_m1")  # fmt: skip


def dense_plan(n_atoms: int, removed: int, seed: int, *, offsets: bool = True) -> DenseMerges:
    """Random ``removed`` sources, every other atom a target, random scales (some zero) and offsets."""
    rng = np.random.default_rng(seed)
    sources = np.sort(rng.choice(n_atoms, removed, replace=False))
    targets = np.setdiff1d(np.arange(n_atoms), sources)
    mix = rng.normal(0.0, 0.3, (targets.size, sources.size)) * (
        rng.random((targets.size, sources.size)) < 0.7
    )
    constant = rng.normal(0.0, 0.5, sources.size) if offsets else np.zeros(sources.size)
    return DenseMerges(sources, targets, mix, constant)


def test_dense_merges_check_their_shapes_and_atoms() -> None:
    with pytest.raises(ValueError, match="need mix"):
        DenseMerges(np.array([1]), np.array([0, 2]), np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="disjoint"):
        DenseMerges(np.array([1]), np.array([1, 2]), np.zeros((2, 1)), np.zeros(1))


def test_helpers_agree_with_the_merge_list() -> None:
    plan = dense_plan(10, 4, 0)
    listed = plan.as_merges()
    assert len(plan) == 4 and removed_atoms(plan).tolist() == removed_atoms(listed).tolist()
    assert has_offsets(plan) and has_offsets(listed)
    assert not has_offsets(dense_plan(10, 4, 0, offsets=False))
    local = np.array([3, -1, 0, 1, 2, 4, 5, 6, 7, -1])  # atoms 1 and 9 absent from this tensor
    for got, want in zip(local_offsets(plan, local), local_offsets(listed, local), strict=True):
        np.testing.assert_array_equal(np.sort(got), np.sort(want))
    assert merge_key(plan) == merge_key(dense_plan(10, 4, 0)) != merge_key(dense_plan(10, 4, 1))
    hash(merge_key(plan))


def test_row_updates_and_local_changes_agree_with_the_merge_list() -> None:
    plan = dense_plan(12, 5, 2)
    rng = np.random.default_rng(0)
    local = np.arange(12)
    weights = rng.standard_normal((12, 7)).astype(np.float32)
    dense_rows, listed_rows = weights.copy(), weights.copy()
    moved = add_merged_rows(dense_rows, local, plan)
    add_merged_rows(listed_rows, local, plan.as_merges())
    np.testing.assert_allclose(dense_rows, listed_rows, rtol=1e-6, atol=1e-6)
    assert sorted(moved.tolist()) == removed_atoms(plan).tolist()
    dense, listed = source_changes(local, plan), source_changes(local, plan.as_merges())
    assert dense is not None and listed is not None
    for field in ("sources", "columns", "mix", "constant"):
        np.testing.assert_allclose(getattr(dense, field), getattr(listed, field), atol=1e-12, err_msg=field)
    assert source_changes(np.full(12, -1), plan) is None


def test_a_dense_merge_into_a_target_the_consumer_does_not_read_is_refused() -> None:
    plan = dense_plan(6, 2, 3)
    local = np.arange(6)
    local[plan.targets[0]] = -1  # the consumer reads the sources but not this target
    plan.mix[0, :] = 1.0
    with pytest.raises(RewriteError, match="not that target"):
        add_merged_rows(np.ones((6, 3), np.float32), local, plan)


@pytest.mark.parametrize("name", WHOLE_GROUPS)
def test_dense_plans_simulate_and_rebuild_as_their_merge_lists(name: str) -> None:
    search = search_of(BUILDERS[name]())
    assert search.simulator is not None
    groups = [o for o in search.options if o.n_atoms >= 3]
    if not groups:
        pytest.skip(f"{name}: no group of 3 channels or more")
    for seed, option in enumerate(groups):
        plan = {option.name: dense_plan(option.n_atoms, max(1, option.n_atoms // 3), seed)}
        listed = {option.name: plan[option.name].as_merges()}
        rebuilt = search.apply_plan(plan)
        onnx.checker.check_model(rebuilt)
        expected = search.verifier.run(search.apply_plan(listed), "disable_all")
        assert_outputs_close(search.verifier.run(rebuilt, "disable_all"), expected, name)
        if search.simulator.supports(plan):  # offsets need a bias of the consumers' own
            assert_outputs_close(search.simulator.run(plan, search.verifier.inputs), expected, name)
        counted = metrics.measure(rebuilt, search.input_shapes).macs / search.total_macs
        assert search.macs_counter.fraction(plan) == pytest.approx(counted, abs=1e-9)
        assert search.macs_counter.fraction(plan) == pytest.approx(search.macs_counter.fraction(listed))
