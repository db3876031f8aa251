"""The least-squares refit as a ranking of the budget search: its merges are the refit, and it wins
where a removed channel is a mix of kept ones (which no single-target λ-merge can compensate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import random_feeds, run
from onnx import helper, numpy_helper

import red_onnx
from red_onnx.analysis.merge_sets import DenseMerges, local_offsets, removed_atoms
from red_onnx.analysis.refit import augmented_gram, refit
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.rewrite.editor import add_merged_rows
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search import budget_options
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.budget_options import refit_ordering
from red_onnx.verify.inputs import make_inputs, split_rows


def test_the_merges_of_a_refit_ordering_apply_the_refit() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, 400)) + 2.0
    rows[5] = 0.7 * rows[0] - 0.2 * rows[3] + 1.5
    weight = rng.standard_normal((6, 3))
    atoms = np.arange(6)
    ordering = refit_ordering(rows, atoms, weight, True)
    assert ordering is not None
    assert ordering.order[0] == 5  # the mix goes first
    for count in (1, 2, 4):
        merges = ordering.merges(count)
        assert isinstance(merges, DenseMerges)  # |R|·|K| merges held as one matrix
        removed = removed_atoms(merges).tolist()
        assert removed == sorted(ordering.order[:count].tolist())
        keep = np.setdiff1d(atoms, removed)
        kept, bias = refit(augmented_gram(rows), weight, keep, ordering.lam)
        for form in (merges, merges.as_merges()):  # the dense form and its Merge list agree
            flat = weight.copy()
            assert set(add_merged_rows(flat, atoms, form).tolist()) == set(removed)  # the rows to zero
            np.testing.assert_allclose(flat[keep], kept, rtol=1e-9, atol=1e-9)
            channels, values = local_offsets(form, atoms)
            offsets = np.zeros(6)
            np.add.at(offsets, channels, values)  # one merge per source carries its intercept
            np.testing.assert_allclose(weight.T @ offsets, bias, rtol=1e-9, atol=1e-9)


def test_wide_groups_take_the_path_in_joint_steps_up_to_the_deepest_level(monkeypatch) -> None:
    monkeypatch.setattr(budget_options, "OBS_SINGLE_MAX", 8)  # the wide-group path on a small group
    monkeypatch.setattr(budget_options, "OBS_WIDE_STEPS", 4)
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((20, 300)) + 1.0
    weight = rng.standard_normal((20, 4))
    atoms = np.arange(20)
    ordering = refit_ordering(rows, atoms, weight, True)
    assert ordering is not None
    assert ordering.order.size == 15  # 3/4 of 20: the deepest level fraction, not 19
    merges = ordering.merges(10)
    keep = np.setdiff1d(atoms, ordering.order[:10])
    kept, _ = refit(augmented_gram(rows), weight, keep, ordering.lam)
    flat = weight.copy()
    add_merged_rows(flat, atoms, merges)
    np.testing.assert_allclose(flat[keep], kept, rtol=1e-9, atol=1e-9)


def _mixed_channel_net() -> onnx.ModelProto:
    """conv1 (1×1, 4 -> 8) straight into conv2: channel 7 of conv1 is channel 0 plus channel 1."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    w1[7] = w1[0] + w1[1]
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    return _conv_model({"w1": w1, "w2": w2}, {"h": ("x", "w1"), "y": ("h", "w2")}, ["y"])


def _conv_model(
    weights: dict[str, np.ndarray], convs: dict[str, tuple[str, str]], outputs: list[str]
) -> onnx.ModelProto:
    """Convs ``output: (input, weight)`` in order on x ``[N, 4, 6, 6]``; every output ``[N, 4, 6, 6]``."""
    nodes = [helper.make_node("Conv", list(reads), [out], name=f"conv_{out}") for out, reads in convs.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 4, 6, 6]) for name in outputs],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _calibration(tmp_path: Path) -> red_onnx.InputSpec:
    """16 seeded N(0, 1) rows of x in an npz."""
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((16, 4, 6, 6)).astype(np.float32))
    return red_onnx.InputSpec(npz=tmp_path / "x.npz")


