"""``--benchmark``: latency before/after per batch, through the CLI and the API; the batch axes it uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx import cli
from red_onnx.measure.benchmark import NO_DYNAMIC_BATCH, BatchAxisError, batch_axes, batched_feed, benchmark
from red_onnx.measure.kernel_profile import WEIGHTED_OPS, KernelProfile, profile_kernels, summed
from red_onnx.measure.latency import LatencyService
from red_onnx.options import InputSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from zoo import zoo_dir

HIDDEN = 6
ONE_THREAD = LatencyService(threads=1)


def conv_relu(batch: int | str) -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 16, 16])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_batch_is_measured_at_1_and_16() -> None:
    model = conv_relu("N")
    figures = benchmark(model, model, InputSpec(), runs=3, threads=1)
    assert set(figures.batches) == {"1", "16"} and not figures.skipped
    for row in figures.batches.values():
        assert row["before_ms"] > 0 and row["after_ms"] > 0
        assert row["ratio"] == pytest.approx(row["after_ms"] / row["before_ms"], rel=1e-2)
    assert figures.threads == 1 and figures.runs == 3 and figures.provider == "CPUExecutionProvider"


def test_static_batch_says_why_16_is_not_measured() -> None:
    model = conv_relu(1)
    figures = benchmark(model, model, InputSpec(), runs=2)
    assert list(figures.batches) == ["1"]
    assert figures.skipped == {"16": NO_DYNAMIC_BATCH}


def test_cli_benchmark_reports_latency(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source, report = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(conv_relu("N"), source)
    code = cli.main([str(source), str(tmp_path / "o.onnx"), "--exact", "--benchmark", "--threads", "1",
                     "--json", str(report)])  # fmt: skip
    out = capfd.readouterr().out
    assert code == 0
    assert "latency (onnxruntime CPUExecutionProvider, threads 1, median of 20 runs" in out
    latency = json.loads(report.read_text())["latency"]
    assert set(latency["batches"]) == {"1", "16"}


def elementwise_tail(ops: int) -> onnx.ModelProto:
    """A 1×1 conv to 4 channels, then ``ops`` Add/Mul/Clip ops on its 64×64 output."""
    weight = np.random.default_rng(1).standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv")]
    for k in range(ops):
        kind = ("Add", "Mul", "Clip")[k % 3]
        inputs = [f"t{k}", f"t{k}"] if kind != "Clip" else [f"t{k}"]
        nodes.append(helper.make_node(kind, inputs, [f"t{k + 1}"], name=f"op{k}"))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info(f"t{ops}", TensorProto.FLOAT, ["N", 4, 64, 64])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def wide_convs() -> onnx.ModelProto:
    """Two 3×3 convs of 64 channels: nearly all kernel time in convolutions."""
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in ((64, 3, 3, 3), (64, 64, 3, 3))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["h"], name="c0", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["h", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 32, 32])],
        [numpy_helper.from_array(w, f"w{k}") for k, w in enumerate(weights)],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_kernel_time_is_summed_per_op_type_and_the_conv_share_follows_the_graph() -> None:
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    tail = profile_kernels(elementwise_tail(30), feed, ONE_THREAD, runs=3)
    assert {"Add", "Mul", "Clip"} <= set(tail.times) and all(value > 0 for value in tail.times.values())
    assert set(tail.times) & WEIGHTED_OPS  # the conv (Conv, or FusedConv once onnxruntime fused it)
    assert tail.run_time >= sum(tail.times.values())  # a run holds its kernels
    feed = {"x": feed["x"][:, :, :32, :32]}
    convs = profile_kernels(wide_convs(), feed, ONE_THREAD, runs=3)
    assert tail.share is not None and convs.share is not None
    assert 0.0 < tail.share < 0.5 < convs.share <= 1.0


def test_the_share_is_of_the_run_and_without_the_first_one() -> None:
    def node(op: str, ts: int, dur: int) -> dict:
        name = f"{op}_node_kernel_time"
        return {"cat": "Node", "name": name, "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        node("Conv", 10, 80), node("Add", 95, 5),  # the first run: allocations, left out
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
        node("Conv", 205, 30), node("Add", 240, 10),
        {"cat": "Node", "name": "Conv_node_fence_before", "ts": 230, "dur": 7, "args": {"op_name": "Conv"}},
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 70},
        node("Conv", 305, 50), node("Add", 360, 10),
    ]  # fmt: skip
    profile = summed(events)
    assert profile.times == {"Conv": 40.0, "Add": 10.0} and profile.run_time == 60.0
    assert profile.weighted_time == 40.0 and profile.share == pytest.approx(2 / 3)
    assert KernelProfile({"Conv": 3.0, "Add": 1.0}, 0.0).share == 0.75  # no run events: the kernels
    assert KernelProfile({"Conv": 3.0}, 2.0).share == 1.0  # capped
    assert KernelProfile({}, 5.0).share is None


def test_benchmark_reports_the_conv_share_before_and_after(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = elementwise_tail(12)
    figures = benchmark(model, model, InputSpec(), runs=2, threads=1)
    share = figures.weighted_share
    assert share is not None and share["batch"] == "1"
    assert 0.0 < share["before"] < 1.0 and 0.0 < share["after"] < 1.0
    source = tmp_path / "m.onnx"
    onnx.save(wide_convs(), source)
    code = cli.main([str(source), str(tmp_path / "o.onnx"), "--exact", "--benchmark", "--threads", "1"])
    out = capfd.readouterr().out
    assert code == 0
    assert "convolutions and matmuls:" in out and "of the run (batch 1, onnxruntime's profiler)" in out


def test_cli_bad_thread_count_is_a_usage_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(conv_relu("N"), source)
    code = cli.main([str(source), str(tmp_path / "o.onnx"), "--benchmark", "--threads", "0"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and "--threads" in err and "\n" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_batch_the_model_cannot_run_is_skipped_with_onnxruntimes_reason() -> None:
    model = conv_relu("N")  # its axis 0 is dynamic, but a Reshape hard-codes batch 1 (as some exports do)
    shape = numpy_helper.from_array(np.array([1, 8 * 16 * 16], np.int64), "flat_shape")
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("Reshape", ["y", "flat_shape"], ["flat"], name="flatten"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 8 * 16 * 16]))
    figures = benchmark(model, model, InputSpec(), runs=2, threads=1)
    assert list(figures.batches) == ["1"]
    assert figures.skipped["16"].startswith("onnxruntime could not run this batch: ")
    assert "\n" not in figures.skipped["16"]


def recurrent_lstm(batch: str = "N", state_batch: str | None = None) -> onnx.ModelProto:
    """silero-vad's layout: ``input [batch, 8]``, ``state [2, batch, H]`` (h, c) -> LSTM -> ``stateN``, ``y``.

    ``state_batch`` names the state's batch dim (default: ``batch``); onnxruntime's LSTM refuses a state
    whose batch differs from the data's.
    """
    rng = np.random.default_rng(3)
    weights = {
        "w_in": rng.standard_normal((8, 4)), "w": rng.standard_normal((1, 4 * HIDDEN, 4)),
        "r": rng.standard_normal((1, 4 * HIDDEN, HIDDEN)), "b": rng.standard_normal((1, 8 * HIDDEN)),
        "w_out": rng.standard_normal((HIDDEN, 1)), "axis0": np.array([0]), "halves": np.array([1, 1]),
    }  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["u"]),
        helper.make_node("Unsqueeze", ["u", "axis0"], ["seq"]),
        helper.make_node("Split", ["state", "halves"], ["h0", "c0"], axis=0),
        helper.make_node("LSTM", ["seq", "w", "r", "b", "", "h0", "c0"], ["", "h", "c"], hidden_size=HIDDEN),
        helper.make_node("Concat", ["h", "c"], ["stateN"], axis=0),
        helper.make_node("Squeeze", ["h", "axis0"], ["h_last"]),
        helper.make_node("MatMul", ["h_last", "w_out"], ["y"]),
    ]
    state_dims = [2, state_batch or batch, HIDDEN]
    graph = helper.make_graph(
        nodes, "lstm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, state_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, state_dims)],
        [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind == "i" else np.float32), k)
         for k, v in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_recurrent_state_follows_the_batch_and_batch_16_is_measured() -> None:
    model = recurrent_lstm()
    spec = InputSpec(ranges={"state": (-0.5, 0.5)})  # a nonzero state, so every row's output depends on it
    feed = batched_feed(model, spec, 16)
    assert feed["input"].shape == (16, 8) and feed["state"].shape == (2, 16, HIDDEN)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    one = session.run(None, batched_feed(model, spec, 1))
    sixteen = session.run(None, feed)
    np.testing.assert_allclose(sixteen[0], np.repeat(one[0], 16, axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sixteen[1], np.repeat(one[1], 16, axis=1), rtol=1e-6, atol=1e-6)
    figures = benchmark(model, model, spec, runs=2, threads=1)
    assert set(figures.batches) == {"1", "16"} and not figures.skipped


def test_a_state_whose_batch_is_named_otherwise_is_skipped_at_16_with_the_reason() -> None:
    model = recurrent_lstm(state_batch="B")
    with pytest.raises(BatchAxisError, match=r"input 'state' \[2, B, 6\] has no axis like the batch \('N'\)"):
        batched_feed(model, InputSpec(), 16)
    figures = benchmark(model, model, InputSpec(), runs=2, threads=1)
    assert list(figures.batches) == ["1"]  # at its own batch
    assert figures.skipped == {"16": "input 'state' [2, B, 6] has no axis like the batch ('N')"}


def _identities(inputs: dict[str, list[int | str | None]]) -> onnx.ModelProto:
    """Identity of every input; a dim of None is unset (no dim_value, no dim_param)."""
    values, nodes = [], []
    for name, dims in inputs.items():
        value = helper.make_tensor_value_info(name, TensorProto.FLOAT, [0] * len(dims))
        for dim, declared in zip(value.type.tensor_type.shape.dim, dims, strict=True):
            dim.Clear()
            if isinstance(declared, str):
                dim.dim_param = declared
            elif declared is not None:
                dim.dim_value = declared
        values.append(value)
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None) for name in inputs]
    graph = helper.make_graph(nodes, "g", values, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SHAPES = {"x": (1, 4), "state": (2, 1, 8)}


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"x": ["batch", 4], "state": [2, "batch", 8]}, {"x": 0, "state": 1}),  # silero's named batch
        ({"x": [None, None], "state": [2, None, 8]}, {"x": 0, "state": 1}),  # unnamed: the size-1 axis
        ({"x": [-1, 4], "state": [2, 1, 8]}, {"x": 0}),  # -1 is dynamic (PP-OCR cls); state is static
        ({"x": [1, 4], "state": [2, 1, 8]}, {}),  # nothing dynamic
        ({"x": ["batch", 4], "state": ["batch", 1, 8]}, {"x": 0, "state": 0}),
    ],
)
def test_batch_axes(inputs: dict[str, list], expected: dict[str, int]) -> None:
    model = _identities(inputs)
    feed = {name: np.zeros(SHAPES[name], np.float32) for name in inputs}
    assert batch_axes(model, feed) == expected


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ({"x": ["batch", 4], "state": ["layers", "batch", 8]}, "name their dynamic axis 0 differently"),
        ({"x": ["batch", 4], "state": [2, None, 8]}, "input 'state' [2, ?, 8] has no axis like the batch"),
        ({"x": [None, 4], "state": [2, 3, None]}, "like the batch (unnamed, of size 1)"),
    ],
)
def test_inputs_without_a_consistent_batch_axis_have_none(inputs: dict[str, list], reason: str) -> None:
    model = _identities(inputs)
    feed = {name: np.zeros(SHAPES[name], np.float32) for name in inputs}
    with pytest.raises(BatchAxisError) as raised:
        batch_axes(model, feed)
    assert reason in str(raised.value)


def test_batched_feed_repeats_the_first_sample_along_each_batch_axis() -> None:
    model = _identities({"x": ["batch", 4], "state": [2, "batch", 8]})
    spec = InputSpec(shapes={"x": (3, 4), "state": (2, 3, 8)})
    feed = batched_feed(model, spec, 16)
    assert feed["x"].shape == (16, 4) and feed["state"].shape == (2, 16, 8)
    np.testing.assert_array_equal(feed["x"], np.repeat(feed["x"][:1], 16, axis=0))
    np.testing.assert_array_equal(feed["state"], np.repeat(feed["state"][:, :1], 16, axis=1))


def test_batched_feed_of_a_static_model_is_its_own_batch_only() -> None:
    model = _identities({"x": [1, 4], "state": [2, 1, 8]})
    with pytest.raises(BatchAxisError, match=NO_DYNAMIC_BATCH):
        batched_feed(model, InputSpec(), 16)
    assert batched_feed(model, InputSpec(), 1, own_batch=True)["x"].shape == (1, 4)


def test_real_silero_vad_is_measured_at_batch_16() -> None:
    path = zoo_dir() / "silero_vad.onnx"  # input [?, ?], state [2, ?, 128] (unnamed), sr a scalar
    if not path.is_file():
        pytest.skip(f"model zoo absent ({path}); run `python bench/zoo.py` to fetch it")
    model = onnx.load(path)
    spec = InputSpec(shapes={"input": (1, 512)}, values={"sr": 16000.0})
    assert batched_feed(model, spec, 16)["state"].shape == (2, 16, 128)
    figures = benchmark(model, model, spec, runs=2, threads=1)
    assert set(figures.batches) == {"1", "16"} and not figures.skipped
