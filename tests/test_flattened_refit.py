"""A Gemm reading flattened channels is refit row by row, beside the refit of whole channels.

Each of a channel's H·W elements meets its own row of the Gemm's weight; the rows refit fits each row
on all kept rows (one position per sample), the channel refit shares one scale across a channel's
elements. Both are offered, each level keeps the one that measures better; the written model has the
held-out error the search reported; the local estimate on the rows is the error measured. Graphs built
in code, calibration rows seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from calibrated import heldout_rows, output_errors
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx.analysis.merge_sets import DenseMerges
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search import activations, budget
from red_onnx.search.activations import captured_by_rows, flattened_rows
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.budget_options import RefitOrdering
from red_onnx.verify.inputs import make_inputs


def flatten_net(seed: int = 0, channels: int = 12) -> onnx.ModelProto:
    """x[N, 3, 5, 5] → conv 3×3 (``channels``, mixtures of 5 kernels) → Relu → Flatten → Gemm (10) → y."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((5, 3 * 9))
    w1 = (rng.standard_normal((channels, 5)) @ base).reshape(channels, 3, 3, 3)
    w1 += 0.1 * rng.standard_normal(w1.shape)
    w2 = rng.standard_normal((10, channels * 9)) / np.sqrt(channels * 9)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = [("w1", w1), ("w2", w2), ("b2", np.zeros(10))]  # no bias: the estimate leaves it out
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in inits],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def images(path: Path, count: int = 256) -> red_onnx.InputSpec:
    """``count`` seeded images of smooth noise whose mean varies with the position (as real images)."""
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((count, 3, 7, 7))
    smooth = sum(noise[:, :, i : i + 5, j : j + 5] for i in range(3) for j in range(3)) / 3.0
    ramp = np.linspace(-1.0, 1.0, 5)
    np.savez(path, x=(smooth + ramp[None, None, :, None] * ramp[None, None, None, :]).astype(np.float32))
    return red_onnx.InputSpec(npz=path)


def _search(model: onnx.ModelProto, spec: red_onnx.InputSpec, **options) -> BudgetSearch:
    shapes = ShapeService(make_inputs(model, spec, 0))
    return BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False, **options)


def test_a_flattened_gemm_input_is_captured_by_rows_up_to_the_limit(tmp_path: Path, monkeypatch) -> None:
    search = _search(flatten_net(), images(tmp_path / "x.npz"))
    (group,) = mergeable_groups(search.working, search.shapes, ())
    (consumer,) = group.consumers
    member = group.tensors[consumer.tensor]
    assert (member.channels, member.block) == (12, 9)
    assert flattened_rows(member, consumer.node) and captured_by_rows(member, consumer.node)
    monkeypatch.setattr(activations, "FLATTENED_ROWS_MAX", 12 * 9 - 1)
    assert not flattened_rows(member, consumer.node) and not captured_by_rows(member, consumer.node)


def test_the_rows_refit_is_offered_beside_the_refit_of_whole_channels(tmp_path: Path) -> None:
    search = _search(flatten_net(), images(tmp_path / "x.npz"))
    refits = {o.label: o for o in search.orderings["conv"] if isinstance(o, RefitOrdering)}
    assert set(refits) == {"refit", "refit rows"}
    assert (refits["refit"].block, refits["refit rows"].block) == (1, 9)
    assert refits["refit rows"].gram.shape == (12 * 9 + 1, 12 * 9 + 1)
    merges = refits["refit rows"].merges(4)
    assert isinstance(merges, DenseMerges) and merges.block == 9 and merges.mix.shape == (8 * 9, 4 * 9)


def _heldout_error(model: onnx.ModelProto, written: onnx.ModelProto, spec: red_onnx.InputSpec) -> float:
    return max(output_errors(model, written, heldout_rows(spec)))


def test_the_written_rows_refit_has_the_error_the_search_reported(tmp_path: Path, monkeypatch) -> None:
    """The editor writes what the simulator measured; without the rows refit the error is larger (one-shot:
    the sequential refit of the Gemm would refit its rows on either plan)."""
    model = flatten_net()
    spec = images(tmp_path / "x.npz")
    one_shot = {"target_macs": 0.5, "channel_multiple": 1, "input_spec": spec, "hashing": False,
                "sequential_refit": False}  # fmt: skip
    result = red_onnx.compress(model, **one_shot)
    (group,) = [g for g in result.report.budget["groups"] if g.get("removed")]
    assert group["ordering"] == "refit rows"
    heldout = _heldout_error(model, result.model, spec)
    assert heldout == pytest.approx(result.report.budget["heldout_error"], rel=1e-4)
    for module in (activations, budget):
        monkeypatch.setattr(module, "flattened_rows", lambda member, node: False)
    channels = red_onnx.compress(model, **one_shot)
    (plain,) = [g for g in channels.report.budget["groups"] if g.get("removed")]
    assert plain["ordering"] != "refit rows"
    assert heldout < _heldout_error(model, channels.model, spec)


def test_the_local_estimate_of_a_flattened_consumer_is_the_measured_error(tmp_path: Path) -> None:
    """The Gemm's output is the model's: on its rows, the estimate of any plan is what is measured."""
    search = _search(flatten_net(), images(tmp_path / "x.npz"), sensitivity="local")
    assert search.local is not None
    for ranking in (o for o in search.orderings["conv"] if o.label in ("refit", "refit rows", "weights")):
        for count in (2, 6):
            merges = ranking.merges(count)
            measured = search.plan_error({"conv": merges})
            assert search.local.error("conv", merges) == pytest.approx(measured, rel=1e-6), ranking.label
