"""Model size figures: parameters, multiply-accumulates (Conv, ConvTranspose, Gemm, MatMul), channels."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from red_onnx.errors import InputError

FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)


#: Ops that turn a stored weight into the one a layer reads, shape unchanged (float16 storage, QDQ).
SAME_SHAPE_WEIGHT_OPS = frozenset({"Cast", "DequantizeLinear"})


@dataclass(frozen=True)
class LayerFigures:
    """One weighted layer: output channels and MACs at the measured input shapes."""

    name: str
    op: str
    channels: int
    macs: int


@dataclass
class ModelFigures:
    """Whole-model figures."""

    params: int
    macs: int
    layers: dict[str, LayerFigures] = field(default_factory=dict)


def _shape_map(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for init in probe.graph.initializer:  # shapes only: drop large weight payloads before inference
        if init.data_type in FLOAT_TYPES and math.prod(init.dims) > 1024:
            init.ClearField("raw_data")
            init.ClearField("float_data")
    for value in probe.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name], strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    del probe.graph.value_info[:]
    with contextlib.suppress(Exception):  # figures are best effort: unknown shapes count 0 MACs
        probe = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    shapes: dict[str, tuple] = {}
    for value in [*probe.graph.input, *probe.graph.value_info, *probe.graph.output]:
        if not value.type.tensor_type.HasField("shape"):  # rank unknown (after an op inference cannot
            continue  # type, e.g. a com.microsoft one): not a scalar
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            weights[node.output[0]] = tuple(node.attribute[0].t.dims)
        elif node.op_type in SAME_SHAPE_WEIGHT_OPS and node.input and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    return weights


def count_params(model: onnx.ModelProto) -> int:
    """Number of floating-point constant values (initializers and Constant nodes)."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                total += math.prod(attr.t.dims) if attr.t.data_type in FLOAT_TYPES else 0
    return int(total)


def _layer(node: onnx.NodeProto, shapes: dict, weights: dict) -> LayerFigures | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
        return None
    weight = weights.get(node.input[1])
    out = shapes.get(node.output[0])
    if node.op_type == "MatMul" and weight is None:
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        macs = math.prod(out) * a[-1] if out and a and b else 0
        return LayerFigures(node.name, node.op_type, out[-1] if out else 0, int(macs))
    if weight is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        channels, per_output = weight[0], math.prod(weight[1:])
        macs = math.prod(out) * per_output if out else 0
    elif node.op_type == "ConvTranspose":
        channels = weight[1] * int(attrs.get("group", 1))
        source = shapes.get(node.input[0])
        macs = math.prod(source) * math.prod(weight[1:]) if source else 0
    elif node.op_type == "Gemm":
        trans_b = int(attrs.get("transB", 0))
        channels, depth = (weight[0], weight[1]) if trans_b else (weight[1], weight[0])
        macs = math.prod(out) * depth if out else 0
    else:
        channels, macs = weight[-1], (math.prod(out) * weight[-2] if out else 0)
    return LayerFigures(node.name, node.op_type, int(channels), int(macs))


def measure(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]],
    known: Mapping[str, Sequence[int] | None] | None = None,
) -> ModelFigures:
    """Parameters, MACs and per-layer channels of ``model`` at the given input shapes.

    Args:
        model: The model.
        input_shapes: Concrete shapes of its inputs.
        known: Tensor shapes already measured (the shape service's onnxruntime run), used where ONNX
            shape inference cannot tell (a dynamic-batch attention Reshape stops it: a transformer's
            MACs then counted only its first three MatMuls).

    Raises:
        InputError: An input shape has a negative dimension (e.g. a declared ``-1`` batch taken as a size).
    """
    for name, shape in input_shapes.items():
        if any(int(dim) < 0 for dim in shape):
            raise InputError(f"input {name!r} has shape {list(shape)}; give every dimension a size >= 0")
    shapes = _shape_map(model, input_shapes)
    shapes |= {name: tuple(shape) for name, shape in (known or {}).items() if shape is not None}  # measured
    weights = _weights(model)
    layers = {}
    for index, node in enumerate(model.graph.node):
        figures = _layer(node, shapes, weights)
        if figures is not None:
            layers[node.name or f"{node.op_type}_{index}"] = figures
    macs = int(np.sum([layer.macs for layer in layers.values()], dtype=np.int64)) if layers else 0
    return ModelFigures(count_params(model), macs, layers)
