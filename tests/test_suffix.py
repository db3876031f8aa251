"""Suffix sessions: a plan run from the latest cut before its first changed weight equals the full run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_simulate import BUILDERS, assert_outputs_close, plans, search_of

from red_onnx.options import InputSpec
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.suffix import SuffixSimulator, boundary, suffix_model
from red_onnx.verify.inputs import make_inputs


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_suffix_runs_equal_the_whole_simulator(name: str) -> None:
    search = search_of(BUILDERS[name]())
    simulator = search.simulator
    feed = search.verifier.inputs[0]
    suffix = SuffixSimulator(simulator, feed, cuts=1000)  # a cut before every group's first change
    cases = [plan for plan in plans(search) if any(plan.values())]
    if not cases:
        pytest.skip(f"{name}: no searchable group")
    for plan in cases:
        assert_outputs_close(suffix.run(plan, [feed]), simulator.run(plan, [feed]), name)
    starts = {min(suffix.first_read[s.weight] for s in slots) for slots in simulator.slots.values() if slots}
    assert suffix.runs == len(cases) or not (starts - {0}), "a plan after a cut ran a suffix"


def test_other_feeds_and_plans_before_every_cut_run_the_whole_model() -> None:
    search = search_of(BUILDERS["deep_net"]())
    simulator = search.simulator
    first, second = search.verifier.inputs[:2]
    suffix = SuffixSimulator(simulator, first)
    plan = plans(search)[-1]
    assert_outputs_close(suffix.run(plan, [second]), simulator.run(plan, [second]), "other feed")
    assert_outputs_close(suffix.run({}, [first]), simulator.run({}, [first]), "no change")
    assert suffix.runs == 1  # the other feed ran the whole model; the empty plan runs the last suffix
    assert suffix.cuts and all(cut > 0 for cut in suffix.cuts)


def test_boundary_holds_what_the_suffix_reads_and_refuses_early_outputs() -> None:
    model = BUILDERS["residual_net"]()
    for cut in range(1, len(model.graph.node)):
        names = boundary(model, cut)
        if names is None:
            continue
        values = {name: np.zeros(1, np.float32) for name in names}
        part = suffix_model(model, cut, values)
        produced = {o for node in part.graph.node for o in node.output}
        inputs = {v.name for v in part.graph.input} | {i.name for i in part.graph.initializer}
        assert {i for node in part.graph.node for i in node.input if i} <= produced | inputs
        nodes = model.graph.node
        assert set(names) <= {o for node in nodes[:cut] for o in node.output}
        assert set(names) <= {i for node in nodes[cut:] for i in node.input}
    two_outputs = onnx.ModelProto()
    two_outputs.CopyFrom(model)
    two_outputs.graph.output.add().name = model.graph.node[0].output[0]
    assert boundary(two_outputs, 1) is None


def test_models_with_subgraphs_get_no_suffix() -> None:
    search = search_of(BUILDERS["conv_net"]())
    simulator = search.simulator
    structure = onnx.ModelProto()
    structure.CopyFrom(simulator.structure)
    branch = onnx.helper.make_graph([], "b", [], [onnx.helper.make_tensor_value_info("y", 1, [1])])
    structure.graph.node.append(
        onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    )
    simulator.structure = structure
    with pytest.raises(ValueError, match="If/Loop/Scan"):
        SuffixSimulator(simulator, search.verifier.inputs[0])


def test_a_failing_suffix_falls_back_to_the_whole_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    model = BUILDERS["deep_net"]()
    spec = InputSpec()
    search = BudgetSearch(
        model, model, spec, ShapeService(make_inputs(model, spec, 0)), hashing=False, activations=False,
        sensitivity="calibrated",
    )  # fmt: skip
    calls = []

    def broken(self: SuffixSimulator, plan: dict, feeds: list) -> list:
        calls.append(plan)
        raise RuntimeError("suffix session failed")

    monkeypatch.setattr(SuffixSimulator, "run", broken)
    search.to_target(0.9)
    assert calls, "the calibration tried the suffix first"
    assert search.suffix is None and search.simulator is not None  # not the rebuild path
    assert search.gain and all(np.isfinite(list(search.gain.values())))
