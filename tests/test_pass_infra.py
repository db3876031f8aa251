"""The pass contract and the pass manager (passes/infra.py), on graphs built in code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import assert_outputs_close, batchnorm_after, conv_chain_identical, random_feeds, run
from onnx import helper, numpy_helper

from red_onnx.errors import InternalError, PassContractError
from red_onnx.io.graph import WorkingModel, export_model, import_model, normalise_constants
from red_onnx.passes.fold_affine import FoldAffine
from red_onnx.passes.fold_batchnorm import FoldBatchNorm
from red_onnx.passes.infra import Pass, PassManager, PassResult, require_constant_weights
from red_onnx.passes.merge_exact import MergeExact
from red_onnx.runtime.shapes import ShapeService


def _shapes(model: onnx.ModelProto) -> ShapeService:
    feed = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    return ShapeService(feed)


class _Rename(Pass):
    """A pass that breaks the contract: it renames the graph's output."""

    name = "rename"

    def call(self, model: WorkingModel) -> PassResult:
        model.graph.outputs[0].name = "renamed"
        return PassResult(model, True)


class _Elsewhere(Pass):
    """An in-place pass that returns another model."""

    name = "elsewhere"

    def call(self, model: WorkingModel) -> PassResult:
        return PassResult(import_model(export_model(model)), False)


def test_the_manager_runs_the_list_in_order_and_the_model_keeps_its_function() -> None:
    built = batchnorm_after()
    working = import_model(built.model)
    normalise_constants(working)
    seen: list[str] = []
    steps = [FoldBatchNorm(), FoldAffine(), MergeExact(shapes=_shapes(built.model))]
    results = PassManager(steps, progress=seen.append)(working)
    assert seen == [r.name for r in results] == ["fold_batchnorm", "fold_affine", "merge_exact"]
    assert results[0].stats["folded"] == 1 and results[2].stats["removed"] >= 1
    assert all(r.model is working and r.seconds >= 0 for r in results)
    for seed in (0, 1):
        feeds = random_feeds(built.model, seed)
        assert_outputs_close(run(built.model, feeds), run(export_model(working), feeds))


def test_a_step_that_builds_no_pass_leaves_no_result() -> None:
    working = import_model(batchnorm_after().model)
    built: list[int] = []

    def step(model: WorkingModel) -> Pass | None:
        built.append(len(model.graph.nodes))
        return None

    results = PassManager([FoldBatchNorm(), step])(working)
    assert [r.name for r in results] == ["fold_batchnorm"]
    assert built == [len(working.graph.nodes)]  # it saw the model the earlier pass left (BN folded)
    assert not any(n.op == "BatchNormalization" for n in working.graph.nodes)


def test_a_pass_that_changes_the_interface_breaks_its_contract() -> None:
    working = import_model(conv_chain_identical().model)
    with pytest.raises(PassContractError, match=r"pass rename changed the model's interface"):
        _Rename()(working)
    assert issubclass(PassContractError, InternalError) and PassContractError.exit_code == 3


def test_an_in_place_pass_must_return_its_model() -> None:
    working = import_model(conv_chain_identical().model)
    with pytest.raises(PassContractError, match="in place but returned another model"):
        _Elsewhere()(working)


def _constant_node_weight() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["w_out"], name="const_w", value=weight),
        helper.make_node("Conv", ["x", "w_out"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_channel_passes_require_normalised_constants() -> None:
    model = _constant_node_weight()
    working = import_model(model)
    with pytest.raises(PassContractError, match=r"weight of Conv node 'conv' is the output of Constant node"):
        MergeExact(shapes=_shapes(model))(working)
    normalise_constants(working)
    require_constant_weights(working, "merge_exact")  # no error once normalised
    assert MergeExact(shapes=_shapes(model))(working).name == "merge_exact"


def test_fold_batchnorm_ensures_no_foldable_batchnorm_is_left() -> None:
    working = import_model(batchnorm_after().model)
    with pytest.raises(PassContractError, match="BatchNormalization 'bn1' was foldable but is still there"):
        FoldBatchNorm().ensures(working)
    FoldBatchNorm()(working)
    FoldBatchNorm().ensures(working)
