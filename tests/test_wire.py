"""The wire-format writer: the bytes ``SerializeToString`` gives, written a weight at a time."""

from __future__ import annotations

import io as stdio
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf.message import EncodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from red_onnx.io import files as io
from red_onnx.io import wire


def _sized_model(sizes: list[int], doc: str, subgraph: bool, metadata: bool) -> onnx.ModelProto:
    """A model with initializers of ``sizes`` floats, optionally an If node whose branch has one too."""
    inits = [numpy_helper.from_array(np.full(size, 0.5, np.float32), f"w{i}") for i, size in enumerate(sizes)]
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if subgraph:
        branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])
        branch_init = numpy_helper.from_array(np.arange(3, dtype=np.float32), "b")
        branch = helper.make_graph([], "branch", [], [branch_out], [branch_init])
        cond = numpy_helper.from_array(np.array(True), "cond")
        inits.append(cond)
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits, doc_string=doc))
    if metadata:
        helper.set_model_props(model, {"k": doc or "v"})
    return model


_SIZES = st.lists(st.sampled_from([0, 1, 31, 32, 4095, 4096, 524_287, 524_288]), max_size=6)


@settings(max_examples=40, deadline=None)
@given(sizes=_SIZES, doc=st.text(max_size=200), subgraph=st.booleans(), metadata=st.booleans())
def test_serialized_size_equals_protobuf_byte_size(
    sizes: list[int], doc: str, subgraph: bool, metadata: bool
) -> None:
    # sizes cross the one-, two- and three-byte length prefixes (128, 16384, 2**21 bytes)
    model = _sized_model(sizes, doc, subgraph, metadata)
    assert wire.serialized_size(model) == model.ByteSize() == len(model.SerializeToString())
    assert wire.serialized_size(onnx.ModelProto()) == 0


@settings(max_examples=40, deadline=None)
@given(
    sizes=_SIZES, doc=st.text(max_size=200), subgraph=st.booleans(), metadata=st.booleans(),
    functions=st.booleans(), sparse=st.booleans(),
)  # fmt: skip
def test_written_bytes_are_serialize_to_string(
    sizes: list[int], doc: str, subgraph: bool, metadata: bool, functions: bool, sparse: bool
) -> None:
    model = _sized_model(sizes, doc, subgraph, metadata)
    if functions:  # model fields numbered after the graph's (opset_import 8, functions 25)
        model.functions.add(name="f", domain="custom", doc_string=doc)
    if sparse:  # a graph field numbered after the initializers (sparse_initializer 15)
        values = numpy_helper.from_array(np.ones(2, np.float32), "s")
        indices = numpy_helper.from_array(np.array([0, 2], np.int64), "")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    stream = stdio.BytesIO()
    written = wire.write_model(model, stream)
    expected = model.SerializeToString()
    assert stream.getvalue() == expected
    assert written == len(expected)


def test_model_with_unknown_fields_is_written_whole() -> None:
    model = _sized_model([4, 5], "doc", subgraph=False, metadata=True)
    data = model.SerializeToString() + b"\xf8\x07\x05"  # field 127, varint 5: unknown to onnx
    parsed = onnx.ModelProto.FromString(data)
    stream = stdio.BytesIO()
    wire.write_model(parsed, stream)
    assert stream.getvalue() == parsed.SerializeToString()
    assert stream.getvalue().endswith(b"\xf8\x07\x05")


def test_save_model_writes_serialize_to_string(tmp_path: Path) -> None:
    model = _sized_model([100_000, 3, 70_000], "weights", subgraph=True, metadata=True)
    nbytes = io.save_model(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert nbytes == model.ByteSize()


def test_structure_keeps_everything_but_the_weights_values() -> None:
    model = _sized_model([1000, 7], "doc", subgraph=True, metadata=True)
    structure = wire.structure_of(model)
    assert structure.ByteSize() < model.ByteSize() - 4000
    assert [(t.name, t.data_type, list(t.dims)) for t in structure.graph.initializer] == [
        (t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    ]
    assert not any(t.raw_data or t.float_data for t in structure.graph.initializer)
    for field in ("input", "output", "node"):
        assert list(getattr(structure.graph, field)) == list(getattr(model.graph, field))
    assert list(structure.metadata_props) == list(model.metadata_props)
    assert list(structure.opset_import) == list(model.opset_import)
    assert structure.ir_version == model.ir_version


def test_structure_of_graphless_model() -> None:
    assert wire.structure_of(onnx.ModelProto(ir_version=8)) == onnx.ModelProto(ir_version=8)


def test_write_model_refuses_over_two_gb_before_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _sized_model([10, 20], "", subgraph=False, metadata=False)
    real = wire._size_without

    def oversized(message: object, name: str, parts: list[int]) -> int:
        return 2**31 if name == "initializer" else real(message, name, parts)

    monkeypatch.setattr(wire, "_size_without", oversized)
    stream = stdio.BytesIO()
    with pytest.raises(EncodeError, match="2 GB"):
        wire.write_model(model, stream)
    assert stream.getvalue() == b""
