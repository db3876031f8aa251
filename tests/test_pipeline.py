"""``red_onnx.compress``: inputs it accepts, what it keeps, what it freezes, and how it fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx.errors import InputError, RedOnnxError, VerificationError
from red_onnx.io.graph import WorkingModel
from red_onnx.passes.fold_affine import FoldAffine
from red_onnx.passes.infra import PassResult

OPSET = 17
BATCH = "N"


# ----------------------------------------------------------------------------------------------
# builders


def planted_conv(seed: int = 0, ir_version: int = 8, opset: int = OPSET) -> onnx.ModelProto:
    """x[N,3,8,8] → Conv c1 (8 ch, channel 5 == channel 2) → Relu → Conv c2 (4 ch) → y.

    ``--exact`` removes exactly one channel of c1 (8 → 7); c2 feeds the graph output and stays.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w1[5], b1[5] = w1[2], b1[2]
    inits = {
        "c1.w": w1,
        "c1.b": b1,
        "c2.w": rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
        "c2.b": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "c2.w", "c2.b"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 4, 8, 8])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    if ir_version >= 4:  # below IR 4 every initializer must also be a graph input
        onnx.checker.check_model(model, full_check=True)
    return model


def list_initializers_as_inputs(model: onnx.ModelProto, names: list[str] | None = None) -> onnx.ModelProto:
    for init in model.graph.initializer:
        if names is None or init.name in names:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    onnx.checker.check_model(model, full_check=True)
    return model


def weights_in_constant_nodes(seed: int = 0) -> onnx.ModelProto:
    model = planted_conv(seed)
    for init in model.graph.initializer:
        model.graph.node.insert(
            0, helper.make_node("Constant", [], [init.name], name=f"k_{init.name}", value=init)
        )
    del model.graph.initializer[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def weights_in_constant_of_shape(seed: int = 0) -> onnx.ModelProto:
    """c1's weight and bias are ConstantOfShape fills: all 8 channels identical (8 → 1)."""
    model = planted_conv(seed)
    graph = model.graph
    kept = [t for t in graph.initializer if not t.name.startswith("c1.")]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    fills = [("c1.w", [8, 3, 3, 3], 0.25), ("c1.b", [8], -0.5)]
    for position, (name, shape, value) in enumerate(fills):
        graph.node.insert(
            2 * position,
            helper.make_node(
                "Constant",
                [],
                [f"{name}.shape"],
                name=f"{name}.shape",
                value=numpy_helper.from_array(np.array(shape, np.int64)),
            ),
        )
        graph.node.insert(
            2 * position + 1,
            helper.make_node(
                "ConstantOfShape",
                [f"{name}.shape"],
                [name],
                name=f"{name}.fill",
                value=numpy_helper.from_array(np.array([value], np.float32)),
            ),
        )
    onnx.checker.check_model(model, full_check=True)
    return model


def if_reads_conv_output(seed: int = 0) -> onnx.ModelProto:
    """planted_conv plus an If whose branches read c1's output ``h`` from the outer scope."""
    model = planted_conv(seed)
    shape = [BATCH, 8, 8, 8]
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["t"], name="then_relu")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"], name="else_neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)],
    )
    model.graph.node.append(
        helper.make_node(
            "If", ["cond"], ["z"], name="branch", then_branch=then_branch, else_branch=else_branch
        )
    )
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, [1]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, shape))
    onnx.checker.check_model(model, full_check=True)
    return model


def gather_by_index(seed: int = 0) -> onnx.ModelProto:
    """planted_conv, then Gather(y, idx, axis=2): ``idx`` (int64 [2]) must lie in [-8, 7]."""
    model = planted_conv(seed)
    graph = model.graph
    graph.node[-1].output[0] = "y_full"
    graph.node.append(helper.make_node("Gather", ["y_full", "idx"], ["y"], name="pick", axis=2))
    graph.input.append(helper.make_tensor_value_info("idx", TensorProto.INT64, [2]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 4, 2, 8]))
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------------------------
# helpers


def channels(model: onnx.ModelProto, node_name: str) -> int:
    """Output channels of a Conv node, from its weight (initializer or Constant node)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    for init in model.graph.initializer:
        if init.name == node.input[1]:
            return int(init.dims[0])
    raise AssertionError(f"weight of {node_name} is not an initializer")


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def x_feed(batch: int = 2, seed: int = 7) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 8, 8)).astype(np.float32)}


def assert_same_function(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    ref, got = run(before, feeds), run(after, feeds)
    assert set(ref) == set(got)
    for name, value in ref.items():
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6 * scale)


def shape_of(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture
def corrupting_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make fold_affine add 0.1 to c2's weight after it runs: a rewrite bug verification must catch."""
    original = FoldAffine.call

    def corrupt(self: FoldAffine, model: WorkingModel) -> PassResult:
        result = original(self, model)
        conv = next(n for n in model.graph.nodes if n.name == "c2")
        conv.inputs[1].values = np.asarray(conv.inputs[1].values) + np.float32(0.1)
        return result

    monkeypatch.setattr(FoldAffine, "call", corrupt)


