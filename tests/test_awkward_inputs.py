"""Bad and awkward input through the ``red-onnx`` command, in ``--exact`` and ``--tolerance 0.02``.

Every case ends one of two ways. Exit 0: outputs unchanged (``--exact``: element-wise within the exact
rule, plus float16's rounding floor for float16 models; ``--tolerance``: relative L2 error within it,
both checked here with onnxruntime at each optimisation level), whatever was left alone named with a
reason in the ``--json`` report, and nothing written but the output and the report. Or exit 2: one
error line, no traceback, the input untouched and nothing written (no output, no temporary file).

Covered elsewhere and not repeated here: empty, truncated and text files, missing external data and
custom-domain ops (tests/test_io.py ``test_bad_file``, ``test_missing_external_data_file``,
``test_custom_domain_op*``; tests/test_cli.py ``test_bad_input_exits_2_with_one_line``); initializers
listed as graph inputs (tests/test_pipeline.py, tests/test_cli.py); opsets 9 to the newest through the
API (tests/test_opsets.py); an If branch reading a conv output (tests/test_pipeline.py); the >2 GB route
with lowered limits (tests/test_large_models.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from graphs import shared_weight
from onnx import TensorProto, helper, numpy_helper
from test_pipeline import list_initializers_as_inputs, planted_conv

from red_onnx import InputError, cli, compress
from red_onnx.demo import demo_path
from red_onnx.io import files as model_io
from red_onnx.options import InputSpec
from red_onnx.runtime import sessions
from red_onnx.verify import noise
from red_onnx.verify.inputs import make_inputs

MODES = {"exact": ["--exact"], "approximate": ["--tolerance", "0.02"]}
TOLERANCE = 0.02
#: Exact rule of the pipeline: |y' - y| <= EXACT_ATOL·max(1, max|y|) + EXACT_RTOL·|y|.
EXACT_RTOL, EXACT_ATOL = 1e-5, 1e-6
#: float16 rounding floor (red_onnx.verify.noise.ROUNDING_UNITS unit roundoffs of float16, see there).
FLOAT16_FLOOR = noise.ROUNDING_UNITS * 2.0**-11
#: Seeds of the inputs these tests check outputs on (the pipeline verifies on 0 and 1).
CHECK_SEEDS = (5, 6)
OPSET = [helper.make_opsetid("", 17)]
#: A file onnxruntime itself keeps in $TMPDIR (a session id, reused by later processes): not ours.
ORT_SESSION_FILE = ".ses"


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def scratch(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The system temporary directory, for this test alone: whatever the run puts there must be gone after."""
    folder = tmp_path_factory.mktemp("scratch")
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    left = sorted(p.name for p in folder.iterdir() if p.name != ORT_SESSION_FILE)
    assert not left, left


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(folder: Path, model: onnx.ModelProto | None, mode: str, *extra: str) -> int:
    """Save ``model`` as ``in.onnx`` (unless given) and run ``red-onnx in.onnx out.onnx`` in ``mode``."""
    if model is not None:
        onnx.save_model(model, folder / "in.onnx")
    args = [str(folder / "in.onnx"), str(folder / "out.onnx"), *MODES[mode], "--json", str(folder / "r.json")]
    return cli.main([*args, "-q", *extra])


