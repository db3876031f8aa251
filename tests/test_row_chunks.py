"""A batch of many rows run in chunks gives the one-run outputs, and is run whole where it would not.

Graphs built in code, run with onnxruntime: a CNN (outputs with the batch leading), a ``[B·S, H]``
reshape (a multiple of the rows leading), a model that mixes its rows (a mean over the batch), one with
an output that carries no batch axis, and a declared fixed batch. The verifier, the tensor fetch and the
merge simulator run chunked and agree with an unchunked session.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from red_onnx.io import graph as graph_utils
from red_onnx.options import InputSpec
from red_onnx.runtime import rows
from red_onnx.runtime.rows import RowChunks, dynamic_leading
from red_onnx.runtime.sessions import session_runner
from red_onnx.runtime.tensor_values import tensor_fetch
from red_onnx.search.simulate import MergeSimulator
from red_onnx.verify.verifier import Verifier


def _model(nodes: list, inits: list, outputs: list, batch: str | int = "N") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cnn(batch: str | int = "N") -> onnx.ModelProto:
    """Conv → Relu → Flatten → Gemm: every output carries the batch on axis 0."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    dense = numpy_helper.from_array(rng.standard_normal((5, 4 * 36)).astype(np.float32), "d")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "d"], ["y"], transB=1),
    ]
    return _model(nodes, [weight, dense], ["y"], batch)


def tokens() -> onnx.ModelProto:
    """``[N, 3, 8, 8]`` reshaped to ``[N·24, 8]`` (a transformer's ``[B·S, H]``), then a MatMul."""
    rng = np.random.default_rng(1)
    shape = numpy_helper.from_array(np.array([-1, 8], np.int64), "s")
    weight = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    nodes = [helper.make_node("Reshape", ["x", "s"], ["t"]), helper.make_node("MatMul", ["t", "w"], ["y"])]
    return _model(nodes, [shape, weight], ["y"])


def mixing() -> onnx.ModelProto:
    """Each row minus the batch's mean: rows run apart give other outputs."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ]
    return _model(nodes, [], ["y"])


def pooled() -> onnx.ModelProto:
    """Two outputs: the rows themselves and their sum over the batch (no batch axis left)."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "a")
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("ReduceSum", ["x", "a"], ["s"], keepdims=0),
    ]
    return _model(nodes, [axes], ["y", "s"])


def assert_rounding_close(have: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float32 rounding at the output's scale (kernels round by batch size)."""
    assert have.shape == want.shape
    np.testing.assert_allclose(have, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(rows_count: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows_count, 3, 8, 8)).astype(np.float32)}


