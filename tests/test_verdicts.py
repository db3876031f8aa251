"""Verdicts are promises: a bound the user asked for, met on named inputs, held-out ones included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_budget import conv_net

import red_onnx
from red_onnx import cli
from red_onnx.options import InputSpec
from red_onnx.report.report import render_table
from red_onnx.verify.inputs import describe_inputs, split_rows


def _idle_on_search_net() -> onnx.ModelProto:
    """conv1's channels 4..7 read only input channel 3; conv2 mixes all eight."""
    rng = np.random.default_rng(0)
    w1 = np.zeros((8, 4, 1, 1), np.float32)
    w1[:4, :3] = rng.standard_normal((4, 3, 1, 1))
    w1[4:, 3] = rng.uniform(0.5, 1.5, (4, 1, 1))
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _drifting_inputs(path: Path) -> Path:
    """Rows whose input channel 3 is silent on the rows the search fits and measures, loud held out."""
    rows = np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)
    halves = split_rows(len(rows))
    rows[np.concatenate([halves["search"], halves["cv"]]), 3] = 0.0
    rows[halves["heldout"], 3] = 3 * np.abs(rows[halves["heldout"], 3])
    np.savez(path, x=rows)
    return path


def test_a_target_that_does_not_generalise_fails_unless_forced(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(_idle_on_search_net(), source)
    inputs = _drifting_inputs(tmp_path / "x.npz")
    out = tmp_path / "out.onnx"
    common = [
        str(source),
        str(out),
        "--target-macs",
        "0.6",
        "--channel-multiple",
        "1",
        "--inputs",
        str(inputs),
    ]
    assert cli.main([*common, "--no-latency-check", "-q"]) == 1
    err = capfd.readouterr().err
    assert "does not generalise: its error on held-out inputs is" in err and "--force-target" in err
    assert not out.exists()
    assert cli.main([*common, "--no-latency-check", "--force-target"]) == 0
    printed = capfd.readouterr().out
    assert out.exists() and "PASSED" not in printed
    assert "target reached (no fidelity bound was asked)" in printed and "held out" in printed


def test_a_target_reports_figures_on_named_inputs_not_a_verdict() -> None:
    result = red_onnx.compress(
        _idle_on_search_net(), target_macs=0.8, channel_multiple=1, latency_check=False
    )
    verification = result.report.verification
    assert verification["target"] and verification["inputs"] == "synthetic inputs, seeds [0, 1]"
    assert verification["search_error"] is not None and verification["heldout_error"] is not None
    table = render_table(result.report)
    assert "PASSED" not in table and "target reached (no fidelity bound was asked)" in table


def test_a_tolerance_verdict_names_its_held_out_error() -> None:
    result = red_onnx.compress(conv_net(1e-3), tolerance=0.05, channel_multiple=1, latency_check=False)
    verification = result.report.verification
    assert result.report.budget is not None and verification["passed"]
    assert verification["heldout_error"] == result.report.budget["heldout_error"] <= 0.05
    assert "and on the search's held-out inputs" in verification["criterion"]
    assert "held out" in render_table(result.report)


def test_force_target_needs_a_target() -> None:
    with pytest.raises(red_onnx.UsageError, match="--force-target only applies to --target-macs"):
        red_onnx.compress(_idle_on_search_net(), tolerance=0.05, force_target=True)


def test_every_report_field_is_documented() -> None:
    import re

    result = red_onnx.compress(
        _idle_on_search_net(), target_macs=0.8, channel_multiple=1, latency_check=False
    )
    data = result.report.to_dict()
    assert data["schema_version"] == 4
    doc = (Path(__file__).parents[1] / "docs" / "report.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", doc))
    assert set(data) <= documented, sorted(set(data) - documented)
    assert set(data["verification"]) - {"criterion"} <= documented, sorted(
        set(data["verification"]) - documented
    )
    assert {k for k in data["budget"] if k != "groups"} <= documented


def _pixel_model(op: str) -> onnx.ModelProto:
    """x (0..255 pixels) -> Div by 255 (or Mul by 1/255) -> Relu: a graph that says its input's range."""
    scale = np.array(255.0 if op == "Div" else 1 / 255, np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "s"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(scale, "s")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op", ["Div", "Mul"])
def test_a_graph_that_scales_pixels_gets_a_range_note_and_the_option_to_pass(op: str) -> None:
    (note,) = describe_inputs(_pixel_model(op), InputSpec())["range_notes"]
    assert "0..255 pixels" in note and "--input-range x=0,255" in note and "N(0, 1)" in note
    assert describe_inputs(_pixel_model(op), InputSpec(ranges={"x": (0.0, 255.0)}))["range_notes"] == []


def test_an_input_nothing_tells_the_range_of_is_named_in_the_text_report(tmp_path) -> None:
    model = _pixel_model("Div")
    model.graph.node[0].op_type = "Add"  # no scale: nothing tells the range
    (note,) = describe_inputs(model, InputSpec(prior="pink"))["range_notes"]
    assert "nothing in the graph tells its range" in note and "pink noise" in note
    source, output = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_pixel_model("Div"), source)
    completed = subprocess.run(
        [sys.executable, "-m", "red_onnx.cli", str(source), str(output)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "note: input 'x': the graph divides it by 255 first" in completed.stdout