def assert_refused(folder: Path, before: dict[str, bytes], code: int, err: str, *fragments: str) -> None:
    """Exit 2, one error line naming ``fragments``, no traceback, the folder exactly as it was."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("red-onnx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    assert listing(folder) == before


def assert_done(folder: Path, before: dict[str, bytes], code: int, err: str) -> dict:
    """Exit 0, no traceback, the input untouched, only the output and the report added; the report."""
    assert code == 0, err
    assert "Traceback" not in err
    after = listing(folder)
    assert {name: after.get(name) for name in before} == before
    assert set(after) - set(before) == {"out.onnx", "r.json"}
    report = json.loads((folder / "r.json").read_text())
    assert report["verification"]["passed"] is True
    return report


def session(model: onnx.ModelProto | Path, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = sessions.LEVELS[level]
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def assert_same_outputs(
    original: onnx.ModelProto | Path,
    written: Path,
    mode: str,
    spec: InputSpec | None = None,
    floor: float = 0.0,
) -> None:
    """Outputs of ``written`` against ``original`` at each onnxruntime level, on seeds the run never saw.

    Exact: element-wise within the pipeline's exact rule plus ``floor·(max|y| + |y|)`` (float16).
    Approximate: every output's relative L2 error within ``TOLERANCE``.
    """
    structure = onnx.load(str(original), load_external_data=False) if isinstance(original, Path) else original
    feeds = [make_inputs(structure, spec or InputSpec(), seed) for seed in CHECK_SEEDS]
    for level in ("disable_all", "enable_all"):
        reference, candidate = session(original, level), session(written, level)
        names = [o.name for o in reference.get_outputs()]
        assert [o.name for o in candidate.get_outputs()] == names
        for feed in feeds:
            for name, y, y_new in zip(
                names, reference.run(names, feed), candidate.run(names, feed), strict=True
            ):
                y, y_new = np.asarray(y, np.float64), np.asarray(y_new, np.float64)
                assert y_new.shape == y.shape, name
                diff, peak = np.abs(y_new - y), np.abs(y).max(initial=0.0)
                if mode == "exact":
                    allowed = (
                        EXACT_ATOL * max(1.0, peak) + EXACT_RTOL * np.abs(y) + floor * (peak + np.abs(y))
                    )
                    assert (diff <= allowed).all(), (name, level, float(diff.max()))
                else:
                    assert np.linalg.norm(diff) <= TOLERANCE * np.linalg.norm(y), (name, level)


def frozen_reasons(report: dict) -> dict[str, str]:
    return {item["group"]: item["reason"] for item in report["frozen"]}


def out_channels(path: Path, node_name: str) -> int:
    """Output channels of a Conv in a written model, from its weight initializer (through a Cast)."""
    model = onnx.load(str(path))
    sources = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type in ("Cast", "DequantizeLinear")}
    node = next(n for n in model.graph.node if n.name == node_name)
    name = sources.get(node.input[1], node.input[1])
    return int(next(t for t in model.graph.initializer if t.name == name).dims[0])


# ----------------------------------------------------------------------------------------------
# files that are not ONNX models (empty, truncated, text: tests/test_cli.py)


def _random_bytes(folder: Path) -> None:
    (folder / "in.onnx").write_bytes(np.random.default_rng(0).bytes(4096))


def _json_of_a_model(folder: Path) -> None:
    (folder / "in.onnx").write_text(json_format.MessageToJson(planted_conv()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("write", "fragment"),
    [(_random_bytes, "truncated or not an ONNX model"), (_json_of_a_model, "is JSON text")],
    ids=["random_bytes", "json"],
)
def test_file_that_is_not_a_model_exits_2(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str, write, fragment: str
) -> None:
    write(tmp_path)
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode)
    _, err = capfd.readouterr()
    assert_refused(tmp_path, before, code, err, fragment, "in.onnx")


# ----------------------------------------------------------------------------------------------
# quantized graphs: passed through, each quantized layer named with its reason


def qdq_conv() -> onnx.ModelProto:
    """QDQ: x → Q/DQ → Conv c1 (int8 weight through DequantizeLinear, rows 5 = 2) → Relu → Q/DQ → Conv c2."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
    w1[5] = w1[2]
    arrays = {
        "w1q": w1, "w2q": rng.integers(-127, 128, (4, 8, 3, 3)).astype(np.int8),
        "ws": np.array(0.01, np.float32), "wz": np.array(0, np.int8),
        "xs": np.array(0.05, np.float32), "xz": np.array(128, np.uint8),
        "b1": rng.standard_normal(8).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32),
    }  # fmt: skip
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        node("DequantizeLinear", ["w1q", "ws", "wz"], ["w1"], name="dq_w1"),
        node("Conv", ["xd", "w1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        node("Relu", ["h"], ["r"], name="relu"),
        node("QuantizeLinear", ["r", "xs", "xz"], ["rq"], name="q_r"),
        node("DequantizeLinear", ["rq", "xs", "xz"], ["rd"], name="dq_r"),
        node("DequantizeLinear", ["w2q", "ws", "wz"], ["w2"], name="dq_w2"),
        node("Conv", ["rd", "w2", "b2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, arrays, TensorProto.FLOAT, TensorProto.FLOAT)


def conv_integer() -> onnx.ModelProto:
    """DynamicQuantizeLinear → ConvInteger c1 (uint8 weight, rows 5 = 2) → rescale → Relu → Conv c2."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(0, 256, (8, 3, 3, 3)).astype(np.uint8)
    w1[5] = w1[2]
    arrays = {
        "w1q": w1, "wz": np.array(128, np.uint8), "ws": np.array(0.02, np.float32),
        "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
    }  # fmt: skip
    node = helper.make_node
    nodes = [
        node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="quantize"),
        node("ConvInteger", ["xq", "w1q", "xz", "wz"], ["hi"], name="c1", pads=[1, 1, 1, 1]),
        node("Cast", ["hi"], ["hf"], name="to_float", to=TensorProto.FLOAT),
        node("Mul", ["xs", "ws"], ["s"], name="scale"),
        node("Mul", ["hf", "s"], ["h"], name="rescale"),
        node("Relu", ["h"], ["r"], name="relu"),
        node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, arrays, TensorProto.FLOAT, TensorProto.FLOAT)


def _model(nodes: list, arrays: dict[str, np.ndarray], x_type: int, y_type: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "awkward",
        [helper.make_tensor_value_info("x", x_type, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", y_type, ["N", 4, 8, 8])],
        [numpy_helper.from_array(array, name) for name, array in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("build", "reason", "stored"),
    [
        (qdq_conv, "dequantized by DequantizeLinear node 'dq_w1'", "w1q"),
        (conv_integer, "quantized integers", "w1q"),
    ],
    ids=["qdq", "conv_integer"],
)
def test_quantized_layers_are_kept_with_a_reason(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str, build, reason: str, stored: str
) -> None:
    model = build()
    onnx.save_model(model, tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode)
    report = assert_done(tmp_path, before, code, capfd.readouterr().err)
    assert reason in frozen_reasons(report)["c1"]
    written = onnx.load(str(tmp_path / "out.onnx"))
    kept = next(t for t in written.graph.initializer if t.name == stored)
    original = next(t for t in model.graph.initializer if t.name == stored)
    assert kept.data_type == original.data_type and kept.dims == original.dims  # still quantized, 8 rows
    assert sorted(n.op_type for n in written.graph.node) == sorted(n.op_type for n in model.graph.node)
    assert_same_outputs(model, tmp_path / "out.onnx", mode)


# ----------------------------------------------------------------------------------------------
# float16: analysed and rewritten in float32 (or wider), saved in float16, verified at float16's floor


def half_planted(kind: str) -> onnx.ModelProto:
    """planted_conv (c1 rows 5 = 2, then BatchNorm) with float16 weights.

    ``float16``: everything float16; ``keep_io_types``: float32 inputs/outputs with Casts around a
    float16 body; ``stored``: float16 initializers each cast to float32, computed in float32;
    ``stored_in_constants``: the same with the float16 weights in Constant nodes.
    """
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    w1[5], b1[5] = w1[2], b1[2]
    arrays = {
        "w1": w1, "b1": b1, "w2": rng.standard_normal((4, 8, 3, 3)), "b2": rng.standard_normal(4),
        "bn.scale": rng.uniform(0.5, 2, 8), "bn.bias": rng.standard_normal(8),
        "bn.mean": rng.standard_normal(8), "bn.var": rng.uniform(0.5, 2, 8),
    }  # fmt: skip
    bn = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    for name in bn:
        arrays[name][5] = arrays[name][2]  # the BatchNorm keeps the two channels identical
    weights = {name: array.astype(np.float16) for name, array in arrays.items()}
    inner = ["x16", "y16"] if kind == "keep_io_types" else ["x", "y"]
    nodes = [
        helper.make_node("Conv", [inner[0], "w1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", *bn], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], [inner[1]], name="c2", pads=[1, 1, 1, 1]),
    ]
    if kind == "keep_io_types":
        nodes.insert(0, helper.make_node("Cast", ["x"], ["x16"], name="cast_in", to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", ["y16"], ["y"], name="cast_out", to=TensorProto.FLOAT))
    if kind.startswith("stored"):
        weights = {f"{name}.f16": array for name, array in weights.items()}
        node = helper.make_node
        nodes = [
            node("Cast", [f"{n}.f16"], [n], name=f"cast_{n}", to=TensorProto.FLOAT) for n in arrays
        ] + nodes
    if kind == "stored_in_constants":
        constants = [
            helper.make_node(
                "Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array)
            )
            for name, array in weights.items()
        ]
        nodes, weights = [*constants, *nodes], {}
    io_type = TensorProto.FLOAT16 if kind == "float16" else TensorProto.FLOAT
    return _model(nodes, weights, io_type, io_type)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["float16", "keep_io_types", "stored", "stored_in_constants"])
def test_float16_models_are_rewritten_and_saved_in_float16(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str, kind: str
) -> None:
    model = half_planted(kind)
    onnx.save_model(model, tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode)
    report = assert_done(tmp_path, before, code, capfd.readouterr().err)
    assert report["verification"]["rounding_floor"] == pytest.approx(FLOAT16_FLOOR)
    assert out_channels(tmp_path / "out.onnx", "c1") == 7  # the planted duplicate went (BatchNorm folded)
    written = onnx.load(str(tmp_path / "out.onnx"))
    weights = {t.name: t.data_type for t in written.graph.initializer}
    assert set(weights.values()) == {TensorProto.FLOAT16}, weights  # saved in float16, nothing widened
    assert (tmp_path / "out.onnx").stat().st_size < (tmp_path / "in.onnx").stat().st_size + 2048
    if kind.startswith("stored"):  # the weights still reach the convs through Casts to float32
        casts = {n.output[0] for n in written.graph.node if n.op_type == "Cast"}
        assert all(n.input[1] in casts for n in written.graph.node if n.op_type == "Conv")
    assert_same_outputs(model, tmp_path / "out.onnx", mode, floor=FLOAT16_FLOOR)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model with every float initializer, input and output in float16 (no Cast in it)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    onnx.checker.check_model(half, full_check=True)
    return half


def test_float16_digits_cnn_is_merged_within_the_tolerance(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The bundled digits CNN in float16: approximate merging changes it, within 0.02, still float16."""
    model = to_float16(onnx.load(demo_path()))
    onnx.save_model(model, tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, "approximate", "--channel-multiple", "1")
    report = assert_done(tmp_path, before, code, capfd.readouterr().err)
    assert report["macs_after"] < report["macs_before"]
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert {t.data_type for t in written.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(model, tmp_path / "out.onnx", "approximate")


# ----------------------------------------------------------------------------------------------
# weights that cannot change: shared, fed as a graph input, read inside an If or Loop body


def weight_is_a_graph_input(overridable: bool) -> onnx.ModelProto:
    """planted_conv with c2's weight a graph input: fed at run time, or an initializer listed as input."""
    model = planted_conv()
    if overridable:
        return list_initializers_as_inputs(model, ["c2.w"])
    weight = next(t for t in model.graph.initializer if t.name == "c2.w")
    model.graph.input.append(helper.make_tensor_value_info("c2.w", TensorProto.FLOAT, list(weight.dims)))
    model.graph.initializer.remove(weight)
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_reads_conv_output() -> onnx.ModelProto:
    """planted_conv plus a Loop whose body adds c1's output ``h`` (outer scope) twice to its carry."""
    model = planted_conv()
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Add", ["acc_in", "h"], ["acc_out"], name="accumulate"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
        ],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
    model.graph.node.append(helper.make_node("Loop", ["trips", "", "h"], ["z"], name="loop", body=body))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8, 8, 8]))
    onnx.checker.check_model(model, full_check=True)
    return model


def if_body_uses_the_weight() -> onnx.ModelProto:
    """planted_conv plus an If whose branches run their own Conv on x with c1's weight (outer scope)."""
    model = planted_conv()

    def branch(name: str, sign: float) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node(
                    "Conv", ["x", "c1.w"], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1]
                ),
                helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [f"{name}_out"], name=f"{name}_mul"),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 8, 8, 8])],
            [numpy_helper.from_array(np.array(sign, np.float32), f"{name}_s")],
        )

    model.graph.node.append(
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=branch("then", 1.0),
                         else_branch=branch("else", -1.0))
    )  # fmt: skip
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8, 8, 8]))
    onnx.checker.check_model(model, full_check=True)
    return model


