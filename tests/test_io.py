"""Tests of red_onnx.io.files: validated loading, atomic deterministic saving, external data, checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from red_onnx.errors import InputError, VerificationError
from red_onnx.io import files as io

OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 8


def make_model(nodes: list[onnx.NodeProto] | None = None, **model_kwargs: object) -> onnx.ModelProto:
    """Conv (weights 2304 bytes: external-data sized) -> Relu; bias 64 bytes (stays inline)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
    default = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        default if nodes is None else nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
        [weight, bias],
    )
    kwargs = {"opset_imports": OPSET, "ir_version": IR_VERSION, **model_kwargs}
    return helper.make_model(graph, **kwargs)


def run(model: onnx.ModelProto | Path) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    return session.run(None, {"x": x})[0]


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def assert_bad_input(path: Path, *fragments: str) -> None:
    """load_model raises InputError mentioning every fragment, and leaves the file as it was."""
    before = snapshot(path) if path.is_file() else None
    with pytest.raises(InputError) as info:
        io.load_model(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    if before is not None:
        assert snapshot(path) == before


# --- round trip, determinism


def test_round_trip_small_model(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.onnx"
    nbytes = io.save_model(model, path)
    assert nbytes == path.stat().st_size == io.model_nbytes(model)
    loaded = io.load_model(path)
    assert loaded.SerializeToString() == model.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary files left
    np.testing.assert_array_equal(run(loaded), run(model))


def test_saves_are_byte_identical(tmp_path: Path) -> None:
    model = make_model()
    (tmp_path / "a").mkdir()
    first, second, third = tmp_path / "m.onnx", tmp_path / "a" / "m.onnx", tmp_path / "other.onnx"
    io.save_model(model, first)
    io.save_model(model, second)
    io.save_model(model, str(third))
    assert first.read_bytes() == second.read_bytes() == third.read_bytes()
    io.save_model(model, first)  # overwriting gives the same bytes again
    assert first.read_bytes() == second.read_bytes()


def test_save_to_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        io.save_model(make_model(), tmp_path / "nope" / "m.onnx")
    with pytest.raises(InputError, match="is a directory"):
        io.save_model(make_model(), tmp_path)


def test_save_refuses_unloaded_external_data(tmp_path: Path) -> None:
    onnx.save_model(make_model(), tmp_path / "e.onnx", save_as_external_data=True, location="e.data")
    unloaded = onnx.load(tmp_path / "e.onnx", load_external_data=False)
    with pytest.raises(InputError, match="still refers to external data"):
        io.save_model(unloaded, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# --- atomic save


def _raise(*_args: object, **_kwargs: object) -> None:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("target", ["write", "os.replace"])
@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_destination_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, external: bool
) -> None:
    destination = tmp_path / "m.onnx"
    destination.write_bytes(b"previous model")
    if external:
        monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
        (tmp_path / "m.onnx.data").write_bytes(b"previous data")
    before = {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path)}
    if target == "write":  # inline: the streamed writer; external data: onnx's
        monkeypatch.setattr(io, "write_model", _raise)
        monkeypatch.setattr(onnx, "save_model", _raise)
    else:
        monkeypatch.setattr(os, "replace", _raise)
    with pytest.raises(InputError, match="No space left on device"):
        io.save_model(make_model(), destination)
    monkeypatch.undo()
    assert {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path)} == before


