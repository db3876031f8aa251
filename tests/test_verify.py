"""Tests of red_onnx.verify.verifier: input generation, metrics, the pass rule and onnxruntime wrapping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from red_onnx.errors import InputError, UsageError, VerificationError
from red_onnx.options import InputSpec, parse_input_range, parse_input_shape, parse_input_value
from red_onnx.runtime import sessions
from red_onnx.verify.compare import compare_outputs, merge_checks
from red_onnx.verify.inputs import make_inputs
from red_onnx.verify.parts import box_error, is_box_head
from red_onnx.verify.verifier import Verifier

OPSET = [helper.make_opsetid("", 17)]
RNG = np.random.default_rng(1234)
W0 = RNG.standard_normal((4, 3)).astype(np.float32)
B0 = RNG.standard_normal(3).astype(np.float32)


def _model(nodes, inputs, outputs, initializers=(), ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = ir_version
    return model


def matmul_add(w: np.ndarray = W0, b: np.ndarray = B0, batch: str | int = "N") -> onnx.ModelProto:
    """y = x @ w + b with a dynamic batch dim."""
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "B"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )


def int_bool_model(offset: int = 0) -> onnx.ModelProto:
    """out = where(mask, float(ids), 0); twice = ids + ids + offset (int64 output)."""
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    off = numpy_helper.from_array(np.array(offset, np.int64), "off")
    nodes = [
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("Where", ["mask", "idsf", "zero"], ["out"]),
        helper.make_node("Add", ["ids", "ids"], ["t"]),
        helper.make_node("Add", ["t", "off"], ["twice"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 5]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 5]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 5]),
            helper.make_tensor_value_info("twice", TensorProto.INT64, ["B", 5]),
        ],
        [zero, off],
    )


def initializer_input_model() -> onnx.ModelProto:
    """W is both an initializer and a graph input (an overridable default from IR 4 on)."""
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(W0, "W")],
    )


def relu_model(shape, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, None)],
    )


# ------------------------------------------------------------------------------------------
# parse_*
# ------------------------------------------------------------------------------------------


def test_parse_good_text() -> None:
    assert parse_input_shape("x:1,3,48,320") == ("x", (1, 3, 48, 320))
    assert parse_input_shape("input:0:2, 3") == ("input:0", (2, 3))
    assert parse_input_shape("x:1,0") == ("x", (1, 0))  # a 0 dim is a size: an empty tensor
    assert parse_input_shape("sr:") == ("sr", ())
    assert parse_input_range("x:-1,1") == ("x", (-1.0, 1.0))
    assert parse_input_range("a:b:1e-3,2.5") == ("a:b", (1e-3, 2.5))
    assert parse_input_value("sr:16000") == ("sr", 16000.0)
    assert parse_input_value("x:-0.5") == ("x", -0.5)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_input_shape, "x"),
        (parse_input_shape, ":1,2"),
        (parse_input_shape, "x:1,a"),
        (parse_input_shape, "x:1,-1"),
        (parse_input_shape, "x:1.5"),
        (parse_input_shape, "x:1,,2"),
        (parse_input_range, "x:1"),
        (parse_input_range, "x:2,1"),
        (parse_input_range, "x:0,inf"),
        (parse_input_range, "x:0,1,2"),
        (parse_input_range, "x"),
        (parse_input_value, "x:"),
        (parse_input_value, "x:nan"),
        (parse_input_value, "x:1,2"),
        (parse_input_value, "16000"),
    ],
)
def test_parse_bad_text(parse, text: str) -> None:
    with pytest.raises(UsageError):
        parse(text)


# ------------------------------------------------------------------------------------------
# make_inputs
# ------------------------------------------------------------------------------------------


def test_inputs_deterministic_per_seed_and_differ_across_seeds() -> None:
    model = int_bool_model()
    first, again, other = (make_inputs(model, InputSpec(), s) for s in (0, 0, 1))
    for name in ("ids", "mask"):
        np.testing.assert_array_equal(first[name], again[name])
    one = matmul_add()
    a, b = (
        make_inputs(one, InputSpec(default_dim=8), 0),
        make_inputs(one, InputSpec(default_dim=8), 1),
    )
    assert not np.array_equal(a["x"], b["x"])
    assert not (np.array_equal(first["ids"], other["ids"]) and np.array_equal(first["mask"], other["mask"]))
    verifier = Verifier(one, InputSpec(), seeds=(0, 1))
    assert not np.array_equal(verifier.inputs[0]["x"], verifier.inputs[1]["x"])


def test_default_types_shapes_and_ranges() -> None:
    feed = make_inputs(int_bool_model(), InputSpec(default_dim=200), 0)
    assert feed["ids"].dtype == np.int64 and feed["ids"].shape == (200, 5)
    assert feed["ids"].min() >= 0 and feed["ids"].max() <= 10
    assert set(np.unique(feed["ids"])) == set(range(11))  # inclusive upper bound
    assert feed["mask"].dtype == np.bool_ and 0 < feed["mask"].mean() < 1
    x = make_inputs(matmul_add(), InputSpec(), 0)["x"]
    assert x.dtype == np.float32 and x.shape == (1, 4)


@pytest.mark.parametrize(
    ("elem", "dtype"),
    [
        (TensorProto.FLOAT16, np.float16),
        (TensorProto.DOUBLE, np.float64),
        (TensorProto.INT8, np.int8),
        (TensorProto.INT32, np.int32),
        (TensorProto.UINT8, np.uint8),
    ],
)
def test_every_generated_type(elem: int, dtype) -> None:
    assert make_inputs(relu_model([3], elem), InputSpec(), 0)["x"].dtype == dtype


def test_shapes_ranges_values_honoured() -> None:
    spec = InputSpec(shapes={"ids": (3, 5)}, ranges={"ids": (1.5, 3.2)}, values={"mask": 1})
    feed = make_inputs(int_bool_model(), spec, 0)
    assert feed["ids"].shape == (3, 5) and set(np.unique(feed["ids"])) <= {2, 3}
    assert feed["mask"].shape == (1, 5) and feed["mask"].all()
    x = make_inputs(matmul_add(), InputSpec(shapes={"x": (7, 4)}, ranges={"x": (2, 3)}), 0)["x"]
    assert x.shape == (7, 4) and x.min() >= 2 and x.max() <= 3
    x = make_inputs(matmul_add(), InputSpec(values={"x": 16000}), 0)["x"]
    assert (x == 16000).all()


def test_npz_wins_and_is_cast(tmp_path: Path) -> None:
    path = tmp_path / "in.npz"
    given_x = np.arange(8, dtype=np.float64).reshape(2, 4)
    np.savez(path, x=given_x)
    spec = InputSpec(npz=path, shapes={"x": (5, 4)}, values={"x": 3.0})
    x = make_inputs(matmul_add(), spec, 0)["x"]
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, given_x)


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((2, 5), np.float32))
    with pytest.raises(InputError, match=r"'x'.*\[2, 5\].*\[\?, 4\]"):
        make_inputs(matmul_add(), InputSpec(npz=path), 0)
    np.savez(path, ids=np.zeros((1, 5), np.float32))
    with pytest.raises(InputError, match="cannot be cast"):
        make_inputs(int_bool_model(), InputSpec(npz=path), 0)
    np.savez(path, nope=np.zeros(1))
    with pytest.raises(UsageError, match=r"nope.*inputs are: x"):
        make_inputs(matmul_add(), InputSpec(npz=path), 0)
    with pytest.raises(InputError, match="not found"):
        make_inputs(matmul_add(), InputSpec(npz=tmp_path / "missing.npz"), 0)


def test_unknown_names_list_real_inputs() -> None:
    with pytest.raises(UsageError, match=r"'mask2'.*inputs are: ids, mask"):
        make_inputs(int_bool_model(), InputSpec(ranges={"mask2": (0, 1)}), 0)
    with pytest.raises(UsageError, match=r"inputs are: x$"):
        make_inputs(initializer_input_model(), InputSpec(shapes={"W": (4, 3)}), 0)


def test_initializer_that_is_also_input_is_not_fed() -> None:
    model = initializer_input_model()
    assert list(make_inputs(model, InputSpec(), 0)) == ["x"]
    result = Verifier(model, InputSpec()).check(model)
    assert result.passed and result.max_abs_err == 0.0


def test_unknown_rank_needs_shape() -> None:
    model = relu_model(None)
    with pytest.raises(InputError, match="--input-shape x:"):
        make_inputs(model, InputSpec(), 0)
    assert make_inputs(model, InputSpec(shapes={"x": (2, 3)}), 0)["x"].shape == (2, 3)


def test_shape_must_fit_static_dims_and_values_fit_types() -> None:
    with pytest.raises(InputError, match=r"\[\?, 4\]"):
        make_inputs(matmul_add(), InputSpec(shapes={"x": (2, 5)}), 0)
    with pytest.raises(UsageError):
        make_inputs(int_bool_model(), InputSpec(values={"ids": 0.5}), 0)
    with pytest.raises(UsageError):
        make_inputs(relu_model([2], TensorProto.UINT8), InputSpec(ranges={"x": (-5, -1)}), 0)
    with pytest.raises(UsageError):
        InputSpec(ranges={"x": (0, 1)}, values={"x": 1.0})


# ------------------------------------------------------------------------------------------
# Verifier
# ------------------------------------------------------------------------------------------


def test_identical_model_passes_with_zero_error() -> None:
    model = matmul_add()
    verifier = Verifier(model, InputSpec(default_dim=6), seeds=(0, 1))
    result = verifier.check(model)
    assert result.passed and result.max_abs_err == 0.0 and result.worst_rel_l2 == 0.0
    (out,) = result.outputs
    assert (out.name, out.shape, out.needed_rtol, out.cosine) == ("y", (6, 3), 0.0, 1.0)
    assert result.levels == ["disable_all", "enable_all"] and result.seeds == [0, 1]
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["outputs"][0]["shape"] == [6, 3] and data["passed"] is True


def test_perturbed_weight_fails_with_expected_rel_l2() -> None:
    delta = np.zeros_like(W0)
    delta[1, 2] = 0.05
    verifier = Verifier(matmul_add(), InputSpec(default_dim=16), seeds=(0, 1, 2))
    result = verifier.check(matmul_add(W0 + delta))
    expected = 0.0
    for feed in verifier.inputs:
        x = feed["x"].astype(np.float64)
        y = x @ W0.astype(np.float64) + B0
        expected = max(expected, np.linalg.norm(x @ delta) / np.linalg.norm(y))
    assert not result.passed
    assert result.worst_rel_l2 == pytest.approx(expected, rel=1e-4)
    fast = verifier.rel_l2_errors(matmul_add(W0 + delta))
    assert fast["y"] == pytest.approx(expected, rel=1e-4)
    assert result.summary().startswith("verification FAILED")


def test_needed_rtol_is_the_smallest_passing_rtol() -> None:
    verifier = Verifier(matmul_add(), InputSpec(default_dim=32), seeds=(0, 1))
    candidate = matmul_add(W0 * np.float32(1.001))
    needed = verifier.check(candidate, rtol=0.0).outputs[0].needed_rtol
    assert 0 < needed < math.inf
    assert verifier.check(candidate, rtol=needed * 1.01).passed
    assert not verifier.check(candidate, rtol=needed * 0.5).passed
    assert verifier.check(candidate, rtol=0.0, atol=1.0).passed  # atol scaled by max|y|


def test_int_and_bool_outputs_must_be_equal() -> None:
    verifier = Verifier(int_bool_model(), InputSpec(default_dim=4))
    assert verifier.check(int_bool_model()).passed
    result = verifier.check(int_bool_model(offset=1), rtol=1.0, atol=1.0)
    by_name = {o.name: o for o in result.outputs}
    assert by_name["out"].passed and not by_name["twice"].passed
    assert by_name["twice"].needed_rtol == math.inf and by_name["twice"].max_abs_err == 1.0


def test_paths_are_loaded_by_path(tmp_path: Path) -> None:
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(matmul_add(), ref)
    onnx.save(matmul_add(), cand)
    assert Verifier(ref, InputSpec()).check(str(cand)).passed
    with pytest.raises(InputError, match="not found"):
        Verifier(tmp_path / "nope.onnx", InputSpec())


def test_serialized_bytes_and_a_held_structure_verify_as_the_proto_does(tmp_path: Path) -> None:
    model, path = matmul_add(), tmp_path / "ref.onnx"
    onnx.save(model, path)
    by_bytes = Verifier(model.SerializeToString(), InputSpec(), seeds=(0, 1))
    by_path = Verifier(path, InputSpec(), seeds=(0, 1), structure=model)
    for verifier in (by_bytes, by_path):
        assert verifier.check(model.SerializeToString()).max_abs_err == 0.0
        assert not verifier.check(matmul_add(W0 * 2).SerializeToString()).passed


def test_head_is_a_verifier_of_the_first_seeds_sharing_the_reference_outputs() -> None:
    model = matmul_add()
    verifier = Verifier(model, InputSpec(), seeds=(3, 4, 5), levels=("disable_all",))
    verifier.reference_outputs("disable_all")
    first = verifier.head(1)
    fresh = Verifier(model, InputSpec(), seeds=(3,), levels=("disable_all",))
    np.testing.assert_array_equal(first.inputs[0]["x"], fresh.inputs[0]["x"])
    np.testing.assert_array_equal(
        first.reference_outputs("disable_all")[0]["y"], fresh.reference_outputs("disable_all")[0]["y"]
    )
    assert first.sessions_built == 0 and len(first.inputs) == 1 and len(verifier.inputs) == 3
    assert first.rel_l2_errors(matmul_add(W0 * 1.1), "disable_all") == fresh.rel_l2_errors(
        matmul_add(W0 * 1.1), "disable_all"
    )


def test_reference_is_a_snapshot() -> None:
    model = matmul_add()
    verifier = Verifier(model, InputSpec())
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(W0 * 2, "W"))
    assert not verifier.check(model).passed


def test_shape_mismatch_and_nan_fail() -> None:
    verifier = Verifier(matmul_add(batch=2), InputSpec())
    wide = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(np.ones((4, 5), np.float32), "W")],
    )
    result = verifier.check(wide)
    assert not result.passed and result.max_abs_err == math.inf
    assert json.dumps(result.to_dict(), allow_nan=False)
    nan_b = B0.copy()
    nan_b[0] = np.nan
    assert verifier.check(matmul_add(b=nan_b, batch=2)).max_rel_err == math.inf


def test_onnxruntime_errors_are_wrapped() -> None:
    broken = _model(
        [helper.make_node("Add", ["x", "missing"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(VerificationError, match="rewritten model"):
        Verifier(relu_model([2]), InputSpec()).check(broken)
    verifier = Verifier(broken, InputSpec())
    with pytest.raises(InputError, match=r"onnxruntime cannot run the input model: .*onnxruntime$"):
        verifier.reference_outputs("enable_all")


def test_oversized_proto_needs_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_PROTO_BYTES", 10)
    with pytest.raises(InputError, match="path"):
        Verifier(matmul_add(), InputSpec())


def test_bad_levels_and_seeds() -> None:
    with pytest.raises(UsageError):
        Verifier(matmul_add(), InputSpec(), levels=("fast",))
    with pytest.raises(UsageError):
        Verifier(matmul_add(), InputSpec(), seeds=())
    with pytest.raises(UsageError):
        Verifier(matmul_add(), InputSpec(values={"x": 1.0}), seeds=(-1,))


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_top1_agreement_on_n_by_c() -> None:
    ref = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 2, 1]], np.float32)
    cand = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 2]], np.float32)
    assert compare_outputs("p", cand, ref).top1_agreement == 0.5
    assert compare_outputs("p", ref[:, :1], ref[:, :1]).top1_agreement is None
    assert compare_outputs("p", ref[0], ref[0]).top1_agreement is None
    merged = merge_checks([compare_outputs("p", cand, ref), compare_outputs("p", ref, ref)])
    assert merged.top1_agreement == 0.5 and not merged.passed


def test_nonfinite_rules() -> None:
    ref = np.array([1.0, np.inf, np.nan], np.float32)
    assert compare_outputs("o", ref.copy(), ref).passed
    assert not compare_outputs("o", np.array([1.0, -np.inf, np.nan], np.float32), ref).passed
    assert not compare_outputs("o", np.array([np.nan, np.inf, np.nan], np.float32), ref).passed
    zeros = np.zeros(3, np.float32)
    check = compare_outputs("o", zeros, zeros)
    assert (check.rel_l2_err, check.cosine, check.needed_rtol) == (0.0, 1.0, 0.0)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=finite)


@settings(max_examples=60, deadline=None)
@given(arrays, st.data())
def test_metric_properties(ref: np.ndarray, data: st.DataObject) -> None:
    cand = data.draw(hnp.arrays(np.float32, ref.shape, elements=finite))
    check = compare_outputs("o", cand, ref)
    assert check.rel_l2_err >= 0 and check.max_abs_err >= 0 and check.max_rel_err >= 0
    assert -1.0 <= check.cosine <= 1.0
    assert check.needed_rtol >= 0
    same = compare_outputs("o", ref.copy(), ref)
    assert (same.max_abs_err, same.max_rel_err, same.rel_l2_err, same.needed_rtol) == (0, 0, 0, 0)
    assert same.passed and same.cosine == 1.0
    diff = np.abs(cand.astype(np.float64) - ref)
    assert check.max_abs_err == pytest.approx(diff.max())
    if np.isfinite(check.needed_rtol):
        assert compare_outputs("o", cand, ref, rtol=check.needed_rtol * 1.01 + 1e-300).passed


def test_scale_slices_split_a_detection_head_only() -> None:
    from red_onnx.verify.parts import measured_parts, scale_slices

    rng = np.random.default_rng(0)
    head = np.concatenate([rng.random((1, 4, 50)) * 300, rng.random((1, 80, 50)) * 0.01], axis=1)
    assert scale_slices(head) == [slice(0, 4), slice(4, 84)]
    assert scale_slices(rng.standard_normal((2, 16, 5))) == [slice(0, 16)]
    assert measured_parts(head) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4), slice(4, 84)]
    assert measured_parts(rng.standard_normal((2, 16, 5))) == [slice(0, 16)]


def test_small_part_of_a_packed_output_is_measured_on_its_own() -> None:
    """Noise on the class scores only: invisible in the whole output's relative L2, not in its slice."""
    shape = [1, 84, 50]
    scale = np.concatenate([np.full(4, 300.0), np.full(80, 0.01)]).astype(np.float32).reshape(1, 84, 1)
    noise = np.zeros((1, 84, 50), np.float32)
    noise[:, 4:] = 0.005

    def head(extra: np.ndarray) -> onnx.ModelProto:
        nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "e"], ["y"])]
        inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(extra, "e")]
        graph = helper.make_graph(
            nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits,
        )  # fmt: skip
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    spec = InputSpec(ranges={"x": (0.0, 1.0)})
    errors = Verifier(head(np.zeros_like(noise)), spec).rel_l2_errors(head(noise), level="disable_all")
    assert errors["y"] < 1e-3
    assert errors["y[4:84]"] > 0.3
    assert [errors[f"y[{k}:{k + 1}]"] for k in range(4)] == [0.0] * 4  # box coordinates, one by one