KEPT_WEIGHTS = {
    "shared_by_two_convs": (lambda: shared_weight().model, "convA", "is shared by 2 nodes"),
    "graph_input": (
        lambda: weight_is_a_graph_input(False),
        "c1",
        "the weight 'c2.w' of Conv node 'c2' is a graph input (fed at run time)",
    ),
    "overridable": (lambda: weight_is_a_graph_input(True), "c1", "an initializer a caller may override"),
    "loop_body": (loop_reads_conv_output, "c1", "tensor 'h' is read inside an If/Loop/Scan body"),
    "if_body": (if_body_uses_the_weight, "c1", "the weight 'c1.w' of Conv node 'c1' is shared by 3 nodes"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", KEPT_WEIGHTS)
def test_weights_that_cannot_change_are_kept_with_a_reason(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str, case: str
) -> None:
    build, group, reason = KEPT_WEIGHTS[case]
    model = build()
    onnx.save_model(model, tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode)
    report = assert_done(tmp_path, before, code, capfd.readouterr().err)
    assert reason in frozen_reasons(report)[group]
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in written.graph.input] == [i.name for i in model.graph.input]
    for cond in (1.0, 0.0) if case == "if_body" else (None,):
        spec = InputSpec(values={"cond": cond}) if cond is not None else InputSpec()
        assert_same_outputs(model, tmp_path / "out.onnx", mode, spec)


# ----------------------------------------------------------------------------------------------
# dynamic dims, opset 9


def dynamic_dims() -> onnx.ModelProto:
    model = planted_conv()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"]))
    onnx.checker.check_model(model, full_check=True)
    return model


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [[], ["--input-shape", "x:2,3,16,12"]], ids=["default_dims", "input_shape"])
def test_dynamic_batch_and_spatial_dims(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str, shape: list[str]
) -> None:
    model = dynamic_dims()
    onnx.save_model(model, tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode, *shape)
    report = assert_done(tmp_path, before, code, capfd.readouterr().err)
    assert report["input_shapes"]["x"] == ([2, 3, 16, 12] if shape else [1, 3, 1, 1])
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert dims(written.graph.input[0]) == ["N", 3, "H", "W"]
    assert dims(written.graph.output[0]) == ["N", 4, "H", "W"]
    if mode == "exact":
        assert out_channels(tmp_path / "out.onnx", "c1") == 7
    for other in ((3, 3, 5, 9), (1, 3, 8, 8)):  # shapes the run never saw
        assert_same_outputs(model, tmp_path / "out.onnx", mode, InputSpec(shapes={"x": other}))