def test_failed_model_replace_restores_previous_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """External save: the data file is moved in first; if the model's move fails, it is undone."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
    destination = tmp_path / "m.onnx"
    io.save_model(make_model(), destination)
    before = {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path)}
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == destination:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    changed = make_model(producer_name="changed")
    with pytest.raises(InputError, match="Input/output error"):
        io.save_model(changed, destination)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path)} == before


# --- bad inputs


def test_missing_path(tmp_path: Path) -> None:
    assert_bad_input(tmp_path / "nope.onnx", "nope.onnx", "no such file")


def test_directory(tmp_path: Path) -> None:
    assert_bad_input(tmp_path, str(tmp_path), "is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    io.save_model(make_model(), path)
    path.chmod(0)
    try:
        assert_bad_input(path, "cannot read", "permissions")
    finally:
        path.chmod(0o600)


def test_unreadable_when_open_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    io.save_model(make_model(), path)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(InputError, match=r"cannot read .*Permission denied.*permissions"):
        io.load_model(path)


def _truncated(path: Path) -> None:
    data = make_model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


def _decodes_as_garbage(path: Path) -> None:
    # A serialized TensorProto parses as a ModelProto full of unknown fields.
    path.write_bytes(numpy_helper.from_array(np.arange(6, dtype=np.int64)).SerializeToString())


BAD_FILES: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "empty": (lambda p: p.write_bytes(b""), ("is empty or not an ONNX model",)),
    "truncated": (_truncated, ("truncated or not an ONNX model",)),
    "random": (
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(1000)),
        ("truncated or not an ONNX model", "1000 bytes"),
    ),
    "text": (lambda p: p.write_text("hello\nnot a model\n"), ("not an ONNX model",)),
    "garbage_that_decodes": (_decodes_as_garbage, ("is empty or not an ONNX model", "no graph")),
    "no_nodes": (
        lambda p: p.write_bytes(make_model(nodes=[]).SerializeToString()),
        ("is empty or not an ONNX model", "no nodes"),
    ),
    "ir_version_0": (
        lambda p: p.write_bytes(make_model(ir_version=0).SerializeToString()),
        ("ir_version is 0",),
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file(tmp_path: Path, kind: str) -> None:
    write, fragments = BAD_FILES[kind]
    path = tmp_path / f"{kind}.onnx"
    write(path)
    assert_bad_input(path, str(path), *fragments)


def test_no_opset_import(tmp_path: Path) -> None:
    model = make_model()
    del model.opset_import[:]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, "no opset_import")


def test_no_outputs(tmp_path: Path) -> None:
    model = make_model()
    del model.graph.output[:]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, "graph has no outputs")


def test_checker_failure(tmp_path: Path) -> None:
    model = make_model(nodes=[helper.make_node("Relu", ["undefined"], ["y"], name="r")])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, "fails the ONNX checker", "topologically sorted")


# --- ops onnxruntime cannot run


def _custom_op_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MyRelu", ["x"], ["y"], name="odd", domain="my.company")]
    return make_model(nodes=nodes, opset_imports=[*OPSET, helper.make_opsetid("my.company", 1)])


def test_custom_domain_op(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_custom_op_model().SerializeToString())
    assert_bad_input(path, "'odd'", "'MyRelu'", "'my.company'", "onnxruntime")


def test_custom_domain_op_inside_if_subgraph(tmp_path: Path) -> None:
    branch = helper.make_graph(
        [helper.make_node("MyRelu", ["x"], ["b"], domain="my.company")],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)
    model = make_model(
        nodes=[helper.make_node("Constant", [], ["cond"], value=cond), node],
        opset_imports=[*OPSET, helper.make_opsetid("my.company", 1)],
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, "'MyRelu'", "'my.company'", "output 'b'")


def test_unknown_standard_op(tmp_path: Path) -> None:
    model = make_model(nodes=[helper.make_node("Frobnicate", ["x"], ["y"], name="f")])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, "'Frobnicate'", "unknown to ONNX domain", "onnxruntime")


def test_local_function_domain_is_accepted(tmp_path: Path) -> None:
    function = helper.make_function(
        "local",
        "DoubleRelu",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["t"]), helper.make_node("Relu", ["t"], ["b"])],
        OPSET,
    )
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("DoubleRelu", ["c"], ["y"], domain="local"),
    ]
    model = make_model(
        nodes=nodes, opset_imports=[*OPSET, helper.make_opsetid("local", 1)], functions=[function]
    )
    path = tmp_path / "m.onnx"
    io.save_model(model, path)
    np.testing.assert_array_equal(run(io.load_model(path)), run(make_model()))


def test_ml_and_microsoft_domains_are_accepted(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Gelu", ["c"], ["g"], domain="com.microsoft"),
        helper.make_node("Relu", ["g"], ["y"]),
    ]
    opsets = [*OPSET, helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("ai.onnx.ml", 3)]
    path = tmp_path / "m.onnx"
    io.save_model(make_model(nodes=nodes, opset_imports=opsets), path)
    assert io.load_model(path).graph.node[1].domain == "com.microsoft"


# --- external data


def _save_with_onnx_external(tmp_path: Path, location: str = "m.onnx.data") -> Path:
    path = tmp_path / "m.onnx"
    onnx.save_model(make_model(), path, save_as_external_data=True, location=location, size_threshold=1024)
    return path


def test_external_data_round_trip(tmp_path: Path) -> None:
    path = _save_with_onnx_external(tmp_path)
    before = {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path)}
    loaded = io.load_model(path)
    assert not any(
        t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer
    )  # data is in memory
    np.testing.assert_array_equal(run(loaded), run(make_model()))
    assert {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path)} == before


def test_model_nbytes_counts_unloaded_external_data(tmp_path: Path) -> None:
    path = _save_with_onnx_external(tmp_path)
    unloaded = onnx.load(path, load_external_data=False)
    data_size = (tmp_path / "m.onnx.data").stat().st_size
    assert io.model_nbytes(unloaded) == path.stat().st_size + data_size


def test_missing_external_data_file(tmp_path: Path) -> None:
    path = _save_with_onnx_external(tmp_path)
    (tmp_path / "m.onnx.data").unlink()
    assert_bad_input(path, "'m.onnx.data'", str(tmp_path.resolve()), "keep the .data file next")


def test_truncated_external_data_file(tmp_path: Path) -> None:
    path = _save_with_onnx_external(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert_bad_input(path, "cannot load its external data", "exceeds")


def test_external_data_outside_model_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    source = tmp_path / "w.onnx"
    onnx.save_model(make_model(), source, save_as_external_data=True, location="w.data")
    model = onnx.load(source, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    path = tmp_path / "sub" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(path, "'../w.data'", "outside the model's directory")


def test_large_model_is_saved_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The > 1.8 GB path, with the threshold lowered instead of allocating gigabytes."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = make_model()
    original = model.SerializeToString()
    (tmp_path / "a").mkdir()
    path, other = tmp_path / "big.onnx", tmp_path / "a" / "big.onnx"
    nbytes = io.save_model(model, path)
    io.save_model(model, other)
    assert model.SerializeToString() == original  # caller's proto untouched
    assert sorted(os.listdir(tmp_path)) == ["a", "big.onnx", "big.onnx.data"]
    data = tmp_path / "big.onnx.data"
    assert nbytes == path.stat().st_size + data.stat().st_size
    assert data.stat().st_size == 16 * 4 * 3 * 3 * 4  # W only; the 64-byte bias stays inline
    assert path.read_bytes() == other.read_bytes()  # same bytes, no path or time in them
    assert data.read_bytes() == (tmp_path / "a" / "big.onnx.data").read_bytes()
    unloaded = onnx.load(path, load_external_data=False)
    locations = {e.value for t in unloaded.graph.initializer for e in t.external_data}
    assert "big.onnx.data" in locations
    np.testing.assert_array_equal(run(path), run(model))  # onnxruntime by path
    assert io.load_model(path).SerializeToString() == original
    io.check_model(path)


# --- full check, size


def test_model_nbytes_is_serialized_size() -> None:
    model = make_model()
    assert io.model_nbytes(model) == len(model.SerializeToString())


def test_check_model_passes_valid_model(tmp_path: Path) -> None:
    io.check_model(make_model())
    io.save_model(make_model(), tmp_path / "m.onnx")
    io.check_model(tmp_path / "m.onnx")
    io.check_model(str(tmp_path / "m.onnx"))


def test_check_model_runs_strict_shape_inference(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((32, 32), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)
    onnx.checker.check_model(model)  # passes the plain check that load_model uses
    with pytest.raises(VerificationError, match="Incompatible dimensions"):
        io.check_model(model)
    path = tmp_path / "m.onnx"
    io.save_model(model, path)
    with pytest.raises(VerificationError, match="Incompatible dimensions"):
        io.check_model(path)


def test_check_model_over_two_gb_goes_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "TWO_GB", 1000)
    calls: list[object] = []
    real_check = onnx.checker.check_model

    def spy(model: object, **kwargs: object) -> None:
        calls.append(model)
        real_check(model, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    io.check_model(make_model())
    assert len(calls) == 1 and isinstance(calls[0], str)


def test_check_model_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        io.check_model(tmp_path / "nope.onnx")


def test_unnamed_nodes_get_unique_names_at_import() -> None:
    """Groups and MACs are keyed by node name: two unnamed producers must not share the name ""."""
    from onnx import helper, numpy_helper

    from red_onnx.io.graph import import_model

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="MatMul_1"),
        helper.make_node("MatMul", ["a", "w"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    names = [node.name for node in import_model(model).graph.nodes]
    assert names == ["MatMul_1", "MatMul_1_1", "Relu_2"]
    assert [node.name for node in model.graph.node] == ["MatMul_1", "", ""]  # the input is not modified
