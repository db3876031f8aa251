"""Synthetic inputs of text models: token ids below the embedding table's size, masks of ones, token
types of zeros, positions 0..S-1 (graphs built in code, as Hugging Face encoders export them)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import red_onnx
from red_onnx.options import InputSpec
from red_onnx.report.report import render_table
from red_onnx.search.activations import capture
from red_onnx.verify.compare import compare_outputs, pooled_cosine, token_rows
from red_onnx.verify.inputs import describe_inputs, make_inputs
from red_onnx.verify.synthetic import IntegerRole, integer_roles
from red_onnx.verify.verifier import Verifier

INT64 = onnx.TensorProto.INT64


def encoder_like(cast_ids: bool = False) -> onnx.ModelProto:
    """Word, token-type and position embeddings summed, masked, then an FFN (MatMul, Relu, MatMul)."""
    rng = np.random.default_rng(0)
    tables = {"word": (50, 8), "types": (2, 8), "positions": (16, 8)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tables.items()}
    weights |= {"w1": rng.standard_normal((8, 12)).astype(np.float32),
                "w2": rng.standard_normal((12, 4)).astype(np.float32)}  # fmt: skip
    ids = "input_ids"
    nodes = []
    if cast_ids:  # some exports cast the ids to int32 before the Gather
        nodes.append(helper.make_node("Cast", ["input_ids"], ["ids32"], to=onnx.TensorProto.INT32))
        ids = "ids32"
    nodes += [
        helper.make_node("Gather", ["word", ids], ["e_word"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["e_type"]),
        helper.make_node("Gather", ["positions", "position_ids"], ["e_pos"]),
        helper.make_node("Sum", ["e_word", "e_type", "e_pos"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["y"]),
    ]
    names = ["input_ids", "token_type_ids", "position_ids", "attention_mask"]
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info(n, INT64, ["B", "S"]) for n in names],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "S", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()]
        + [numpy_helper.from_array(np.array([-1], np.int64), "axis")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_roles_come_from_the_names_and_the_embedding_tables() -> None:
    for cast in (False, True):
        assert integer_roles(encoder_like(cast)) == {
            "input_ids": IntegerRole("ids", 50), "token_type_ids": IntegerRole("zeros"),
            "position_ids": IntegerRole("positions"), "attention_mask": IntegerRole("mask"),
        }  # fmt: skip


def test_synthetic_text_inputs_hold_their_roles_values_and_the_model_runs() -> None:
    model = encoder_like()
    spec = InputSpec(shapes={name: (3, 10) for name in ("input_ids", "token_type_ids", "position_ids",
                                                        "attention_mask")})  # fmt: skip
    feeds = [make_inputs(model, spec, seed) for seed in (0, 1)]
    for feed in feeds:
        assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 50
        assert (feed["attention_mask"] == 1).all() and (feed["token_type_ids"] == 0).all()
        np.testing.assert_array_equal(feed["position_ids"], np.broadcast_to(np.arange(10), (3, 10)))
    assert not np.array_equal(feeds[0]["input_ids"], feeds[1]["input_ids"])  # seeded, not constant
    assert len(np.unique(np.concatenate([f["input_ids"].ravel() for f in feeds]))) > 10  # not 0..10 only
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, feeds[0])[0].shape == (3, 10, 4)


def test_a_range_overrides_a_role_and_the_report_names_the_roles() -> None:
    model = encoder_like()
    feed = make_inputs(model, InputSpec(ranges={"input_ids": (0.0, 4.0)}), 0)
    assert feed["input_ids"].max() <= 4
    notes = describe_inputs(model, InputSpec(ranges={"input_ids": (0.0, 4.0)}))["range_notes"]
    assert not any("'input_ids'" in note for note in notes)
    assert any("'attention_mask': ones" in note for note in notes)
    assert any("'position_ids': 0..S-1" in note for note in notes)


def test_an_encoder_compresses_on_its_synthetic_text_inputs() -> None:
    """Random ints in [0, 10] would index past the 2-row token-type table: the run would fail."""
    result = red_onnx.compress(encoder_like(), latency_check=False)
    assert result.verified
    notes = result.report.to_dict()["inputs"]["range_notes"]
    assert any("ids drawn below 50" in note for note in notes)


def test_pooled_cosine_is_the_mask_weighted_sentence_embedding_cosine() -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((2, 5, 4))
    candidate = reference + 0.1 * rng.standard_normal((2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    candidate[0, 3:] = 100.0  # padding: the mask weighs it out
    expected = []
    for row in range(2):
        keep = mask[row].astype(bool)
        c, r = candidate[row, keep].mean(axis=0), reference[row, keep].mean(axis=0)
        expected.append(c @ r / np.linalg.norm(c) / np.linalg.norm(r))
    assert pooled_cosine(candidate, reference, mask) == pytest.approx(min(expected), rel=1e-12)
    assert pooled_cosine(candidate, reference) < min(expected)  # unweighted, the padding counts
    assert pooled_cosine(candidate[:, :, 0], reference[:, :, 0]) is None  # not [B, S, H]
    assert pooled_cosine(candidate, reference, mask[:, :3]) is None  # a mask of another shape


def test_the_report_gives_the_pooled_cosine_of_a_text_encoder(capsys) -> None:
    names = ("input_ids", "token_type_ids", "position_ids", "attention_mask")
    spec = InputSpec(shapes=dict.fromkeys(names, (2, 8)))
    result = red_onnx.compress(encoder_like(), target_macs=0.95, channel_multiple=1, latency_check=False,
                               force_target=True, input_spec=spec)  # fmt: skip
    (output,) = result.report.to_dict()["verification"]["outputs"]
    assert output["shape"][-1] == 4 and 0.0 < output["pooled_cosine"] <= 1.0
    text = render_table(result.report)
    figure = f"{output['pooled_cosine']:.4f}"
    assert f"token-pooled cosine of 'y' (mean over the sequence, weighted by the mask): {figure}" in text


def test_a_model_without_token_ids_gets_no_pooled_cosine() -> None:
    """A [B, C, N] conv output (a detection head's layout) is no sentence embedding."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((6, 4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1], name="conv")], "conv1d",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6, 8])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (output,) = red_onnx.compress(model, latency_check=False).report.to_dict()["verification"]["outputs"]
    assert output["shape"] == [1, 6, 8] and output["pooled_cosine"] is None


def padded_samples(path, rows: int = 6, length: int = 8) -> np.ndarray:
    """An npz of the encoder's four inputs, sentences of 3..length tokens padded to ``length``."""
    rng = np.random.default_rng(4)
    lengths = rng.integers(3, length + 1, rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    positions = np.broadcast_to(np.arange(length), (rows, length)).copy()
    ids = rng.integers(0, 50, (rows, length)) * mask
    types = np.zeros_like(mask)
    np.savez(path, input_ids=ids, token_type_ids=types, position_ids=positions, attention_mask=mask)
    return mask


def test_the_relative_error_counts_only_the_tokens_the_mask_keeps() -> None:
    rng = np.random.default_rng(5)
    reference = rng.standard_normal((2, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    candidate = reference.copy()
    candidate[mask == 0] += 50.0  # padded tokens only
    check = compare_outputs("y", candidate, reference, mask=mask)
    assert check.rel_l2_err == 0.0 and check.max_abs_err == pytest.approx(50.0) and not check.passed
    candidate[0, 0, 0] += 1.0  # a kept token: measured over the kept tokens alone
    kept = mask > 0
    expected = 1.0 / np.linalg.norm(reference[kept].astype(np.float64))
    assert compare_outputs("y", candidate, reference, mask=mask).rel_l2_err == pytest.approx(expected)
    assert compare_outputs("y", candidate, reference).rel_l2_err > 1.0  # without a mask: every element
    assert token_rows(reference, np.ones((2, 6))) is None  # a mask that keeps everything changes nothing


def test_search_errors_and_captured_activations_skip_padded_tokens(tmp_path) -> None:
    model = encoder_like()
    path = tmp_path / "samples.npz"
    mask = padded_samples(path)
    verifier = Verifier(model, InputSpec(calibration=path), levels=("disable_all",))
    (masked,) = verifier.token_masks
    np.testing.assert_array_equal(masked, mask)
    (reference,) = verifier.reference_outputs("disable_all")
    padded = {"y": reference["y"] + 10.0 * (mask == 0)[:, :, None].astype(np.float32)}
    assert verifier.rel_l2_errors_of([padded], "disable_all")["y"] == 0.0
    captured = capture(model, verifier.inputs, {"h2": (2, 1)}, masks=verifier.token_masks)
    assert captured["h2"].shape == (12, int(mask.sum()))  # one column per kept token
    assert capture(model, verifier.inputs, {"h2": (2, 1)})["h2"].shape == (12, mask.size)