def unpadded_3x3(spatial: list[int | str]) -> onnx.ModelProto:
    """A 3×3 conv without padding on [N, 3, *spatial]: onnxruntime cannot run it on a 1×1 image."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h_out", "w_out"])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mode", MODES)
def test_a_model_that_fails_at_the_default_dims_is_told_to_give_input_shape(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str
) -> None:
    """Dynamic dims are fed at 1 by default; when onnxruntime then fails, the error says which and how."""
    onnx.save_model(unpadded_3x3(["height", 8]), tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode)
    err = capfd.readouterr().err
    assert_refused(tmp_path, before, code, err, "onnxruntime cannot run the input model")
    assert "its dynamic dims were set to 1 (x [?, 3, ?, 8])" in err
    assert "--input-shape, e.g. x:1,3,<height>,8" in err
    assert_done(tmp_path, before, run_cli(tmp_path, None, mode, "--input-shape", "x:1,3,8,8"), "")


def test_the_shape_hint_is_left_out_where_the_sizes_were_given(tmp_path: Path) -> None:
    broken = unpadded_3x3([2, 2])  # fixed 2×2: fails whatever the user gives
    with pytest.raises(InputError, match=r"cannot run the input model: .*onnxruntime$"):
        compress(broken, exact=True)
    with pytest.raises(InputError, match=r"onnxruntime$"):
        compress(unpadded_3x3(["h", "w"]), exact=True, input_spec=InputSpec(shapes={"x": (1, 3, 2, 2)}))


@pytest.mark.parametrize("mode", MODES)
def test_opset_9_model(tmp_path: Path, capfd: pytest.CaptureFixture[str], mode: str) -> None:
    """IR 4, opset 9 (Split and Clip with attributes, Upsample-era signatures), through the command."""
    from test_opsets import build

    model = build(9)
    model.ir_version = 4
    onnx.save_model(model, tmp_path / "in.onnx")
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, mode)
    assert_done(tmp_path, before, code, capfd.readouterr().err)
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written.opset_import[0].version == 9
    onnx.checker.check_model(written, full_check=True)
    if mode == "exact":
        assert out_channels(tmp_path / "out.onnx", "conv") == 6  # the two planted duplicates went
    assert_same_outputs(model, tmp_path / "out.onnx", mode)


# ----------------------------------------------------------------------------------------------
# models over the protobuf limit: external data (a 3 GB model, and the same route with lowered limits)


def test_approximate_run_over_the_protobuf_limit_exits_2(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget search measures candidates in memory: over the limit (lowered here) it refuses cleanly.

    ``--exact`` takes the by-path route instead (tests/test_large_models.py, and the 3 GB test below).
    """
    monkeypatch.setattr(sessions, "MAX_PROTO_BYTES", 10_000)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    model_io.save_model(onnx.load(demo_path()), tmp_path / "in.onnx")
    assert (tmp_path / "in.onnx.data").is_file()
    before = listing(tmp_path)
    code = run_cli(tmp_path, None, "approximate")
    assert_refused(tmp_path, before, code, capfd.readouterr().err, "--exact")


