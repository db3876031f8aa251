"""k×k Conv consumers are refit tap by tap from their input patches.

The patches are what the Conv multiplies (checked against onnxruntime's Conv: padded, strided, dilated,
1-D and 2-D); a plan over kernel taps is the closed-form refit of every tap row; the editor applies it
as the simulator does (the written model has the held-out error the search reported); and on a conv net
with correlated channels it measures well below the refit that shares one scale across the taps.
Graphs built in code, calibration rows seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from calibrated import heldout_rows, output_errors, smooth_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx.analysis.merge_sets import DenseMerges, atom_rows, to_rows
from red_onnx.analysis.refit import refit
from red_onnx.io import graph as graph_utils
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.rewrite.editor import add_merged_rows
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.activations import ConvTaps, conv_taps, patch_rows_sampled
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.budget_options import RefitOrdering
from red_onnx.search.simulate import consumer_slots, tap_rows
from red_onnx.verify.inputs import make_inputs


def _conv(x: np.ndarray, w: np.ndarray, **attrs) -> np.ndarray:
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    session = ort.InferenceSession(
        helper.make_model(graph).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "taps",
    [
        ConvTaps((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
        ConvTaps((3, 2), (2, 1), (1, 2), (0, 1, 2, 0)),
        ConvTaps((5,), (2,), (1,), (2, 2)),
        ConvTaps((3,), (1,), (2,), (0, 0)),
    ],
)
def test_patches_are_what_the_conv_multiplies(taps: ConvTaps) -> None:
    rng = np.random.default_rng(0)
    rank = len(taps.kernel)
    x = rng.standard_normal((2, 4, *(9,) * rank)).astype(np.float32)
    w = rng.standard_normal((3, 4, *taps.kernel)).astype(np.float32)
    attrs = {"strides": list(taps.strides), "dilations": list(taps.dilations), "pads": list(taps.pads)}
    y = _conv(x, w, kernel_shape=list(taps.kernel), **attrs)
    rows = patch_rows_sampled(x, taps, np.random.default_rng(1), positions=10**9)  # every output position
    assert rows.shape == (4 * taps.taps, y.size // 3)
    got = (w.reshape(3, -1).astype(np.float64) @ rows).T
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, 3), rtol=1e-5, atol=1e-5)
    sampled = patch_rows_sampled(x, taps, np.random.default_rng(1), positions=5)
    assert sampled.shape == (4 * taps.taps, 5)
    assert all(any(np.array_equal(column, other) for other in rows.T) for column in sampled.T)


def test_conv_taps_reads_a_kxk_conv_and_nothing_else() -> None:
    def node(shape: tuple[int, ...], **attrs) -> object:
        model = onnx.helper.make_model(helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, shape[1] * attrs.get("group", 1), 8, 8])],  # noqa: E501
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.ones(shape, np.float32), "w")],
        ))  # fmt: skip
        return graph_utils.import_model(model).graph.nodes[0]

    assert conv_taps(node((4, 2, 3, 3), pads=[1, 1, 1, 1])) == ConvTaps((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    assert conv_taps(node((4, 2, 3, 3), auto_pad="VALID")) == ConvTaps((3, 3), (1, 1), (1, 1), (0, 0, 0, 0))
    assert conv_taps(node((4, 2, 1, 1))) is None  # 1×1: the refit over channels is already exact
    assert conv_taps(node((4, 2, 3, 3), group=2)) is None
    assert conv_taps(node((4, 2, 3, 3), auto_pad="SAME_UPPER")) is None


def test_tap_merges_add_every_tap_row_on_its_own() -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((3, 4, 2, 2))  # [outputs, channels, kernel]: 4 taps
    merges = DenseMerges(
        np.array([1]), np.array([0, 2, 3]), rng.standard_normal((12, 4)), np.zeros(4), 4, True
    )
    flat = np.moveaxis(weight, 1, 0).reshape(4, -1).copy()  # the editor's [channels, outputs·taps]
    removed = add_merged_rows(flat, np.arange(4), merges)
    rows = np.moveaxis(weight, 1, 0).reshape(4, 3, 4).transpose(0, 2, 1).reshape(16, 3)  # row c·4 + t
    expected = rows.copy()
    expected[atom_rows(np.array([0, 2, 3]), 4)] += merges.mix @ rows[atom_rows(np.array([1]), 4)]
    got = flat.reshape(4, 3, 4).transpose(0, 2, 1).reshape(16, 3)
    np.testing.assert_allclose(
        got[atom_rows(np.array([0, 2, 3]), 4)], expected[atom_rows(np.array([0, 2, 3]), 4)]
    )
    assert removed.tolist() == [1]
    with pytest.raises(ValueError, match="no rows of whole channels"):
        to_rows(merges, 1)
    with pytest.raises(ValueError, match="take no offsets"):
        DenseMerges(np.array([1]), np.array([0]), np.zeros((4, 4)), np.ones(4), 4, True)


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """x[N, 3, 10, 10] → conv1 3×3 (16 channels, mixtures of 6 kernels) → Relu → conv2 3×3 (8) → y."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((6, 3, 3, 3))
    w1 = (rng.standard_normal((16, 6)) @ base.reshape(6, -1)).reshape(16, 3, 3, 3)
    w1 += 0.1 * rng.standard_normal(w1.shape)
    w2 = rng.standard_normal((8, 16, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 10, 10])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in (("w1", w1), ("w2", w2))],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_search_refits_a_kxk_consumer_tap_by_tap_in_closed_form(tmp_path: Path) -> None:
    model = conv_net()
    spec = smooth_images(tmp_path / "x.npz")
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False)  # fmt: skip
    (ranking,) = [o for o in search.orderings["conv1"] if isinstance(o, RefitOrdering)]
    assert (ranking.label, ranking.taps, ranking.block, ranking.free_bias) == ("refit taps", True, 9, False)
    assert ranking.gram.shape == (16 * 9 + 1, 16 * 9 + 1)
    assert ranking.gram[-1, -1] == 32 * 100  # every output position of the 32 search rows (< 4096)
    (group,) = mergeable_groups(search.working, search.shapes, ())
    (slot,) = consumer_slots(group)
    weight = tap_rows(slot, np.arange(16), 9)
    for count in (2, 6):
        merges = ranking.merges(count)
        assert isinstance(merges, DenseMerges) and merges.taps and not np.any(merges.offsets)
        kept = np.setdiff1d(np.arange(16), ranking.order[:count])
        expected, _ = refit(ranking.gram, weight, atom_rows(kept, 9), ranking.lam, free_bias=False)
        flat = np.moveaxis(slot.values, 1, 0).reshape(16, -1).astype(np.float64)
        add_merged_rows(flat, np.arange(16), merges)
        got = flat.reshape(16, 8, 9).transpose(0, 2, 1).reshape(144, 8)
        np.testing.assert_allclose(got[atom_rows(kept, 9)], expected, rtol=1e-9, atol=1e-9)


