"""The least-squares refit as a ranking of the budget search: its merges are the refit, and it wins
where a removed channel is a mix of kept ones (which no single-target λ-merge can compensate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
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
from red_onnx.verify.inputs import make_inputs


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


def test_the_ridge_strength_is_validated_on_the_cv_rows_and_the_refit_fits_search_and_cv(
    tmp_path: Path,
) -> None:
    """16 calibration rows: 8 search, 4 cv (4 held out); 36 positions each, all captured."""
    model = _mixed_channel_net()
    spec = _calibration(tmp_path)
    shapes = ShapeService(make_inputs(model, spec, 0))
    search = BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False)
    (ranking,) = [o for orderings in search.orderings.values() for o in orderings if o.label == "refit"]
    assert ranking.gram[-1, -1] == (8 + 4) * 36  # the constant channel's sum counts the samples fitted
    (group,) = search.options
    validation = search._validation(mergeable_groups(search.working, search.shapes, ()))
    assert validation[group.name].shape == (8, 4 * 36)