# ----------------------------------------------------------------------------------------------
# inputs


def test_accepts_a_path_and_a_model_proto(tmp_path: Path) -> None:
    model = planted_conv()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    from_path = red_onnx.compress(path, exact=True)
    from_str = red_onnx.compress(str(path), exact=True)
    from_proto = red_onnx.compress(model, exact=True)
    for result in (from_path, from_str, from_proto):
        assert result.verified
        assert channels(result.model, "c1") == 7
        assert channels(result.model, "c2") == 4
        onnx.checker.check_model(result.model, full_check=True)
        assert_same_function(model, result.model, x_feed())
    assert from_path.model.SerializeToString() == from_proto.model.SerializeToString()
    assert from_path.model.SerializeToString() == from_str.model.SerializeToString()


def test_a_failed_scratch_write_is_one_input_error_and_nothing_is_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(planted_conv(), path)
    before = path.read_bytes()

    def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(red_onnx.pipeline.wire, "write_model", full)
    with pytest.raises(InputError, match=r"No space left on device.*free"):
        red_onnx.compress(path, exact=True)
    assert path.read_bytes() == before


def test_rejects_other_types() -> None:
    with pytest.raises(InputError):
        red_onnx.compress(b"not a model")  # type: ignore[arg-type]


def test_does_not_mutate_the_callers_model() -> None:
    model = if_reads_conv_output()
    model.metadata_props.add(key="author", value="tests")
    before = model.SerializeToString()
    red_onnx.compress(model, exact=True)
    assert model.SerializeToString() == before


def test_report_figures_and_layers() -> None:
    report = red_onnx.compress(planted_conv(), exact=True).report
    assert report.params_before == 8 * 27 + 8 + 4 * 8 * 9 + 4
    assert report.params_after == 7 * 27 + 7 + 4 * 7 * 9 + 4
    assert report.macs_before == 64 * (8 * 27 + 4 * 8 * 9)
    assert report.macs_after == 64 * (7 * 27 + 4 * 7 * 9)
    layers = {layer.name: (layer.channels_before, layer.channels_after) for layer in report.layers}
    assert layers == {"c1": (8, 7), "c2": (4, 4)}
    assert [p.name for p in report.passes] == [
        "fold_batchnorm",
        "fold_affine",
        "merge_exact",
        "separate_depthwise",
    ]
    assert report.input_shapes == {"x": [1, 3, 8, 8]}
    data = json.loads(report.to_json())
    assert data["verification"]["passed"] is True


def test_progress_reports_every_stage_in_order() -> None:
    stages: list[str] = []
    red_onnx.compress(planted_conv(), exact=True, progress=stages.append)
    assert stages == [
        "load", "normalise", "fold_batchnorm", "fold_affine", "merge_exact", "separate_depthwise", "verify",
    ]  # fmt: skip


def test_default_mode_is_exact_for_now() -> None:
    exact = red_onnx.compress(planted_conv(), exact=True).model
    default = red_onnx.compress(planted_conv()).model
    assert exact.graph.SerializeToString() == default.graph.SerializeToString()
    options = {p.key: p.value for p in default.metadata_props}["red_onnx.options"]
    assert json.loads(options)["exact"] is False


def test_same_input_gives_identical_bytes() -> None:
    first = red_onnx.compress(planted_conv(), exact=True).model.SerializeToString()
    second = red_onnx.compress(planted_conv(), exact=True).model.SerializeToString()
    assert first == second


# ----------------------------------------------------------------------------------------------
# IR versions and overridable initializers


def test_ir3_initializers_listed_as_inputs_become_constants() -> None:
    model = list_initializers_as_inputs(planted_conv(ir_version=3, opset=8))
    result = red_onnx.compress(model, exact=True)
    out = result.model
    assert out.ir_version >= 4
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"]
    assert channels(out, "c1") == 7
    assert result.report.overridable_initializers == []
    assert_same_function(model, out, x_feed())


def test_overridable_initializer_stays_an_input_and_freezes_its_layer() -> None:
    model = list_initializers_as_inputs(planted_conv(ir_version=8), ["c1.w"])
    result = red_onnx.compress(model, exact=True)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x", "c1.w"]
    default = next(t for t in out.graph.initializer if t.name == "c1.w")
    original = next(t for t in model.graph.initializer if t.name == "c1.w")
    np.testing.assert_array_equal(numpy_helper.to_array(default), numpy_helper.to_array(original))
    assert channels(out, "c1") == 8  # planted duplicate kept: a caller may override the weight
    assert result.report.overridable_initializers == ["c1.w"]
    reasons = [f.reason for f in result.report.frozen if f.group == "c1"]
    assert reasons and "override" in reasons[0]
    assert_same_function(model, out, x_feed())


