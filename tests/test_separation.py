"""Uneven depthwise separation: factorisation, the exact rewrite vs onnxruntime, MACs, and decisions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx import cli
from red_onnx.analysis.separation import (
    break_even_units,
    conv_macs,
    factor_kernels,
    separated_macs,
    units_lower_bound,
)
from red_onnx.measure import metrics
from red_onnx.measure.latency import LatencyService
from red_onnx.passes.separate_depthwise import SeparateDepthwise, probe_models
from red_onnx.rewrite.separation import separate_conv

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def planted_weight(
    rng: np.random.Generator,
    out_channels: int,
    counts: list[int],
    kernel: tuple[int, ...],
    zero_share: float = 0.2,
) -> np.ndarray:
    """``W[O, I, *kernel]``: input channel c uses ``counts[c]`` unit kernels (scaled, signed, some zero)."""
    weight = np.zeros((out_channels, len(counts), *kernel))
    for channel, count in enumerate(counts):
        units = rng.standard_normal((max(count, 1), *kernel))
        pick = rng.integers(0, max(count, 1), out_channels)
        scale = rng.uniform(0.3, 2.0, out_channels) * rng.choice([-1.0, 1.0], out_channels)
        scale[rng.random(out_channels) < zero_share] = 0.0
        if count == 0:
            scale[:] = 0.0
        weight[:, channel] = scale.reshape(-1, *([1] * len(kernel))) * units[pick]
    return weight.astype(np.float32)


def conv_model(
    weight: np.ndarray, bias: np.ndarray | None, input_shape: list[int], **attrs: object
) -> onnx.ModelProto:
    """One Conv with constant weight (and bias), opset 17."""
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    out_shape = [input_shape[0], weight.shape[0]] + [None] * (len(input_shape) - 2)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


def separated(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    separate_conv(graph, conv, factor_kernels(conv.inputs[1].values))
    out = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(out, full_check=True)
    return out


# --- factorisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (2, 3), (3, 3, 3)])
def test_planted_counts_are_found(kernel: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    counts = [2, 0, 3, 1, 2]
    weight = planted_weight(rng, 16, counts, kernel, zero_share=0.0)
    basis = factor_kernels(weight)
    assert basis.counts.tolist() == counts
    assert basis.size == sum(counts)
    assert basis.error < 1e-6
    np.testing.assert_allclose(basis.reconstruct(), weight, rtol=1e-5, atol=1e-6)


def test_all_zero_weight_has_an_empty_basis() -> None:
    basis = factor_kernels(np.zeros((3, 2, 3, 3), np.float32))
    assert basis.size == 0 and basis.counts.tolist() == [0, 0] and basis.error == 0.0


def test_zero_kernels_need_no_unit() -> None:
    weight = np.zeros((4, 3, 3, 3), np.float32)
    weight[1, 2] = 1.0
    basis = factor_kernels(weight)
    assert basis.counts.tolist() == [0, 0, 1]
    assert basis.channels.tolist() == [2]


def test_trained_like_kernels_do_not_repeat() -> None:
    weight = np.random.default_rng(2).standard_normal((8, 4, 3, 3)).astype(np.float32)
    basis = factor_kernels(weight)
    assert basis.size == 8 * 4
    assert basis.size > break_even_units(8, 4, 9)


def test_macs_formula_matches_the_counter() -> None:
    rng = np.random.default_rng(3)
    weight = planted_weight(rng, 12, [1, 2, 0, 1], (3, 3))
    model = conv_model(weight, None, [2, 4, 10, 9], strides=[2, 1], pads=[1, 1, 1, 1])
    basis = factor_kernels(weight)
    before = metrics.measure(model, {"x": [2, 4, 10, 9]}).macs
    after = metrics.measure(separated(model), {"x": [2, 4, 10, 9]}).macs
    pixels = 2 * 5 * 9
    assert before == conv_macs(12, 4, 9, pixels)
    assert after == separated_macs(12, basis.size, 9, pixels)


# --- the rewrite is exact -----------------------------------------------------------------------


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[onnx.ModelProto, list[int]]:
    spatial = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(2, 3)) for _ in range(spatial))
    counts = draw(st.lists(st.integers(0, 3), min_size=1, max_size=5))
    uniform = draw(st.booleans())
    if uniform:
        counts = [max(counts[0], 1)] * len(counts)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weight = planted_weight(rng, draw(st.integers(1, 9)), counts, kernel, zero_share=0.0 if uniform else 0.2)
    assume(np.any(weight))
    attrs: dict[str, object] = {}
    if draw(st.booleans()):
        attrs["strides"] = [draw(st.integers(1, 2)) for _ in range(spatial)]
    if draw(st.booleans()):
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(spatial)]
    padding = draw(st.sampled_from(["none", "pads", "same"]))
    if padding == "pads":
        attrs["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * spatial)]
    elif padding == "same" and "dilations" not in attrs:  # onnxruntime: no dilation with SAME_*
        attrs["auto_pad"] = "SAME_UPPER"
    bias = rng.standard_normal(weight.shape[0]).astype(np.float32) if draw(st.booleans()) else None
    shape = [draw(st.integers(1, 2)), len(counts)] + [draw(st.integers(7, 11)) for _ in range(spatial)]
    return conv_model(weight, bias, shape, **attrs), shape


@SETTINGS
@given(conv_cases())
def test_separated_conv_equals_the_conv(case: tuple[onnx.ModelProto, list[int]]) -> None:
    model, shape = case
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    expected = run(model, x)
    got = run(separated(model), x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def test_uniform_counts_use_a_plain_depthwise_multiplier() -> None:
    weight = planted_weight(np.random.default_rng(4), 10, [2, 2, 2], (3, 3), zero_share=0.0)
    ops = [n.op_type for n in separated(conv_model(weight, None, [1, 3, 8, 8])).graph.node]
    assert ops == ["Conv", "Conv"]


def test_uneven_counts_gather_their_channels() -> None:
    weight = planted_weight(np.random.default_rng(5), 10, [1, 3, 0], (3, 3), zero_share=0.0)
    model = separated(conv_model(weight, None, [1, 3, 8, 8]))
    assert [n.op_type for n in model.graph.node] == ["Gather", "Conv", "Conv"]
    indices = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_channels"))
    assert indices.tolist() == [0, 1, 1, 1]


# --- decisions, with a latency double ---------------------------------------------------------------


class FakeLatency:
    """Reports the given times and records what it was asked."""

    provider = "FakeProvider"

    def __init__(self, before: float, after: float) -> None:
        self.times, self.calls = (before, after), 0

    def compare(
        self, before: onnx.ModelProto, after: onnx.ModelProto, feed: dict, *, runs: int | None = None
    ) -> tuple[float, float]:
        self.calls += 1
        assert [n.op_type for n in before.graph.node] == ["Conv"]
        assert [n.op_type for n in after.graph.node][-2:] == ["Conv", "Conv"]
        assert feed["x"].shape == (1, 4, 12, 12)
        return self.times


def two_conv_net(first: np.ndarray) -> onnx.ModelProto:
    """conv(first, pads 1) -> Relu -> conv 3x3 (random, does not repeat)."""
    rng = np.random.default_rng(9)
    second = rng.standard_normal((3, first.shape[0], 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
    ]
    inits = [
        numpy_helper.from_array(first, "w1"),
        numpy_helper.from_array(rng.standard_normal(first.shape[0]).astype(np.float32), "b1"),
        numpy_helper.from_array(second, "w2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 10, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


PAYING = planted_weight(np.random.default_rng(6), 32, [1, 2, 1, 1], (3, 3), zero_share=0.0)


def decisions(result: red_onnx.Result) -> dict[str, dict]:
    item = next(p for p in result.report.passes if p.name == "separate_depthwise")
    return {conv["name"]: conv for conv in item.stats["convs"]}


def test_measured_faster_is_separated_and_exact() -> None:
    fake = FakeLatency(2e-3, 1e-3)
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=fake)
    assert fake.calls == 1  # only c1 cuts MACs; c2's kernels are all distinct
    rows = decisions(result)
    assert rows["c1"]["separated"] and rows["c1"]["units"] == 5
    assert rows["c1"]["latency_before_ms"] == 2.0 and rows["c1"]["latency_after_ms"] == 1.0
    assert not rows["c2"]["separated"] and rows["c2"]["latency_before_ms"] is None
    assert "needs U <" in rows["c2"]["decision"]
    assert result.verified
    assert result.report.macs_after < result.report.macs_before
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Conv") == 3 and "Gather" in ops


@pytest.mark.parametrize(
    ("after", "verdict", "calls"),
    [(1.0e-3, "kept: marginal", 2), (0.97e-3, "kept: marginal", 2), (1.5e-3, "kept: slower", 1)],
)
def test_not_faster_enough_is_kept(after: float, verdict: str, calls: int) -> None:
    fake = FakeLatency(1e-3, after)
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=fake)
    row = decisions(result)["c1"]
    assert not row["separated"] and row["verdict"] == verdict and fake.calls == calls
    assert "% faster" in row["decision"]
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Conv"]


def test_no_latency_check_decides_on_macs() -> None:
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, latency_check=False)
    row = decisions(result)["c1"]
    assert row["separated"] and row["latency_before_ms"] is None and "--no-latency-check" in row["decision"]
    assert result.verified


def test_separation_off() -> None:
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, separation=False)
    assert "separate_depthwise" not in [p.name for p in result.report.passes]


def test_frozen_conv_is_skipped_with_the_reason() -> None:
    fake = FakeLatency(2e-3, 1e-3)
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=fake, freeze=["c1"])
    item = next(p for p in result.report.passes if p.name == "separate_depthwise")
    assert fake.calls == 0
    assert any(s["subject"] == "c1" and "--freeze" in s["reason"] for s in item.skips)


def test_grouped_conv_is_skipped_with_the_reason() -> None:
    model = two_conv_net(PAYING)
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.name == "c2")
    conv.attrs["group"] = 2
    conv.inputs[1].values = conv.inputs[1].values[:, :16].copy()
    item = SeparateDepthwise(shapes=lambda m: {}, latency=None)
    working = red_onnx.io.graph.import_model(gs.export_onnx(graph))
    skips = item(working).skips
    assert any(s.subject == "c2" and "group=2" in s.reason for s in skips)


def test_probe_models_are_the_conv_and_its_separated_form() -> None:
    graph = gs.import_onnx(two_conv_net(PAYING))
    conv = next(n for n in graph.nodes if n.name == "c1")
    before, after = probe_models(conv, factor_kernels(conv.inputs[1].values), [1, 4, 12, 12])
    x = np.random.default_rng(0).standard_normal((1, 4, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-5, atol=1e-5)


# --- the real latency service -----------------------------------------------------------------------


def test_latency_service_measures_and_caches() -> None:
    service = LatencyService(runs=3, warmup=1)
    model = conv_model(PAYING, None, [1, 4, 12, 12])
    feed = {"x": np.zeros((1, 4, 12, 12), np.float32)}
    first = service.compare(model, separated(model), feed)
    again = service.compare(model, separated(model), feed)
    assert first == again and service.probes == 1
    assert all(t > 0 for t in first)


def test_unknown_provider_is_a_usage_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "net.onnx"
    onnx.save(two_conv_net(PAYING), source)
    code = cli.main([str(source), str(tmp_path / "out.onnx"), "--provider", "NoSuchProvider"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and "NoSuchProvider" in err and "CPUExecutionProvider" in err and "\n" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_cli_reports_separation_decisions(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source, out, report = tmp_path / "net.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(two_conv_net(PAYING), source)
    code = cli.main([str(source), str(out), "--exact", "--no-latency-check", "--json", str(report)])
    text = capfd.readouterr().out
    assert code == 0
    assert "depthwise separation (MACs only: --no-latency-check): 1 of 2 k×k convs separated" in text
    rows = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == "separate_depthwise")
    assert [c["name"] for c in rows["stats"]["convs"]] == ["c1", "c2"]
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert layers["c1"]["channels_after"] == 32 and layers["c1"]["macs_after"] < layers["c1"]["macs_before"]


@pytest.mark.parametrize("seed", range(5))
def test_rank_bound_never_exceeds_the_unit_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, 6).tolist()
    weight = planted_weight(rng, 12, counts, (3, 3))
    assert units_lower_bound(weight) <= factor_kernels(weight).size


def test_rank_bound_of_trained_like_weights_is_min_of_outputs_and_kernel_size() -> None:
    weight = np.random.default_rng(8).standard_normal((5, 4, 3, 3)).astype(np.float32)
    assert units_lower_bound(weight) == 4 * 5
    wide = np.random.default_rng(8).standard_normal((32, 4, 3, 3)).astype(np.float32)
    assert units_lower_bound(wide) == 4 * 9
