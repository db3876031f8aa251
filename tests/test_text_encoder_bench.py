"""The sentence-encoder benchmark's pure helpers (``bench/text_encoder.py``): equal-MACs bisection,
paired bootstrap, interleaved timing, resuming, the GELU rewrites and the weight-norm FFN baseline on
small graphs built here. Needs neither the exported model nor onnxsim."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from bench import text_encoder as te

FLOAT = onnx.TensorProto.FLOAT


def test_bisection_matches_a_linear_curve_within_the_tolerance() -> None:
    calls: list[float] = []

    def kept(s: float) -> float:
        calls.append(s)
        return 1 - 0.66 * s  # the FFN share of MACs, removed in proportion

    found = te.bisect_sparsity(kept, 0.8, tolerance=0.005)
    assert found.matched
    assert abs(found.macs_kept - 0.8) <= 0.005
    assert found.sparsity == pytest.approx(0.2 / 0.66, abs=0.005 / 0.66)
    assert 0.0 not in calls  # sparsity 0 is taken as all MACs kept, never evaluated
    assert len(calls) <= 3  # the interpolation step lands on a line at once
    assert found.trace == [(s, kept(s)) for s in calls[: len(found.trace)]]


def test_bisection_on_a_step_function_returns_the_closest_step_unmatched() -> None:
    def heads(s: float) -> float:  # 12 heads, each 1/30 of the MACs: steps too coarse for 0.005
        return 1 - math.floor(s * 12) / 30

    found = te.bisect_sparsity(heads, 0.86, tolerance=0.005)
    assert not found.matched
    assert found.macs_kept == pytest.approx(1 - 4 / 30)  # 0.8667, the step closest to 0.86
    assert len(found.trace) <= 24


def test_bisection_of_an_unreachable_or_unmoving_target_stops_at_once() -> None:
    nothing = te.bisect_sparsity(lambda s: 1.0, 0.8)
    assert not nothing.matched and nothing.macs_kept == 1.0 and len(nothing.trace) == 1
    floor = te.bisect_sparsity(lambda s: 1 - 0.3 * s, 0.6, high=0.95)
    assert not floor.matched and floor.sparsity == 0.95 and len(floor.trace) == 1


def test_bisection_accepts_the_highest_sparsity_when_it_matches() -> None:
    found = te.bisect_sparsity(lambda s: 1 - s, 0.05, high=0.95)
    assert found.matched and found.sparsity == 0.95 and len(found.trace) == 1


def test_paired_bootstrap_interval_covers_a_known_shift_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    b = rng.normal(0.9, 0.05, 200)
    a = b + 0.01 + rng.normal(0, 0.002, 200)  # a pairs with b: the shared noise cancels
    first = te.paired_bootstrap(a, b, resamples=1000, seed=0)
    assert first == te.paired_bootstrap(a, b, resamples=1000, seed=0)
    low, high = first["ci95"]
    assert low < first["difference"] < high
    assert low < 0.01 < high and high - low < 0.002  # narrow: the paired differences vary little
    assert first["pairs"] == 200 and first["resamples"] == 1000 and first["seed"] == 0
    unpaired_width = 2 * 1.96 * np.std(b) * math.sqrt(2 / 200)
    assert high - low < unpaired_width / 10


def test_paired_bootstrap_of_identical_values_is_zero_and_rejects_mismatched_lengths() -> None:
    same = te.paired_bootstrap([0.2, 0.4, 1.0], [0.2, 0.4, 1.0])
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        te.paired_bootstrap([1.0, 2.0], [1.0])


def test_interleaved_times_alternate_the_runners_after_the_warm_up() -> None:
    order: list[str] = []
    now = [0.0]

    def runner(name: str, seconds: float):
        def run() -> None:
            order.append(name)
            now[0] += seconds

        return run

    a, b = te.interleaved_times(
        [runner("A", 0.010), runner("B", 0.005)], runs=4, warmup=2, clock=lambda: now[0]
    )
    assert order == ["A", "B"] * 6  # 2 warm-ups, then 4 timed rounds, always A then B
    assert a == pytest.approx([0.010] * 4) and b == pytest.approx([0.005] * 4)
    summary = te.latency_summary(a, b)
    assert summary["original_ms"] == pytest.approx(10) and summary["compressed_ms"] == pytest.approx(5)
    assert summary["ratio"] == pytest.approx(0.5) and summary["runs"] == 4


def test_latency_summary_uses_medians() -> None:
    summary = te.latency_summary([0.010, 0.011, 0.100], [0.009, 0.008, 0.001])  # one outlier each
    assert summary["original_ms"] == pytest.approx(11) and summary["compressed_ms"] == pytest.approx(8)
    assert summary["ratio"] == pytest.approx(8 / 11)


def test_a_run_is_kept_on_resume_only_when_complete() -> None:
    full = {"label": "x", **{name: 1 for name in te.COMPLETE_FIELDS}}
    assert te.is_complete(full)
    assert not te.is_complete({**full, "error": "RuntimeError: boom"})
    assert not te.is_complete({"label": "calibrated@0.8", "cosine_mean": 0.96})  # written by an older script
    assert te.is_complete({"label": "onnxsim-heads-wanda@0.8", "status": "pruned nothing"})


def test_comparisons_pair_calibrated_with_each_baseline_at_the_same_target() -> None:
    def row(label: str, setting: str, target: float, cos: list[float]) -> dict:
        return {"label": label, "setting": setting, "target": target, "macs_kept_s32": target,
                "per_sentence": {"cosine": cos, "top5_overlap": [1.0] * len(cos)}}  # fmt: skip

    runs = [row("calibrated@0.8", "calibrated", 0.8, [0.99, 0.98, 0.97]),
            row("data-free@0.8", "data-free", 0.8, [0.5, 0.5, 0.5])]  # fmt: skip
    baselines = [
        {**row("ffn-weight-norm@0.8", "ffn-weight-norm", 0.8, [0.9, 0.9, 0.9]),
         "bisection": {"matched": True}},
        row("onnxsim-ffn-wanda@0.7", "onnxsim-ffn-wanda", 0.7, [0.8, 0.8, 0.8]),  # no calibrated@0.7
        {"label": "onnxsim-heads-wanda@0.8", "setting": "onnxsim-heads-wanda", "target": 0.8,
         "status": "pruned nothing"},
    ]  # fmt: skip
    (only,) = te.compare_with_baselines(runs, baselines)
    assert only["ours"] == "calibrated@0.8" and only["baseline"] == "ffn-weight-norm@0.8"
    assert only["cosine_mean_difference"]["difference"] == pytest.approx(0.08)
    assert only["top5_overlap_difference"]["difference"] == 0
    assert only["baseline_matched"] is True


def _ffn_encoder(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add(b1) -> erf GELU as PyTorch exports it -> MatMul(W2), named as in the encoder."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(math.sqrt(2.0), dtype=np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]
    ffn = "/inner/encoder/layer.0/intermediate"
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name=f"{ffn}/dense/MatMul"),
        helper.make_node("Add", ["b1", "h0"], ["h"], name=f"{ffn}/dense/Add"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"], name=f"{ffn}/intermediate_act_fn/Div"),
        helper.make_node("Erf", ["d"], ["e"], name=f"{ffn}/intermediate_act_fn/Erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name=f"{ffn}/intermediate_act_fn/Add"),
        helper.make_node("Mul", ["h", "a"], ["m"], name=f"{ffn}/intermediate_act_fn/Mul"),
        helper.make_node("Mul", ["m", "half"], ["g"], name=f"{ffn}/intermediate_act_fn/Mul_1"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="/inner/encoder/layer.0/output/dense/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", "sequence", 4])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_gelu_fusion_and_its_inverse_keep_the_function() -> None:
    model = _ffn_encoder()
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    fused, count = te.fuse_erf_gelu(model)
    assert count == 1
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "Add", "Gelu", "MatMul"]
    assert not {"sqrt2", "one", "half"} & {t.name for t in fused.graph.initializer}
    np.testing.assert_allclose(_run(fused, x), _run(model, x), rtol=1e-5, atol=1e-5)
    back = te.unfuse_gelu(fused)
    assert "Gelu" not in {n.op_type for n in back.graph.node}
    assert all(o.domain != "com.microsoft" for o in back.opset_import)
    onnx.checker.check_model(back)
    np.testing.assert_allclose(_run(back, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_gelu_fusion_leaves_a_gelu_whose_parts_are_read_elsewhere() -> None:
    for name in ("e", "m"):
        model = _ffn_encoder()
        model.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
        assert te.fuse_erf_gelu(model)[1] == 0
    model = _ffn_encoder()
    model.graph.node.append(helper.make_node("Relu", ["h"], ["r"]))  # a third reader of the GELU's input
    model.graph.output.append(helper.make_tensor_value_info("r", FLOAT, None))
    assert te.fuse_erf_gelu(model)[1] == 0


def test_weight_norm_pruning_drops_the_neurons_with_the_smallest_norm_product() -> None:
    model = _ffn_encoder()
    (layer,) = te.ffn_layers(model)
    assert (layer.w1, layer.b1, layer.w2) == ("w1", "b1", "w2")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    score = np.linalg.norm(inits["w1"], axis=0) * np.linalg.norm(inits["w2"], axis=1)
    pruned = te.prune_ffn_by_weight_norm(model, 0.25)  # 2 of 8 neurons
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    keep = np.sort(np.argsort(-score)[:6])
    np.testing.assert_array_equal(after["w1"], inits["w1"][:, keep])
    np.testing.assert_array_equal(after["b1"], inits["b1"][keep])
    np.testing.assert_array_equal(after["w2"], inits["w2"][keep])
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (4, 8)  # the input is left alone
    x = np.random.default_rng(2).standard_normal((1, 3, 4)).astype(np.float32)
    assert _run(pruned, x).shape == (1, 3, 4)
    assert te.prune_ffn_by_weight_norm(model, 0.0).graph.initializer[0].dims == [4, 8]


@pytest.mark.slow
def test_the_cached_model_counts_its_attention_matmuls() -> None:
    if not te.MODEL.exists() or not (te.TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("needs the exported sentence encoder: run bench/models/export_text_encoder.py")
    pytest.importorskip("tokenizers")
    model = onnx.load(str(te.MODEL), load_external_data=False)
    feed = {"input_ids": np.zeros((1, 8), dtype=np.int64), "attention_mask": np.ones((1, 8), dtype=np.int64)}
    shapes = te.measured_shapes(model, feed)
    scores = [n for n in model.graph.node if n.name.endswith("/attention/attn/MatMul")]
    assert scores and all(shapes[n.output[0]] == (1, 12, 8, 8) for n in scores)


def test_removed_units_count_heads_and_ffn_neurons_by_layer_name() -> None:
    from red_onnx.measure.metrics import LayerFigures, ModelFigures

    def figures(q: int, ffn: int) -> ModelFigures:
        parts = (("attention/attn/q/MatMul", q), ("intermediate/dense/MatMul", ffn))
        layers = {f"/inner/encoder/layer.{i}/{part}": LayerFigures(part, "MatMul", width, 0)
                  for i in range(2) for part, width in parts}  # fmt: skip
        return ModelFigures(0, 0, layers)

    assert te.removed_units(figures(768, 3072), figures(640, 2048)) == {
        "heads_removed": 4, "ffn_neurons_removed": 2048}  # fmt: skip
    assert te.removed_units(figures(768, 3072), ModelFigures(0, 0, {})) == {
        "heads_removed": None, "ffn_neurons_removed": None}  # fmt: skip