def test_overridable_weights_count_their_macs_and_a_target_they_freeze_is_refused() -> None:
    """Every initializer listed as an input (``keep_initializers_as_inputs``): the figures still count
    its layers (they counted 0 parameters and 0 MACs, and a --target-macs run "reached" 0.000)."""
    plain = red_onnx.compress(planted_conv(), exact=True).report
    model = list_initializers_as_inputs(planted_conv(ir_version=8))
    report = red_onnx.compress(model, exact=True).report
    assert (report.params_before, report.macs_before) == (plain.params_before, plain.macs_before)
    assert report.macs_before == 8 * 8 * 8 * 27 + 4 * 8 * 8 * 72
    with pytest.raises(VerificationError, match=r"cannot be reached.*1\.000"):
        red_onnx.compress(list_initializers_as_inputs(planted_conv(ir_version=8)), target_macs=0.8)


def test_a_budget_beside_an_overridable_bias_measures_in_one_session(caplog) -> None:
    """The simulator takes an overridable initializer's default (it failed, and every measurement
    rebuilt the model); the merged model keeps the input and computes what the search measured."""
    model = list_initializers_as_inputs(planted_conv(ir_version=8), ["c2.b"])
    with caplog.at_level("WARNING"):
        result = red_onnx.compress(model, target_macs=0.7, channel_multiple=1)
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]
    assert channels(result.model, "c1") < 8
    assert [i.name for i in result.model.graph.input] == ["x", "c2.b"]
    assert result.report.macs_before == 8 * 8 * 8 * 27 + 4 * 8 * 8 * 72


# ----------------------------------------------------------------------------------------------
# where the weights are


def test_weights_in_constant_nodes_are_found() -> None:
    model = weights_in_constant_nodes()
    result = red_onnx.compress(model, exact=True)
    assert result.verified
    assert channels(result.model, "c1") == 7
    assert result.report.params_before == 8 * 27 + 8 + 4 * 8 * 9 + 4
    assert_same_function(model, result.model, x_feed())


def test_weights_in_constant_of_shape_fills_are_found() -> None:
    model = weights_in_constant_of_shape()
    result = red_onnx.compress(model, exact=True)
    assert result.verified
    assert channels(result.model, "c1") == 1  # eight identical channels merge into one
    assert not any(n.op_type == "ConstantOfShape" for n in result.model.graph.node)
    assert_same_function(model, result.model, x_feed())


def test_external_data_by_path(tmp_path: Path) -> None:
    model = planted_conv()
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        planted_conv(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    result = red_onnx.compress(path, exact=True)
    assert result.verified
    assert channels(result.model, "c1") == 7
    assert not any(t.data_location == TensorProto.EXTERNAL for t in result.model.graph.initializer)
    assert_same_function(model, result.model, x_feed())


# ----------------------------------------------------------------------------------------------
# interface kept


def test_dynamic_spatial_dims_are_kept_and_input_shape_is_used() -> None:
    model = planted_conv()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 3, "H", "W"]))
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 4, "H", "W"])
    )
    spec = red_onnx.InputSpec(shapes={"x": (2, 3, 16, 12)})
    result = red_onnx.compress(model, exact=True, input_spec=spec)
    assert shape_of(result.model.graph.input[0]) == [BATCH, 3, "H", "W"]
    assert shape_of(result.model.graph.output[0]) == [BATCH, 4, "H", "W"]
    assert result.report.input_shapes == {"x": [2, 3, 16, 12]}
    assert result.report.macs_before == 2 * 16 * 12 * (8 * 27 + 4 * 8 * 9)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 5, 9)).astype(np.float32)}
    assert_same_function(model, result.model, feeds)


def test_stale_value_info_is_not_kept() -> None:
    model = onnx.shape_inference.infer_shapes(planted_conv())
    assert any(v.name == "h" for v in model.graph.value_info)
    out = red_onnx.compress(model, exact=True).model
    assert channels(out, "c1") == 7
    onnx.checker.check_model(out, full_check=True)
    for value in out.graph.value_info:
        dims = shape_of(value)
        assert value.name not in ("h", "r") or not dims or dims[1] == 7, (value.name, dims)


def test_dynamic_batch_dim_is_kept() -> None:
    model = planted_conv()
    out = red_onnx.compress(model, exact=True).model
    assert [i.name for i in out.graph.input] == ["x"]
    assert shape_of(out.graph.input[0]) == [BATCH, 3, 8, 8]
    assert shape_of(out.graph.output[0]) == [BATCH, 4, 8, 8]
    assert_same_function(model, out, x_feed(batch=3))


