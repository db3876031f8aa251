"""Recurrent models are verified on streams: state pairs, the stream run, drift, the --inputs steps and split.

The recurrent graphs are built here with onnx.helper (a leaky state update
``stateN = decay·state + tanh(relu(x·W1 + b1)·W2 + state·Ws)``, ``y = stateN·Wo``) and every expectation is
computed with onnxruntime directly, carrying the state by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx import compress
from red_onnx.errors import InputError
from red_onnx.options import InputSpec
from red_onnx.runtime.shapes import ShapeService
from red_onnx.runtime.stream import Runner, StatePair, confirm_pairs, find_state_pairs, join_steps, run_stream
from red_onnx.search.budget import BudgetSearch
from red_onnx.verify.inputs import make_inputs, split_rows
from red_onnx.verify.verifier import STREAM_STEPS, Verifier

FEATURES, HIDDEN, STATE = 4, 16, 8
TOLERANCE = 0.02
Feed = dict[str, np.ndarray]


def recurrent(
    *, decay: float = 0.9, drift: float = 0.0, batch: int | str = 1, near: float | None = None,
    names: tuple[str, str] = ("state", "stateN"), seed: int = 0,
) -> onnx.ModelProto:  # fmt: skip
    """The leaky recurrent cell; ``drift`` adds a constant to every next state (a small per-call error).

    ``near``: fc1's channel 5 is channel 3 plus noise of this size (a near-duplicate a merge can take).
    """
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.standard_normal((FEATURES, HIDDEN)) / 2, "b1": rng.standard_normal(HIDDEN) / 4,
        "W2": rng.standard_normal((HIDDEN, STATE)) / 4, "Ws": rng.standard_normal((STATE, STATE)) / 4,
        "Wo": rng.standard_normal((STATE, 2)), "decay": np.array(decay), "shift": np.full(STATE, drift),
    }  # fmt: skip
    if near is not None:
        weights["W1"][:, 5] = weights["W1"][:, 3] + near * rng.standard_normal(FEATURES)
        weights["b1"][5] = weights["b1"][3]
    state_in, state_out = names
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a1"], name="fc1"),
        helper.make_node("Add", ["a1", "b1"], ["z1"], name="fc1_bias"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "W2"], ["a2"], name="fc2"),
        helper.make_node("MatMul", [state_in, "Ws"], ["r"], name="recur"),
        helper.make_node("Add", ["a2", "r"], ["z2"], name="mix"),
        helper.make_node("Tanh", ["z2"], ["t"], name="tanh"),
        helper.make_node("Mul", [state_in, "decay"], ["kept"], name="leak"),
        helper.make_node("Add", ["kept", "t"], ["s1"], name="update"),
        helper.make_node("Add", ["s1", "shift"], [state_out], name="shift"),
        helper.make_node("MatMul", [state_out, "Wo"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES]),
         helper.make_tensor_value_info(state_in, TensorProto.FLOAT, [batch, STATE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2]),
         helper.make_tensor_value_info(state_out, TensorProto.FLOAT, [batch, STATE])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def single_output_model(
    nodes: list[onnx.NodeProto], inputs: dict[str, tuple[int, list]], outputs: dict[str, tuple[int, list]]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "lookalike",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def runner_of(model: onnx.ModelProto) -> Runner:
    """A runner for ``red_onnx.runtime.stream``: one onnxruntime call per feed."""
    run = session(model)
    names = [out.name for out in run.get_outputs()]
    return lambda feeds: [dict(zip(names, run.run(names, feed), strict=True)) for feed in feeds]


def hand_stream(model: onnx.ModelProto, xs: Sequence[np.ndarray], state: np.ndarray) -> dict[str, np.ndarray]:
    """y and stateN of every call, the state carried by hand, stacked on axis 0."""
    run = session(model)
    ys, states = [], []
    for x in xs:
        y, state = run.run(["y", "stateN"], {"x": x, "state": state})
        ys.append(y)
        states.append(state)
    return {"y": np.concatenate(ys), "stateN": np.concatenate(states)}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


# -- state pairs --------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("state", "stateN"), ("h", "hn"), ("c", "c_out"), ("mem", "mem_next")])
def test_state_pairs_are_found_by_name_shape_and_dependence(names: tuple[str, str]) -> None:
    assert find_state_pairs(recurrent(names=names)) == [StatePair(*names)]
    assert find_state_pairs(recurrent(batch="N")) == [StatePair("state", "stateN")]


def test_look_alike_outputs_are_not_state_pairs() -> None:
    f32 = TensorProto.FLOAT
    normalised = single_output_model(  # x -> xn is "x normalised", a function of x alone
        [helper.make_node("LpNormalization", ["x"], ["xn"], axis=1)], {"x": (f32, [1, 4])},
        {"xn": (f32, [1, 4])},
    )  # fmt: skip
    assert find_state_pairs(normalised) == []
    data_only = single_output_model(  # stateN does not read state: nothing is carried
        [helper.make_node("Tanh", ["x"], ["stateN"]), helper.make_node("Relu", ["state"], ["y"])],
        {"x": (f32, [1, 4]), "state": (f32, [1, 4])}, {"y": (f32, [1, 4]), "stateN": (f32, [1, 4])},
    )  # fmt: skip
    assert find_state_pairs(data_only) == []
    resized = single_output_model(  # a declared shape that differs
        [helper.make_node("Concat", ["x", "state"], ["stateN"], axis=1)],
        {"x": (f32, [1, 4]), "state": (f32, [1, 4])}, {"stateN": (f32, [1, 8])},
    )  # fmt: skip
    assert find_state_pairs(resized) == []
    counter = single_output_model(  # integer inputs are never state
        [helper.make_node("Add", ["step", "one"], ["stepN"]), helper.make_node("Cast", ["step"], ["c"], to=1),
         helper.make_node("Add", ["x", "c"], ["y"])],
        {"x": (f32, [1]), "step": (TensorProto.INT64, [1]), "one": (TensorProto.INT64, [1])},
        {"y": (f32, [1]), "stepN": (TensorProto.INT64, [1])},
    )  # fmt: skip
    assert find_state_pairs(counter) == []
    renamed = recurrent(names=("state", "state_prediction"))
    assert find_state_pairs(renamed) == []


def test_a_pair_whose_output_comes_back_in_another_shape_is_dropped_at_run_time() -> None:
    f32 = TensorProto.FLOAT
    model = single_output_model(  # declared [?, ?] both ways, but stateN has twice the columns
        [helper.make_node("Concat", ["x", "state"], ["stateN"], axis=1)],
        {"x": (f32, ["n", "k"]), "state": (f32, ["n", "m"])}, {"stateN": (f32, ["n", "j"])},
    )  # fmt: skip
    pairs = find_state_pairs(model)
    assert pairs == [StatePair("state", "stateN")]
    feed = {"x": np.ones((1, 2), np.float32), "state": np.ones((1, 3), np.float32)}
    assert confirm_pairs(pairs, feed, {"stateN": session(model).run(None, feed)[0]}) == []
    verifier = Verifier(model, InputSpec(default_dim=3))
    assert verifier.pairs == [] and verifier.steps == 1  # verified call by call, as before


# -- running a stream ---------------------------------------------------------------------------


def test_a_stream_run_equals_a_hand_carried_loop() -> None:
    model = recurrent()
    rng = np.random.default_rng(5)
    starts = [rng.standard_normal((1, STATE)).astype(np.float32) for _ in range(2)]
    xs = [[rng.standard_normal((1, FEATURES)).astype(np.float32) for _ in range(2)] for _ in range(6)]
    steps = [[{"x": x, "state": starts[k] if t == 0 else np.full((1, STATE), np.nan, np.float32)}
              for k, x in enumerate(step)] for t, step in enumerate(xs)]  # fmt: skip
    fed, outputs = run_stream(runner_of(model), steps, find_state_pairs(model))
    for k in range(2):
        expected = hand_stream(model, [step[k] for step in xs], starts[k])
        for name in ("y", "stateN"):
            assert np.array_equal(join_steps([out[k][name] for out in outputs]), expected[name])
        assert np.array_equal(fed[3][k]["state"], expected["stateN"][2:3])  # what step 2 returned


def test_the_verifier_streams_a_recurrent_model_from_the_zero_state() -> None:
    model = recurrent()
    verifier = Verifier(model, InputSpec(), seeds=(0, 1))
    assert verifier.pairs == [StatePair("state", "stateN")] and verifier.steps == STREAM_STEPS
    for k, seed in enumerate((0, 1)):
        xs = [make_inputs(model, InputSpec(), seed, step=t)["x"] for t in range(STREAM_STEPS)]
        expected = hand_stream(model, xs, np.zeros((1, STATE), np.float32))
        got = verifier.reference_outputs("disable_all")[k]
        np.testing.assert_allclose(got["stateN"], expected["stateN"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-6, atol=1e-6)
    assert len(verifier.inputs) == 2 * STREAM_STEPS  # every call, with the state the reference carried in
    carried = np.concatenate([feed["state"] for feed in verifier.inputs[2::2]])  # stream 0, steps 1..
    np.testing.assert_allclose(carried, verifier.reference_outputs("disable_all")[0]["stateN"][:-1])
    assert verifier.check(model).passed and verifier.check(model).stream["steps"] == STREAM_STEPS


def test_a_recurrent_model_that_fails_at_the_default_dims_says_which_and_how_to_set_them() -> None:
    model = recurrent()
    features = model.graph.input[0].type.tensor_type.shape.dim[1]
    features.ClearField("dim_value")
    features.dim_param = "F"  # fed at 1 by default: fc1's MatMul cannot take it
    with pytest.raises(InputError, match=r"cannot run the input model: .*dims were set to 1 \(x \[1, \?\]\)"):
        Verifier(model, InputSpec())  # the state pairs are confirmed by a reference call at construction
    with pytest.raises(InputError, match=r"--input-shape, e.g. x:1,<F>$"):
        Verifier(model, InputSpec())
    assert Verifier(model, InputSpec(shapes={"x": (1, FEATURES)})).pairs  # with the size given, it runs


def test_the_head_of_a_recurrent_verifier_is_its_first_stream() -> None:
    model = recurrent()
    verifier = Verifier(model, InputSpec(), seeds=(0, 1))
    verifier.reference_outputs("disable_all")
    first, fresh = verifier.head(1), Verifier(model, InputSpec(), seeds=(0,))
    assert first.steps == fresh.steps == STREAM_STEPS and len(first.inputs) == STREAM_STEPS
    for name, values in fresh.reference_outputs("disable_all")[0].items():
        np.testing.assert_array_equal(first.reference_outputs("disable_all")[0][name], values)
    assert len(first.reference_outputs("disable_all")) == 1 and first.sessions_built == 0


def test_outputs_of_a_runner_carry_the_runners_own_state() -> None:
    model, drifting = recurrent(), recurrent(drift=0.002)
    verifier = Verifier(model, InputSpec(), seeds=(0, 1))
    got = verifier.outputs_of(runner_of(drifting))
    for want, have in zip(verifier.run(drifting, "disable_all"), got, strict=True):
        assert np.array_equal(want["stateN"], have["stateN"]) and np.array_equal(want["y"], have["y"])


# -- drift --------------------------------------------------------------------------------------


def test_a_state_that_drifts_is_rejected_although_every_call_is_within_tolerance() -> None:
    model, drifting = recurrent(), recurrent(drift=0.002)  # 0.002 more on every next state
    verifier = Verifier(model, InputSpec(), seeds=(0, 1))
    per_call, reference = session(drifting), session(model)  # each call given the reference's state
    calls = [(per_call.run(None, feed), reference.run(None, feed)) for feed in verifier.inputs]
    assert max(rel_l2(h, w) for have, want in calls for h, w in zip(have, want, strict=True)) <= TOLERANCE / 2
    for k in range(2):  # y and stateN of all calls as one batch, as the per-call check measured
        batch = rel_l2(np.concatenate([c[0][k] for c in calls]), np.concatenate([c[1][k] for c in calls]))
        assert batch <= TOLERANCE / 10
    streamed = verifier.rel_l2_errors(drifting, "disable_all")  # each model carrying its own state
    assert streamed["stateN"] > 2 * TOLERANCE and streamed["y"] > 2 * TOLERANCE
    assert not verifier.check(drifting).passed
    assert max(verifier.rel_l2_errors(model, "enable_all").values()) < 1e-6


def recurrent_search(model: onnx.ModelProto, spec: InputSpec) -> BudgetSearch:
    shapes = ShapeService(make_inputs(model, spec, 0))
    return BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False, activations=False)


def test_the_budget_search_measures_a_recurrent_model_on_streams() -> None:
    model = recurrent()
    search = recurrent_search(model, InputSpec())
    option = next(o for o in search.options if len(o.levels) > 2)
    plan = {option.name: search.merges[option.name][option.levels[2]]}
    measured = search.plan_error(plan)
    assert search.simulator is not None and search.simulator.runs == STREAM_STEPS  # one run per step
    streamed = search.verifier.rel_l2_errors(search.apply_plan(plan), "disable_all")
    assert measured == pytest.approx(max(streamed.values()), rel=1e-4)
    merged = session(search.apply_plan(plan))
    reference = session(model)
    per_call = max(
        rel_l2(merged.run(None, feed)[1], reference.run(None, feed)[1]) for feed in search.verifier.inputs
    )
    assert measured > per_call  # what the state accumulates is measured, not only each call


def test_compress_keeps_a_recurrent_model_within_tolerance_over_streams() -> None:
    model = recurrent(near=0.003)  # merging fc1's channel 5 into 3 costs 0.006 over the search streams
    result = compress(model, tolerance=TOLERANCE, separation=False, channel_multiple=1)
    assert result.verified and result.report.verification["stream"]["steps"] == STREAM_STEPS
    assert result.report.macs_after < result.report.macs_before
    closer = compress(recurrent(near=0.01), tolerance=TOLERANCE, separation=False, channel_multiple=1)
    assert closer.report.macs_after == closer.report.macs_before  # 0.019 over the streams: over the aim
    verifier = Verifier(model, InputSpec(), seeds=(7,))  # a seed neither the search nor the check used
    xs = [make_inputs(model, InputSpec(), 7, step=t)["x"] for t in range(STREAM_STEPS)]
    start = np.zeros((1, STATE), np.float32)
    expected, got = hand_stream(model, xs, start), hand_stream(result.model, xs, start)
    errors = verifier.rel_l2_errors(result.model, "disable_all")
    for name in ("y", "stateN"):
        assert errors[name] == pytest.approx(rel_l2(got[name], expected[name]), rel=1e-4, abs=1e-9)
        assert errors[name] <= TOLERANCE


# -- --inputs steps and the held-out split ------------------------------------------------------


def stream_file(folder: Path, steps: int, batch: int = 1) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((steps, batch, FEATURES)).astype(np.float32)
    start = (rng.standard_normal((batch, STATE)) / 4).astype(np.float32)
    np.savez(folder / "stream.npz", x=xs, state=start)
    return folder / "stream.npz", xs, start


def test_an_inputs_file_with_a_step_axis_is_one_stream(tmp_path: Path) -> None:
    model = recurrent(batch="N")
    path, xs, start = stream_file(tmp_path, 10, batch=3)
    verifier = Verifier(model, InputSpec(npz=path), seeds=(0, 1))  # the file gives every input: one stream
    assert verifier.steps == 10 and verifier.stream_summary()["streams"] == 1
    expected = hand_stream(model, list(xs), start)
    got = verifier.reference_outputs("disable_all")
    assert len(got) == 1 and np.allclose(got[0]["stateN"], expected["stateN"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(make_inputs(model, InputSpec(npz=path), 0, step=4)["x"], xs[4])


def test_an_inputs_file_without_a_step_axis_is_fed_on_every_call(tmp_path: Path) -> None:
    model = recurrent()
    np.savez(tmp_path / "one.npz", x=np.ones((1, FEATURES), np.float32))
    verifier = Verifier(model, InputSpec(npz=tmp_path / "one.npz"))
    assert verifier.steps == STREAM_STEPS
    assert all(np.array_equal(feed["x"], np.ones((1, FEATURES))) for feed in verifier.inputs)


def test_step_axes_of_different_lengths_are_an_input_error(tmp_path: Path) -> None:
    f32 = TensorProto.FLOAT
    model = single_output_model(
        [helper.make_node("Add", ["x", "u"], ["a"]), helper.make_node("Add", ["a", "state"], ["stateN"])],
        {"x": (f32, [1, 2]), "u": (f32, [1, 2]), "state": (f32, [1, 2])}, {"stateN": (f32, [1, 2])},
    )  # fmt: skip
    np.savez(tmp_path / "bad.npz", x=np.ones((3, 1, 2), np.float32), u=np.ones((4, 1, 2), np.float32))
    with pytest.raises(InputError, match="step axes"):
        Verifier(model, InputSpec(npz=tmp_path / "bad.npz"))


def test_the_heldout_part_of_a_stream_file_is_its_second_half_from_the_carried_state(tmp_path: Path) -> None:
    model = recurrent()
    path, xs, start = stream_file(tmp_path, 9)
    search = Verifier(model, InputSpec(npz=path), part="search", levels=("disable_all",))
    heldout = Verifier(model, InputSpec(npz=path), part="heldout", levels=("disable_all",))
    whole = Verifier(model, InputSpec(npz=path), levels=("disable_all",))
    assert (search.steps, heldout.steps, whole.steps) == (5, 4, 9)
    searched = np.concatenate([feed["x"] for feed in search.inputs])
    held = np.concatenate([feed["x"] for feed in heldout.inputs])
    assert np.array_equal(searched, xs[:5, 0]) and np.array_equal(held, xs[5:, 0])  # no step in both
    expected = hand_stream(model, list(xs), start)  # the held-out half goes on from the carried state
    np.testing.assert_allclose(heldout.inputs[0]["state"], expected["stateN"][4:5], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        heldout.reference_outputs("disable_all")[0]["y"], expected["y"][5:], rtol=1e-6, atol=1e-6
    )


def test_the_heldout_part_of_a_batch_file_uses_the_other_rows(tmp_path: Path) -> None:
    f32 = TensorProto.FLOAT
    model = single_output_model(
        [helper.make_node("Relu", ["x"], ["y"])], {"x": (f32, ["N", 3])}, {"y": (f32, ["N", 3])}
    )
    rows = np.arange(18, dtype=np.float32).reshape(6, 3)
    np.savez(tmp_path / "batch.npz", x=rows)
    spec = InputSpec(npz=tmp_path / "batch.npz")
    search, heldout = Verifier(model, spec, part="search"), Verifier(model, spec, part="heldout")
    halves = split_rows(len(rows))
    assert np.array_equal(search.inputs[0]["x"], rows[halves["search"]])
    assert np.array_equal(heldout.inputs[0]["x"], rows[halves["heldout"]])
    assert np.array_equal(Verifier(model, spec).inputs[0]["x"], rows)  # the final verification: all of it
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    fixed = single_output_model(relu, {"x": (f32, [6, 3])}, {"y": (f32, [6, 3])})
    assert np.array_equal(Verifier(fixed, spec, part="heldout").inputs[0]["x"], rows)  # no batch to split


def test_worst_step_error_bounds_every_step_against_the_stream_size() -> None:
    from red_onnx.runtime.stream import worst_step_error

    reference = np.array([0.9, 0.8, 0.0, 0.0, 0.7, 0.0], np.float64).reshape(6, 1)  # speech, silence
    candidate = reference.copy()
    candidate[3] = 0.05  # one silent step moves by 0.05
    rms = math.sqrt(np.mean(reference**2))
    assert worst_step_error(candidate, reference, 6) == pytest.approx(0.05 / rms)
    whole = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
    assert whole < worst_step_error(candidate, reference, 6)  # the stream's relative L2 hides one step
    assert worst_step_error(reference, reference, 6) == 0.0
    assert worst_step_error(candidate, np.zeros_like(reference), 6) == math.inf


@pytest.mark.parametrize("count", [2, 3, 7, 16, 69])
def test_a_batch_splits_at_random_into_disjoint_parts(count: int) -> None:
    parts = split_rows(count)
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(count))  # disjoint, and every row in one part
    assert all(len(rows) >= 1 for name, rows in parts.items() if count >= 3 or name != "cv")
    assert abs(len(parts["search"]) - count / 2) <= 1 and abs(len(parts["heldout"]) - count / 4) <= 1
    assert split_rows(count)["search"].tolist() == parts["search"].tolist()  # seeded: the same split


def test_a_patterned_file_gives_both_halves_every_kind() -> None:
    kinds = np.arange(64) % 4  # rotations 0/90/180/270 repeating: even/odd rows saw two of the four
    halves = split_rows(len(kinds))
    assert set(kinds[0::2]) == {0, 2}  # what a split by position gave
    assert set(kinds[halves["search"]]) == set(kinds[halves["heldout"]]) == {0, 1, 2, 3}


def test_a_recurrent_stream_gets_no_sequential_refit_and_the_report_says_why() -> None:
    model = recurrent(near=0.003)
    result = compress(model, tolerance=TOLERANCE, separation=False, channel_multiple=1, sequential_refit=True)
    plain = compress(model, tolerance=TOLERANCE, separation=False, channel_multiple=1)
    assert result.report.macs_after < result.report.macs_before
    correction = result.report.budget["correction"]
    assert correction["kept"] is False and "recurrent stream" in correction["reason"]
    assert result.report.budget["heldout_error"] == plain.report.budget["heldout_error"]
    assert not any(item.name == "correct_consumers" for item in result.report.passes)
