"""The one-session merge simulator and the MACs counter agree with the rebuilt model.

For every topology the builders cover, every searchable group and several merge counts (and all
groups at once): the simulator's outputs equal onnxruntime's outputs of the model rebuilt by the
rewrite (zeroing a merged channel's consumer slice is the same function as deleting it), and the
counted MACs fraction equals the MACs counter of ``red_onnx.measure.metrics`` on the rebuilt model.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import graphs
import numpy as np
import onnx
import pytest
from test_budget import conv_net, deep_net, residual_net

from red_onnx.io import graph
from red_onnx.measure import metrics
from red_onnx.options import InputSpec
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search import budget
from red_onnx.search.budget import BudgetSearch
from red_onnx.verify.inputs import make_inputs

BUILDERS = {
    "conv_net": lambda: conv_net(0.05),
    "residual_net": lambda: residual_net(0.05),
    "deep_net": lambda: deep_net(),
    "residual_projection": lambda: graphs.residual_projection(True).model,
    "se_gate": lambda: graphs.se_gate().model,
    "concat_conv": lambda: graphs.concat_conv().model,
    "split_consumers": lambda: graphs.split_consumers().model,
    "depthwise_m1": lambda: graphs.depthwise_m1().model,
    "flatten_gemm": lambda: graphs.flatten_gemm().model,
    "reshape_gemm": lambda: graphs.flatten_gemm(reshape=True).model,
    "nhwc_matmul": lambda: graphs.nhwc_matmul().model,
    "gemm_mlp": lambda: graphs.gemm_mlp(1, "N").model,
    "gemm_mlp_transb0": lambda: graphs.gemm_mlp(0, "1N").model,
    "matmul_add": lambda: graphs.matmul_add().model,
    "conv_transpose": lambda: graphs.conv_transpose().model,
    "batchnorm_after": lambda: graphs.batchnorm_after().model,
}


def search_of(model: onnx.ModelProto, spec: InputSpec | None = None) -> BudgetSearch:
    spec = spec or InputSpec()
    shapes = ShapeService(make_inputs(model, spec, 0))
    return BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False, activations=False)


def plans(search: BudgetSearch) -> list[dict]:
    """Each group at each of its levels, and every group at its first level together."""
    found = [{o.name: search.merges[o.name][level]} for o in search.options for level in o.levels[1:]]
    together = {o.name: search.merges[o.name][o.levels[1]] for o in search.options if len(o.levels) > 1}
    return [*found, together] if len(together) > 1 else found


def assert_outputs_close(got: list[dict], expected: list[dict], name: str) -> None:
    for want, have in zip(expected, got, strict=True):
        for output, values in want.items():
            scale = max(1.0, float(np.abs(values).max()))
            np.testing.assert_allclose(have[output], values, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_simulated_outputs_and_macs_equal_the_rebuilt_model(name: str) -> None:
    search = search_of(BUILDERS[name]())
    assert search.simulator is not None
    cases = [plan for plan in plans(search) if any(plan.values())]
    if not cases:
        pytest.skip(f"{name}: no searchable group (all frozen)")
    for plan in cases:
        rebuilt = search.apply_plan(plan)
        expected = search.verifier.run(rebuilt, "disable_all")
        got = search.simulator.run(plan, search.verifier.inputs)
        assert_outputs_close(got, expected, name)
        counted = metrics.measure(rebuilt, search.input_shapes).macs / search.total_macs
        assert search.macs_counter.fraction(plan) == pytest.approx(counted, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_weights_fed_as_inputs_give_the_plans_outputs_without_a_copy(name: str) -> None:
    """Every float32 weight dims-only in the session (as on large models): same outputs, shared arrays."""
    with mock.patch.object(graph, "LIGHT_ELEMENTS", 0):
        search = search_of(BUILDERS[name]())
        simulator = search.simulator
        assert simulator is not None and simulator.fixed
        constants = search.working.graph.tensors()
        assert all(np.shares_memory(value, constants[n].values) for n, value in simulator.fixed.items())
        stored = {i.name for i in onnx.load_from_string(simulator.session._model_bytes).graph.initializer}
        assert not stored & set(simulator.fixed)
        for plan in [{}, *plans(search)]:
            expected = search.verifier.run(search.apply_plan(plan), "disable_all")
            got = simulator.run(plan, search.verifier.inputs)
            assert_outputs_close(got, expected, name)


def test_search_measures_without_rebuilding() -> None:
    search = search_of(conv_net(0.05))
    result = search.within_tolerance(0.04)
    assert result.evaluations > 0
    assert search.simulator.runs >= result.evaluations - 1  # every error measured in the one session
    assert result.macs_fraction < 1.0


def with_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with axis 0 of its inputs and outputs named ``N`` (shape inference left to ORT)."""
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for value in [*dynamic.graph.input, *dynamic.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "N"
    del dynamic.graph.value_info[:]
    return dynamic


@pytest.mark.parametrize("name", ["conv_net", "residual_net", "flatten_gemm"])
def test_batched_samples_give_the_per_sample_outputs(name: str) -> None:
    search = search_of(with_dynamic_batch(BUILDERS[name]()))
    plan = plans(search)[-1]
    got = search.simulator.run(plan, search.verifier.inputs)
    assert search.simulator.batched is True
    one_by_one = [
        search.simulator._run_one(search.simulator.weights(plan), feed) for feed in search.verifier.inputs
    ]
    for want, have in zip(one_by_one, got, strict=True):
        for output, values in want.items():
            np.testing.assert_allclose(have[output], values, rtol=1e-5, atol=1e-6)


def test_large_models_are_run_sample_by_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above LARGE_MODEL_MACS a batch's activations beside a plan's merged weights cost more than it saves."""
    monkeypatch.setattr(budget, "LARGE_MODEL_MACS", 0)
    search = search_of(with_dynamic_batch(BUILDERS["conv_net"]()))
    assert search.large and search.simulator.batched is False
    plan = plans(search)[-1]
    runs = search.simulator.runs
    got = search.simulator.run(plan, search.verifier.inputs)
    assert search.simulator.runs == runs + 1 and len(got) == len(search.verifier.inputs) > 1
    assert search.simulator.batched is False  # not decided again on the first run


def test_a_model_that_hard_codes_its_batch_is_run_sample_by_sample() -> None:
    static = BUILDERS["reshape_gemm"]()
    model = with_dynamic_batch(static)
    search = search_of(model, InputSpec(shapes=graphs.input_shapes(static)))
    search.simulator.run(plans(search)[0], search.verifier.inputs)
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert reshapes, "the builder flattens with a Reshape"
    target = next(i for i in model.graph.initializer if i.name == reshapes[0].input[1])
    if onnx.numpy_helper.to_array(target)[0] in (0, -1):
        pytest.skip("this Reshape keeps the batch axis dynamic")
    assert search.simulator.batched is False


def test_simulator_fetches_intermediate_tensors_and_leaves_the_base_model_as_it_was() -> None:
    from red_onnx.runtime.tensor_values import run_tensors
    from red_onnx.search.simulate import MergeSimulator

    search = search_of(residual_net(0.05))
    before = search.base.SerializeToString()
    groups = mergeable_groups_of(search)
    names = sorted({c.tensor for g in groups for c in g.consumers})
    simulator = MergeSimulator(search.base, groups, extra_outputs=names)
    assert search.base.SerializeToString() == before  # inputs/outputs added for the session only
    feed = search.verifier.inputs[0]
    expected = run_tensors(search.base, names, [feed])[0]
    for got, want in zip(simulator.tensors(names, feed), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert set(simulator.outputs) == {o.name for o in search.base.graph.output}  # run() returns outputs only


def mergeable_groups_of(search: BudgetSearch) -> list:
    from red_onnx.io import graph
    from red_onnx.passes.merge_near import mergeable_groups

    return mergeable_groups(graph.import_model(search.base), search.shapes, ())


def with_offsets(plan: dict, seed: int) -> dict:
    """The plan's merges with random offsets (as the refit's intercept and fitted merges carry)."""
    rng = np.random.default_rng(seed)
    return {
        name: [dataclasses.replace(m, offset=float(rng.normal())) for m in merges]
        for name, merges in plan.items()
    }


#: Builders whose every consumer has a bias of its own: offset plans must be simulated there.
BIASED = ("conv_net", "gemm_mlp", "matmul_add", "conv_transpose", "deep_net")


@pytest.mark.parametrize("light", [False, True], ids=["stored", "fed"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_offsets_go_into_the_consumers_bias_as_the_editor_puts_them(name: str, light: bool) -> None:
    """Also with every weight and bias fed as an input (``fed``), as on large models."""
    with mock.patch.object(graph, "LIGHT_ELEMENTS", 0 if light else graph.LIGHT_ELEMENTS):
        search = search_of(BUILDERS[name]())
    simulator = search.simulator
    assert simulator is not None
    cases = [with_offsets(plan, seed) for seed, plan in enumerate(plans(search)) if any(plan.values())]
    if not cases:
        pytest.skip(f"{name}: no searchable group (all frozen)")
    supported = [plan for plan in cases if simulator.supports(plan)]
    if name in BIASED:
        assert supported, f"{name}: every consumer has a bias, yet offset plans are not simulated"
    for plan in supported:
        expected = search.verifier.run(search.apply_plan(plan), "disable_all")
        got = simulator.run(plan, search.verifier.inputs)
        assert_outputs_close(got, expected, name)
    for plan in cases:  # a plan the simulator cannot take is refused, never simulated wrong
        missing = [n for n, merges in plan.items() if merges and not all(s.bias for s in simulator.slots[n])]
        assert simulator.supports(plan) == (not missing)
