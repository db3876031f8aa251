"""Small ONNX graphs with planted redundancy, shared by the tests.

Every builder returns a :class:`BuiltGraph`: the model, the exact number of output channels the
``--exact`` mode must remove per producer node name (names left out: 0), and the planted facts
(``planted``) that :func:`check_planted` verifies with onnxruntime alone, so the graphs can be
trusted before the engine exists.

Conventions: opset 17, IR 8, float32, NCHW, node names unique and explicit, weights drawn from
``np.random.default_rng(seed)`` (He-normal), every constant an initializer named ``<node>.<role>``.
Planted scale factors are powers of two so that ``λ·row`` is exact in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
LEAKY_ALPHA = 0.1
#: Activations that are positively homogeneous (scaled merges pass them).
HOMOGENEOUS_ACTS = frozenset({"Relu", "LeakyRelu", "Identity", "None"})
#: Activations the scaled_act builder covers.
SCALED_ACTS = ("Relu", "LeakyRelu", "Identity", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "SiLU")


@dataclasses.dataclass(frozen=True)
class Plant:
    """A planted fact about an intermediate tensor, checked with onnxruntime.

    Attributes:
        kind: ``identical`` (channel == ref), ``scaled`` (channel == scale·ref), ``not_scaled``
            (channel != scale·ref), ``distinct`` (channel != ref), ``constant`` (channel == value
            everywhere), ``unused`` (perturbing ``producer``'s row ``channel`` leaves every graph
            output unchanged), ``used`` (it changes them).
        tensor: Intermediate tensor to inspect (empty for unused/used).
        channel: The planted channel j.
        ref: The reference channel i (-1 when not applicable).
        scale: λ for scaled/not_scaled.
        value: The constant for ``constant``.
        axis: Channel axis of ``tensor``.
        producer: Producer node whose output row is perturbed (unused/used).
    """

    kind: str
    tensor: str = ""
    channel: int = 0
    ref: int = -1
    scale: float = 1.0
    value: float = 0.0
    axis: int = 1
    producer: str = ""


@dataclasses.dataclass
class BuiltGraph:
    """A test graph and what ``compress(exact=True)`` must do to it.

    Attributes:
        model: The ONNX model.
        expected_removed: Output channels to remove per producer node name (absent: 0).
        planted: Facts about the planted redundancy, for :func:`check_planted`.
        description: One line saying what the graph exercises.
    """

    model: onnx.ModelProto
    expected_removed: dict[str, int]
    planted: tuple[Plant, ...] = ()
    description: str = ""


# ----------------------------------------------------------------------------------------------
# onnxruntime helpers (shared by the tests)


def _session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes of the real graph inputs (initializers listed as inputs excluded; free dims: 1)."""
    inits = {i.name for i in model.graph.initializer}
    return {
        vi.name: [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        for vi in model.graph.input
        if vi.name not in inits
    }


def random_feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 feeds for every real graph input."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in input_shapes(model).items()
    }