def _heldout_error(model: onnx.ModelProto, written: onnx.ModelProto, spec: red_onnx.InputSpec) -> float:
    return max(output_errors(model, written, heldout_rows(spec)))


def test_the_written_tap_refit_has_the_error_the_search_reported(tmp_path: Path, monkeypatch) -> None:
    """The editor writes what the simulator measured; the refit sharing a scale across taps does worse."""
    model = conv_net()
    spec = smooth_images(tmp_path / "x.npz")
    settings = {"target_macs": 0.5, "channel_multiple": 1, "input_spec": spec, "hashing": False,
                "sequential_refit": False}  # fmt: skip  # the one-shot refit, as the search measured it
    result = red_onnx.compress(model, **settings)
    (group,) = [g for g in result.report.budget["groups"] if g.get("removed")]
    assert group["ordering"] == "refit taps"
    heldout = _heldout_error(model, result.model, spec)
    assert heldout == pytest.approx(result.report.budget["heldout_error"], rel=1e-4)
    monkeypatch.setattr(BudgetSearch, "_tap_groups", lambda self, groups: {})
    shared = red_onnx.compress(model, **settings)
    (plain,) = [g for g in shared.report.budget["groups"] if g.get("removed")]
    assert plain["removed"] == group["removed"] and plain["ordering"] != "refit taps"
    assert heldout < 0.9 * _heldout_error(model, shared.model, spec)  # measured: 0.220 against 0.265


