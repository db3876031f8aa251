"""Candidates fitted on synthetic activations: affine fits, offsets folded into biases, chains."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import Net
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx.analysis.merge_sets import DenseMerges, of_consumer
from red_onnx.analysis.redundancy import Merge
from red_onnx.analysis.similarity import Candidates, resolve_merges
from red_onnx.errors import RewriteError
from red_onnx.options import InputSpec
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.budget_options import ConsumerRefitOrdering, Ordering
from red_onnx.verify.inputs import make_inputs


def _candidates(rows: list[tuple[int, int, float, float]]) -> Candidates:
    source, target, scale, offset = (np.array(column) for column in zip(*rows, strict=True))
    zeros = np.zeros(len(rows))
    return Candidates(source.astype(np.int64), target.astype(np.int64), scale, zeros, zeros, offset)


def test_chains_compose_scale_and_offset() -> None:
    merges = resolve_merges(_candidates([(2, 1, 2.0, 1.0), (1, 0, 3.0, 0.5)]), 2)
    by_source = {m.source: m for m in merges}
    assert by_source[1].target == 0 and by_source[1].scale == 3.0 and by_source[1].offset == 0.5
    # y2 = 2·y1 + 1 and y1 = 3·y0 + 0.5  →  y2 = 6·y0 + 2
    assert by_source[2].target == 0 and by_source[2].scale == 6.0 and by_source[2].offset == 2.0


def affine_pair_net(seed: int = 0) -> onnx.ModelProto:
    """conv1 (8 channels, no activation; channel 5 = 2·channel 2 + 0.5) → unpadded 1x1 conv2."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w1[5], b1[5] = 2 * w1[2], 2 * b1[2] + 0.5
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_affine_duplicate_goes_with_its_offset_in_the_bias() -> None:
    model = affine_pair_net()
    result = red_onnx.compress(model, tolerance=1e-4, channel_multiple=1, hashing=False, activations=True)
    layers = {layer.name: layer for layer in result.report.layers}
    assert (layers["conv1"].channels_before, layers["conv1"].channels_after) == (8, 7)
    chosen = {g["ordering"] for g in result.report.budget["groups"] if g["removed"]}
    assert chosen == {"activations"}
    feed = {"x": np.random.default_rng(5).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    onnx.checker.check_model(result.model, full_check=True)


def test_activation_ranking_is_off_on_synthetic_inputs_and_on_with_real_ones(tmp_path) -> None:
    model = affine_pair_net()
    synthetic = red_onnx.compress(model, tolerance=1e-4, channel_multiple=1)
    assert synthetic.report.options["activations"] is False
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.random.default_rng(3).standard_normal((1, 3, 6, 6)).astype(np.float32))
    spec = red_onnx.InputSpec(npz=inputs)
    real = red_onnx.compress(model, tolerance=1e-4, channel_multiple=1, input_spec=spec)
    assert real.report.options["activations"] is True


def test_pink_prior_is_smooth_unit_variance_noise() -> None:
    from red_onnx.verify.inputs import make_inputs

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [value], [out])
    identity = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    image = make_inputs(identity, red_onnx.InputSpec(prior="pink"), 0)["x"]
    assert image.shape == (1, 3, 64, 64) and image.dtype == np.float32
    np.testing.assert_allclose(image.std(axis=(2, 3)), 1.0, rtol=1e-4)
    white = make_inputs(identity, red_onnx.InputSpec(), 0)["x"]
    neighbours = [np.corrcoef(a[0, 0, :, :-1].ravel(), a[0, 0, :, 1:].ravel())[0, 1] for a in (image, white)]
    assert neighbours[0] > neighbours[1] + 0.3  # neighbouring pixels correlate


def _split_reader_net() -> onnx.ModelProto:
    """convA (8 channels) read whole by convD and split 4 + 4 into convE and convF: three segments."""
    net = Net(0)
    a = net.act("Relu", net.conv("convA", net.input("x", [1, 4, 8, 8]), 4, 8), "reluA")
    d = net.conv("convD", a, 8, 4)
    sizes = net.const("split.sizes", [4, 4], np.int64)
    net.nodes.append(helper.make_node("Split", [a, sizes], ["s0", "s1"], name="split", axis=1))
    e, f = net.conv("convE", "s0", 4, 4), net.conv("convF", "s1", 4, 4)
    return net.build([net.op("Add", [net.op("Add", [d, e], "add1"), f], "add2")])


def test_activation_candidates_stay_within_a_segment() -> None:
    """A consumer reading the source but not the target cannot take the compensation (it went to a wrong
    row before: 19 of 32 activation candidates crossed chunks on this graph)."""
    model, spec = _split_reader_net(), InputSpec()
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1)
    ranked = {o.label: o for o in search.orderings["convA"]}
    assert "activations" in ranked
    (group,) = [g for g in mergeable_groups(search.working, search.shapes, ()) if g.name == "convA"]
    each = ranked.pop("refit per consumer")  # each consumer is refit on the atoms it reads
    assert isinstance(each, ConsumerRefitOrdering)
    merges = each.merges(4)
    for index, consumer in enumerate(group.consumers):
        local = group.atom_index(consumer.tensor)
        plan = of_consumer(merges, index)
        assert isinstance(plan, DenseMerges) or plan == []
        if isinstance(plan, DenseMerges):
            assert (local[plan.sources] >= 0).all() and (local[plan.targets] >= 0).all()
    for ordering in ranked.values():
        assert isinstance(ordering, Ordering)
        segment, found = ordering.steps.segment, ordering.candidates
        assert len(found) > 0
        assert np.array_equal(segment[found.source], segment[found.target])
    crossing = [(j, i) for j in range(8) for i in range(8) if segment[j] != segment[i]]
    assert crossing
    with pytest.raises(RewriteError, match="reads the source but not the target"):
        search.apply_plan({"convA": [Merge(*crossing[0], 1.0)]})