def test_the_search_refits_a_channel_that_mixes_two_others(tmp_path: Path) -> None:
    model = _mixed_channel_net()
    spec = _calibration(tmp_path)
    result = red_onnx.compress(
        model, target_macs=0.9, channel_multiple=1, input_spec=spec, latency_check=False
    )
    group = next(g for g in result.report.budget["groups"] if g["removed"])
    assert group["removed"] == 1 and group["ordering"] == "refit"  # the report names the rule used
    assert result.report.budget["error"] < 1e-4 and result.report.budget["heldout_error"] < 1e-4
    assert result.verified
    feeds = random_feeds(model, 5)
    got, want = run(result.model, feeds)["y"], run(model, feeds)["y"]
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_no_refit_is_the_ablation(tmp_path: Path) -> None:
    spec = _calibration(tmp_path)
    common = {"target_macs": 0.9, "channel_multiple": 1, "input_spec": spec, "latency_check": False}
    without = red_onnx.compress(_mixed_channel_net(), refit=False, force_target=True, **common)
    orderings = {g["ordering"] for g in without.report.budget["groups"] if g["removed"]}
    assert orderings and "refit" not in orderings
    assert without.report.options["refit"] is False
    assert (
        without.report.budget["error"]
        > 100 * red_onnx.compress(_mixed_channel_net(), **common).report.budget["error"]
    )


def _two_consumer_net() -> onnx.ModelProto:
    """conv1 (1×1, 4 -> 8) read by conv2a and conv2b: channel 7 of conv1 is channel 0 plus channel 1;
    conv2a does not read channel 3 (its weights there are 0), conv2b reads it most."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    w1[7] = w1[0] + w1[1]
    wa = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    wa[:, 3] = 0.0
    wb = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    wb[:, 3] *= 10.0
    convs = {"h": ("x", "w1"), "ya": ("h", "wa"), "yb": ("h", "wb")}
    return _conv_model({"w1": w1, "wa": wa, "wb": wb}, convs, ["ya", "yb"])


def test_every_consumer_of_the_captured_tensor_enters_the_refit_cost(tmp_path: Path) -> None:
    """Channel 3 costs nothing to the first consumer alone; both together make the mix the cheapest."""
    model = _two_consumer_net()
    spec = _calibration(tmp_path)
    result = red_onnx.compress(
        model, target_macs=0.95, channel_multiple=1, input_spec=spec, latency_check=False, hashing=False
    )
    group = next(g for g in result.report.budget["groups"] if g["removed"])
    assert group["removed"] == 1 and group["ordering"] == "refit"
    feeds = random_feeds(model, 5)
    for name in ("ya", "yb"):
        got, want = run(result.model, feeds)[name], run(model, feeds)[name]
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), name


def test_on_synthetic_inputs_the_search_measures_on_draws_the_fits_never_saw() -> None:
    """Data-free with activation fits: the refit is fitted on the search seeds, the plans measured on
    the cv seeds (the fitted draws would flatter the refit), and the report says so."""
    from red_onnx.search.budget import CV_SEEDS, SEARCH_SEEDS

    model = _mixed_channel_net()
    spec = red_onnx.InputSpec(ranges={"x": (0.0, 1.0)})
    shapes = ShapeService(make_inputs(model, spec, 0))
    search = BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False)
    assert search.measured_part == "cv"
    count = search.seed_count
    assert list(search.verifier.seeds) == list(CV_SEEDS[:count])
    fit, validation, _ = search.correction_verifiers() or (None, None, None)
    assert fit is not None and list(fit.seeds) == list(SEARCH_SEEDS[:count])
    assert validation is search.verifier and search._cv_verifier() is search.verifier
    fitted, measured = (np.asarray(v.inputs[0]["x"]) for v in (fit, search.verifier))
    assert fitted.shape == measured.shape and not np.array_equal(fitted, measured)
    assert fitted.min() >= 0.0 and fitted.max() <= 1.0  # the range given
    result = red_onnx.compress(
        model, target_macs=0.9, channel_multiple=1, input_spec=spec, latency_check=False
    )
    assert result.report.budget["measured_on"] == "cv"
    assert "(draws unseen by the fits)" in red_onnx.report.report.render_table(result.report)
    plain = BudgetSearch(model, model, spec, shapes, channel_multiple=1, activations=False)
    assert plain.measured_part == "search"  # nothing fitted: the search seeds are measured


def test_the_refit_fits_the_search_rows_and_the_search_measures_on_the_cv_rows(
    tmp_path: Path,
) -> None:
    """16 calibration rows: 8 search, 4 cv (4 held out); 36 positions each, all captured.

    The ridge strength is validated on the cv rows, and the plans are measured there: rows no fit saw.
    """
    model = _mixed_channel_net()
    spec = _calibration(tmp_path)
    shapes = ShapeService(make_inputs(model, spec, 0))
    search = BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False)
    (ranking,) = [o for orderings in search.orderings.values() for o in orderings if o.label == "refit"]
    assert ranking.gram[-1, -1] == 8 * 36  # the constant channel's sum counts the samples fitted
    assert search.measured_part == "cv" and search.verifier.part == "cv"
    cv_rows = np.load(spec.calibration)["x"][split_rows(16)["cv"]]
    assert len(search.verifier.inputs) == 1
    np.testing.assert_array_equal(next(iter(search.verifier.inputs[0].values())), cv_rows)
    result, _ = search.to_target(0.8)
    assert result.to_dict()["measured_on"] == "cv"
    (group,) = search.options
    assert search.covered  # the file gives x: the cv rows validating the ridge are the measuring verifier's
    search._verifier = None  # no second verifier (and no second read of the file) for them
    captured, _ = search._captures(
        mergeable_groups(search.working, search.shapes, ()), search._cv_verifier(), {}
    )
    assert captured[group.name][1].shape == (8, 4 * 36)


def test_the_final_refit_adds_the_cv_rows_to_the_removals_the_search_chose() -> None:
    """``final_merges``: the search path's removals, refit on both Grams, λ rescaled to their sum."""
    rng = np.random.default_rng(5)
    rows, held = rng.standard_normal((6, 300)) + 1.0, rng.standard_normal((6, 120)) + 1.0
    rows[5], held[5] = 0.7 * rows[0] - 0.2 * rows[3], 0.7 * held[0] - 0.2 * held[3]
    weight, atoms = rng.standard_normal((6, 3)), np.arange(6)
    ordering = refit_ordering(rows, atoms, weight, True, held, fit_validation=False)
    assert ordering is not None and ordering.extra is not None
    assert ordering.gram[-1, -1] == 300  # the search fit saw only ``rows``
    together = refit_ordering(rows, atoms, weight, True, held)  # fit_validation: the former rule
    assert together is not None and together.extra is None and together.gram[-1, -1] == 420
    summed = augmented_gram(np.hstack([rows, held]))
    rescale = budget_options.lambda_scale(summed) / budget_options.lambda_scale(ordering.gram)
    assert ordering.lam * rescale == pytest.approx(together.lam, rel=1e-9)  # one strength chosen
    for count in (1, 3):
        final = ordering.final_merges(count)
        assert isinstance(final, DenseMerges)
        removed = removed_atoms(final)
        np.testing.assert_array_equal(removed, np.sort(ordering.order[:count]))
        keep = np.setdiff1d(atoms, removed)
        kept, bias = refit(summed, weight, keep, together.lam)
        flat = weight.copy()
        add_merged_rows(flat, atoms, final)
        np.testing.assert_allclose(flat[keep], kept, rtol=1e-5, atol=1e-6)  # extra is float32
        channels, values = local_offsets(final, atoms)
        offsets = np.zeros(6)
        np.add.at(offsets, channels, values)
        np.testing.assert_allclose(weight.T @ offsets, bias, rtol=1e-5, atol=1e-6)