def test_the_local_estimate_takes_a_tap_plan_on_the_patches(tmp_path: Path) -> None:
    """conv2's output is the model's: on the cv rows (all 1600 patches, under the 4096 sampled) the
    estimate of a plan over taps is the error the search measures there."""
    model = conv_net()
    spec = smooth_images(tmp_path / "x.npz")
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False, sensitivity="local")  # fmt: skip
    (ranking,) = [o for o in search.orderings["conv1"] if isinstance(o, RefitOrdering) and o.taps]
    assert search.measured_part == "cv" and ranking.extra is not None and ranking.extra[-1, -1] == 16 * 100
    for count in (2, 5, 9):
        merges = ranking.merges(count)
        measured = search.plan_error({"conv1": merges})
        assert search._estimate("conv1", merges) == pytest.approx(measured, rel=1e-3)
    assert ranking.estimated_error([]) == 0.0


def test_a_group_with_another_kind_of_consumer_keeps_the_refit_over_channels(tmp_path: Path) -> None:
    """conv1's channels reach a 3×3 conv after the Relu and a 1×1 conv before it: a plan over taps could
    not be written into the 1×1 one, so that group is refit over channels."""
    model = conv_net()
    w3 = np.random.default_rng(4).standard_normal((4, 16, 1, 1)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w3, "w3"))
    model.graph.node.append(helper.make_node("Conv", ["h", "w3"], ["z"], name="conv3"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 10, 10]))
    spec = smooth_images(tmp_path / "x.npz")
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False)  # fmt: skip
    (group,) = mergeable_groups(search.working, search.shapes, ())
    assert len(group.consumers) == 2 and search._tap_groups([group]) == {}
    assert "refit taps" not in [o.label for o in search.orderings[group.name]]
    result = red_onnx.compress(model, target_macs=0.7, channel_multiple=1, input_spec=spec, hashing=False)
    assert result.verified


def test_the_patch_gram_is_summed_block_by_block(monkeypatch) -> None:
    """Gathered a few patches at a time (bounded float64 rows), the Gram is the one of all of them."""
    from red_onnx.search import activations

    model = conv_net()
    feed = {"x": np.random.default_rng(5).standard_normal((3, 3, 10, 10)).astype(np.float32)}
    taps = {"r": ConvTaps((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))}
    whole = activations.patch_grams(model, [feed], taps, positions=200)["r"]
    monkeypatch.setattr(activations, "PATCH_BLOCK", 7)
    blocked = activations.patch_grams(model, [feed], taps, positions=200)["r"]
    assert whole.shape == blocked.shape == (16 * 9 + 1, 16 * 9 + 1)
    assert whole[-1, -1] == 200
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-9)


def test_a_group_too_wide_for_the_tap_refit_takes_no_patch_gram(tmp_path: Path, monkeypatch) -> None:
    """16 channels × 9 taps over the refit's row limit: no patches are captured (their Gram is large)."""
    from red_onnx.search import budget

    monkeypatch.setattr(budget, "REFIT_MAX_ATOMS", 16 * 9 - 1)
    model = conv_net()
    spec = smooth_images(tmp_path / "x.npz")
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False)  # fmt: skip
    (group,) = mergeable_groups(search.working, search.shapes, ())
    assert search._tap_groups([group]) == {}
    assert "refit taps" not in [o.label for o in search.orderings[group.name]]