class Counting:
    """A session's run that records the rows of each call."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.calls = session, []
        self.names = [o.name for o in session.get_outputs()]

    def __call__(self, feed):
        self.calls.append(feed["x"].shape[0])
        return self.session.run(self.names, {"x": feed["x"]})


@pytest.mark.parametrize("builder", [cnn, tokens])
def test_chunks_join_to_the_one_run_outputs(builder) -> None:
    session = _session(builder())
    run = Counting(session)
    feed = _feed(40)
    chunks = RowChunks(["x"], elements=7 * 3 * 64)  # 7 rows a chunk
    got = chunks.run(run, feed)
    whole = session.run(run.names, feed)
    assert chunks.safe is True
    assert run.calls == [3, 1, 1, 1, 7, 7, 7, 7, 7, 5]  # the check on three rows, then the chunks
    for have, want in zip(got, whole, strict=True):
        assert_rounding_close(have, want)


def two_apart() -> onnx.ModelProto:
    """Each row plus the row two before it (a causal depthwise conv over the batch axis, taps 1, 0, 1):
    rows 0 and 1 run together give what they give alone; the third row shows the mixing."""
    kernel = np.tile(np.array([1.0, 0.0, 1.0], np.float32), (192, 1, 1))
    inits = [
        numpy_helper.from_array(np.array([1, 192, -1], np.int64), "flat"),
        numpy_helper.from_array(np.array([3, 8, 8, -1], np.int64), "back"),
        numpy_helper.from_array(kernel, "k"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 3, 0]),
        helper.make_node("Reshape", ["t", "flat"], ["seq"]),
        helper.make_node("Conv", ["seq", "k"], ["mixed"], group=192, pads=[2, 0]),
        helper.make_node("Reshape", ["mixed", "back"], ["u"]),
        helper.make_node("Transpose", ["u"], ["y"], perm=[3, 0, 1, 2]),
    ]
    return _model(nodes, inits, ["y"])


@pytest.mark.parametrize("builder", [mixing, pooled, two_apart])
def test_rows_that_interact_or_outputs_without_a_batch_run_whole(builder) -> None:
    session = _session(builder())
    run = Counting(session)
    feed = _feed(40)
    chunks = RowChunks(["x"], elements=7 * 3 * 64)
    got = chunks.run(run, feed)
    assert chunks.safe is False
    assert run.calls[-1] == 40  # after the failed check: one run of every row
    for have, want in zip(got, session.run(run.names, feed), strict=True):
        np.testing.assert_array_equal(have, want)
    chunks.run(run, feed)
    assert run.calls[-1] == 40 and len(run.calls) == 6  # decided once: no second check


def test_small_batches_and_fixed_batches_are_not_chunked() -> None:
    chunks = RowChunks(["x"], elements=7 * 3 * 64)
    assert chunks.rows_per_chunk(_feed(7)) is None  # fits one chunk
    assert chunks.rows_per_chunk(_feed(8)) == 7
    assert chunks.rows_per_chunk({"x": np.float32(1.0)}) is None  # no batch axis
    assert chunks.rows_per_chunk({"y": np.zeros((40, 2))}) is None  # the batched input is absent
    declared = {i.name: i.shape for i in _session(cnn(batch=40)).get_inputs()}
    assert dynamic_leading(declared) == []
    declared = {i.name: i.shape for i in _session(cnn()).get_inputs()}
    assert dynamic_leading(declared) == ["x"]


def test_verifier_runs_a_calibration_batch_in_chunks(tmp_path, monkeypatch) -> None:
    """The verifier's reference and candidate runs on a 64-row file: chunked, same outputs and errors."""
    model = cnn()
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=_feed(64, seed=3)["x"])
    spec = InputSpec(npz=samples)
    plain = Verifier(model, spec).reference_outputs("disable_all")[0]["y"]
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 5 * 3 * 64)
    seen: list[int] = []
    real_run = ort.InferenceSession.run

    def spy(self, names, feed, *args, **kwargs):
        seen.append(next(iter(feed.values())).shape[0])
        return real_run(self, names, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", spy)
    verifier = Verifier(model, InputSpec(npz=samples))
    chunked = verifier.reference_outputs("disable_all")[0]["y"]
    assert max(seen) <= 5 and len(seen) > 12
    assert_rounding_close(chunked, plain)
    assert verifier.check(model).passed


def test_session_runner_fetch_and_simulator_chunk_alike(monkeypatch) -> None:
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 6 * 3 * 64)
    model = cnn()
    feed = _feed(50, seed=5)
    whole = _session(model).run(["y"], feed)[0]
    runner = session_runner(_session(model), "disable_all", reference=True)
    assert_rounding_close(runner([feed])[0]["y"], whole)
    fetch = tensor_fetch(model, ["r", "y"])
    relu, out = fetch(["r", "y"], feed)
    assert relu.shape == (50, 4, 6, 6)
    assert_rounding_close(out, whole)
    simulator = MergeSimulator.of_working(graph_utils.import_model(model), [], extra_outputs=["r"])
    assert simulator.batch_inputs == ["x"]
    assert_rounding_close(simulator.run({}, [feed])[0]["y"], whole)
    assert_rounding_close(simulator.tensors(["r"], feed)[0], relu)


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 30), per_chunk=st.integers(1, 12), seed=st.integers(0, 1000))
def test_any_rows_and_chunk_size_give_the_one_run_outputs(count: int, per_chunk: int, seed: int) -> None:
    session = _session(tokens() if seed % 2 else cnn())
    names = [o.name for o in session.get_outputs()]
    feed = _feed(count, seed)
    got = RowChunks(["x"], elements=per_chunk * 3 * 64).run(lambda part: session.run(names, part), feed)
    for have, want in zip(got, session.run(names, feed), strict=True):
        assert_rounding_close(have, want)