BIG_ROWS, BIG_HEADS, BIG_WIDTH = 786_432, 4, 256  # four [786432, 256] float32 heads: 3.2 GB
#: Measured peak RSS of the command on the 3 GB model: 15.6 GB exact, 19.1 GB approximate (before it refuses).
BIG_NEEDS_MEMORY = {"exact": 17 * 2**30, "approximate": 20 * 2**30}
BIG_NEEDS_DISK = 14 * 2**30  # input, output and the verification's scratch copy: 3.2 GB each


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> onnx.TensorProto:
    tensor = TensorProto(
        name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL
    )
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def write_big_model(folder: Path) -> Path:
    """x[1,64,1,1] → conv0 (64 → 256, row 1 = row 0) → Relu → four 1×1 conv heads [786432, 256] → y0..y3.

    The heads' weights (one random block four times) go straight to ``big.onnx.data``, never into a
    proto; each head reduces over only 256 channels, so float32 rounding stays far inside the exact
    rule. The exact run merges conv0's duplicate row into all four heads.
    """
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((BIG_WIDTH, 64, 1, 1)) / 8).astype(np.float32)
    w0[1] = w0[0]
    block = (rng.standard_normal((BIG_ROWS, BIG_WIDTH), dtype=np.float32) / np.float32(16)).tobytes()
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h"], name="conv0"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
    ]
    initializers, outputs = [numpy_helper.from_array(w0, "w0")], []
    with (folder / "big.onnx.data").open("wb") as data:
        for head in range(BIG_HEADS):
            data.write(block)
            where = ("big.onnx.data", head * len(block), len(block))
            initializers.append(_external(f"w{head + 1}", [BIG_ROWS, BIG_WIDTH, 1, 1], *where))
            nodes.append(helper.make_node("Conv", ["r", f"w{head + 1}"], [f"y{head}"], name=f"head{head}"))
            outputs.append(helper.make_tensor_value_info(f"y{head}", TensorProto.FLOAT, [1, BIG_ROWS, 1, 1]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 1, 1])
    graph = helper.make_graph(nodes, "big", [x], outputs, initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=OPSET, ir_version=8), folder / "big.onnx")
    return folder / "big.onnx"