def test_the_written_plan_is_the_final_refit_and_its_held_out_error_is_reported(tmp_path: Path) -> None:
    model = _mixed_channel_net()
    spec = _calibration(tmp_path)
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False)  # fmt: skip
    result, _ = search.to_target(0.8)
    (name,) = [name for name, count in result.counts.items() if count]
    count = result.counts[name]
    chosen = search.chosen[(name, count)]
    assert chosen.label == "refit"
    final = search.final_plan(result.counts)[name]
    searched = search.merges[name][count]
    assert isinstance(final, DenseMerges) and isinstance(searched, DenseMerges)
    assert not np.array_equal(final.mix, searched.mix)  # refit once more, on the cv rows too
    np.testing.assert_array_equal(final.mix, chosen.final_merges(count).mix)
    rebuilt = search.apply_plan({name: final})
    errors = search.heldout.rel_l2_errors(rebuilt, level="disable_all")
    assert max(errors.values()) == pytest.approx(result.heldout_error, rel=1e-4)
    written = red_onnx.compress(model, target_macs=0.8, channel_multiple=1, input_spec=spec,
                                latency_check=False, hashing=False, sequential_refit=False)  # fmt: skip
    assert written.report.budget["heldout_error"] == pytest.approx(result.heldout_error, rel=1e-6)
    feeds = {"x": np.load(spec.calibration)["x"][split_rows(16)["heldout"]]}
    got, want = run(written.model, feeds)["y"], run(model, feeds)["y"]
    np.testing.assert_allclose(got, run(rebuilt, feeds)["y"], rtol=1e-4, atol=1e-5)  # the final plan
    assert np.linalg.norm(got - want) / np.linalg.norm(want) == pytest.approx(result.heldout_error, rel=1e-3)
