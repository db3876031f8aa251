"""The working model after ``detach_from_input``: independent of the input proto, exported the same."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from red_onnx.io import graph as graph_utils
from red_onnx.io import wire
from tests.graphs import conv_chain_identical, random_feeds, run


def _bfloat16_if_model() -> onnx.ModelProto:
    """A Conv weight, a bfloat16 initializer behind a Cast, and an If whose branch holds a constant."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    narrow = helper.make_tensor("nb", TensorProto.BFLOAT16, [4], [16256, 16384, 16448, 16512])  # 1,2,3,4
    cond = numpy_helper.from_array(np.array(True), "cond")
    branch_value = numpy_helper.from_array(np.full(4, 0.5, np.float32), "half")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value=branch_value)],
        "branch", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Cast", ["nb"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("If", ["cond"], ["k"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["nf", "k"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["s4"]),
        helper.make_node("Add", ["c", "s4"], ["y"]),
    ]
    shape = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], [weight, narrow, cond, shape],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scrub(model: onnx.ModelProto) -> None:
    """Overwrite every weight of ``model`` in place (what freeing it would leave to a reader)."""
    for tensor in model.graph.initializer:
        tensor.raw_data = b"\0" * len(tensor.raw_data)
        del tensor.int32_data[:]
    del model.opset_import[:]


def test_detached_working_model_no_longer_reads_the_input() -> None:
    for model in (conv_chain_identical().model, _bfloat16_if_model()):
        feeds = random_feeds(model, 1)
        expected = run(model, feeds)
        weights = {t.name: (t.data_type, numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        working = graph_utils.import_model(model)
        assert graph_utils.detach_from_input(working) >= len(model.graph.initializer)
        opsets = [(o.domain, o.version) for o in model.opset_import]
        _scrub(model)  # were the working model still reading it, its export would change
        exported = graph_utils.export_model(working)
        for tensor in exported.graph.initializer:
            data_type, values = weights[tensor.name]
            assert tensor.data_type == data_type, tensor.name
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), values, err_msg=tensor.name)
        assert [(d.domain, d.version) for d in working.graph.import_domains] == opsets
        got = run(exported, feeds)
        for name, values in expected.items():
            np.testing.assert_array_equal(got[name], values, err_msg=name)


def test_detach_keeps_unsupported_types_as_their_own_protos() -> None:
    narrow = helper.make_tensor("nb", TensorProto.BFLOAT16, [4], [16256, 16384, 16448, 16512])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["nb"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4])], [narrow],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = model.graph.initializer[0].SerializeToString()
    working = graph_utils.import_model(model)
    assert graph_utils.detach_from_input(working) == 1
    lazy = working.graph.tensors()["nb"]._values  # not loaded: gs would cast it to float32
    assert lazy.tensor is not model.graph.initializer[0]
    _scrub(model)
    assert graph_utils.export_model(working).graph.initializer[0].SerializeToString() == expected
    assert graph_utils.detach_from_input(working) == 1  # still lazy (a copy again): never loaded


def test_structure_of_the_input_is_enough_for_its_inputs() -> None:
    model = conv_chain_identical().model
    structure = wire.structure_of(model)
    assert [v.name for v in structure.graph.input] == [v.name for v in model.graph.input]
    assert structure.ByteSize() < model.ByteSize()