def _packed_head(boxes: int = 50, classes: int = 3, seed: int = 0) -> np.ndarray:
    """[1, 4 + classes, boxes]: x, y in pixels, w, h from 5 to 120 pixels, class scores in (0, 1)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 320, (2, boxes))
    wh = rng.uniform(5, 120, (2, boxes))
    scores = rng.uniform(0, 1, (classes, boxes))
    return np.vstack([xy, wh, scores])[None].astype(np.float32)


def test_box_head_is_recognised_only_with_four_coordinates_and_non_negative_sizes() -> None:
    head = _packed_head()
    assert is_box_head(head)
    negative = head.copy()
    negative[0, 2, 0] = -1.0
    assert not is_box_head(negative)
    assert not is_box_head(head[:, 4:])  # scores only: one scale
    assert not is_box_head(head[0])  # rank 2


def test_box_error_is_each_box_move_relative_to_its_own_size() -> None:
    head = _packed_head().astype(np.float64)
    size = np.sqrt(head[0, 2] * head[0, 3])
    moved = head.copy()
    moved[0, 0] += 0.01 * size  # every box shifted by 1% of its own size
    assert box_error(moved, head) == pytest.approx(0.01, rel=1e-9)
    one = head.copy()
    small = int(np.argmin(size))
    one[0, 1, small] += 0.5 * size[small]  # the smallest box moves by half its size, the others not
    weights = head[0, 4:].max(axis=0)  # each box's highest class score
    assert box_error(one, head) == pytest.approx(0.5 * math.sqrt(weights[small] / weights.sum()), rel=1e-9)
    # relative L2 over the whole head barely sees it: x and y are image-sized
    assert compare_outputs("h", one[:, :4], head[:, :4]).rel_l2_err < 0.01


def test_box_error_weighs_boxes_by_their_confidence() -> None:
    head = _packed_head().astype(np.float64)
    head[0, 4:] = 1e-4  # background everywhere ...
    head[0, 5, 7] = 0.9  # ... but one detection
    size = np.sqrt(head[0, 2] * head[0, 3])
    background = head.copy()
    background[0, 0, 8] += size[8]  # a background box moves by its whole size
    detection = head.copy()
    detection[0, 0, 7] += 0.1 * size[7]  # the detection's box by a tenth of it
    assert box_error(background, head) < 0.02
    assert box_error(detection, head) > 0.09
    risen = background.copy()
    risen[0, 6, 8] = 0.8  # the moved box turns confident in the candidate: it counts
    assert box_error(risen, head) > 0.5
    logits = head.copy()
    logits[0, 4:] = np.log(head[0, 4:] / (1 - head[0, 4:]))  # class logits: every box weighs the same
    moved = logits.copy()
    moved[0, 0, 8] += size[8]
    assert box_error(moved, logits) == pytest.approx(1 / math.sqrt(head.shape[2]), rel=1e-9)


def test_packed_detection_head_is_also_measured_per_box(tmp_path: Path) -> None:
    head = _packed_head()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(head.shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(head.shape))
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    spec = InputSpec(npz=tmp_path / "head.npz")
    np.savez(spec.npz, x=head)
    verifier = Verifier(model, spec, levels=("disable_all",))
    got = [
        {"y": feed["x"] * np.array([1, 1, 1.1, 1, 1, 1, 1], np.float32)[None, :, None]}
        for feed in verifier.inputs
    ]
    errors = verifier.rel_l2_errors_of(got, "disable_all")
    assert errors["y[0:4] per box"] > 0.04  # widths 10% larger: each box moved by ~5-10% of its size
    assert errors["y[2:3]"] == pytest.approx(0.1, rel=1e-5)


def test_held_session_is_opened_once_for_verifiers_sharing_it() -> None:
    model = matmul_add()
    held = sessions.HeldSessions(model.SerializeToString())
    first = Verifier(model, InputSpec(), seeds=(1, 2), levels=("disable_all",), held=held)
    second = Verifier(model, InputSpec(), seeds=(7,), levels=("disable_all",), held=held)
    alone = Verifier(model, InputSpec(), seeds=(7,), levels=("disable_all",))
    first.reference_outputs("disable_all")
    second.reference_outputs("disable_all")
    assert (first.sessions_built, second.sessions_built) == (1, 0)
    np.testing.assert_array_equal(
        second.reference_outputs("disable_all")[0]["y"], alone.reference_outputs("disable_all")[0]["y"]
    )
    # a candidate is never run in the held reference session
    assert second.check(matmul_add(W0 * 2)).passed is False
    assert second.sessions_built == 1


def test_held_sessions_hold_only_their_levels_and_nothing_once_released() -> None:
    held = sessions.HeldSessions(matmul_add().SerializeToString(), levels=("disable_all",))
    session, opened = held.session("disable_all")
    again, opened_again = held.session("disable_all")
    assert opened and not opened_again and again is session
    _, opened = held.session("enable_all")
    assert opened and held.session("enable_all")[1]  # not held: opened again
    held.release()
    after, opened = held.session("disable_all")
    assert opened and after is not session and held.session("disable_all")[1]
    with pytest.raises(UsageError, match="unknown optimisation level"):
        sessions.HeldSessions(b"", levels=("fastest",))
