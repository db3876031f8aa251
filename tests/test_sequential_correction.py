"""Sequential correction of 1×1 consumers: the ridge maths, the node walk, the pass and the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx import InputSpec, compress
from red_onnx.analysis.correction import LinearStats, chosen_change, ridge_change
from red_onnx.errors import RewriteError, UsageError
from red_onnx.io import graph as graph_utils
from red_onnx.options import make_options
from red_onnx.passes.correct_consumers import CorrectConsumers
from red_onnx.report.report import render_table
from red_onnx.search.correction import correct_sequentially, correctable_nodes


def _stats(x: np.ndarray, t: np.ndarray) -> LinearStats:
    stats = LinearStats.empty(x.shape[1], t.shape[1])
    stats.add(x, t)
    return stats


def test_linear_stats_error_is_the_relative_error_of_the_rows() -> None:
    rng = np.random.default_rng(0)
    x, t, m = rng.normal(size=(50, 3)), rng.normal(size=(50, 2)), rng.normal(size=(4, 2))
    stats = LinearStats.empty(3, 2)
    stats.add(x[:20], t[:20])
    stats.add(x[20:], t[20:])  # rows added in two parts give the statistics of all of them
    direct = np.linalg.norm(np.hstack([x, np.ones((50, 1))]) @ m - t) / np.linalg.norm(t)
    assert stats.rows == 50
    assert stats.error(m) == pytest.approx(direct, rel=1e-10)


def test_ridge_change_without_penalty_is_least_squares_and_the_intercept_is_free() -> None:
    rng = np.random.default_rng(1)
    x, true = rng.normal(size=(200, 3)), rng.normal(size=(4, 2))
    true[-1] = [5.0, -3.0]  # a large intercept: a penalised one would shrink it
    t = np.hstack([x, np.ones((200, 1))]) @ true
    start = np.zeros((4, 2))
    np.testing.assert_allclose(ridge_change(_stats(x, t), start, 0.0), true, atol=1e-9)
    strong = ridge_change(_stats(x, t), start, 1e6)  # the weights stay, the intercept still moves
    assert np.abs(strong[:-1]).max() < 1e-3
    np.testing.assert_allclose(strong[-1], t.mean(axis=0), atol=1e-2)


def test_chosen_change_lowers_the_validation_error_or_changes_nothing() -> None:
    rng = np.random.default_rng(2)
    x, true = rng.normal(size=(300, 4)), rng.normal(size=(5, 3))
    t = np.hstack([x, np.ones((300, 1))]) @ true + 0.01 * rng.normal(size=(300, 3))
    current = true + 0.3 * rng.normal(size=true.shape)
    chosen = chosen_change(_stats(x[:200], t[:200]), _stats(x[200:], t[200:]), current)
    assert chosen.alpha > 0 and chosen.validation_after < 0.1 * chosen.validation_before
    assert chosen.validation_after == pytest.approx(_stats(x[200:], t[200:]).error(current + chosen.change))
    # validation rows that want the change the other way: no strength helps, nothing changes
    away = np.hstack([x[200:], np.ones((100, 1))]) @ (2 * current - true)
    unchanged = chosen_change(_stats(x[:200], t[:200]), _stats(x[200:], away), current)
    assert unchanged.alpha == 0.0 and not unchanged.change.any()
    assert unchanged.validation_after == unchanged.validation_before


def _net(
    first: np.ndarray,
    second: np.ndarray,
    second_bias: np.ndarray | None,
    *,
    gemm: bool = False,
    trans_b: bool = True,
) -> onnx.ModelProto:
    """x [N, 3, 4, 4] → 1×1 Conv → Relu → (Conv with ``second``'s kernel | GlobalAveragePool → Gemm)."""
    hidden = first.shape[0]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
    ]
    arrays = {"w1": first, "b1": np.linspace(-0.2, 0.2, hidden)}
    inputs = ["w2"] + (["b2"] if second_bias is not None else [])
    if gemm:
        nodes += [
            helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", *inputs], ["y"], name="fc", transB=int(trans_b)),
        ]
        arrays["w2"] = second if trans_b else second.T
    else:
        pads = [second.shape[2] // 2] * 4
        nodes.append(helper.make_node("Conv", ["r", *inputs], ["y"], name="conv2", pads=pads))
        arrays["w2"] = second
    if second_bias is not None:
        arrays["b2"] = second_bias
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _outputs(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": images})[0]


def _pair(kernel: int = 1, gemm: bool = False, bias: bool = True, trans_b: bool = True, seed: int = 3):
    """The original net and the net with hidden channel 4 dropped (its consumer not compensated)."""
    rng = np.random.default_rng(seed)
    first = rng.normal(size=(5, 3, 1, 1))
    second = rng.normal(size=(2, 5) if gemm else (2, 5, kernel, kernel))
    second_bias = rng.normal(size=2) if bias else None
    original = _net(first, second, second_bias, gemm=gemm, trans_b=trans_b)
    dropped = _net(first[:4], second[:, :4], second_bias, gemm=gemm, trans_b=trans_b)
    return original, dropped, rng


@pytest.mark.parametrize(("gemm", "bias", "trans_b"), [(False, True, True), (True, True, True),
                                                       (True, False, True), (True, True, False)])  # fmt: skip
def test_a_consumer_that_lost_a_channel_is_refit_and_the_pass_writes_the_same_weights(
    gemm: bool, bias: bool, trans_b: bool
) -> None:
    original, dropped, rng = _pair(gemm=gemm, bias=bias, trans_b=trans_b)
    fit = [{"x": rng.normal(size=(30, 3, 4, 4)).astype(np.float32)}]
    validation = [{"x": rng.normal(size=(10, 3, 4, 4)).astype(np.float32)}]
    correction = correct_sequentially(original, dropped, fit, validation)
    assert [layer["node"] for layer in correction.layers] == ["fc" if gemm else "conv2"]
    assert correction.weights and correction.layers[0]["alpha"] > 0
    test = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    want = _outputs(original, test)
    before = np.linalg.norm(_outputs(dropped, test) - want) / np.linalg.norm(want)
    after = np.linalg.norm(_outputs(correction.model, test) - want) / np.linalg.norm(want)
    assert after < 0.75 * before
    # the pass writes the same weights into a working model of the dropped net: same function
    working = graph_utils.import_model(dropped)
    result = CorrectConsumers(weights=correction.weights)(working)
    assert result.modified and result.stats == {"corrected": 1}
    written = graph_utils.export_model(working)
    np.testing.assert_allclose(
        _outputs(written, test), _outputs(correction.model, test), rtol=1e-5, atol=1e-5
    )


def test_a_kxk_consumer_is_left_as_it_is_with_the_reason() -> None:
    original, dropped, rng = _pair(kernel=3)
    feeds = [{"x": rng.normal(size=(8, 3, 4, 4)).astype(np.float32)}]
    correction = correct_sequentially(original, dropped, feeds, feeds)
    assert not correction.weights and not correction.layers
    assert correction.skipped == [
        {"node": "conv2", "reason": "a k×k Conv (only 1×1 consumers are corrected)"}
    ]
    nodes, skipped = correctable_nodes(original, original)  # nothing lost inputs: nothing found
    assert (nodes, skipped) == ([], [])


def test_the_pass_refuses_weights_made_for_another_model() -> None:
    _, dropped, _ = _pair()
    working = graph_utils.import_model(dropped)
    with pytest.raises(RewriteError, match="no Conv or Gemm writes"):
        CorrectConsumers(weights={"missing": (np.zeros((2, 4, 1, 1)), None)})(working)
    with pytest.raises(RewriteError, match="shape"):
        CorrectConsumers(weights={"y": (np.zeros((2, 5, 1, 1)), None)})(graph_utils.import_model(dropped))


def test_sequential_refit_needs_an_approximate_run() -> None:
    with pytest.raises(UsageError, match="--sequential-refit"):
        make_options(sequential_refit=True)
    with pytest.raises(UsageError, match="--sequential-refit"):
        make_options(exact=True, sequential_refit=True)
    assert make_options(target_macs=0.8, sequential_refit=True).provenance()["sequential_refit"] is True


def test_sequential_refit_is_on_by_default_with_calibration_samples_only(tmp_path: Path) -> None:
    npz = tmp_path / "samples.npz"
    np.savez(npz, x=np.zeros((4, 3), np.float32))
    calibrated = InputSpec(npz=npz)
    assert make_options(target_macs=0.8, input_spec=calibrated).sequential_refit is True
    assert make_options(tolerance=0.05, input_spec=calibrated).sequential_refit is True
    assert make_options(target_macs=0.8).sequential_refit is False  # synthetic inputs
    assert make_options(input_spec=calibrated).sequential_refit is False  # exact
    assert (
        make_options(target_macs=0.8, input_spec=calibrated, sequential_refit=False).sequential_refit is False
    )


def _wide_net(seed: int = 4) -> onnx.ModelProto:
    """x [N, 4, 6, 6] → 1×1 Conv (24) → Relu → 1×1 Conv (16) → Relu → 1×1 Conv → y [N, 8, 6, 6].

    Both hidden groups may lose channels; the last conv's input then differs from what the one-shot
    refit saw (the middle conv's inputs lost channels too).
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": rng.normal(size=(24, 4, 1, 1)) * 0.5, "b1": rng.normal(size=24) * 0.1,
        "w2": rng.normal(size=(16, 24, 1, 1)) * 0.3, "b2": rng.normal(size=16) * 0.1,
        "w3": rng.normal(size=(8, 16, 1, 1)) * 0.3, "b3": rng.normal(size=8),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compress_reports_the_correction_and_judges_the_model_it_writes(tmp_path: Path) -> None:
    model = _wide_net()
    path, npz = tmp_path / "wide.onnx", tmp_path / "calibration.npz"
    onnx.save(model, path)
    rng = np.random.default_rng(5)
    np.savez(npz, x=np.abs(rng.normal(size=(64, 4, 6, 6))).astype(np.float32))
    # merges only (no one-shot refit): the last conv's compensation is the λ-merge, which the
    # correction improves on
    settings = {"target_macs": 0.6, "channel_multiple": 4, "latency_check": False, "force_target": True,
                "input_spec": InputSpec(npz=npz), "raise_on_failure": False, "refit": False}  # fmt: skip
    plain = compress(path, sequential_refit=False, **settings)
    corrected = compress(path, **settings)  # on by default with calibration samples
    summary = corrected.report.budget["correction"]
    assert summary["rows"] == {"fit": 32, "cv": 16}
    assert [layer["node"] for layer in summary["layers"]] == ["conv3"]
    assert summary["skipped"] == [
        {"node": "conv2", "reason": "its own outputs were merged too (no target to refit to)"}
    ]
    assert plain.report.macs_after == corrected.report.macs_after
    assert summary["kept"] and summary["cv_error_after"] < summary["cv_error_before"]
    assert corrected.report.budget["heldout_error"] == summary["heldout_error_after"]
    assert corrected.report.budget["heldout_error_uncorrected"] == pytest.approx(
        plain.report.budget["heldout_error"], rel=1e-4
    )
    assert any(item.name == "correct_consumers" and item.modified for item in corrected.report.passes)
    assert (
        corrected.verified
        and corrected.report.verification["heldout_error"] == summary["heldout_error_after"]
    )
    assert "sequential refit: 1 of 1 1x1 consumers refit; kept (output error on the cv rows" in render_table(
        corrected.report
    )
    test = np.abs(rng.normal(size=(200, 4, 6, 6))).astype(np.float32)
    want = _outputs(model, test)
    errors = [
        np.linalg.norm(_outputs(r.model, test) - want) / np.linalg.norm(want) for r in (plain, corrected)
    ]
    assert errors[1] < 0.9 * errors[0]


def test_a_correction_not_kept_says_why_in_the_table() -> None:
    from red_onnx.report.report import _render_correction

    summary = {
        "corrected": 2,
        "layers": [{}, {}, {}],
        "kept": False,
        "cv_error_before": 0.2,
        "cv_error_after": 0.199,
    }
    assert _render_correction(summary) == (
        "sequential refit: 2 of 3 1x1 consumers refit; not kept (output error on the cv rows 0.2 -> 0.199, "
        "not 1% lower)"
    )
    stream = {"kept": False, "reason": "a recurrent stream is used whole: no rows to validate on"}
    assert _render_correction(stream).endswith(
        "; not kept: a recurrent stream is used whole: no rows to validate on"
    )
    reason = "held out 0.03 would fail the held-out check; the uncorrected model's 0.02 passes"
    assert _render_correction(summary | {"reason": reason}).endswith(f"; not kept: {reason}")


def test_a_correction_that_would_fail_the_held_out_check_is_not_written() -> None:
    from red_onnx.pipeline import _dropped_correction

    summary = {"heldout_error_after": 0.03}
    bounded = make_options(tolerance=0.025)
    reason = _dropped_correction(bounded, {"heldout_error": 0.02}, summary)
    assert reason is not None and "0.03 would fail the held-out check" in reason and "0.02 passes" in reason
    assert _dropped_correction(bounded, {"heldout_error": 0.026}, summary) is None  # both fail: it is lower
    assert _dropped_correction(make_options(tolerance=0.05), {"heldout_error": 0.02}, summary) is None
    targeted = make_options(target_macs=0.8)  # the drift check: 2x the search's error
    assert _dropped_correction(targeted, {"heldout_error": 0.02, "error": 0.012}, summary) is not None
    assert _dropped_correction(targeted, {"heldout_error": 0.02, "error": 0.02}, summary) is None
    forced = make_options(target_macs=0.8, force_target=True)  # nothing fails: kept
    assert _dropped_correction(forced, {"heldout_error": 0.02, "error": 0.012}, summary) is None