def test_if_branch_reading_a_conv_output_freezes_its_group() -> None:
    model = if_reads_conv_output()
    result = red_onnx.compress(model, exact=True)
    assert channels(result.model, "c1") == 8  # the planted duplicate stays: the If body reads h
    reasons = [f.reason for f in result.report.frozen if f.group == "c1"]
    assert reasons and ("If" in reasons[0] or "Loop" in reasons[0])
    for cond in (True, False):
        assert_same_function(model, result.model, {**x_feed(), "cond": np.array([cond])})


def test_freeze_glob_protects_a_layer() -> None:
    model = planted_conv()
    assert channels(red_onnx.compress(model, exact=True, freeze=["c?"]).model, "c1") == 8
    assert channels(red_onnx.compress(model, exact=True, freeze=["other*"]).model, "c1") == 7


# ----------------------------------------------------------------------------------------------
# verification


@pytest.mark.usefixtures("corrupting_pass")
def test_verification_failure_raises_with_the_result() -> None:
    with pytest.raises(VerificationError) as caught:
        red_onnx.compress(planted_conv(), exact=True)
    assert caught.value.exit_code == 1
    assert "\n" not in str(caught.value)
    result = caught.value.result
    assert not result.verified
    assert result.report.verification["passed"] is False


@pytest.mark.usefixtures("corrupting_pass")
def test_raise_on_failure_false_returns_an_unverified_result() -> None:
    result = red_onnx.compress(planted_conv(), exact=True, raise_on_failure=False)
    assert result.verified is False
    failed = [o for o in result.report.verification["outputs"] if not o["passed"]]
    assert [o["name"] for o in failed] == ["y"]
    assert result.report.headline()["verified"] is False


def test_verify_false_skips_verification() -> None:
    result = red_onnx.compress(planted_conv(), exact=True, verify=False)
    assert result.report.verification is None
    assert result.verified is False
    assert channels(result.model, "c1") == 7


def test_input_range_reaches_verification() -> None:
    model = gather_by_index()
    spec = red_onnx.InputSpec(ranges={"idx": (0, 7)})
    result = red_onnx.compress(model, exact=True, input_spec=spec)
    assert result.verified
    assert channels(result.model, "c1") == 7
    value = red_onnx.compress(model, exact=True, input_spec=red_onnx.InputSpec(values={"idx": 7}))
    assert value.verified
    with pytest.raises(RedOnnxError):  # 8 is out of range for Gather over 8 rows
        red_onnx.compress(model, exact=True, input_spec=red_onnx.InputSpec(values={"idx": 8}))


def test_input_model_that_cannot_run_on_default_inputs_is_an_input_error() -> None:
    with pytest.raises(InputError):  # default int range [0, 10] indexes past the 8 rows
        red_onnx.compress(gather_by_index(), exact=True)


def test_scalar_bool_input() -> None:
    model = if_reads_conv_output()
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    onnx.checker.check_model(model, full_check=True)
    assert red_onnx.compress(model, exact=True).verified


# ----------------------------------------------------------------------------------------------
# a run that rewrites nothing


def nothing_to_rewrite() -> onnx.ModelProto:
    """``planted_conv`` without its duplicate channel, weights in Constant nodes (normalisation folds)."""
    model = planted_conv()
    weight = next(t for t in model.graph.initializer if t.name == "c1.w")
    weight.CopyFrom(
        numpy_helper.from_array(
            np.random.default_rng(5).standard_normal((8, 3, 3, 3)).astype(np.float32), "c1.w"
        )
    )
    for init in model.graph.initializer:
        model.graph.node.insert(
            0, helper.make_node("Constant", [], [init.name], name=f"k_{init.name}", value=init)
        )
    del model.graph.initializer[:]
    return model


def test_a_run_that_rewrites_nothing_returns_the_input_graph(tmp_path: Path) -> None:
    model = nothing_to_rewrite()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    for source in (model, path):
        result = red_onnx.compress(source, exact=True)
        assert result.report.unchanged and result.verified
        assert not any(item.modified for item in result.report.passes)
        assert result.model.graph == model.graph  # not its normalised form (Constants folded, reordered)
        assert result.model.metadata_props  # with the provenance
        report = result.report
        assert (report.params_after, report.macs_after) == (report.params_before, report.macs_before)
    assert not model.metadata_props  # the caller's proto is not touched
    assert "no rewrite applied" in red_onnx.report.report.render_table(result.report)


def test_a_run_that_rewrites_returns_the_rewritten_graph() -> None:
    result = red_onnx.compress(planted_conv(), exact=True)
    assert not result.report.unchanged
    assert next(t for t in result.model.graph.initializer if t.name.startswith("c1")).dims[0] == 7