def _with_second_reader(pads: list[int]) -> onnx.ModelProto:
    """conv_net with a second 3×3 conv, strided, reading conv1's channels after the Relu."""
    model = conv_net()
    w3 = np.random.default_rng(6).standard_normal((4, 16, 3, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w3, "w3"))
    model.graph.node.append(
        helper.make_node("Conv", ["r", "w3"], ["z"], name="conv3", strides=[2, 2], pads=pads)
    )
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, "H", "W"]))
    return model


def test_a_strided_reader_shares_the_unstrided_patch_gram(tmp_path: Path) -> None:
    """A strided 3×3 conv beside a 3×3 conv reads every other patch of it: one Gram (the unstrided's)
    serves both, and the written model has the held-out error the search reported."""
    model = _with_second_reader([1, 1, 1, 1])
    spec = smooth_images(tmp_path / "x.npz")
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False)  # fmt: skip
    (group,) = mergeable_groups(search.working, search.shapes, ())
    assert search._tap_groups([group]) == {group.name: ("r", ConvTaps((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)))}
    result = red_onnx.compress(model, target_macs=0.6, channel_multiple=1, input_spec=spec, hashing=False)
    (changed,) = [g for g in result.report.budget["groups"] if g.get("removed")]
    assert changed["ordering"] == "refit taps" and result.verified
    rows = heldout_rows(spec)
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (model, result.model)
    ]
    errors = []
    for want, got in zip(*(session.run(None, {"x": rows}) for session in run), strict=True):
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert max(errors) == pytest.approx(result.report.budget["heldout_error"], rel=1e-4)
    other = _with_second_reader([0, 0, 0, 0])  # other pads: other patches, no shared Gram
    search = BudgetSearch(other, other, spec, ShapeService(make_inputs(other, spec, 0)), channel_multiple=1,
                          hashing=False)  # fmt: skip
    assert search._tap_groups(mergeable_groups(search.working, search.shapes, ())) == {}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.sampled_from([1, 2]),
    kernel=st.sampled_from([2, 3, 5]),
    dilation=st.sampled_from([1, 2]),
    pad=st.integers(0, 2),
    strides=st.lists(st.sampled_from([1, 2]), min_size=1, max_size=2),
    seed=st.integers(0, 1000),
)
def test_random_tap_plans_are_written_as_measured(
    tmp_path_factory, rank: int, kernel: int, dilation: int, pad: int, strides: list[int], seed: int
) -> None:
    """Random k×k readers (1-D or 2-D, dilated, padded, one or two with other strides): whatever the
    search chooses, the written model has the held-out error it reported (the editor writes what the
    simulator measured)."""
    rng = np.random.default_rng(seed)
    size = 12
    spatial = [size] * rank
    w1 = rng.standard_normal((12, 3, *[3] * rank)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1] * 2 * rank),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
    ]
    outputs = []
    for index, stride in enumerate(strides):
        weight = rng.standard_normal((4, 12, *[kernel] * rank)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{index + 2}"))
        nodes.append(helper.make_node(
            "Conv", ["r", f"w{index + 2}"], [f"y{index}"], name=f"reader{index}", strides=[stride] * rank,
            dilations=[dilation] * rank, pads=[pad] * 2 * rank,
        ))  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, ["N", 4, *["S"] * rank]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *spatial])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("taps") / "x.npz"
    np.savez(path, x=rng.standard_normal((32, 3, *spatial)).astype(np.float32))
    spec = red_onnx.InputSpec(npz=path)
    result = red_onnx.compress(model, target_macs=0.7, channel_multiple=1, input_spec=spec, hashing=False,
                               force_target=True, raise_on_failure=False)  # fmt: skip
    assert result.verified
    rows = heldout_rows(spec)
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (model, result.model)
    ]
    errors = [
        np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
        for want, got in zip(*(session.run(None, {"x": rows}) for session in run), strict=True)
    ]
    assert max(errors) == pytest.approx(result.report.budget["heldout_error"], rel=1e-3, abs=1e-6)