def run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False
) -> dict[str, np.ndarray]:
    """Run ``model`` in onnxruntime (CPU) and return every graph output by name."""
    sess = _session(model, optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def assert_outputs_close(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float = 1e-5, atol_frac: float = 1e-6
) -> None:
    """Assert every output of ``got`` matches ``ref`` (atol = atol_frac · max|ref|)."""
    assert set(ref) == set(got), f"outputs differ: {sorted(ref)} vs {sorted(got)}"
    for name, y in ref.items():
        assert got[name].shape == y.shape, f"{name}: shape {got[name].shape} != {y.shape}"
        atol = atol_frac * float(np.max(np.abs(y))) if y.size else 0.0
        np.testing.assert_allclose(got[name], y, rtol=rtol, atol=atol, err_msg=name)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` that also exposes the intermediate tensors ``names`` as graph outputs.

    Their types come from shape inference where it knows them (IR 3 needs a shape on outputs).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    todo = [n for n in dict.fromkeys(names) if n not in have]
    if not todo:
        return out
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for name in todo:
        vi = inferred.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        out.graph.output.append(vi)
    return out


# ----------------------------------------------------------------------------------------------
# Producer layout (docs/method.md, "Where the channels are")


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def producer_weight(node: onnx.NodeProto) -> tuple[str, int] | None:
    """(weight tensor name, output-channel axis) of a producer node, or None if not a producer."""
    if node.op_type == "Conv":
        return node.input[1], 0
    if node.op_type == "ConvTranspose":
        return node.input[1], 1
    if node.op_type == "Gemm":
        return node.input[1], 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return node.input[1], -1
    return None


def producer_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channel count of every named producer whose weight is an initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        layout = producer_weight(node)
        if layout is None or layout[0] not in inits or not node.name:
            continue
        dims = list(inits[layout[0]].dims)
        n = dims[layout[1]]
        if node.op_type == "ConvTranspose":
            n *= int(_attr(node, "group", 1))
        counts[node.name] = int(n)
    return counts


# ----------------------------------------------------------------------------------------------
# Graph construction


def _rows(arr: np.ndarray, axis: int) -> np.ndarray:
    """View of ``arr`` with the channel axis first (writes go through)."""
    return np.moveaxis(arr, axis, 0)


class Net:
    """Accumulates nodes and named weight arrays; arrays stay editable until :meth:`build`."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        #: producer name -> (weight name, out axis, bias name or "", bias axis)
        self.layout: dict[str, tuple[str, int, str, int]] = {}
        #: producer name -> factor applied to its bias (Gemm beta)
        self.bias_factor: dict[str, float] = {}

    def input(self, name: str, shape: Sequence[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def const(self, name: str, value: np.ndarray | Sequence[float] | float, dtype: type = np.float32) -> str:
        self.arrays[name] = np.array(value, dtype=dtype)
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: object) -> str:
        out = f"{name}_y"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def he(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        return np.asarray(self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), np.float32)

    def small(self, shape: Sequence[int], std: float = 0.1) -> np.ndarray:
        return np.asarray(self.rng.standard_normal(shape) * std, np.float32)

    def uniform(self, shape: Sequence[int], lo: float, hi: float) -> np.ndarray:
        return np.asarray(self.rng.uniform(lo, hi, shape), np.float32)

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        pad: int | None = None,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
        weight: str = "",
    ) -> str:
        """Conv; ``pad`` defaults to k // 2; ``weight`` reuses an existing W (and B) pair."""
        pad = k // 2 if pad is None else pad
        w_name = weight or f"{name}.W"
        b_name = w_name[:-2] + ".B" if bias else ""
        if not weight:
            self.arrays[w_name] = self.he([cout, cin // group, k, k], cin // group * k * k)
            if bias:
                self.arrays[b_name] = self.small([cout])
        self.layout[name] = (w_name, 0, b_name, 0)
        inputs = [x, w_name] + ([b_name] if bias else [])
        return self.op(
            "Conv", inputs, name, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride], group=group
        )

    def conv_t(self, name: str, x: str, cin: int, cout: int, k: int = 3, stride: int = 2) -> str:
        """ConvTranspose (group 1, pads 1, output_padding stride-1): W is [cin, cout, k, k]."""
        self.arrays[f"{name}.W"] = self.he([cin, cout, k, k], cin * k * k)
        self.arrays[f"{name}.B"] = self.small([cout])
        self.layout[name] = (f"{name}.W", 1, f"{name}.B", 0)
        return self.op(
            "ConvTranspose",
            [x, f"{name}.W", f"{name}.B"],
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[1] * 4,
            output_padding=[stride - 1] * 2,
        )

    def gemm(
        self,
        name: str,
        x: str,
        k: int,
        n: int,
        trans_b: int = 1,
        alpha: float = 1.0,
        beta: float = 1.0,
        c_shape: Sequence[int] | None = None,
    ) -> str:
        """Gemm; ``c_shape`` defaults to [n]; () makes C a scalar."""
        c_shape = [n] if c_shape is None else list(c_shape)
        self.arrays[f"{name}.W"] = self.he([n, k] if trans_b else [k, n], k)
        self.arrays[f"{name}.C"] = self.small(c_shape)
        bias = f"{name}.C" if c_shape and c_shape[-1] == n else ""
        self.layout[name] = (f"{name}.W", 0 if trans_b else 1, bias, len(c_shape) - 1)
        self.bias_factor[name] = beta
        return self.op("Gemm", [x, f"{name}.W", f"{name}.C"], name, transB=trans_b, alpha=alpha, beta=beta)

    def matmul(self, name: str, x: str, k: int, n: int, bias_first: bool = False) -> str:
        """MatMul with a [k, n] weight followed by an Add of a [n] bias (node ``<name>_bias``)."""
        self.arrays[f"{name}.W"] = self.he([k, n], k)
        self.arrays[f"{name}.B"] = self.small([n])
        self.layout[name] = (f"{name}.W", 1, f"{name}.B", 0)
        y = self.op("MatMul", [x, f"{name}.W"], name)
        ins = [f"{name}.B", y] if bias_first else [y, f"{name}.B"]
        return self.op("Add", ins, f"{name}_bias")

    def bn(self, name: str, x: str, c: int) -> str:
        for role, arr in (
            ("scale", self.uniform([c], 0.5, 1.5)),
            ("bias", self.small([c])),
            ("mean", self.small([c])),
            ("var", self.uniform([c], 0.5, 1.5)),
        ):
            self.arrays[f"{name}.{role}"] = arr
        return self.op(
            "BatchNormalization", [x] + [f"{name}.{r}" for r in ("scale", "bias", "mean", "var")], name
        )

    def act(self, kind: str, x: str, name: str) -> str:
        """Apply an activation by name (``None`` returns x unchanged)."""
        if kind == "None":
            return x
        if kind == "LeakyRelu":
            return self.op("LeakyRelu", [x], name, alpha=LEAKY_ALPHA)
        if kind == "Clip":
            lo, hi = self.const(f"{name}.min", 0.0), self.const(f"{name}.max", 1.0)
            return self.op("Clip", [x, lo, hi], name)
        if kind == "SiLU":
            s = self.op("Sigmoid", [x], f"{name}_sigmoid")
            return self.op("Mul", [x, s], name)
        return self.op(kind, [x], name)

    def w(self, node: str) -> np.ndarray:
        return self.arrays[self.layout[node][0]]

    def plant(self, node: str, j: int, i: int, scale: float = 1.0, bias: bool = True) -> None:
        """Make producer ``node``'s output row j equal ``scale`` times row i (weights and bias).

        Row i is first made non-negative and its bias raised to at least 0.5, so that channel i
        stays alive after a Relu on the test inputs (post-Relu inputs give a positive output),
        which keeps the planted fact observable.
        """
        w_name, axis, b_name, b_axis = self.layout[node]
        rows = _rows(self.arrays[w_name], axis)
        rows[i] = np.abs(rows[i])
        rows[j] = np.float32(scale) * rows[i]
        if b_name and bias:
            brow = _rows(self.arrays[b_name], b_axis)
            brow[i] = np.maximum(np.abs(brow[i]), np.float32(0.5))
            brow[j] = np.float32(scale) * brow[i]

    def zero_row(self, node: str, j: int, bias: float) -> None:
        """Make producer ``node``'s output j the constant ``bias`` (zero row; C = bias/beta)."""
        w_name, axis, b_name, b_axis = self.layout[node]
        _rows(self.arrays[w_name], axis)[j] = 0.0
        _rows(self.arrays[b_name], b_axis)[j] = np.float32(bias) / self.bias_factor.get(node, 1.0)

    def zero_input(self, node: str, j: int) -> None:
        """Zero consumer ``node``'s slice for input channel j (Conv group 1, Gemm, MatMul)."""
        w_name, axis, _, _ = self.layout[node]
        arr = self.arrays[w_name]
        in_axis = 1 if arr.ndim == 4 else (1 - axis) % 2
        _rows(arr, in_axis)[j] = 0.0

    def build(self, outputs: Sequence[str]) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(a, name) for name, a in self.arrays.items()]
        graph = helper.make_graph(
            self.nodes,
            "g",
            self.inputs,
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="red_onnx-tests",
        )
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.value_info[:]
        onnx.checker.check_model(model, full_check=True)
        return model


# ----------------------------------------------------------------------------------------------
# Plant shorthands


def _ident(t: str, j: int, i: int, axis: int = 1) -> Plant:
    return Plant("identical", t, j, i, axis=axis)


def _scaled(t: str, j: int, i: int, s: float, axis: int = 1) -> Plant:
    return Plant("scaled", t, j, i, s, axis=axis)


def _not_scaled(t: str, j: int, i: int, s: float, axis: int = 1) -> Plant:
    return Plant("not_scaled", t, j, i, s, axis=axis)


def _distinct(t: str, j: int, i: int, axis: int = 1) -> Plant:
    return Plant("distinct", t, j, i, axis=axis)


def _const(t: str, j: int, value: float) -> Plant:
    return Plant("constant", t, j, value=value)


# ----------------------------------------------------------------------------------------------
# Builders: chains, activations, paths


def conv_chain_identical(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    y = net.conv("conv2", h, 8, 6)
    for j, i in ((5, 1), (6, 1), (7, 3)):
        net.plant("conv1", j, i)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 3},
        (_ident(h, 5, 1), _ident(h, 6, 1), _ident(h, 7, 3)),
        "conv-relu-conv; conv1 rows 5, 6 = row 1 (a set of 3) and 7 = row 3",
    )


def scaled_relu_pool(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    p = net.op("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    y = net.conv("conv2", p, 8, 6)
    net.plant("conv1", 4, 0, 2.0)
    net.plant("conv1", 6, 2, 0.5)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2},
        (_scaled(p, 4, 0, 2.0), _scaled(p, 6, 2, 0.5)),
        "conv-relu-maxpool-conv; conv1 row 4 = 2·row 0, row 6 = 0.5·row 2",
    )


def scaled_act(act: str, seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act(act, net.conv("conv1", x, 4, 8), "act1")
    y = net.conv("conv2", h, 8, 6)
    net.plant("conv1", 4, 0, 2.0)
    net.plant("conv1", 5, 1)
    homog = act in HOMOGENEOUS_ACTS
    check = _scaled(h, 4, 0, 2.0) if homog else _not_scaled(h, 4, 0, 2.0)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2 if homog else 1},
        (_ident(h, 5, 1), check),
        f"conv-{act}-conv; row 5 = row 1 (removed), row 4 = 2·row 0 "
        f"({'removed' if homog else 'kept: not homogeneous'})",
    )


def scaled_path(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    pads = net.const("pad.pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    p = net.op("Pad", [h, pads], "pad", mode="constant")
    a = net.op("AveragePool", [p], "avgpool", kernel_shape=[3, 3])
    d = net.op("Dropout", [a], "dropout")
    lk = net.act("LeakyRelu", d, "leaky")
    m = net.op("MaxPool", [lk], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    h2 = net.act("Relu", net.conv("conv2", m, 8, 8, k=1), "relu2")
    g = net.op("GlobalAveragePool", [h2], "gap")
    f = net.op("Flatten", [g], "flatten")
    y = net.gemm("fc", f, 8, 5)
    net.plant("conv1", 3, 1, 2.0)
    net.plant("conv1", 7, 5, 0.5)
    net.plant("conv1", 6, 0)
    net.plant("conv2", 6, 2, 2.0)
    planted = (_scaled(m, 3, 1, 2.0), _scaled(m, 7, 5, 0.5), _ident(m, 6, 0), _scaled(f, 6, 2, 2.0))
    return BuiltGraph(
        net.build([y]),
        {"conv1": 3, "conv2": 1},
        planted,
        "scaled rows through Relu, zero Pad, AveragePool, Dropout, LeakyRelu, "
        "MaxPool; and through Relu, GlobalAveragePool, Flatten into a Gemm",
    )


def prelu_mul_add(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    c = net.conv("conv1", x, 4, 8)
    mul_c = net.const("mul.c", net.uniform([1, 8, 1, 1], 0.5, 1.5))
    add_d = net.const("add.d", net.small([1, 8, 1, 1]))
    slope = net.const("prelu.slope", net.uniform([8, 1, 1], 0.05, 0.3))
    m = net.op("Mul", [c, mul_c], "mul")
    a = net.op("Add", [m, add_d], "add")
    h = net.op("PRelu", [a, slope], "prelu")
    y = net.conv("conv2", h, 8, 6)
    cv, dv, sv = (net.arrays[k].reshape(-1) for k in ("mul.c", "add.d", "prelu.slope"))
    for j, i in ((5, 1), (6, 2), (7, 3)):
        net.plant("conv1", j, i)
        cv[j], dv[j], sv[j] = cv[i], dv[i], sv[i]
    sv[6] += 0.2
    dv[7] += 0.3
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1},
        (_ident(h, 5, 1), _distinct(h, 6, 2), _distinct(h, 7, 3)),
        "conv-Mul-Add-PRelu-conv; rows 5=1 with equal per-channel params (removed); "
        "6=2 with another slope, 7=3 with another Add constant (kept)",
    )


def batchnorm_after(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    n = net.bn("bn1", net.conv("conv1", x, 4, 8), 8)
    h = net.act("Relu", n, "relu1")
    y = net.conv("conv2", h, 8, 6)
    p = {r: net.arrays[f"bn1.{r}"] for r in ("scale", "bias", "mean", "var")}
    for j, i, s in ((5, 1, 1.0), (6, 2, 1.0), (7, 3, 2.0)):
        net.plant("conv1", j, i, s)
        for r, arr in p.items():
            arr[j] = arr[i] * (s if r in ("mean", "bias") else 1.0)
    p["scale"][6] *= 1.5
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2},
        (_ident(h, 5, 1), _distinct(h, 6, 2), _scaled(h, 7, 3, 2.0)),
        "conv-BN-relu-conv; row 5=1 with equal BN params (removed), 6=2 with another "
        "BN scale (kept), 7=2·row 3 with BN mean/bias doubled (scaled after folding)",
    )


# ----------------------------------------------------------------------------------------------
# Builders: coupled groups


def residual_identity(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    r0 = net.act("Relu", net.conv("conv0", x, 4, 6), "relu0")
    a = net.act("Relu", net.conv("convA", r0, 6, 8), "reluA")
    s = net.op("Add", [r0, net.conv("convB", a, 8, 6)], "add")
    r = net.act("Relu", s, "relu_add")
    y = net.conv("conv_out", r, 6, 5)
    for node in ("conv0", "convB"):
        net.plant(node, 4, 1)
        net.plant(node, 5, 2, 2.0)
    net.plant("convA", 7, 3)
    planted = (_ident(r, 4, 1), _scaled(r, 5, 2, 2.0), _ident(r0, 4, 1), _ident(a, 7, 3))
    return BuiltGraph(
        net.build([y]),
        {"conv0": 2, "convB": 2, "convA": 1},
        planted,
        "identity residual Add(relu(conv0), convB(...)); rows 4=1 and 5=2·row 2 in "
        "both producers; convA row 7=3",
    )


def residual_projection(both: bool, seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    r0 = net.act("Relu", net.conv("conv0", x, 4, 6), "relu0")
    p = net.conv("convP", r0, 6, 8, k=1)
    a = net.act("Relu", net.conv("convA", r0, 6, 8), "reluA")
    s = net.op("Add", [p, net.conv("convB", a, 8, 8)], "add")
    r = net.act("Relu", s, "relu_add")
    y = net.conv("conv_out", r, 8, 5)
    for node in ("convP", "convB") if both else ("convB",):
        net.plant(node, 5, 1)
        net.plant(node, 6, 2, 2.0)
    if both:
        planted = (_ident(r, 5, 1), _scaled(r, 6, 2, 2.0))
        expected = {"convP": 2, "convB": 2}
    else:
        planted = (_distinct(r, 5, 1), _not_scaled(r, 6, 2, 2.0))
        expected = {}
    return BuiltGraph(
        net.build([y]),
        expected,
        planted,
        "projection residual Add(convP, convB); rows 5=1 and 6=2·row 2 planted in "
        + ("both producers (removed)" if both else "convB only (kept)"),
    )


def residual_graph_input(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 8, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 8, 8), "relu1")
    s = net.op("Add", [x, net.conv("conv2", h, 8, 8)], "add")
    y = net.conv("conv3", net.act("Relu", s, "relu_add"), 8, 5)
    net.plant("conv2", 5, 1)
    net.plant("conv1", 3, 0)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1},
        (_ident(h, 3, 0),),
        "residual Add with the graph input (conv2's group frozen); conv1 row 3=0",
    )


def se_gate(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    r1 = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    g0 = net.op("GlobalAveragePool", [r1], "gap")
    s1 = net.act("Relu", net.conv("se1", g0, 8, 4, k=1), "relu_se")
    g = net.act("Sigmoid", net.conv("se2", s1, 4, 8, k=1), "sigmoid_se")
    m = net.op("Mul", [r1, g], "gate")
    y = net.conv("conv2", m, 8, 6)
    net.plant("conv1", 5, 1)
    net.plant("se2", 5, 1)
    net.plant("se1", 3, 0)
    net.plant("conv1", 6, 2)
    net.plant("se2", 6, 2, -1.0)  # gate 6 = 1 - gate 2: visibly different from gate 2
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1, "se2": 1, "se1": 1},
        (_ident(m, 5, 1), _ident(s1, 3, 0), _distinct(m, 6, 2)),
        "SE gate x·sigmoid(se2(relu(se1(gap(x))))); conv1 and se2 rows 5=1 "
        "(removed), conv1 row 6=2 with another gate (kept), se1 row 3=0",
    )


def concat_conv(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    a = net.act("Relu", net.conv("convA", x, 4, 4), "reluA")
    b = net.act("Relu", net.conv("convB", x, 4, 6), "reluB")
    c = net.op("Concat", [a, b], "cat", axis=1)
    p = net.op("MaxPool", [c], "pool", kernel_shape=[2, 2], strides=[2, 2])
    y = net.conv("conv_out", p, 10, 5)
    net.plant("convA", 3, 0)
    net.plant("convB", 4, 1)
    net.plant("convB", 5, 2, 2.0)
    return BuiltGraph(
        net.build([y]),
        {"convA": 1, "convB": 2},
        (_ident(c, 3, 0), _ident(c, 8, 5), _scaled(c, 9, 6, 2.0)),
        "Concat(convA, convB)-maxpool-conv; convA row 3=0, convB rows 4=1, 5=2·row 2",
    )


def split_consumers(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    sizes = net.const("split.sizes", [4, 4], np.int64)
    net.nodes.append(helper.make_node("Split", [h, sizes], ["split_y0", "split_y1"], name="split", axis=1))
    p = net.conv("convP", "split_y0", 4, 5)
    q = net.conv("convQ", "split_y1", 4, 5, k=1)
    y = net.op("Add", [p, q], "add")
    net.plant("conv1", 1, 0)
    net.plant("conv1", 6, 5, 2.0)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2},
        (_ident(h, 1, 0), _scaled(h, 6, 5, 2.0)),
        "Split of conv1's output into two consumers; row 1=0 (first half), row 6=2·row 5 (second half)",
    )


def depthwise_m1(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    d = net.act("Relu", net.conv("dw", h, 8, 8, group=8), "relu_dw")
    y = net.conv("conv2", d, 8, 6, k=1)
    net.plant("conv1", 5, 1)
    net.plant("dw", 5, 1)
    net.plant("conv1", 7, 3)
    net.arrays["dw.W"][3] = np.abs(net.arrays["dw.W"][3])  # channel 3 alive after relu_dw
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1, "dw": 1},
        (_ident(d, 5, 1), _ident(h, 7, 3), _distinct(d, 7, 3)),
        "depthwise (multiplier 1) in the chain; conv1+dw row 5=1 (removed), conv1 "
        "row 7=3 with another dw kernel (kept)",
    )


def depthwise_zero_kernel(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    d = net.act("Relu", net.conv("dw", h, 8, 8, group=8), "relu_dw")
    y = net.conv("conv2", d, 8, 6, k=1)
    net.zero_row("dw", 6, 0.0)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1, "dw": 1},
        (_const(d, 6, 0.0), Plant("unused", producer="conv1", channel=6)),
        "depthwise kernel 6 and bias 6 zero: channel 6 is zero after dw, unused from conv1",
    )


def depthwise_m2(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 4), "relu1")
    d = net.act("Relu", net.conv("dw2", h, 4, 8, group=4), "relu_dw")
    y = net.conv("conv2", d, 8, 6, k=1)
    net.plant("conv1", 3, 1)
    return BuiltGraph(
        net.build([y]),
        {},
        (_ident(h, 3, 1),),
        "depthwise multiplier 2 consumer freezes conv1's group (row 3=1 kept)",
    )


def grouped_consumer(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    y = net.conv("gconv", h, 8, 6, group=2)
    net.plant("conv1", 1, 0)
    return BuiltGraph(
        net.build([y]),
        {},
        (_ident(h, 1, 0),),
        "grouped (g=2, not depthwise) consumer freezes conv1's group (row 1=0 kept)",
    )


# ----------------------------------------------------------------------------------------------
# Builders: heads, fully connected layers, other producers


def flatten_gemm(reshape: bool = False, seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [2, 4, 6, 6])
    h = net.act("Relu", net.conv("conv1", x, 4, 6, stride=2), "relu1")  # [2, 6, 3, 3]
    if reshape:
        f = net.op("Reshape", [h, net.const("reshape.shape", [2, 54], np.int64)], "reshape")
    else:
        f = net.op("Flatten", [h], "flatten")
    g = net.act("Relu", net.gemm("fc1", f, 54, 12), "relu_fc")
    y = net.gemm("fc2", g, 12, 5)
    net.plant("conv1", 4, 1)
    net.plant("conv1", 5, 2, 2.0)
    net.plant("fc1", 7, 3)
    op = "Reshape [2, 54]" if reshape else "Flatten"
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2, "fc1": 1},
        (_ident(h, 4, 1), _scaled(h, 5, 2, 2.0), _ident(g, 7, 3)),
        f"conv-relu-{op}-Gemm-relu-Gemm; conv1 rows 4=1, 5=2·row 2 (feature blocks of 9), fc1 row 7=3",
    )


def reshape_not_flatten(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 6), "relu1")
    r = net.op("Reshape", [h, net.const("reshape.shape", [1, 3, 16, 8], np.int64)], "reshape")
    y = net.conv("conv2", r, 3, 5)
    net.plant("conv1", 1, 0)
    return BuiltGraph(
        net.build([y]),
        {},
        (_ident(h, 1, 0),),
        "Reshape [1,6,8,8]->[1,3,16,8] mixes channels into rows: freezes (row 1=0)",
    )


def nhwc_matmul(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 6), "relu1")
    t = net.op("Transpose", [h], "nhwc", perm=[0, 2, 3, 1])
    m = net.act("Relu", net.matmul("mm1", t, 6, 8), "relu_mm")
    y = net.matmul("mm2", m, 8, 5)
    net.plant("conv1", 4, 1)
    net.plant("mm1", 6, 2)
    net.plant("mm1", 7, 3, 2.0)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1, "mm1": 2},
        (_ident(h, 4, 1), _ident(m, 6, 2, -1), _scaled(m, 7, 3, 2.0, -1)),
        "conv-relu-Transpose(0,2,3,1)-MatMul[6,8]+Add-relu-MatMul; conv1 row 4=1, mm1 columns 6=2, 7=2·col 3",
    )


#: C shapes of :func:`gemm_mlp`: per-channel [N], [1, N], scalar, full [M, N].
GEMM_C_SHAPES = {"N": None, "1N": (1, 12), "scalar": (), "MN": (8, 12)}


def gemm_mlp(trans_b: int, c: str, seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [8, 10])
    fc1 = net.gemm("fc1", x, 10, 12, trans_b, alpha=0.5, beta=2.0, c_shape=GEMM_C_SHAPES[c])
    h1 = net.act("Relu", fc1, "relu1")
    h2 = net.act("Relu", net.gemm("fc2", h1, 12, 8, 1 - trans_b, alpha=1.5, beta=0.5), "relu2")
    y = net.gemm("fc3", h2, 8, 4)
    if c == "scalar":  # keep the reference channels alive after the relu
        net.arrays["fc1.C"][...] = 0.5
    elif c == "MN":
        net.arrays["fc1.C"][:, [3, 5]] += 1.0
    net.plant("fc1", 7, 3, bias=c != "MN")
    net.plant("fc1", 9, 5, 2.0, bias=c != "MN")
    net.plant("fc2", 6, 1)
    if c in ("N", "1N"):
        planted, n1 = (_ident(h1, 7, 3), _scaled(h1, 9, 5, 2.0)), 2
    elif c == "scalar":  # beta·C is the same for every channel: cannot scale with the row
        planted, n1 = (_ident(h1, 7, 3), _not_scaled(h1, 9, 5, 2.0)), 1
    else:  # C [M, N] is not a per-channel bias: columns of C stay different
        planted, n1 = (_distinct(h1, 7, 3), _not_scaled(h1, 9, 5, 2.0)), 0
    expected = {"fc1": n1, "fc2": 1} if n1 else {"fc2": 1}
    return BuiltGraph(
        net.build([y]),
        expected,
        (*planted, _ident(h2, 6, 1)),
        f"Gemm MLP, fc1 transB={trans_b} alpha .5 beta 2 C {c}, fc2 transB="
        f"{1 - trans_b}; fc1 channels 7=3, 9=2·ch 5; fc2 row 6=1",
    )


def matmul_add(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [2, 3, 10])
    h = net.act("Relu", net.matmul("mm1", x, 10, 8, bias_first=True), "relu1")
    y = net.matmul("mm2", h, 8, 4)
    net.plant("mm1", 6, 2)
    net.plant("mm1", 7, 1, 0.5)
    return BuiltGraph(
        net.build([y]),
        {"mm1": 2},
        (_ident(h, 6, 2, -1), _scaled(h, 7, 1, 0.5, -1)),
        "batched MatMul[10,8] + Add(bias, ·) -> relu -> MatMul; columns 6=2, 7=0.5·col 1",
    )


def conv_transpose(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 6, 6])
    h0 = net.act("Relu", net.conv("conv0", x, 4, 4), "relu0")
    t = net.act("Relu", net.conv_t("convT", h0, 4, 8), "relu_t")  # [1, 8, 12, 12]
    y = net.conv("conv2", t, 8, 5)
    net.plant("conv0", 3, 0)
    net.plant("convT", 5, 1)
    net.plant("convT", 7, 3, 2.0)
    return BuiltGraph(
        net.build([y]),
        {"conv0": 1, "convT": 2},
        (_ident(h0, 3, 0), _ident(t, 5, 1), _scaled(t, 7, 3, 2.0)),
        "conv-relu-ConvTranspose(W[4,8,3,3], stride 2)-relu-conv; conv0 row 3=0 "
        "(consumer rows W[o]), convT W[:,5]=W[:,1], W[:,7]=2·W[:,3]",
    )


# ----------------------------------------------------------------------------------------------
# Builders: freezing, constants, unused channels


def shared_weight(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    a = net.act("Relu", net.conv("convA", h, 8, 8), "reluA")
    b = net.act("Relu", net.conv("convB", a, 8, 8, weight="convA.W"), "reluB")
    y = net.conv("conv_out", b, 8, 5)
    net.plant("convA", 5, 1)
    return BuiltGraph(
        net.build([y]),
        {},
        (_ident(a, 5, 1), _ident(b, 5, 1)),
        "convA and convB share one W/B initializer with rows 5=1: both frozen",
    )


def output_in_middle(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h1 = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    h2 = net.act("Relu", net.conv("conv2", h1, 8, 8), "relu2")
    y = net.conv("conv3", h2, 8, 5)
    net.plant("conv1", 5, 1)
    net.plant("conv2", 6, 2)
    return BuiltGraph(
        net.build([h1, y]),
        {"conv2": 1},
        (_ident(h1, 5, 1), _ident(h2, 6, 2)),
        "relu1 is also a graph output: conv1 (row 5=1) frozen; conv2 row 6=2 removed",
    )


def softmax_channels(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.op("Softmax", [net.conv("conv1", x, 4, 8)], "softmax", axis=1)
    y = net.conv("conv2", h, 8, 5)
    net.plant("conv1", 1, 0)
    return BuiltGraph(
        net.build([y]), {}, (_ident(h, 1, 0),), "Softmax over channels freezes conv1's group (row 1=0 kept)"
    )


def lrn_consumer(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    n = net.op("LRN", [h], "lrn", size=3)
    y = net.conv("conv2", n, 8, 5)
    net.plant("conv1", 1, 0)
    return BuiltGraph(
        net.build([y]), {}, (_ident(h, 1, 0),), "LRN mixes channels: freezes conv1's group (row 1=0 kept)"
    )


def constant_channels(padded: bool, seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    y = net.conv("conv2", h, 8, 6, pad=1 if padded else 0)
    for j, b in ((3, 0.7), (5, 0.0), (6, -0.5)):
        net.zero_row("conv1", j, b)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2 if padded else 3},
        (_const(h, 3, 0.7), _const(h, 5, 0.0), _const(h, 6, 0.0)),
        "conv1 rows 3, 5, 6 zero with bias .7, 0, -.5 (relu: .7, 0, 0) before a "
        + ("padded 3x3 conv: the .7 channel stays" if padded else "valid 3x3 conv: all three go"),
    )


def constant_gemm(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [2, 4, 6, 6])
    h = net.act("LeakyRelu", net.conv("conv1", x, 4, 6, stride=2), "leaky1")
    y = net.gemm("fc1", net.op("Flatten", [h], "flatten"), 54, 5)
    net.zero_row("conv1", 2, 0.7)
    net.zero_row("conv1", 4, -0.3)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 2},
        (_const(h, 2, 0.7), _const(h, 4, -0.3 * LEAKY_ALPHA)),
        "nonzero constant channels (.7 and LeakyRelu(-.3)) before Flatten-Gemm: folded into the Gemm bias",
    )


def unused_channels(seed: int = 0) -> BuiltGraph:
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 8), "relu1")
    p = net.conv("conv2", h, 8, 6)
    q = net.conv("conv3", h, 8, 6, k=1)
    y = net.op("Add", [p, q], "add")
    for node in ("conv2", "conv3"):
        net.zero_input(node, 4)
    net.zero_input("conv2", 6)
    return BuiltGraph(
        net.build([y]),
        {"conv1": 1},
        (Plant("unused", producer="conv1", channel=4), Plant("used", producer="conv1", channel=6)),
        "conv1 channel 4 read by nobody (both consumer slices zero); channel 6 zero in conv2 only (kept)",
    )


BUILDERS: dict[str, Callable[[], BuiltGraph]] = {
    "conv_chain_identical": conv_chain_identical,
    "scaled_relu_pool": scaled_relu_pool,
    **{f"scaled_act[{a}]": functools.partial(scaled_act, a) for a in SCALED_ACTS},
    "scaled_path": scaled_path,
    "prelu_mul_add": prelu_mul_add,
    "batchnorm_after": batchnorm_after,
    "residual_identity": residual_identity,
    "residual_projection[both]": functools.partial(residual_projection, True),
    "residual_projection[one]": functools.partial(residual_projection, False),
    "residual_graph_input": residual_graph_input,
    "se_gate": se_gate,
    "concat_conv": concat_conv,
    "split_consumers": split_consumers,
    "depthwise_m1": depthwise_m1,
    "depthwise_zero_kernel": depthwise_zero_kernel,
    "depthwise_m2": depthwise_m2,
    "grouped_consumer": grouped_consumer,
    "flatten_gemm": flatten_gemm,
    "reshape_gemm": functools.partial(flatten_gemm, True),
    "reshape_not_flatten": reshape_not_flatten,
    "nhwc_matmul": nhwc_matmul,
    "gemm_mlp[transB=0,C=N]": functools.partial(gemm_mlp, 0, "N"),
    "gemm_mlp[transB=1,C=N]": functools.partial(gemm_mlp, 1, "N"),
    "gemm_mlp[transB=0,C=1N]": functools.partial(gemm_mlp, 0, "1N"),
    "gemm_mlp[transB=1,C=scalar]": functools.partial(gemm_mlp, 1, "scalar"),
    "gemm_mlp[transB=1,C=MN]": functools.partial(gemm_mlp, 1, "MN"),
    "matmul_add": matmul_add,
    "conv_transpose": conv_transpose,
    "shared_weight": shared_weight,
    "output_in_middle": output_in_middle,
    "softmax_channels": softmax_channels,
    "lrn_consumer": lrn_consumer,
    "constant_channels[padded]": functools.partial(constant_channels, True),
    "constant_channels[unpadded]": functools.partial(constant_channels, False),
    "constant_gemm": constant_gemm,
    "unused_channels": unused_channels,
}


# ----------------------------------------------------------------------------------------------
# Self-check of the planted facts (onnxruntime only)


def _check_tensor(p: Plant, arr: np.ndarray, require_live: bool) -> None:
    t = np.moveaxis(arr, p.axis, 0).astype(np.float64)
    yj = t[p.channel]
    atol = 1e-5 * max(1.0, float(np.abs(t).max()))
    msg = f"{p.kind} {p.tensor}[{p.channel}] vs [{p.ref}] x {p.scale}"
    if p.kind == "constant":
        np.testing.assert_allclose(yj, p.value, rtol=1e-5, atol=atol, err_msg=msg)
        return
    yi = p.scale * t[p.ref]
    if require_live:
        assert np.abs(yi).max() > 1e-3, f"{msg}: reference channel is all zero, plant is vacuous"
    if p.kind in ("identical", "scaled"):
        np.testing.assert_allclose(yj, yi, rtol=1e-5, atol=atol, err_msg=msg)
    elif p.kind in ("distinct", "not_scaled"):
        assert not np.allclose(yj, yi, rtol=1e-3, atol=1e-3 * atol / 1e-5), msg
    else:
        raise ValueError(f"unknown plant kind {p.kind!r}")


def _perturb_row(model: onnx.ModelProto, producer: str, j: int, seed: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == producer)
    w_name, axis = producer_weight(node)  # type: ignore[misc]
    init = next(i for i in out.graph.initializer if i.name == w_name)
    arr = numpy_helper.to_array(init).copy()
    rows = _rows(arr, axis)
    rows[j] = np.random.default_rng(seed).standard_normal(rows[j].shape) + 1.0
    init.CopyFrom(numpy_helper.from_array(arr, w_name))
    return out


def _outputs_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6 * max(1.0, np.abs(a[k]).max())) for k in a)


def check_planted(built: BuiltGraph, seeds: Sequence[int] = (0, 1), require_live: bool = True) -> None:
    """Verify with onnxruntime that every planted fact of ``built`` holds (else AssertionError).

    Args:
        built: The graph.
        seeds: Input seeds to check on.
        require_live: Also require each reference channel to be nonzero somewhere (a planted
            identity between two dead channels would prove nothing).
    """
    tensors = sorted({p.tensor for p in built.planted if p.tensor})
    probe = with_outputs(built.model, tensors)
    for seed in seeds:
        out = run(probe, random_feeds(built.model, seed))
        for p in built.planted:
            if p.tensor:
                _check_tensor(p, out[p.tensor], require_live)
    feeds = random_feeds(built.model, seeds[0])
    base = run(built.model, feeds)
    for p in built.planted:
        if p.kind in ("unused", "used"):
            moved = run(_perturb_row(built.model, p.producer, p.channel, seeds[0]), feeds)
            same = _outputs_equal(base, moved)
            assert same == (p.kind == "unused"), f"{p.kind} {p.producer}[{p.channel}]"
    names = {n.name for n in built.model.graph.node}
    assert len(names) == len(built.model.graph.node), "node names must be unique"
    assert all(n.name for n in built.model.graph.node), "every node needs a name"
    channels = producer_channels(built.model)
    for name, count in built.expected_removed.items():
        assert name in channels and 0 <= count < channels[name], (name, count)


# ----------------------------------------------------------------------------------------------
# Random nets with planted redundancy (property tests)

PLANT_KINDS = ("identical", "scaled", "constant", "unused")
RANDOM_ACTS = ("Relu", "LeakyRelu", "Sigmoid", "None")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a random net.

    Attributes:
        width: Output width of a plain stage; inner width of a residual block.
        act: Activation after the layer (and after the residual Add).
        residual: A block ``act(h + b(act(a(h))))`` instead of a plain layer.
        flavour: conv: 0 = 1x1 no pads, else 3x3 pads 1; gemm: 0 = Gemm transB=0,
            1 = Gemm transB=1 alpha .5 beta 2, 2 = MatMul + Add.
        plants: Plant kinds for the group this stage creates.
    """

    width: int
    act: str = "Relu"
    residual: bool = False
    flavour: int = 1
    plants: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A random conv or gemm net; see :func:`random_planted_net`."""

    kind: str
    in_width: int
    stages: tuple[StageSpec, ...]
    out_width: int
    seed: int = 0
    out_plants: tuple[str, ...] = ()


@dataclasses.dataclass
class _Group:
    width: int
    producers: list[str]
    acts: list[str]
    plants: tuple[str, ...] = ()
    frozen: bool = False
    tensor: str = ""
    consumers: list[tuple[str, bool]] = dataclasses.field(default_factory=list)


def _layer(net: Net, kind: str, name: str, x: str, cin: int, cout: int, flavour: int) -> tuple[str, bool]:
    """Add one producer layer; returns (output, whether it pads its input)."""
    if kind == "conv":
        k = 1 if flavour == 0 else 3
        return net.conv(name, x, cin, cout, k=k), k > 1
    if flavour == 2:
        return net.matmul(name, x, cin, cout), False
    alpha, beta = (0.5, 2.0) if flavour == 1 else (1.0, 1.0)
    return net.gemm(name, x, cin, cout, trans_b=flavour, alpha=alpha, beta=beta), False


def _stage(
    net: Net, spec: NetSpec, k: int, x: str, group: _Group, groups: list[_Group]
) -> tuple[str, _Group]:
    """Add stage k reading ``x`` (channels of ``group``); returns the new tensor and group."""
    st = spec.stages[k]
    if not st.residual:
        name = f"L{k}"
        y, padded = _layer(net, spec.kind, name, x, group.width, st.width, st.flavour)
        group.consumers.append((name, padded))
        h = net.act(st.act, y, f"{name}_act")
        new = _Group(st.width, [name], [st.act], st.plants, tensor=h)
        groups.append(new)
        return h, new
    a, b = f"L{k}a", f"L{k}b"
    ya, pad_a = _layer(net, spec.kind, a, x, group.width, st.width, st.flavour)
    group.consumers.append((a, pad_a))
    ha = net.act(st.act, ya, f"{a}_act")
    inner = _Group(st.width, [a], [st.act], st.plants, tensor=ha)
    groups.append(inner)
    yb, pad_b = _layer(net, spec.kind, b, ha, st.width, group.width, st.flavour)
    inner.consumers.append((b, pad_b))
    group.producers.append(b)
    group.acts.append(st.act)
    group.tensor = net.act(st.act, net.op("Add", [x, yb], f"L{k}_add"), f"L{k}_post")
    return group.tensor, group


def _act_value(act: str, b: float) -> float:
    if act == "Relu":
        return max(b, 0.0)
    if act == "LeakyRelu":
        return b if b >= 0 else LEAKY_ALPHA * b
    if act == "Sigmoid":
        return float(1.0 / (1.0 + np.exp(-np.float32(b))))
    return b


def _assign(group: _Group, rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """Give each plant of ``group`` its channels (kind, j, i); drop the plants that do not fit."""
    free = list(rng.permutation(group.width))
    out: list[tuple[str, int, int]] = []
    for kind in group.plants:
        if not group.producers or (kind == "constant" and len(group.producers) > 1):
            continue  # constants only in single-producer groups (see module notes)
        if kind == "unused" and not group.consumers:
            continue
        need = 2 if kind in ("identical", "scaled") else 1
        if len(free) <= need or (kind == "constant" and any(k == "constant" for k, _, _ in out)):
            continue  # at least one untouched channel stays, so no group is emptied
        j, i = int(free.pop()), int(free.pop()) if need == 2 else -1
        out.append((kind, j, i))
    return out


def _plant_group(
    net: Net, group: _Group, plan: list[tuple[str, int, int]], rng: np.random.Generator
) -> tuple[int, list[Plant]]:
    """Apply the row plants of one group; returns (provable removals, planted facts)."""
    homog = all(a in HOMOGENEOUS_ACTS for a in group.acts)
    removed, facts = 0, []
    for kind, j, i in plan:
        if kind == "identical":
            for p in group.producers:
                net.plant(p, j, i)
            removed += 1
            facts.append(_ident(group.tensor, j, i))
        elif kind == "scaled":
            lam = float(rng.choice([0.5, 2.0]))
            for p in group.producers:
                net.plant(p, j, i, lam)
            removed += homog
            facts.append((_scaled if homog else _not_scaled)(group.tensor, j, i, lam))
        elif kind == "constant":
            b = float(rng.choice([0.0, -0.5, 0.7]))
            net.zero_row(group.producers[0], j, b)
            c = _act_value(group.acts[0], b)
            removed += c == 0.0 or not any(padded for _, padded in group.consumers)
            facts.append(_const(group.tensor, j, c))
        else:
            removed += 1
            facts.append(Plant("unused", producer=group.producers[0], channel=j))
    return (0 if group.frozen else removed), facts


def random_planted_net(spec: NetSpec) -> BuiltGraph:
    """Build a random conv or gemm net with the planted channels of ``spec``.

    ``expected_removed`` counts what the exact rules prove: identical always; scaled when every
    activation of the group is Relu/LeakyRelu/None; a zero-weight channel when its constant is 0
    or no consumer pads; unused always; nothing in a frozen group (the graph input's group, which a
    residual block at stage 0 joins, and the output layer's group). Constants are planted only in
    single-producer groups, where their value is the same for every consumer.
    """
    net = Net(spec.seed)
    shape = [1, spec.in_width, 6, 6] if spec.kind == "conv" else [4, spec.in_width]
    x = net.input("x", shape)
    group = _Group(spec.in_width, [], [], frozen=True)
    groups = [group]
    for k in range(len(spec.stages)):
        x, group = _stage(net, spec, k, x, group, groups)
    y, padded = _layer(net, spec.kind, "out", x, group.width, spec.out_width, spec.seed % 3)
    group.consumers.append(("out", padded))
    groups.append(_Group(spec.out_width, ["out"], ["None"], spec.out_plants, True, y))
    rng = np.random.default_rng(spec.seed + 1)
    plans = [_assign(g, rng) for g in groups]
    for g, plan in zip(groups, plans, strict=True):
        for _, j, _ in (p for p in plan if p[0] == "unused"):
            for consumer, _ in g.consumers:
                net.zero_input(consumer, j)
    expected: dict[str, int] = {}
    planted: list[Plant] = []
    for g, plan in zip(groups, plans, strict=True):
        n, facts = _plant_group(net, g, plan, rng)
        planted += facts
        expected.update({p: n for p in g.producers if n})
    return BuiltGraph(net.build([y]), expected, tuple(planted), f"random {spec}")


# ----------------------------------------------------------------------------------------------
# The onnx package's light model zoo (opset 9, IR 3, weights as ConstantOfShape fills)

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = (
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)


def light_model_path(name: str) -> str:
    """Path of ``light_<name>.onnx`` inside the installed onnx package."""
    return os.path.join(LIGHT_DIR, f"light_{name}.onnx")


def _reshape(data: np.ndarray, shape: np.ndarray) -> np.ndarray:
    dims = [int(d) if d != 0 else data.shape[k] for k, d in enumerate(shape.astype(np.int64))]
    return data.reshape(dims)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers, ConstantOfShape outputs and Reshapes of constants, by tensor name."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in values:
            fill = next(
                (numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                np.zeros(1, np.float32),
            )
            values[node.output[0]] = np.full(values[node.input[0]].astype(np.int64), fill[0])
        elif node.op_type == "Reshape" and all(i in values for i in node.input):
            values[node.output[0]] = _reshape(values[node.input[0]], values[node.input[1]])
    return values


def _drop_folded(graph: onnx.GraphProto, materialised: set[str]) -> None:
    """Remove nodes whose outputs are now initializers, then constant makers left unused."""
    nodes = [n for n in graph.node if not set(n.output) <= materialised]
    while True:
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in nodes if n.op_type in ("ConstantOfShape", "Reshape") and not set(n.output) & used]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    del graph.node[:]
    graph.node.extend(nodes)


def _per_channel_source(graph: onnx.GraphProto, tensor: str, values: dict[str, np.ndarray]) -> str | None:
    """The constant behind ``tensor`` (itself or the input of the Unsqueeze making it)."""
    if tensor in values:
        return tensor
    maker = next((n for n in graph.node if tensor in n.output), None)
    if maker is not None and maker.op_type == "Unsqueeze" and maker.input[0] in values:
        return maker.input[0]
    return None


def _weight_roles(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> dict[str, tuple[str, int, int]]:
    """Constant tensors that are weights: name -> (role, output-channel axis, fan_in)."""
    roles: dict[str, tuple[str, int, int]] = {}
    for node in graph.node:
        ins = [i if i in values else "" for i in node.input]
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(ins) > 1 and ins[1]:
            shape = values[ins[1]].shape
            layout = producer_weight(node)
            assert layout is not None
            if node.op_type == "Gemm":
                fan_in = shape[1] if _attr(node, "transB", 0) else shape[0]
            elif node.op_type == "ConvTranspose":
                fan_in = int(np.prod(shape)) // shape[1]
            else:
                fan_in = int(np.prod(shape[1:])) if node.op_type == "Conv" else shape[0]
            roles[ins[1]] = ("weight", layout[1], int(fan_in))
            if len(ins) > 2 and ins[2]:
                roles[ins[2]] = ("bias", -1, 0)
        elif node.op_type == "BatchNormalization":
            for role, name in zip(("bn_scale", "bn_bias", "bn_mean", "bn_var"), ins[1:5], strict=True):
                roles[name] = (role, 0, 0)
        elif node.op_type in ("Mul", "Add", "PRelu"):
            for tensor in node.input[1:] if node.op_type == "PRelu" else node.input:
                src = _per_channel_source(graph, tensor, values)
                if src is not None and src not in roles and values[src].size > 1:
                    shape = values[src].shape
                    axis = int(np.argmax(np.array(shape) > 1))
                    roles[src] = ("mul" if node.op_type != "Add" else "bias", axis, 0)
    roles.pop("", None)
    return roles


def _random_weight(rng: np.random.Generator, role: str, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    size = tuple(int(d) for d in shape)
    if role == "weight":
        return rng.standard_normal(size, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    if role in ("bn_scale", "bn_var", "mul"):
        return rng.uniform(0.5, 1.5, size).astype(np.float32)
    return rng.standard_normal(size, dtype=np.float32) * np.float32(0.1)


def duplicate_pairs(arr: np.ndarray, axis: int) -> np.ndarray:
    """Copy channel 2k into channel 2k+1 along ``axis`` (an odd last channel stays alone)."""
    n = arr.shape[axis]
    return np.take(arr, (np.arange(n) // 2) * 2, axis=axis)


def light_duplicated_variant(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Random-weight variant of a light zoo model in which every channel 2k+1 repeats channel 2k.

    Every weight (ConstantOfShape fills and real initializers alike) becomes a random initializer:
    He-normal conv/gemm weights (std sqrt(2/fan_in)), biases ~N(0, 0.1), BatchNormalization
    mean ~N(0, 0.1), var and scale ~U(0.5, 1.5), bias ~N(0, 0.1), per-channel Mul constants
    ~U(0.5, 1.5) and Add constants ~N(0, 0.1). Each of these tensors is then duplicated pairwise
    along its output-channel axis. Unsqueeze nodes in front of per-channel Mul/Add stay; the
    ConstantOfShape nodes (and inception_v1's Reshape of its classifier weight) go. The IR
    version is kept, and below IR 4 every initializer is also listed as a graph input, as that
    format requires.
    """
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    values = _constant_values(graph)
    roles = _weight_roles(graph, values)
    new = {
        name: duplicate_pairs(_random_weight(rng, role, values[name].shape, fan_in), axis)
        for name, (role, axis, fan_in) in roles.items()
    }
    _drop_folded(graph, set(new))
    used = {i for n in graph.node for i in n.input}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in used}
    inits.update(new)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in inits.items())
    real = [vi for vi in graph.input if vi.name not in values]
    del graph.input[:]
    graph.input.extend(real)
    if out.ir_version < 4:
        graph.input.extend(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for name, a in inits.items()
        )
    return out


# ----------------------------------------------------------------------------------------------
# Checking a compression result


def removed_by_report(report: object) -> dict[str, int]:
    """Channels removed per layer name, as ``report.layers`` states them."""
    return {layer.name: layer.channels_before - layer.channels_after for layer in report.layers}  # type: ignore[attr-defined]


def assert_removed(original: onnx.ModelProto, expected: dict[str, int], result: object) -> None:
    """Assert that ``result`` removed exactly ``expected`` channels per producer of ``original``.

    Checks the report (a producer it leaves out counts as 0 removed) and, for every producer that
    keeps its name and op type in ``result.model``, the weight shapes too.
    """
    before = producer_channels(original)
    reported = removed_by_report(result.report)  # type: ignore[attr-defined]
    model: onnx.ModelProto = result.model  # type: ignore[attr-defined]
    after = producer_channels(model)
    op_before = {n.name: n.op_type for n in original.graph.node}
    op_after = {n.name: n.op_type for n in model.graph.node}
    errors = [f"expected_removed names a non-producer {name!r}" for name in expected if name not in before]
    for name, n in before.items():
        want = expected.get(name, 0)
        if reported.get(name, 0) != want:
            errors.append(f"{name}: report says {reported.get(name, 0)} removed, expected {want}")
        if name in after and op_after.get(name) == op_before[name] and n - after[name] != want:
            errors.append(f"{name}: model keeps {after[name]} of {n} channels, expected {n - want}")
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------------------------------------
# Attention blocks as transformer exports write them (docs/method.md, "Attention heads")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Options of :func:`attention_model`.

    Attributes:
        heads: Heads H per layer.
        head_size: Head size D.
        width: Model width E (the projections map E to H·D and back).
        layers: Attention blocks in sequence (residual adds between them).
        batch: Batch size (the static shape, and the declared one of static models).
        seq: Sequence length (likewise).
        dynamic: Batch and sequence are symbolic and the head-split targets are built at run time
            (``Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [-1 or H], [D])``).
        explicit_heads: A dynamic head-split target says H, not -1.
        merge_target: The merge-back Reshape's target: ``constant`` ([B, S, H·D], or [0, 0, H·D] when
            dynamic), ``concat`` (B and S read by Shape from the merged tensor, then [H·D]),
            ``shape_slice`` (``Shape`` with start/end from opset 15, or Slice below: [B, S] in one
            piece), or ``minus_one`` ([0, 0, -1]).
        k_transpose: ``one`` (K by perm (0, 2, 3, 1)) or ``two`` ((0, 2, 1, 3) then (0, 1, 3, 2)).
        scale: ``div`` (scores / √D), ``mul`` (scores · 1/√D) or ``shape`` (as exports of
            scaled_dot_product_attention: 1/√D computed from ``Shape(q)[-1]`` at run time).
        mask: An additive mask input ``mask`` [B, 1, 1, S].
        position_bias: A position bias [1, H, S, S] computed once (Gather from a table by the int64
            input ``relative`` [S, S]) and added to the scores of every layer.
        fused: ``""`` (three projections), ``split`` or ``slice`` (one projection to 3·H·D cut in three),
            ``reshape5`` (timm: the fused output reshaped to [B, S, 3, H, D], transposed, gathered; static).
        head_size_from_shape: The head-split target's last entry is ``Shape(q)[2] // H`` (frozen).
        opset: The opset (Split's sizes and Unsqueeze's axes are inputs from 13, Shape's start/end
            attributes from 15, Split's num_outputs from 18).
        seed: Weight seed.
    """

    heads: int = 4
    head_size: int = 8
    width: int = 16
    layers: int = 1
    batch: int = 2
    seq: int = 6
    dynamic: bool = False
    explicit_heads: bool = False
    merge_target: str = "constant"
    k_transpose: str = "one"
    scale: str = "div"
    mask: bool = True
    position_bias: bool = False
    fused: str = ""
    head_size_from_shape: bool = False
    opset: int = 17
    seed: int = 0


@dataclasses.dataclass
class AttentionModel:
    """A built attention model and the names the tests look for.

    Attributes:
        model: The ONNX model (output ``y`` [B, S, E]).
        producers: Per layer, the projection MatMuls that write the heads (q, k, v or the fused one).
        out_proj: Per layer, the output projection MatMul (the consumer of the heads).
        out_weight: Per layer, the output projection's weight initializer [H·D, E].
    """

    model: onnx.ModelProto
    producers: list[list[str]]
    out_proj: list[str]
    out_weight: list[str]


class _AttentionGraph:
    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(spec.seed)
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, stem: str, values: np.ndarray) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs: int | float | list[int]) -> str:
        out = self.name(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], out, **attrs))
        return out

    def weight(self, stem: str, shape: tuple[int, int]) -> str:
        return self.const(stem, (self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def unsqueeze0(self, x: str) -> str:
        return self.node("Unsqueeze", [x, self.const("axes", np.array([0], np.int64))], "unsqueeze")

    def dim(self, x: str, index: int) -> str:
        shape = self.node("Shape", [x], "shape")
        return self.unsqueeze0(self.node("Gather", [shape, self.const("index", np.array(index, np.int64))],
                                         "gather", axis=0))  # fmt: skip

    def split_heads(self, x: str, source: str) -> str:
        """Reshape [B, S, H·D] to [B, S, H, D] (``source``: the tensor B and S are read from)."""
        s = self.spec
        if s.head_size_from_shape:
            shape = self.node("Shape", [x], "shape")
            columns = self.node("Gather", [shape, self.const("index", np.array(2))], "gather", axis=0)
            size = self.unsqueeze0(self.node("Div", [columns, self.const("heads", np.array(s.heads))], "div"))
            pieces = [self.dim(source, 0), self.dim(source, 1), self.const("h", np.array([s.heads])), size]
            target = self.node("Concat", pieces, "target", axis=0)
        elif s.dynamic:
            heads = s.heads if s.explicit_heads else -1
            pieces = [self.dim(source, 0), self.dim(source, 1), self.const("h", np.array([heads])),
                      self.const("d", np.array([s.head_size]))]  # fmt: skip
            target = self.node("Concat", pieces, "target", axis=0)
        else:
            target = self.const("target", np.array([s.batch, s.seq, s.heads, s.head_size]))
        return self.node("Reshape", [x, target], "split")

    def merge_heads(self, x: str) -> str:
        """Reshape [B, S, H, D] to [B, S, H·D] by the spec's merge-back target."""
        s = self.spec
        width = s.heads * s.head_size
        if s.merge_target == "concat":
            pieces = [self.dim(x, 0), self.dim(x, 1), self.const("c", np.array([width]))]
            target = self.node("Concat", pieces, "target", axis=0)
        elif s.merge_target == "shape_slice":
            if s.opset >= 15:
                lead = self.node("Shape", [x], "shape", start=0, end=2)
            else:
                shape = self.node("Shape", [x], "shape")
                ends = [self.const("starts", np.array([0])), self.const("ends", np.array([2]))]
                lead = self.node("Slice", [shape, *ends], "slice")
            target = self.node("Concat", [lead, self.const("c", np.array([width]))], "target", axis=0)
        elif s.merge_target == "minus_one":
            target = self.const("target", np.array([0, 0, -1]))
        elif s.dynamic:
            target = self.const("target", np.array([0, 0, width]))
        else:
            target = self.const("target", np.array([s.batch, s.seq, width]))
        return self.node("Reshape", [x, target], "merge")

    def projections(self, x: str, layer: int) -> tuple[list[str], list[str]]:
        """The projected q, k, v [B, S, H·D] (with biases) and the MatMuls that wrote them."""
        s = self.spec
        width = s.heads * s.head_size
        if not s.fused:
            outs, names = [], []
            for role in "qkv":
                product = self.node(
                    "MatMul", [x, self.weight(f"w{role}", (s.width, width))], f"{role}{layer}"
                )
                names.append(product)
                bias = self.const(f"b{role}", self.rng.standard_normal(width).astype(np.float32))
                outs.append(self.node("Add", [bias, product], f"{role}_bias"))
            return outs, names
        product = self.node("MatMul", [x, self.weight("wqkv", (s.width, 3 * width))], f"qkv{layer}")
        bias = self.const("bqkv", self.rng.standard_normal(3 * width).astype(np.float32))
        fused = self.node("Add", [product, bias], "qkv_bias")
        if s.fused == "reshape5":
            target = self.const("target", np.array([s.batch, s.seq, 3, s.heads, s.head_size]))
            split = self.node("Reshape", [fused, target], "split5")
            moved = self.node("Transpose", [split], "qkv_t", perm=[2, 0, 3, 1, 4])
            picks = [self.const("pick", np.array(k, np.int64)) for k in range(3)]
            return [self.node("Gather", [moved, pick], "pick", axis=0) for pick in picks], [product]
        if s.fused == "slice":
            outs = []
            for k in range(3):
                start, end = np.array([k * width]), np.array([(k + 1) * width])
                bounds = [
                    self.const("start", start),
                    self.const("end", end),
                    self.const("axes", np.array([-1])),
                ]
                outs.append(self.node("Slice", [fused, *bounds], "slice"))
            return outs, [product]
        outs = [self.name("part") for _ in range(3)]
        if s.opset >= 18:
            self.nodes.append(helper.make_node("Split", [fused], outs, name=self.name("split"), axis=-1,
                                               num_outputs=3))  # fmt: skip
        else:
            sizes = self.const("sizes", np.array([width] * 3))
            self.nodes.append(
                helper.make_node("Split", [fused, sizes], outs, name=self.name("split"), axis=-1)
            )
        return outs, [product]

    def layer(self, x: str, layer: int, bias: str | None) -> tuple[str, list[str], str, str]:
        s = self.spec
        (q, k, v), producers = self.projections(x, layer)
        if s.fused == "reshape5":  # already [B, H, S, D]
            k = self.node("Transpose", [k], "k_t", perm=[0, 1, 3, 2])
        else:
            q = self.node("Transpose", [self.split_heads(q, x)], "q_t", perm=[0, 2, 1, 3])
            k = self.split_heads(k, x)
            if s.k_transpose == "one":
                k = self.node("Transpose", [k], "k_t", perm=[0, 2, 3, 1])
            else:
                k = self.node("Transpose", [self.node("Transpose", [k], "k_t", perm=[0, 2, 1, 3])], "k_tt",
                              perm=[0, 1, 3, 2])  # fmt: skip
            v = self.node("Transpose", [self.split_heads(v, x)], "v_t", perm=[0, 2, 1, 3])
        scores = self.node("MatMul", [q, k], "scores")
        if s.scale == "div":
            scores = self.node(
                "Div", [scores, self.const("scale", np.array(np.sqrt(s.head_size), np.float32))], "div"
            )
        elif s.scale == "shape":
            size = self.node("Gather", [self.node("Shape", [q], "shape"), self.const("last", np.array(-1))],
                             "gather", axis=0)  # fmt: skip
            root = self.node("Sqrt", [self.node("Cast", [size], "cast", to=TensorProto.FLOAT)], "sqrt")
            scale = self.node("Div", [self.const("one", np.array(1.0, np.float32)), root], "scale")
            scores = self.node("Mul", [scores, scale], "mul")
        else:
            scale = np.array(1 / np.sqrt(s.head_size), np.float32)
            scores = self.node("Mul", [scores, self.const("scale", scale)], "mul")
        if s.mask:
            scores = self.node("Add", [scores, "mask"], "masked")
        if bias is not None:
            scores = self.node("Add", [scores, bias], "biased")
        probs = self.node("Softmax", [scores], "probs", axis=-1)
        heads = self.node(
            "Transpose", [self.node("MatMul", [probs, v], "context")], "context_t", perm=[0, 2, 1, 3]
        )
        weight = self.weight("wo", (s.heads * s.head_size, s.width))
        out = self.node("MatMul", [self.merge_heads(heads), weight], f"o{layer}")
        projected = self.node(
            "Add", [out, self.const("bo", self.rng.standard_normal(s.width).astype(np.float32))], "o_bias"
        )
        return self.node("Add", [projected, x], "residual"), producers, out, weight

    def build(self) -> AttentionModel:
        s = self.spec
        batch, seq = ("B", "S") if s.dynamic else (s.batch, s.seq)
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, s.width])]
        if s.mask:
            inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 1, 1, seq]))
        bias = None
        if s.position_bias:
            inputs.append(helper.make_tensor_value_info("relative", TensorProto.INT64, [seq, seq]))
            table = self.const("table", self.rng.standard_normal((16, s.heads)).astype(np.float32))
            gathered = self.node("Gather", [table, "relative"], "bias_gather", axis=0)
            bias = self.unsqueeze0(self.node("Transpose", [gathered], "bias_t", perm=[2, 0, 1]))
        x = "x"
        model = AttentionModel(onnx.ModelProto(), [], [], [])
        for layer in range(s.layers):
            x, producers, out, weight = self.layer(x, layer, bias)
            model.producers.append(producers)
            model.out_proj.append(out)
            model.out_weight.append(weight)
        self.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, s.width])
        graph = helper.make_graph(self.nodes, "attention", inputs, [output], self.inits)
        opset = [helper.make_opsetid("", s.opset)]
        model.model = helper.make_model(graph, opset_imports=opset, ir_version=IR_VERSION)
        onnx.checker.check_model(model.model, full_check=True)
        return model


def attention_model(spec: AttentionSpec) -> AttentionModel:
    """An attention model as transformer exports write it (see :class:`AttentionSpec` for the options)."""
    return _AttentionGraph(spec).build()


def attention_feeds(
    spec: AttentionSpec, seed: int, batch: int | None = None, seq: int | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs of :func:`attention_model` (other batch and sequence sizes for dynamic models)."""
    rng = np.random.default_rng(seed)
    b, s = batch or spec.batch, seq or spec.seq
    feeds = {"x": rng.standard_normal((b, s, spec.width)).astype(np.float32)}
    if spec.mask:
        feeds["mask"] = np.where(rng.random((b, 1, 1, s)) < 0.2, -1e4, 0.0).astype(np.float32)
    if spec.position_bias:
        feeds["relative"] = rng.integers(0, 16, (s, s)).astype(np.int64)
    return feeds


def without_heads(
    built: AttentionModel, spec: AttentionSpec, deleted: Sequence[Sequence[int]]
) -> onnx.ModelProto:
    """``built`` with the output projection rows of the ``deleted`` heads (per layer) zeroed: head removal."""
    model = onnx.ModelProto()
    model.CopyFrom(built.model)
    for weight, heads in zip(built.out_weight, deleted, strict=True):
        init = next(i for i in model.graph.initializer if i.name == weight)
        values = numpy_helper.to_array(init).copy()
        rows = values.reshape(spec.heads, spec.head_size, -1)
        rows[list(heads)] = 0.0
        init.CopyFrom(numpy_helper.from_array(values, weight))
    return model


def plant_identical_heads(
    built: AttentionModel, spec: AttentionSpec, source: int, target: int
) -> onnx.ModelProto:
    """``built`` with head ``target`` of every layer a copy of head ``source``: the same Q, K and V columns
    and biases (in every region of a fused projection), so both heads compute the same output."""
    model = onnx.ModelProto()
    model.CopyFrom(built.model)
    inits = {i.name: i for i in model.graph.initializer}
    width = spec.heads * spec.head_size
    names = {n for layer in built.producers for n in layer}
    columns = []
    for node in model.graph.node:
        if node.name in names:
            columns.append(node.input[1])
            add = next(n for n in model.graph.node if node.output[0] in n.input and n.op_type == "Add")
            columns += [t for t in add.input if t in inits]
    for name in columns:
        values = numpy_helper.to_array(inits[name]).copy()
        heads = values.reshape(*values.shape[:-1], values.shape[-1] // width, spec.heads, spec.head_size)
        heads[..., target, :] = heads[..., source, :]
        inits[name].CopyFrom(numpy_helper.from_array(values, name))
    return model