def fingerprint(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Size, mtime and SHA-256 of every file in ``folder``."""
    prints = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(2**24):
                digest.update(chunk)
        prints[path.name] = (path.stat().st_size, path.stat().st_mtime_ns, digest.hexdigest())
    return prints


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The 3.2 GB model in its own folder, deleted after the module (pytest keeps old temp folders)."""
    folder = tmp_path_factory.mktemp("big")
    if shutil.disk_usage(folder).free < BIG_NEEDS_DISK:
        pytest.skip(f"needs {BIG_NEEDS_DISK / 2**30:.0f} GB of free disk in {folder}")
    try:
        yield write_big_model(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_console_script(args: list[str], cwd: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    """``red-onnx`` in its own process (its memory is its own), temporary files in ``scratch``."""
    found = shutil.which("red-onnx")
    command = [found] if found else [sys.executable, "-m", "red_onnx.cli"]
    env = {**os.environ, "TMPDIR": str(scratch)}
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800, check=False
    )


@pytest.mark.slow
@pytest.mark.huge
@pytest.mark.parametrize("mode", ["approximate", "exact"])  # the refusal first: it needs the most memory
def test_3gb_model_with_external_data(big_model: Path, scratch: Path, mode: str) -> None:
    """Exact: written with external data, outputs unchanged. Approximate: exit 2, one line."""
    if _available_memory() < BIG_NEEDS_MEMORY[mode]:
        pytest.skip(f"needs {BIG_NEEDS_MEMORY[mode] / 2**30:.0f} GB of available memory for {mode} mode")
    folder = big_model.parent
    before = fingerprint(folder)
    try:
        args = [big_model.name, "out.onnx", *MODES[mode], "-q", "--json", "r.json"]
        done = run_console_script(args, folder, scratch)
        after = fingerprint(folder)
        assert {name: after.get(name) for name in before} == before
        assert "Traceback" not in done.stderr
        if mode == "approximate":
            assert done.returncode == 2, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and "use --exact" in done.stderr
            assert after == before
            return
        assert done.returncode == 0, done.stderr
        assert set(after) - set(before) == {"out.onnx", "out.onnx.data", "r.json"}
        report = json.loads((folder / "r.json").read_text())
        assert report["verification"]["passed"] is True
        assert {layer["name"]: layer["channels_after"] for layer in report["layers"]}[
            "conv0"
        ] == BIG_WIDTH - 1
        assert_same_outputs(big_model, folder / "out.onnx", "exact")
    finally:
        for name in ("out.onnx", "out.onnx.data", "r.json"):
            (folder / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# what is written


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("external", [False, True])
def test_written_files_get_the_mode_of_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    """The output is written through temporary files (mode 0600); it ends with the umask's mode."""
    if external:
        monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)
    onnx.save_model(planted_conv(), tmp_path / "in.onnx")
    old = os.umask(0o027)
    try:
        assert cli.main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "-q"]) == 0
    finally:
        os.umask(old)
    written = ["out.onnx", "out.onnx.data"] if external else ["out.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == written
    for name in written:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
