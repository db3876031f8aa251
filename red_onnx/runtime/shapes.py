"""Static shapes of every tensor at the run's concrete inputs: the shape service passes ask.

ONNX shape inference first; tensors it cannot tell (Reshape fed by Shape arithmetic, custom export
patterns) are measured by one onnxruntime run on the verification inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from red_onnx.errors import first_line
from red_onnx.io.graph import WorkingModel, export_light, export_model
from red_onnx.runtime.tensor_values import run_tensors

logger = logging.getLogger(__name__)

Shapes = dict[str, "tuple[int, ...] | None"]


class ShapeService:
    """Shapes of a working model's tensors for fixed concrete inputs.

    Args:
        feed: The inputs the run works at (the seed-0 verification inputs), by graph input name.
    """

    def __init__(self, feed: Mapping[str, np.ndarray]) -> None:
        self.feed = dict(feed)
        self.input_shapes = {name: tuple(array.shape) for name, array in self.feed.items()}
        self.runs = 0

    def __call__(self, working: WorkingModel, exported: onnx.ModelProto | None = None) -> Shapes:
        """Shapes by tensor name (None where neither inference nor a run could tell).

        Args:
            working: The working model.
            exported: ``working`` already exported, when the caller has it (saves exporting it again
                when a shape has to be measured).
        """
        shapes = _inferred(export_light(working)[0], self.input_shapes)
        outputs = {t.name for t in working.graph.outputs}
        unknown = [
            t.name
            for t in working.graph.tensors().values()
            if isinstance(t, gs.Variable)
            and t.name
            and shapes.get(t.name) is None
            and t.inputs
            and (t.outputs or t.name in outputs)  # an unread tensor (a Dropout mask) needs no shape
        ]
        if unknown:
            model = exported if exported is not None else export_model(working)
            shapes.update(self._measured(model, unknown))
        return shapes

    def _measured(self, model: onnx.ModelProto, names: list[str]) -> Shapes:
        try:
            (values,) = run_tensors(model, names, [self.feed])
        except Exception as error:
            logger.warning("could not measure %d tensor shapes: %s", len(names), first_line(error))
            return {}
        self.runs += 1
        return {name: _shape_of(value) for name, value in zip(names, values, strict=True)}


def _shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a measured value; None for a sequence of tensors of different shapes (no one shape)."""
    try:
        return tuple(np.shape(value))
    except ValueError:
        return None


def _inferred(probe: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> Shapes:
    """Shapes by ONNX shape inference (with data propagation) at ``input_shapes``; edits ``probe``."""
    for value in probe.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            shape = input_shapes[value.name]
            if len(dims) == len(shape):
                for dim, size in zip(dims, shape, strict=True):
                    dim.Clear()
                    dim.dim_value = int(size)
    del probe.graph.value_info[:]
    try:
        probe = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as error:
        logger.info("shape inference failed: %s", first_line(error))
    shapes: Shapes = {}
    for value in [*probe.graph.input, *probe.graph.value_info, *probe.graph.output]:
        shapes[value.name] = _static(value)
    for init in probe.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _static(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)
