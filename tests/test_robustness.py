"""Shapes of input the onnx backend test suite found, each built in code: every run verifies or refuses.

Optional-typed If outputs (and ``Optional``'s type attribute) survive the graph round trip; sequences
of tensors of different shapes are compared element by element; ``--inputs`` files whose members
cannot be read are a one-line refusal; types numpy lacks are fed from their raw bits, strings from
unicode arrays; a 0 dim is a size; a model whose input fails the full ONNX check is not failed for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx import cli
from red_onnx.errors import InputError
from red_onnx.verify.compare import compare_outputs

OPSET = 18


def _model(nodes, inputs, outputs, inits=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _planted_conv(name: str = "conv", source: str = "x", out: str = "c") -> tuple[onnx.NodeProto, list]:
    """A 1×1 conv 4 -> 6 whose rows 4 and 5 repeat rows 0 and 1 (exact merging removes two channels)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    weight[4:] = weight[:2]
    bias = rng.standard_normal(6).astype(np.float32)
    bias[4:] = bias[:2]
    head = rng.standard_normal((3, 6, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((weight, "w"), (bias, "b"), (head, "w2"))]
    nodes = [
        helper.make_node("Conv", [source, "w", "b"], ["h"], name=name),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], [out], name="head"),
    ]
    return nodes, inits


def _channels(model: onnx.ModelProto, node: str = "conv") -> int:
    weight = next(n for n in model.graph.node if n.name == node).input[1]
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == weight).shape[0]


def test_optional_typed_if_outputs_survive_a_rewrite() -> None:
    conv, inits = _planted_conv()
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [5]))
    opt_type = helper.make_optional_type_proto(seq_type)
    then_branch = helper.make_graph(
        [helper.make_node("Optional", [], ["empty"], type=seq_type)],
        "then", [], [helper.make_value_info("empty", opt_type)],
    )  # fmt: skip
    five = numpy_helper.from_array(np.arange(5, dtype=np.float32), "five")
    else_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["v"], value=five),
            helper.make_node("SequenceConstruct", ["v"], ["seq"]),
            helper.make_node("Optional", ["seq"], ["full"]),
        ],
        "else", [], [helper.make_value_info("full", opt_type)],
    )  # fmt: skip
    nodes = [
        *conv,
        helper.make_node("If", ["cond"], ["opt"], then_branch=then_branch, else_branch=else_branch),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outputs = [
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 3, 3]),
        helper.make_value_info("opt", opt_type),
    ]
    model = _model(nodes, inputs, outputs, inits)
    for value in ("0", "1"):
        spec = red_onnx.InputSpec(values={"cond": float(value)})
        result = red_onnx.compress(model, exact=True, input_spec=spec, latency_check=False)
        assert result.verified and _channels(result.model) == 4  # the two repeated rows went
        assert result.model.graph.output[1] == model.graph.output[1]  # the optional type, as declared
        branch = next(
            a.g
            for n in result.model.graph.node
            if n.op_type == "If"
            for a in n.attribute
            if a.name == "then_branch"
        )
        optional = next(n for n in branch.node if n.op_type == "Optional")
        assert [a.name for a in optional.attribute] == ["type"]  # graph surgeon drops it on import
        onnx.checker.check_model(result.model, full_check=True)


def test_a_sequence_of_unequal_tensors_verifies() -> None:
    conv, inits = _planted_conv()
    split = numpy_helper.from_array(np.array([1, 2], np.int64), "split")
    nodes = [*conv, helper.make_node("SplitToSequence", ["c", "split"], ["parts"], axis=1)]
    seq = helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)
    model = _model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])], [seq], [*inits, split]
    )
    result = red_onnx.compress(model, exact=True, latency_check=False)
    assert result.verified and _channels(result.model) == 4
    feeds = random_feeds(model, 0)
    for got, want in zip(run(result.model, feeds)["parts"], run(model, feeds)["parts"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ragged_sequences_are_compared_element_by_element() -> None:
    def ragged(*arrays: np.ndarray) -> np.ndarray:
        holder = np.empty(len(arrays), dtype=object)
        holder[:] = list(arrays)
        return holder

    reference = ragged(np.ones((1, 3)), np.arange(6.0).reshape(2, 3))
    assert compare_outputs("s", ragged(np.ones((1, 3)), np.arange(6.0).reshape(2, 3)), reference).passed
    moved = compare_outputs("s", ragged(np.ones((1, 3)), np.arange(6.0).reshape(2, 3) + 0.5), reference)
    assert not moved.passed and moved.max_abs_err == pytest.approx(0.5)
    assert not compare_outputs("s", ragged(np.ones((1, 3)), np.ones((3, 3))), reference).passed


def _saved(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_an_npz_member_that_cannot_be_read_is_a_one_line_refusal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    conv, inits = _planted_conv()
    model = _model(conv, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 3, 3])], inits)  # fmt: skip
    source = _saved(tmp_path, model)
    before = source.read_bytes()
    inputs = tmp_path / "objects.npz"
    np.savez(inputs, x=np.array([{"not": "an array"}], dtype=object))  # a pickle inside
    out = tmp_path / "out.onnx"
    code = cli.main([str(source), str(out), "--inputs", str(inputs)])
    err = capfd.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("red-onnx: error: array 'x' of inputs file") and "cannot be read" in err
    assert not out.exists() and source.read_bytes() == before


