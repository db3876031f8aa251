"""Latency-gated separation: the hysteresis band, measured decisions in the report and the model, replay.

The latency check is the one source of run-to-run differences: these tests pin the decision rule with
scripted timings, check that every measured decision is listed (report, table, the model's metadata),
that runs without the check repeat byte for byte, and that a latency cache replays a run exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_separation import PAYING, decisions, two_conv_net

import red_onnx
from red_onnx import cli, demo
from red_onnx.errors import UsageError
from red_onnx.io.graph import import_model
from red_onnx.measure.latency import CACHE_FORMAT, LatencyService
from red_onnx.options import InputSpec
from red_onnx.passes.separate_depthwise import (
    DEFAULT_BAND,
    DEFAULT_MIN_GAIN,
    REMEASURE_RUNS,
    SeparateDepthwise,
)
from red_onnx.report.report import render_table
from red_onnx.runtime.shapes import ShapeService
from red_onnx.verify.inputs import make_inputs

#: Gains (1 - after/before) well clear of the band edges (min_gain ± band: 0.0 and 0.10).
ABOVE, INSIDE, INSIDE_TOO, BELOW = 0.30, 0.07, 0.03, -0.20


class ScriptedLatency:
    """A latency probe double: answers each comparison with the next scripted gain, counting calls."""

    provider = "FakeProvider"

    def __init__(self, gains: Sequence[float]) -> None:
        self.gains, self.runs = list(gains), []

    def compare(
        self, before: onnx.ModelProto, after: onnx.ModelProto, feed: dict, *, runs: int | None = None
    ) -> tuple[float, float]:
        self.runs.append(runs)
        gain = self.gains[len(self.runs) - 1]
        return 1e-3, (1.0 - gain) * 1e-3

    @property
    def calls(self) -> int:
        return len(self.runs)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def summary(model: onnx.ModelProto) -> dict:
    return json.loads(metadata(model)["red_onnx.summary"])


def gate_edges() -> tuple[float, float]:
    return DEFAULT_MIN_GAIN - DEFAULT_BAND, DEFAULT_MIN_GAIN + DEFAULT_BAND


def test_scripted_gains_are_clear_of_the_band_edges() -> None:
    low, high = gate_edges()
    assert BELOW < low - 0.05 < low + 0.02 < INSIDE_TOO < INSIDE < high - 0.02 < high + 0.05 <= ABOVE


# --- (a) without the latency check, runs repeat byte for byte ---------------------------------------


def test_no_latency_check_runs_give_identical_bytes() -> None:
    first = red_onnx.compress(two_conv_net(PAYING), exact=True, latency_check=False)
    second = red_onnx.compress(two_conv_net(PAYING), exact=True, latency_check=False)
    assert decisions(first)["c1"]["separated"]  # the run rewrites: the bytes are worth comparing
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert "latency_decisions" not in summary(first.model)  # nothing measured, nothing to list


def test_cli_no_latency_check_gives_identical_files(tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    onnx.save(two_conv_net(PAYING), source)
    for model in (source, demo.demo_path()):
        outputs = [tmp_path / f"{model.stem}.{run}.onnx" for run in (1, 2)]
        for out in outputs:
            assert cli.main([str(model), str(out), "--no-latency-check", "-q"]) == 0
        assert outputs[0].read_bytes() == outputs[1].read_bytes()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "net.1.onnx")).graph.node]
    assert "Gather" in ops  # c1 was separated on MACs alone


# --- (b) the hysteresis band ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gains", "verdict", "separated"),
    [
        ([ABOVE], "separated", True),
        ([BELOW], "kept: slower", False),
        ([INSIDE, INSIDE_TOO], "kept: marginal", False),
        ([INSIDE, ABOVE], "separated", True),
        ([INSIDE, BELOW], "kept: slower", False),
    ],
)
def test_hysteresis_decision(gains: list[float], verdict: str, separated: bool) -> None:
    fake = ScriptedLatency(gains)
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=fake)
    row = decisions(result)["c1"]
    assert fake.runs == [None, REMEASURE_RUNS][: len(gains)]  # re-measured, with more runs, only inside
    assert (row["verdict"], row["separated"], row["decided_by"]) == (verdict, separated, "latency")
    assert row["gains"] == pytest.approx(gains) and row["gain"] == pytest.approx(gains[-1])
    assert (row["min_gain"], row["band"]) == (DEFAULT_MIN_GAIN, DEFAULT_BAND)
    assert ("Gather" in [n.op_type for n in result.model.graph.node]) == separated
    assert result.verified


def test_marginal_decision_says_so() -> None:
    result = red_onnx.compress(
        two_conv_net(PAYING), exact=True, latency=ScriptedLatency([INSIDE, INSIDE_TOO])
    )
    row = decisions(result)["c1"]
    assert "marginal" in row["decision"] and "+7.0%" in row["decision"] and "+3.0%" in row["decision"]


def test_a_zero_band_is_a_plain_threshold() -> None:
    model = two_conv_net(PAYING)
    shapes = ShapeService(make_inputs(model, InputSpec(), 0))
    for gain, separated in ((0.06, True), (0.04, False)):
        fake = ScriptedLatency([gain])
        result = SeparateDepthwise(shapes=shapes, latency=fake, band=0.0)(import_model(model))
        row = next(c for c in result.stats["convs"] if c["name"] == "c1")
        assert (fake.calls, row["separated"]) == (1, separated)


# --- (c) measured decisions are listed: report, table, the model's metadata -------------------------


def test_report_and_metadata_list_the_measured_decisions() -> None:
    result = red_onnx.compress(
        two_conv_net(PAYING), exact=True, latency=ScriptedLatency([INSIDE, INSIDE_TOO])
    )
    rows = decisions(result)
    assert rows["c1"]["latency_before_ms"] == 1.0 and rows["c1"]["latency_after_ms"] == pytest.approx(0.97)
    assert rows["c2"]["decided_by"] in ("rank bound", "MACs") and rows["c2"]["gain"] is None  # computed
    stats = next(p for p in result.report.passes if p.name == "separate_depthwise").stats
    assert (stats["measured"], stats["marginal"]) == (1, 1)
    listed = {
        "provider": "FakeProvider",
        "min_gain": DEFAULT_MIN_GAIN,
        "band": DEFAULT_BAND,
        "convs": {"c1": "kept: marginal"},
    }
    assert result.report.headline()["latency_decisions"] == listed
    assert summary(result.model)["latency_decisions"] == listed  # written into the output model
    table = render_table(result.report)
    assert "1 decided by measured latency" in table and "(1 kept as marginal)" in table
    assert "gain +7.0%, then +3.0%: kept: marginal [latency]" in table


def test_json_report_has_the_decision_fields(tmp_path: Path) -> None:
    result = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=ScriptedLatency([ABOVE]))
    data = json.loads(result.report.to_json())
    row = next(p for p in data["passes"] if p["name"] == "separate_depthwise")["stats"]["convs"][0]
    assert {"verdict", "decided_by", "gain", "gains", "min_gain", "band"} <= set(row)


# --- (d) a latency cache replays a run exactly -----------------------------------------------------


def scripted_service(cache: Path, gains: Sequence[float]) -> tuple[LatencyService, list[int | None]]:
    """A real LatencyService on ``cache`` whose timer answers the scripted gains; the runs it was asked."""
    service = LatencyService(runs=3, warmup=0, cache_file=cache)
    asked: list[int | None] = []

    def timer(sessions: list, feed: dict, runs: int | None = None) -> tuple[float, float]:
        asked.append(runs)
        return 1e-3, (1.0 - gains[len(asked) - 1]) * 1e-3

    service.time_sessions = timer  # type: ignore[method-assign]
    return service, asked


def test_latency_cache_replays_a_run_byte_for_byte(tmp_path: Path) -> None:
    cache = tmp_path / "timings.json"
    first_service, first_asked = scripted_service(cache, [INSIDE, ABOVE])  # re-measured, then separated
    first = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=first_service, latency_cache=cache)
    assert first_asked == [3, REMEASURE_RUNS] and decisions(first)["c1"]["verdict"] == "separated"
    assert json.loads(cache.read_text())["format"] == CACHE_FORMAT
    # the timer would now keep c1; the recorded timings decide instead, and it is never asked
    second_service, second_asked = scripted_service(cache, [BELOW, BELOW])
    second = red_onnx.compress(two_conv_net(PAYING), exact=True, latency=second_service, latency_cache=cache)
    assert second_asked == [] and second_service.replayed == 2 and second_service.probes == 0
    assert decisions(second)["c1"] == decisions(first)["c1"]
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert json.loads(metadata(second.model)["red_onnx.options"])["latency_cache"] == "timings.json"


def test_latency_cache_measures_what_it_has_not_recorded(tmp_path: Path) -> None:
    cache = tmp_path / "timings.json"
    red_onnx.compress(two_conv_net(PAYING), exact=True, latency=scripted_service(cache, [ABOVE])[0])
    other = two_conv_net(PAYING * np.float32(2.0))  # another conv: another probe, not in the cache
    service, asked = scripted_service(cache, [BELOW])
    result = red_onnx.compress(other, exact=True, latency=service)
    assert asked == [3] and decisions(result)["c1"]["verdict"] == "kept: slower"
    assert len(json.loads(cache.read_text())["timings"]) == 2  # recorded next to the first


def test_a_file_that_is_not_a_latency_cache_is_a_usage_error(tmp_path: Path) -> None:
    cache = tmp_path / "model.onnx"
    onnx.save(two_conv_net(PAYING), cache)
    data = cache.read_bytes()
    with pytest.raises(UsageError, match="not a red-onnx latency cache"):
        LatencyService(cache_file=cache)
    assert cache.read_bytes() == data  # never overwritten


def test_latency_cache_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--no-latency-check"):
        red_onnx.make_options(latency_check=False, latency_cache=tmp_path / "t.json")
    with pytest.raises(UsageError, match="existing directory"):
        red_onnx.make_options(latency_cache=tmp_path / "missing" / "t.json")
    options = red_onnx.make_options(latency_cache=str(tmp_path / "t.json"))
    assert options.latency_cache == tmp_path / "t.json"
    assert options.provenance()["latency_cache"] == "t.json"  # its name only
    assert "latency_cache" not in red_onnx.make_options().provenance()


def test_cli_takes_a_latency_cache(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(two_conv_net(PAYING), source)
    code = cli.main([str(source), str(out), "--latency-cache", str(tmp_path / "t.json"), "-q"])
    assert code == 0, capfd.readouterr().err
    assert json.loads(metadata(onnx.load(str(out)))["red_onnx.options"])["latency_cache"] == "t.json"
    code = cli.main([str(source), str(out), "--latency-cache", str(tmp_path), "--no-latency-check"])
    assert code == 2 and "--latency-cache" in capfd.readouterr().err


def test_the_cli_latency_cache_makes_two_timed_runs_identical(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(two_conv_net(PAYING), source)
    cache = tmp_path / "timings.json"
    outputs = [tmp_path / f"out{i}.onnx" for i in range(2)]
    for out in outputs:
        assert cli.main([str(source), str(out), "--latency-cache", str(cache), "-q"]) == 0
    assert cache.exists() and json.loads(cache.read_text())
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
