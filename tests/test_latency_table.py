"""The latency table's pure logic: ratios and verdicts (``bench/latency_table.py``; no timing).

Its batch axes are the library's (``red_onnx.measure.benchmark``, tested in ``tests/test_benchmark.py``).
"""

from __future__ import annotations

import pytest

from bench.latency_table import (
    aa_noise,
    markdown,
    noise_margin,
    reduction_efficiency,
    summarise,
    verdict,
)


def test_reduction_efficiency_only_where_macs_drop_by_a_fifth() -> None:
    assert reduction_efficiency(0.75, 0.8) == pytest.approx(0.8)
    assert reduction_efficiency(0.5, 1.1) == pytest.approx(-0.2)  # slower: negative
    assert reduction_efficiency(0.8004, 0.9) == pytest.approx(0.1 / 0.1996)  # 0.800 at 3 decimals
    assert reduction_efficiency(0.81, 0.5) is None
    assert reduction_efficiency(None, 0.5) is None  # MACs not counted (inside If)


def test_aa_noise_is_the_largest_deviation_per_thread_count() -> None:
    groups = [
        {"threads": 1, "original_ms": 2.0, "aa_ms": 2.1},
        {"threads": 1, "original_ms": 1.0, "aa_ms": 0.9},
        {"threads": 2, "original_ms": 1.0, "aa_ms": 1.01},
        {"threads": 2, "skipped": "why"},
    ]
    assert aa_noise(groups) == pytest.approx({"1t": 0.1, "2t": 0.01})
    assert aa_noise([{"threads": 1, "skipped": "why"}]) == {}


def test_noise_margin_is_the_aa_noise_but_never_under_the_floor() -> None:
    assert noise_margin(0.05) == pytest.approx(0.05)
    assert noise_margin(0.01) == noise_margin(None) == pytest.approx(0.03)


def test_verdict_needs_two_groups_over_their_noise_to_call_a_run_slower() -> None:
    margins = {"b1 1t": 0.02, "b16 1t": 0.02, "b1 2t": 0.1}
    one = verdict(1.0, {"b1 1t": 1.05, "b16 1t": 1.0, "b1 2t": 1.09}, margins)  # 2t within its noise
    assert one["slower"] == {"b1 1t": 1.05} and not one["is_slower"] and one["efficiency"] is None
    two = verdict(1.0, {"b1 1t": 1.05, "b16 1t": 1.03, "b1 2t": 0.99}, margins)
    assert two["is_slower"]
    alone = verdict(1.0, {"b1 1t": 1.05}, margins)  # a model timed in one group only
    assert alone["is_slower"]


def test_verdict_counts_the_groups_meeting_the_efficiency_target() -> None:
    judged = verdict(0.6, {"b1 1t": 0.7, "b16 1t": 0.6}, {"b1 1t": 0.03, "b16 1t": 0.03})
    assert judged["efficiency"] == pytest.approx({"b1 1t": 0.75, "b16 1t": 1.0})
    assert judged["efficiency_met"] == [1, 2] and not judged["is_slower"]


def _row() -> dict:
    groups = [
        {"threads": 1, "batch": 1, "original_ms": 1.0, "aa_ms": 1.01, "after_ms": {"t": 1.2}},
        {"threads": 1, "batch": 16, "original_ms": 10.0, "aa_ms": 9.9, "after_ms": {"t": 11.0}},
        {"threads": 1, "batch": 16, "skipped": "no input has a dynamic batch axis"},
    ]
    runs = {"t": {"macs_ratio": 0.7, "layout": {"plain_convs": 2, "reorders": 3}},
            "u": {"failed": "--target-macs 0.8 cannot be reached"}}  # fmt: skip
    return {"label": "m", "runs": runs, "groups": groups, "layout": {"plain_convs": 0, "reorders": 1}}


def test_summarise_and_markdown_report_ratios_noise_and_a_slower_run() -> None:
    row = summarise(_row())
    figures = row["runs"]["t"]
    assert row["aa_noise"] == pytest.approx({"1t": 0.01})
    assert figures["latency_ratio"] == {"b1 1t": 1.2, "b16 1t": 1.1}
    assert figures["verdict"]["is_slower"] and figures["verdict"]["efficiency_met"] == [0, 2]
    data = {"environment": {"threads": [1], "onnxruntime": "x", "provider": "CPU", "cpu_count": 2,
                            "load_average": [1.0]}, "models": {"m": row}}  # fmt: skip
    table = markdown(data)
    assert "SLOWER (b1 1t 1.20, b16 1t 1.10)" in table and "no input has a dynamic batch axis" in table
    slower = "| m | t | 0.700 | 1 / 10 | 1.20 | 1.10 | ±1.0% | -0.67 | -0.33 | 0 → 2 (reorders 1 → 3) | ≥0.8×"
    failed = "| m | u | — | 1 / 10 | — | — | ±1.0% | — | — | — | not compressed: --target-macs 0.8 cannot"
    assert slower in table and failed in table
