"""Sequential correction of Conv and Gemm consumers: ridge maths, node walk, pass and pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx import InputSpec, compress
from red_onnx.analysis.correction import LinearStats, cross_validated_change, ridge_change
from red_onnx.errors import RewriteError, UsageError
from red_onnx.io import graph as graph_utils
from red_onnx.options import make_options
from red_onnx.passes.correct_consumers import CorrectConsumers
from red_onnx.report.report import render_table
from red_onnx.search.activations import ConvTaps
from red_onnx.search.correction import LinearNode, _input_rows, correct_sequentially, correctable_nodes


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


def test_linear_stats_add_and_subtract_as_their_rows_do() -> None:
    rng = np.random.default_rng(6)
    x, t, m = rng.normal(size=(40, 3)), rng.normal(size=(40, 2)), rng.normal(size=(4, 2))
    first, second = _stats(x[:15], t[:15]), _stats(x[15:], t[15:])
    both, alone = first + second, _stats(x, t) - second
    assert both.rows == 40 and alone.rows == 15
    assert both.error(m) == pytest.approx(_stats(x, t).error(m), rel=1e-10)
    assert alone.squared_error(m) == pytest.approx(first.squared_error(m), rel=1e-9)


def test_cross_validated_change_is_chosen_on_the_folds_held_back_and_fitted_on_all() -> None:
    rng = np.random.default_rng(2)
    x, true = rng.normal(size=(300, 4)), rng.normal(size=(5, 3))
    t = np.hstack([x, np.ones((300, 1))]) @ true + 0.01 * rng.normal(size=(300, 3))
    current = true + 0.3 * rng.normal(size=true.shape)
    folds = [_stats(x[i::4], t[i::4]) for i in range(4)]
    chosen = cross_validated_change(folds, current, alphas=(0.01, 1.0))
    assert chosen.alpha > 0 and chosen.held_back_after < 0.1 * chosen.fit_before
    everything = _stats(x, t)
    np.testing.assert_allclose(chosen.change, ridge_change(everything, current, chosen.alpha))
    assert chosen.fit_after == pytest.approx(everything.error(current + chosen.change))
    assert chosen.fit_before == pytest.approx(everything.error(current))
    pooled = sum(  # each fold scored on the change fitted without it
        f.squared_error(current + ridge_change(everything - f, current, chosen.alpha)) for f in folds
    )
    assert chosen.held_back_after == pytest.approx(np.sqrt(pooled / everything.energy))


def test_cross_validated_change_changes_nothing_when_the_folds_disagree_or_are_too_few() -> None:
    rng = np.random.default_rng(7)
    x, true = rng.normal(size=(200, 4)), rng.normal(size=(5, 3))
    current = true + 0.3 * rng.normal(size=true.shape)
    ones = np.hstack([x, np.ones((200, 1))])
    # half the rows want the change one way, the other half the other way: fitted on one half,
    # scored on the other, no strength helps
    folds = [_stats(x[:100], ones[:100] @ true), _stats(x[100:], ones[100:] @ (2 * current - true))]
    unchanged = cross_validated_change(folds, current)
    assert unchanged.alpha == 0.0 and not unchanged.change.any()
    assert unchanged.held_back_after == unchanged.fit_before
    empty = LinearStats.empty(4, 3)
    lone = cross_validated_change([_stats(x, ones @ true), empty, empty], current)
    assert lone.alpha == 0.0 and not lone.change.any()


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


@pytest.mark.parametrize(
    ("kernel", "gemm", "bias", "trans_b"),
    [(1, False, True, True), (3, False, True, True), (3, False, False, True), (1, True, True, True),
     (1, True, False, True), (1, True, True, False)],
)  # fmt: skip
def test_a_consumer_that_lost_a_channel_is_refit_and_the_pass_writes_the_same_weights(
    kernel: int, gemm: bool, bias: bool, trans_b: bool
) -> None:
    original, dropped, rng = _pair(kernel=kernel, gemm=gemm, bias=bias, trans_b=trans_b)
    fit = [{"x": rng.normal(size=(n, 3, 4, 4)).astype(np.float32)} for n in (17, 23)]  # two feeds
    correction = correct_sequentially(original, dropped, fit)
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


@pytest.mark.parametrize(
    ("kernel", "strides", "dilations", "pads"),
    [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), ((3, 2), (2, 1), (1, 2), (0, 1, 2, 0)),
     ((1, 1), (2, 2), (1, 1), (0,) * 4)],
)  # fmt: skip
def test_input_rows_times_the_weight_are_the_conv_output(
    kernel: tuple[int, int], strides: tuple[int, int], dilations: tuple[int, int], pads: tuple[int, ...]
) -> None:
    """A Conv's patch rows ``[N·P, C·taps]`` times its weight: onnxruntime's output at those positions."""
    rng = np.random.default_rng(8)
    weight = rng.normal(size=(4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, dilations=dilations, pads=pads)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3, 7, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    images = rng.normal(size=(5, 3, 7, 6)).astype(np.float32)
    want = _outputs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), images)
    taps = ConvTaps(kernel, strides, dilations, pads)
    linear = LinearNode("conv", "y", "x", "w", None, rows_first=True, taps=taps)
    samples, picked = np.array([1, 4]), np.array([0, 3, want.shape[2] * want.shape[3] - 1])
    rows = _input_rows(linear, images, picked, samples)
    got = rows @ weight.reshape(4, -1).T.astype(np.float64)
    expected = want.reshape(5, 4, -1)[samples][:, :, picked].transpose(0, 2, 1).reshape(-1, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _grouped_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x [N, 4, 4, 4] → grouped 1×1 Conv (2 groups, 4 out) → y; and the same with 2 inputs fewer."""

    def net(inputs: int) -> onnx.ModelProto:
        weight = np.ones((4, inputs // 2, 1, 1), np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="grouped", group=2)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w")],
        )  # fmt: skip
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    return net(4), net(2)


def test_feeds_of_different_sizes_read_their_own_sampled_positions(monkeypatch) -> None:
    """Few rows per node: each feed's positions are sampled for its own output size, and its input
    patches are read at those positions (not at another feed's)."""
    from red_onnx.search import correction as correction_module

    original, dropped, rng = _pair(kernel=3, seed=10)
    for model in (original, dropped):  # height and width dynamic
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    monkeypatch.setattr(correction_module, "CORRECTION_ROWS", 60)  # 3 positions per sample
    fit = [{"x": rng.normal(size=(10, 3, h, h)).astype(np.float32)} for h in (4, 7)]
    done = correct_sequentially(original, dropped, fit)
    assert done.weights and done.layers[0]["rows"] == 20 * 3
    for h in (4, 7):
        test = rng.normal(size=(30, 3, h, h)).astype(np.float32)
        want = _outputs(original, test)
        before = np.linalg.norm(_outputs(dropped, test) - want)
        assert np.linalg.norm(_outputs(done.model, test) - want) < 0.9 * before


def test_a_grouped_conv_is_left_with_the_reason_and_nothing_lost_finds_nothing() -> None:
    original, fewer = _grouped_pair()
    assert correctable_nodes(original, fewer) == ([], [{"node": "grouped", "reason": "a grouped Conv"}])
    original, dropped, _ = _pair(kernel=3)
    assert correctable_nodes(original, original) == ([], [])  # nothing lost inputs: nothing found
    assert [n.name for n in correctable_nodes(original, dropped)[0]] == ["conv2"]
    assert correctable_nodes(original, dropped, scope="pointwise") == (
        [], [{"node": "conv2", "reason": "a k×k Conv (left in the pointwise scope)"}]
    )  # fmt: skip


def test_a_node_whose_outputs_were_merged_is_refit_towards_the_channels_it_kept() -> None:
    """conv2 [2, 5, 3, 3] loses input 4 and output 0: its target is the original's output channel 1."""
    original, dropped, rng = _pair(kernel=3, seed=9)
    weights = {i.name: numpy_helper.to_array(i) for i in dropped.graph.initializer}
    narrower = onnx.ModelProto()
    narrower.CopyFrom(dropped)
    for initializer in narrower.graph.initializer:
        if initializer.name in ("w2", "b2"):
            initializer.CopyFrom(numpy_helper.from_array(weights[initializer.name][1:], initializer.name))
    nodes, skipped = correctable_nodes(original, narrower)
    assert nodes == [] and skipped == [
        {"node": "conv2", "reason": "its own outputs were merged too, and which ones it kept is not known"}
    ]
    fit = [{"x": rng.normal(size=(40, 3, 4, 4)).astype(np.float32)}]
    correction = correct_sequentially(original, narrower, fit, kept_outputs={"y": np.array([1])})
    assert [layer["node"] for layer in correction.layers] == ["conv2"] and correction.weights
    test = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    want = _outputs(original, test)[:, 1:]
    before = np.linalg.norm(_outputs(narrower, test) - want) / np.linalg.norm(want)
    after = np.linalg.norm(_outputs(correction.model, test) - want) / np.linalg.norm(want)
    assert after < 0.75 * before


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


def test_activation_fits_are_on_by_default_with_calibration_or_a_target_in_given_input_ranges(
    tmp_path: Path,
) -> None:
    npz = tmp_path / "samples.npz"
    np.savez(npz, x=np.zeros((4, 3), np.float32))
    assert make_options(target_macs=0.8, input_spec=InputSpec(npz=npz)).activations is True
    assert make_options(target_macs=0.8, input_spec=InputSpec(ranges={"x": (0.0, 1.0)})).activations is True
    # under a tolerance, synthetic draws in a range are ranked on the weights
    assert make_options(tolerance=0.02, input_spec=InputSpec(ranges={"x": (0.0, 1.0)})).activations is False
    assert make_options(target_macs=0.8).activations is False  # N(0, 1) draws alone
    assert make_options(target_macs=0.8, input_spec=InputSpec(prior="pink")).activations is False
    ranged = InputSpec(ranges={"x": (0.0, 1.0)})
    assert make_options(target_macs=0.8, input_spec=ranged, activations=False).activations is False
    assert make_options(target_macs=0.8, input_spec=ranged).sequential_refit is False  # synthetic


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
    # conv3 alone (pointwise) or conv2 too, towards the outputs it kept: the lower cv error is chosen
    assert set(summary["cv_error_per_scope"]) == {"pointwise", "every"}
    assert summary["cv_error_after"] == min(summary["cv_error_per_scope"].values())
    chosen = {"pointwise": ["conv3"], "every": ["conv2", "conv3"]}[summary["scope"]]
    assert [layer["node"] for layer in summary["layers"]] == chosen
    assert summary["skipped"] == ([] if summary["scope"] == "every" else [
        {"node": "conv2", "reason": "its own outputs were merged too, and which ones it kept is not known"}
    ])  # fmt: skip
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
    assert (
        f"sequential refit: {len(chosen)} of {len(chosen)} layers refit; kept (output error on the cv rows"
        in render_table(corrected.report)
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
        "sequential refit: 2 of 3 layers refit; not kept (output error on the cv rows 0.2 -> 0.199, "
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
