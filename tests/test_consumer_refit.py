"""A group whose consumers one refit cannot serve is refit consumer by consumer.

Consumers reading different tensors of the group (before and after a Relu, both sides of a residual
Add) or one tensor in different ways (a 3×3 conv tap by tap beside a 1×1 conv) each get a refit on
their own input; the removal order is the joint greedy OBS path (its cost the sum over the systems,
each exact in closed form); the editor writes each consumer its own plan as the simulator applies it
(the written model has the held-out error the search reported); the ranking's estimate is the error
measured where the consumers' outputs are the model's. Graphs built in code, calibration rows seeded.
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
from red_onnx.analysis.merge_sets import (
    ConsumerMerges,
    DenseMerges,
    has_offsets,
    merge_key,
    of_consumer,
    removed_atoms,
)
from red_onnx.analysis.refit import augmented_gram, block_rows, greedy_obs, greedy_obs_joint, penalised_error
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.activations import ConvTaps
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.budget_options import ConsumerRefitOrdering
from red_onnx.search.refit_systems import RefitSystem, consumer_systems
from red_onnx.verify.inputs import make_inputs

RTOL = 1e-7


def test_the_joint_path_of_one_system_is_the_greedy_path() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)) @ rng.standard_normal((4, 300)) + 0.1 * rng.standard_normal((6, 300))
    gram, weight = augmented_gram(x), rng.standard_normal((6, 3))
    single = greedy_obs(gram, weight, 4, 0.2)
    joint = greedy_obs_joint([(gram, weight, 0.2, 1, True)], 4)
    np.testing.assert_array_equal(joint.order, single.order)
    np.testing.assert_allclose(joint.cost, single.cost, rtol=1e-12)


def test_the_joint_cost_is_the_sum_of_every_systems_closed_form() -> None:
    """Two systems over the same 8 channels: one over channels (free bias), one over 3 rows a channel."""
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((5, 400))
    x1 = rng.standard_normal((8, 5)) @ latent + 0.2 * rng.standard_normal((8, 400)) + 0.3
    x2 = rng.standard_normal((24, 5)) @ latent + 0.2 * rng.standard_normal((24, 400))
    g1, g2 = augmented_gram(x1), augmented_gram(x2)
    v1, v2 = rng.standard_normal((8, 4)), rng.standard_normal((24, 2))
    systems = [(g1, v1, 0.5, 1, True), (g2, v2, 2.0, 3, False)]
    path = greedy_obs_joint(systems, 6)
    assert len(set(path.order.tolist())) == 6
    for step in range(6):
        kept = np.setdiff1d(np.arange(8), path.order[: step + 1])
        closed = penalised_error(g1, v1, kept, 0.5) + penalised_error(
            g2, v2, block_rows(kept, 3), 2.0, free_bias=False
        )
        assert path.cost[step] == pytest.approx(closed, rel=RTOL)
    with pytest.raises(ValueError, match="share no channels"):
        greedy_obs_joint([(g1, v1, 0.5, 1, True), (g2, v2, 2.0, 1, False)], 2)


def test_consumer_merges_hold_one_removal_and_give_each_consumer_its_plan() -> None:
    sources, targets = np.array([1, 3]), np.array([0, 2])
    first = DenseMerges(sources, targets, np.ones((2, 2)), np.array([0.5, 0.0]))
    second = DenseMerges(sources, targets, np.zeros((18, 18)), np.zeros(18), 9, True)
    merges = ConsumerMerges(sources, (first, second, []))
    assert len(merges) == 2 and of_consumer(merges, 1) is second and of_consumer(first, 1) is first
    assert of_consumer(merges, 2) == [] and removed_atoms(merges).tolist() == [1, 3]
    assert has_offsets(merges) and merge_key(merges) != merge_key(ConsumerMerges(sources, (first, first, [])))
    with pytest.raises(ValueError, match="keeps"):
        ConsumerMerges(np.array([1]), (first,))


def residual_net(seed: int = 0, *, consumer_bias: bool = True) -> onnx.ModelProto:
    """x[N, 3, 10, 10] → conv1 3×3 (16, mixtures of 6 kernels) = h; r = Relu(h);
    y1 = conv2 3×3 (r); y2 = conv3 1×1 (h); s = Relu(h + skip 1×1(x)) → y3 = conv4 3×3 (s)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((6, 27))
    w1 = (rng.standard_normal((16, 6)) @ base).reshape(16, 3, 3, 3) + 0.1 * rng.standard_normal((16, 3, 3, 3))
    weights = {
        "w1": w1,
        "b1": 0.1 * rng.standard_normal(16),
        "w2": rng.standard_normal((8, 16, 3, 3)) / 12,
        "w3": rng.standard_normal((4, 16, 1, 1)) / 4,
        "b3": rng.standard_normal(4) if consumer_bias else np.zeros(4),
        "ws": rng.standard_normal((16, 3, 1, 1)),
        "w4": rng.standard_normal((6, 16, 3, 3)) / 12,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y1"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "w3", "b3"], ["y2"], name="conv3"),
        helper.make_node("Conv", ["x", "ws"], ["k"], name="skip"),
        helper.make_node("Add", ["h", "k"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["s"], name="relu2"),
        helper.make_node("Conv", ["s", "w4"], ["y3"], name="conv4", pads=[1, 1, 1, 1]),
    ]
    outputs = [("y1", 8), ("y2", 4), ("y3", 6)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", c, 10, 10]) for name, c in outputs],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _search(model: onnx.ModelProto, spec: red_onnx.InputSpec, **options) -> BudgetSearch:
    shapes = ShapeService(make_inputs(model, spec, 0))
    return BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False, **options)


def test_the_consumers_fall_into_systems_by_tensor_and_kind(tmp_path: Path) -> None:
    search = _search(residual_net(), smooth_images(tmp_path / "x.npz"))
    groups = {g.name: g for g in mergeable_groups(search.working, search.shapes, ())}
    group = next(g for g in groups.values() if len(g.consumers) == 3)
    names = [c.node.name for c in group.consumers]
    systems = consumer_systems(group)
    assert systems is not None
    by_reader = {tuple(names[i] for i in s.consumers): s for s in systems}
    assert set(by_reader) == {("conv2",), ("conv3",), ("conv4",)}
    three = ConvTaps((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    assert by_reader[("conv2",)] == RefitSystem("r", by_reader[("conv2",)].consumers, three)
    assert by_reader[("conv3",)].taps is None and by_reader[("conv3",)].tensor == "h"
    assert by_reader[("conv4",)].tensor == "s" and by_reader[("conv4",)].block == 9
    ranking = next(o for o in search.orderings[group.name] if isinstance(o, ConsumerRefitOrdering))
    assert [fit.block for fit in ranking.fits] == [s.block for s in systems]
    merges = ranking.merges(5)
    assert isinstance(merges, ConsumerMerges) and len(merges) == 5
    assert [p.taps for p in merges.plans] == [p.taps for p in (of_consumer(merges, i) for i in range(3))]
    assert sorted(p.taps for p in merges.plans) == [False, True, True]


def test_the_written_per_consumer_refit_has_the_error_the_search_reported(
    tmp_path: Path, monkeypatch
) -> None:
    """Each consumer gets its own plan in the written model, as the simulator measured it; without the
    per-consumer refit the error at the same MACs is larger."""
    model = residual_net()
    spec = smooth_images(tmp_path / "x.npz")
    settings = {"target_macs": 0.6, "channel_multiple": 1, "input_spec": spec, "hashing": False,
                "sequential_refit": False}  # fmt: skip  # the one-shot refit, as the search measured it
    result = red_onnx.compress(model, **settings)
    (changed,) = [g for g in result.report.budget["groups"] if g.get("removed")]
    assert changed["ordering"] == "refit per consumer" and result.verified
    heldout = heldout_rows(spec)
    errors = output_errors(model, result.model, heldout)
    assert max(errors) == pytest.approx(result.report.budget["heldout_error"], rel=1e-4)
    from red_onnx.search import budget

    monkeypatch.setattr(budget, "consumer_systems", lambda group: None)
    shared = red_onnx.compress(model, **settings)
    (plain,) = [g for g in shared.report.budget["groups"] if g.get("removed")]
    assert plain["ordering"] != "refit per consumer"
    assert max(errors) < max(output_errors(model, shared.model, heldout))


def test_the_estimate_of_a_per_consumer_plan_is_the_error_measured(tmp_path: Path) -> None:
    """Every consumer's output is a model output, none with a bias of its own: on the rows the search
    measures (all their positions, fewer than the sampled ones), the estimate over all systems is the
    relative change of the outputs taken together."""
    model = residual_net(consumer_bias=False)
    search = _search(model, smooth_images(tmp_path / "x.npz"), sensitivity="local")
    assert search.measured_part == "cv" and search.simulator is not None
    group = next(g for g in mergeable_groups(search.working, search.shapes, ()) if len(g.consumers) == 3)
    ranking = next(o for o in search.orderings[group.name] if isinstance(o, ConsumerRefitOrdering))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = search.verifier.inputs
    for count in (2, 6, 10):
        merges = ranking.merges(count)
        simulated = search.simulator.run({group.name: merges}, feeds)
        change = total = 0.0
        for feed, outputs in zip(feeds, simulated, strict=True):
            for name, want in zip(["y1", "y2", "y3"], session.run(["y1", "y2", "y3"], feed), strict=True):
                change += float(np.sum((outputs[name].astype(np.float64) - want) ** 2))
                total += float(np.sum(want.astype(np.float64) ** 2))
        assert search._estimate(group.name, merges) == pytest.approx(np.sqrt(change / total), rel=1e-4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    readers=st.lists(
        st.tuples(
            st.sampled_from(["h", "r"]), st.sampled_from([1, 3]), st.integers(0, 1), st.sampled_from([1, 2])
        ),
        min_size=2,
        max_size=3,
    ),
    seed=st.integers(0, 1000),
)
def test_random_consumer_mixes_are_written_as_measured(
    tmp_path_factory, readers: list[tuple[str, int, int, int]], seed: int
) -> None:
    """Random readers of a conv's channels, before or after its Relu: 1×1 or 3×3, padded or not,
    strided or not. Whatever the search chooses, the written model has the held-out error it reported."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 3, 3, 3)).astype(np.float32), "w1")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
    ]
    outputs = []
    for index, (tensor, kernel, pad, stride) in enumerate(readers):
        weight = rng.standard_normal((4, 12, kernel, kernel)).astype(np.float32)
        bias = rng.standard_normal(4).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"w{index + 2}"),
            numpy_helper.from_array(bias, f"b{index + 2}"),
        ]
        nodes.append(helper.make_node("Conv", [tensor, f"w{index + 2}", f"b{index + 2}"], [f"y{index}"],
                                      name=f"reader{index}", pads=[pad * (kernel // 2)] * 4,
                                      strides=[stride] * 2))  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, ["N", 4, "H", "W"]))
    _assert_written_as_measured(nodes, inits, outputs, tmp_path_factory.mktemp("consumers"), rng, 0.7, 1)


def _assert_written_as_measured(
    nodes: list,
    inits: list,
    outputs: list,
    folder: Path,
    rng: np.random.Generator,
    target: float,
    multiple: int,
) -> None:
    """The graph of ``nodes`` (input x[N, 3, 8, 8]) compressed on 32 seeded rows at ``target``: its
    written model has on the held-out rows the error the search reported."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    np.savez(folder / "x.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    spec = red_onnx.InputSpec(npz=folder / "x.npz")
    options = {"channel_multiple": multiple, "input_spec": spec, "hashing": False, "force_target": True}
    result = red_onnx.compress(model, target_macs=target, raise_on_failure=False, **options)
    assert result.verified
    errors = output_errors(model, result.model, heldout_rows(spec))
    assert max(errors) == pytest.approx(result.report.budget["heldout_error"], rel=1e-3, abs=1e-6)


def test_the_joint_path_over_segments_costs_each_system_its_own_channels() -> None:
    """System 1 reads channels 0..9, system 2 channels 6..9 only (a Split's chunk): the cost is each
    system's closed form over the channels it reads, and system 2 keeps one channel."""
    rng = np.random.default_rng(2)
    latent = rng.standard_normal((4, 300))
    x1 = rng.standard_normal((10, 4)) @ latent + 0.3 * rng.standard_normal((10, 300))
    g1, v1 = augmented_gram(x1), rng.standard_normal((10, 3))
    g2, v2 = augmented_gram(x1[6:] + 0.1 * rng.standard_normal((4, 300))), 3.0 * rng.standard_normal((4, 2))
    members = [np.arange(10), np.arange(6, 10)]
    path = greedy_obs_joint([(g1, v1, 0.5, 1, True), (g2, v2, 0.5, 1, True)], 9, members=members, channels=10)
    assert path.order.size == 9  # the last channel of system 1 would also empty system 2: 9 of 10 go
    assert np.isin(np.arange(6, 10), path.order).sum() == 3  # the last of system 2 stays
    for step in range(path.order.size):
        removed = path.order[: step + 1]
        closed = penalised_error(g1, v1, np.setdiff1d(np.arange(10), removed), 0.5)
        closed += penalised_error(g2, v2, np.flatnonzero(~np.isin(np.arange(6, 10), removed)), 0.5)
        assert path.cost[step] == pytest.approx(closed, rel=RTOL)


def c2f_net(seed: int = 0) -> onnx.ModelProto:
    """YOLOv8's C2f block: a = Relu(1×1 conv (16)) split into s0, s1 (8 each); m = two 3×3 convs on
    s1; y = 1×1 conv (6) of Concat(s0, s1, m). The group of a's and m's channels (24) is read by the
    first 3×3 conv (s1: a segment) and by the last 1×1 conv (all of it)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((5, 3))
    weights = {
        "wa": (rng.standard_normal((16, 5)) @ latent).reshape(16, 3, 1, 1)
        + 0.1 * rng.standard_normal((16, 3, 1, 1)),
        "ba": 0.2 * rng.standard_normal(16),
        "wb1": rng.standard_normal((8, 8, 3, 3)) / 8,
        "wb2": rng.standard_normal((8, 8, 3, 3)) / 8,
        "wc": rng.standard_normal((6, 24, 1, 1)) / 5,
        "bc": rng.standard_normal(6),
        "split": np.array([8, 8]),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["pa"], name="cv1"),
        helper.make_node("Relu", ["pa"], ["a"], name="relu_a"),
        helper.make_node("Split", ["a", "split"], ["s0", "s1"], name="split", axis=1),
        helper.make_node("Conv", ["s1", "wb1"], ["pb1"], name="m_cv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["pb1"], ["b1"], name="relu_b1"),
        helper.make_node("Conv", ["b1", "wb2"], ["pb2"], name="m_cv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["pb2"], ["m"], name="relu_m"),
        helper.make_node("Concat", ["s0", "s1", "m"], ["c"], name="concat", axis=1),
        helper.make_node("Conv", ["c", "wc", "bc"], ["y"], name="cv2"),
    ]
    inits = [
        numpy_helper.from_array(w.astype(np.int64 if n == "split" else np.float32), n)
        for n, w in weights.items()
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 10, 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("multiple", [1, 4])
def test_a_group_of_segments_is_refit_consumer_by_consumer(tmp_path: Path, multiple: int) -> None:
    """The C2f group: the 3×3 conv reading one chunk is refit tap by tap on that chunk's atoms, the
    1×1 conv on all; the written model has the held-out error reported, every chunk on its step."""
    model = c2f_net()
    spec = smooth_images(tmp_path / "x.npz")
    search = _search(model, spec)
    group = next(g for g in mergeable_groups(search.working, search.shapes, ()) if g.n_atoms == 24)
    systems = consumer_systems(group)
    assert systems is not None and sorted((s.tensor, s.block) for s in systems) == [("c", 1), ("s1", 9)]
    result = red_onnx.compress(
        model, target_macs=0.5, channel_multiple=multiple, input_spec=spec, hashing=False
    )
    (changed,) = [g for g in result.report.budget["groups"] if g.get("removed") and g["channels"] == 24]
    assert changed["ordering"] == "refit per consumer" and result.verified
    heldout = heldout_rows(spec)
    assert max(output_errors(model, result.model, heldout)) == pytest.approx(
        result.report.budget["heldout_error"], rel=1e-4
    )
    sizes = {init.name: numpy_helper.to_array(init) for init in result.model.graph.initializer}
    (split,) = [node for node in result.model.graph.node if node.op_type == "Split"]
    chunks = sizes[split.input[1]].tolist()
    assert sum(chunks) < 16 and all(chunk % multiple == 0 for chunk in chunks)  # every chunk on its step


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.sampled_from([4, 6, 8]),
    chunk=st.integers(0, 1),
    kernel=st.sampled_from([1, 3]),
    multiple=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_random_split_readers_are_written_as_measured(
    tmp_path_factory, first: int, chunk: int, kernel: int, multiple: int, seed: int
) -> None:
    """A conv's 12 channels split in two chunks: one chunk read by a 1×1 or 3×3 conv, both chunks
    concatenated again into a 1×1 conv. Whatever the search chooses, the written model has the
    held-out error it reported."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((12, 3, 3, 3)),
        "wk": rng.standard_normal((4, (first, 12 - first)[chunk], kernel, kernel)),
        "wc": rng.standard_normal((5, 12, 1, 1)),
        "bc": rng.standard_normal(5),
    }
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
    inits.append(numpy_helper.from_array(np.array([first, 12 - first], np.int64), "sizes"))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Split", ["r", "sizes"], ["c0", "c1"], name="split", axis=1),
        helper.make_node("Conv", [f"c{chunk}", "wk"], ["y0"], name="reader", pads=[kernel // 2] * 4),
        helper.make_node("Concat", ["c0", "c1"], ["c"], name="concat", axis=1),
        helper.make_node("Conv", ["c", "wc", "bc"], ["y1"], name="mixer"),
    ]
    outputs = [
        helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", c, 8, 8]) for i, c in ((0, 4), (1, 5))
    ]
    _assert_written_as_measured(nodes, inits, outputs, tmp_path_factory.mktemp("split"), rng, 0.8, multiple)
