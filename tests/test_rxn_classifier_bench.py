"""The reaction-classifier benchmark's pure helpers (``bench/rxn_classifier.py``): metrics on logits,
units per layer, the joined latency row, comparisons, run order, resuming and the table. Needs neither
the exported model nor onnxsim, except the one test that reads the cached data and skips without it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import rxn_classifier as rc


def _layer_channels(q: int, k: int, v: int, ffn: int, layer: int = 0) -> dict[str, int]:
    prefix = f"/inner/bert/encoder/layer.{layer}"
    return {
        f"{prefix}/attention/self/query/MatMul": q,
        f"{prefix}/attention/self/key/MatMul": k,
        f"{prefix}/attention/self/value/MatMul": v,
        f"{prefix}/attention/output/dense/MatMul": 256,
        f"{prefix}/intermediate/dense/MatMul": ffn,
        f"{prefix}/output/dense/MatMul": 256,
    }


def test_metrics_of_identical_logits_are_perfect() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 5))
    intended = ref.argmax(axis=1)
    intended[0] = (intended[0] + 1) % 5  # the original is wrong on one row
    per_row = rc.per_row_metrics(ref, ref.copy(), intended)
    summary = rc.summary_of(per_row)
    assert summary["agreement"] == 1.0
    assert summary["accuracy"] == pytest.approx(5 / 6)
    assert summary["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert summary["rel_l2_mean"] == 0.0


def test_metrics_count_flipped_labels_and_match_a_hand_computed_kl() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 1.0]])
    got = np.array([[0.0, 2.0], [0.0, 1.0]])  # row 0 flips, row 1 is unchanged
    per_row = rc.per_row_metrics(ref, got, np.array([0, 1]))
    assert per_row["agree"].tolist() == [0.0, 1.0]
    assert per_row["correct"].tolist() == [0.0, 1.0]
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    assert per_row["kl"][0] == pytest.approx(float(np.sum(p * np.log(p / p[::-1]))))
    assert per_row["kl"][1] == pytest.approx(0.0, abs=1e-12)
    assert per_row["rel_l2"][0] == pytest.approx(math.sqrt(8) / 2)


def test_metrics_refuse_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        rc.per_row_metrics(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(3))


def test_softmax_is_stable_for_large_logits() -> None:
    out = rc.softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    assert np.allclose(out, [[0.5, 0.5, 0.0]])


def test_joined_row_frames_the_inner_tokens_and_drops_the_padding() -> None:
    ids = np.array([[2, 10, 11, 3, 0, 0], [2, 20, 21, 22, 3, 0]])
    mask = (ids != 0).astype(np.int64)
    row = rc.joined_row(ids, mask, 6)
    assert row["input_ids"].tolist() == [[2, 10, 11, 20, 21, 3]]
    assert row["attention_mask"].tolist() == [[1] * 6]
    assert row["input_ids"].dtype == np.int64
    with pytest.raises(ValueError):
        rc.joined_row(ids, mask, 8)  # only 5 inner tokens


def test_units_and_removals_per_layer() -> None:
    before = rc.units_per_layer(
        {**_layer_channels(256, 256, 256, 512, 0), **_layer_channels(256, 256, 256, 512, 1)}
    )
    after = rc.units_per_layer(
        {**_layer_channels(192, 192, 192, 400, 0), **_layer_channels(256, 256, 256, 512, 1)}
    )
    assert [entry["layer"] for entry in before] == [0, 1]
    assert after[0] == {"layer": 0, "query": 192, "key": 192, "value": 192, "ffn": 400}
    removed = rc.removed_per_layer(before, after)
    assert removed["heads_removed"] == [1, 0]
    assert removed["ffn_removed"] == [112, 0]
    assert (removed["heads_removed_total"], removed["ffn_removed_total"]) == (1, 112)
    assert removed["heads_consistent"]


def test_removals_flag_query_key_value_widths_that_differ() -> None:
    before = rc.units_per_layer(_layer_channels(256, 256, 256, 512))
    after = rc.units_per_layer(_layer_channels(192, 192, 256, 512))
    assert not rc.removed_per_layer(before, after)["heads_consistent"]
    missing = rc.removed_per_layer(before, [])
    assert missing["heads_removed"] == [None] and missing["ffn_removed"] == [None]


def test_other_layers_changed_skips_the_per_layer_matmuls() -> None:
    before = {**_layer_channels(256, 256, 256, 512), "/inner/bert/pooler/dense/Gemm": 256}
    after = {**_layer_channels(192, 192, 192, 256), "/inner/bert/pooler/dense/Gemm": 128}
    assert rc.other_layers_changed(before, after) == {"/inner/bert/pooler/dense/Gemm": [256, 128]}


def _row(setting: str, target: float, agree: list[int], kl: list[float], **extra: object) -> dict:
    return {"label": f"{setting}@{target}", "setting": setting, "target": target,
            "per_row": {"agree": agree, "kl": kl}, **extra}  # fmt: skip


def test_comparisons_pair_calibrated_with_baselines_and_norefit_at_the_same_target() -> None:
    runs = [
        _row("calibrated", 0.8, [1, 1, 1, 1], [0.0, 0.1, 0.0, 0.1]),
        _row("calibrated-norefit", 0.8, [1, 0, 1, 1], [0.1, 0.2, 0.1, 0.2]),
        _row("calibrated", 0.7, [1, 1, 0, 1], [0.0, 0.0, 0.0, 0.0]),
    ]
    baselines = [
        _row("ffn-weight-norm", 0.8, [0, 0, 1, 1], [1.0, 1.0, 1.0, 1.0], bisection={"matched": True}),
        {"label": "onnxsim-heads-wanda@0.8", "setting": "onnxsim-heads-wanda", "target": 0.8,
         "status": "pruned nothing"},
        _row("ffn-weight-norm", 0.6, [0, 0, 0, 0], [1.0] * 4),  # no calibrated run at 0.6
    ]  # fmt: skip
    out = rc.comparisons(runs, baselines)
    assert [(c["target"], c["other"]) for c in out] == [
        (0.8, "calibrated-norefit@0.8"),
        (0.8, "ffn-weight-norm@0.8"),
    ]
    assert out[0]["agreement_difference"]["difference"] == pytest.approx(0.25)
    assert out[1]["agreement_difference"]["difference"] == pytest.approx(0.5)
    assert out[1]["kl_difference"]["difference"] == pytest.approx(-0.95)
    low, high = out[1]["agreement_difference"]["ci95"]
    assert low <= 0.5 <= high
    assert out[0]["agreement_difference"]["resamples"] == 1000


def test_run_order_puts_norefit_after_every_other_setting() -> None:
    order = rc.run_order([0.9, 0.8], ["calibrated-norefit", "data-free", "calibrated", "ffn-weight-norm"])
    assert order == [
        (0.9, "data-free"), (0.9, "calibrated"), (0.9, "ffn-weight-norm"),
        (0.8, "data-free"), (0.8, "calibrated"), (0.8, "ffn-weight-norm"),
        (0.9, "calibrated-norefit"), (0.8, "calibrated-norefit"),
    ]  # fmt: skip
    assert rc.run_order([0.9], ["data-free"]) == [(0.9, "data-free")]


def test_is_complete_needs_every_field_unless_nothing_was_pruned() -> None:
    full = dict.fromkeys(rc.COMPLETE_FIELDS, 1)
    assert rc.is_complete(full)
    assert not rc.is_complete({**full, "error": "RuntimeError: x"})
    assert not rc.is_complete({k: v for k, v in full.items() if k != "latency"})
    assert rc.is_complete({"status": "pruned nothing"})


def test_markdown_has_one_line_per_run_in_target_and_setting_order() -> None:
    data = {
        "runs": [
            {"target": 0.8, "setting": "calibrated", "macs_kept_s128": 0.8012, "macs_kept_s32": 0.79,
             "agreement": 0.99, "accuracy": 0.98, "kl_mean": 0.01, "rel_l2_mean": 0.1,
             "latency": {"32": {"ratio": 0.9}, "128": {"ratio": 0.85}}, "heads_removed_total": 3,
             "ffn_removed_total": 100, "seconds": 160.2},
            {"target": 0.9, "setting": "data-free", "error": "ValueError: bad"},
        ],
        "baselines": [{"target": 0.8, "setting": "onnxsim-heads-wanda", "status": "pruned nothing",
                       "seconds": 0.2}],
    }  # fmt: skip
    lines = rc.markdown(data).splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| 0.9 | data-free | error: ValueError: bad")
    assert lines[3] == (
        "| 0.8 | calibrated | 0.801 / 0.790 | 0.990 | 0.980 | 0.0100 | 0.100 | 0.90 / 0.85 | 3 / 100 | 160 |"
    )
    assert "pruned nothing" in lines[4]


def test_cached_test_rows_give_a_latency_row_of_real_tokens() -> None:
    if not (rc.DATA / "test.npz").exists():
        pytest.skip("run bench/models/export_rxn_classifier.py first: the reaction data is not cached")
    for length in rc.LATENCY_SEQS:
        feed = rc.feed_of(length)
        assert feed["input_ids"].shape == (1, length)
        assert feed["attention_mask"].all()
        assert (feed["input_ids"] != 0).all()