def _cast_model(elem: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, [2, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], opset=19)  # fmt: skip


@pytest.mark.parametrize(
    ("elem", "carrier", "values"),
    [
        (TensorProto.FLOAT8E5M2, np.uint8, [0x3C, 0x40, 0xC0, 0x00, 0x38, 0x44]),  # 1, 2, -2, 0, 0.5, 4
        (TensorProto.FLOAT8E4M3FN, np.uint8, [0x38, 0x40, 0xC0, 0x00, 0x30, 0x48]),  # 1, 2, -2, 0, 0.5, 4
        (TensorProto.BFLOAT16, np.uint16, [0x3F80, 0x4000, 0xC000, 0x0000, 0x3F00, 0x4080]),
    ],
)
def test_types_numpy_lacks_are_fed_from_their_raw_bits(tmp_path: Path, elem: int, carrier, values) -> None:
    model = _cast_model(elem)
    inputs = tmp_path / "bits.npz"
    np.savez(inputs, x=np.array(values, carrier).reshape(2, 3))
    result = red_onnx.compress(model, exact=True, input_spec=red_onnx.InputSpec(npz=inputs))
    assert result.verified
    with pytest.raises(
        InputError,
        match=rf"cannot generate; pass its values in a --calibration file.npz, as their raw bits in {carrier.__name__}",  # noqa: E501
    ):
        red_onnx.compress(model, exact=True)
    np.savez(inputs, x=np.zeros((2, 3), np.float32))
    with pytest.raises(
        InputError,
        match=rf"has dtype float32; the model's \w+ is given as their raw bits in {np.dtype(carrier)}",
    ):
        red_onnx.compress(model, exact=True, input_spec=red_onnx.InputSpec(npz=inputs))


def test_four_bit_inputs_are_refused_naming_what_works() -> None:
    with pytest.raises(
        InputError,
        match=r"element type INT4, which red_onnx can neither generate nor feed.*cast to it inside the model",
    ):
        red_onnx.compress(_cast_model(TensorProto.INT4), exact=True)


def test_strings_are_fed_from_unicode_arrays(tmp_path: Path) -> None:
    nodes = [helper.make_node("StringConcat", ["x", "x"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.STRING, [3])
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.STRING, [3])], opset=20)
    with pytest.raises(
        InputError, match=r"STRING, which red_onnx cannot generate; .* as a numpy unicode array"
    ):
        red_onnx.compress(model, exact=True)
    inputs = tmp_path / "text.npz"
    np.savez(inputs, x=np.array(["monday", "Tuesday", "x"]))
    assert red_onnx.compress(model, exact=True, input_spec=red_onnx.InputSpec(npz=inputs)).verified


def test_a_zero_dim_is_a_size(tmp_path: Path) -> None:
    nodes = [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1)]
    declared = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    result = red_onnx.compress(declared, exact=True)
    assert result.verified and result.report.input_shapes == {"x": [0, 4]}
    dynamic = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    source = _saved(tmp_path, dynamic)
    assert cli.main([str(source), "--dry-run", "-q", "--input-shape", "x:0,4"]) == 0
    inputs = tmp_path / "empty.npz"
    np.savez(inputs, x=np.zeros((0, 4), np.float32))
    assert red_onnx.compress(dynamic, exact=True, input_spec=red_onnx.InputSpec(npz=inputs)).verified


def test_an_input_that_fails_the_full_check_does_not_fail_the_run() -> None:
    conv, inits = _planted_conv(out="c")
    nodes = [*conv, helper.make_node("MeanVarianceNormalization", ["c"], ["y"])]  # its function body fails it
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])
    model = _model(nodes, [x], [y], inits, opset=13)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(model, full_check=True)
    result = red_onnx.compress(model, exact=True, latency_check=False)
    assert result.verified and _channels(result.model) == 4
    note = result.report.verification["full_check"]
    assert note.startswith("skipped: the input model fails the full ONNX check")
