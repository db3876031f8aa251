"""Attention heads are removed whole and the output projection is refit row by row.

A head is an atom of D rows of the output projection; the refit regresses each removed row on every
kept row (``captured_by_rows``), so its plan is a ``DenseMerges`` over rows. It must be the closed-form
refit, simulate as the rebuilt model computes, never measure worse than removing the same heads with
no compensation on the inputs it was fitted on, and be estimated by the local estimate as measured.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import AttentionSpec, attention_model

from red_onnx.analysis.merge_sets import DenseMerges, atom_rows
from red_onnx.analysis.refit import augmented_gram, refit
from red_onnx.options import InputSpec
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.rewrite.editor import add_merged_rows
from red_onnx.runtime.shapes import ShapeService
from red_onnx.runtime.tensor_values import tensor_fetch
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.budget_options import RefitOrdering
from red_onnx.search.sensitivity import LocalSensitivity, consumer_inputs
from red_onnx.search.simulate import consumer_slots, weight_rows
from red_onnx.verify.inputs import make_inputs

SPEC = AttentionSpec(heads=6, head_size=4, width=16, seq=8, batch=4)


def head_search(spec: AttentionSpec = SPEC) -> tuple[BudgetSearch, object]:
    model = attention_model(spec).model
    shapes = ShapeService(make_inputs(model, InputSpec(), 0))
    search = BudgetSearch(model, model, InputSpec(), shapes, channel_multiple=4, hashing=False)
    (option,) = search.options
    return search, option


def refit_of(search: BudgetSearch, name: str) -> RefitOrdering:
    (ranking,) = [o for o in search.orderings[name] if isinstance(o, RefitOrdering)]
    return ranking


def test_heads_are_refit_row_by_row_as_the_closed_form_says() -> None:
    search, option = head_search()
    assert option.n_atoms == SPEC.heads
    assert option.levels == list(range(option.levels[-1] + 1))  # D = 4 columns on a multiple of 4: any head
    ranking = refit_of(search, option.name)
    width = SPEC.heads * SPEC.head_size
    assert ranking.block == SPEC.head_size and ranking.gram.shape == (width + 1, width + 1)
    (group,) = mergeable_groups(search.working, search.shapes, ())
    (slot,) = consumer_slots(group)
    weight = weight_rows(slot, np.arange(SPEC.heads)).reshape(width, -1).astype(np.float64)
    for count in (1, 2, 3):
        merges = ranking.merges(count)
        assert isinstance(merges, DenseMerges) and merges.block == SPEC.head_size
        kept = np.setdiff1d(np.arange(SPEC.heads), ranking.order[:count])
        rows = atom_rows(kept, SPEC.head_size)
        expected, _ = refit(ranking.gram, weight, rows, ranking.lam, free_bias=ranking.free_bias)
        flat = weight.reshape(SPEC.heads, -1).copy()
        add_merged_rows(flat, slot.local, merges)
        np.testing.assert_allclose(flat.reshape(width, -1)[rows], expected, rtol=1e-9, atol=1e-9)


def test_head_refit_plans_simulate_as_rebuilt_and_beat_plain_removal() -> None:
    search, option = head_search()
    ranking = refit_of(search, option.name)
    assert search.simulator is not None
    for count in (1, 2, 3):
        merges = ranking.merges(count)
        plan = {option.name: merges}
        rebuilt = search.verifier.run(search.apply_plan(plan), "disable_all")
        if search.simulator.supports(plan):
            simulated = search.simulator.run(plan, search.verifier.inputs)
            for want, have in zip(rebuilt, simulated, strict=True):
                np.testing.assert_allclose(have["y"], want["y"], rtol=1e-4, atol=1e-5)
        removal = DenseMerges(merges.sources, merges.targets, np.zeros_like(merges.mix),
                              np.zeros_like(merges.offsets), merges.block)  # fmt: skip
        refit_error, removal_error = search.plan_error(plan), search.plan_error({option.name: removal})
        assert 0.0 < refit_error <= removal_error * (1 + 1e-6)


def test_the_local_estimate_reads_heads_row_by_row() -> None:
    """On the output projection's own input, the estimate of a head plan is its measured change there."""
    search, option = head_search()
    (group,) = mergeable_groups(search.working, search.shapes, ())
    tensor = group.consumers[0].tensor
    assert consumer_inputs([group])[tensor] == (2, 1)  # captured by rows, not in blocks of D
    fetch = tensor_fetch(attention_model(SPEC).model, [tensor])
    local = LocalSensitivity(fetch, [group], search.verifier.inputs, form="rows")
    ranking = refit_of(search, option.name)
    merges = ranking.merges(2)
    (slot,) = consumer_slots(group)
    width = SPEC.heads * SPEC.head_size
    weight = weight_rows(slot, np.arange(SPEC.heads)).reshape(width, -1).astype(np.float64)
    changed = weight.reshape(SPEC.heads, -1).copy()
    changed[add_merged_rows(changed, slot.local, merges)] = 0.0
    fetched = [fetch([tensor], feed)[0] for feed in search.verifier.inputs]
    x = np.concatenate([values.reshape(-1, width) for values in fetched]).astype(np.float64)
    offsets = np.zeros(width)
    offsets[atom_rows(merges.sources, SPEC.head_size)] = merges.offsets
    delta = x @ (changed.reshape(width, -1) - weight) + offsets @ weight
    expected = np.linalg.norm(delta) / np.linalg.norm(x @ weight)
    assert local.error(option.name, merges) == pytest.approx(expected, rel=1e-6)
    assert augmented_gram(x.T).shape == (width + 1, width + 1)
