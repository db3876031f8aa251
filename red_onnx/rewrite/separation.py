"""Rewrite a conv as ``Gather → Conv(group=U) → Conv 1×1`` from its ``KernelBasis`` (graph edit only).

The depthwise conv keeps the original strides, pads, dilations and ``auto_pad``; the pointwise conv
carries the mixing coefficients and the original bias. When every input channel has the same number of
unit kernels and none is empty, the Gather is left out (a plain depthwise multiplier, ``group = I``).
Weights keep the original conv's dtype (the basis is computed in float64).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.separation import KernelBasis
from red_onnx.errors import RewriteError
from red_onnx.io.graph import expect_constant, is_empty_input

SUFFIX = "red_sep"
#: Conv attributes the depthwise conv inherits (``group`` and ``kernel_shape`` are set anew).
SPATIAL_ATTRIBUTES = ("strides", "pads", "dilations", "auto_pad")


def separate_conv(graph: gs.Graph, conv: gs.Node, basis: KernelBasis) -> list[gs.Node]:
    """Replace ``conv`` (group 1, constant weight) in ``graph`` by its separated form.

    Args:
        graph: The graph holding ``conv``.
        conv: The conv to rewrite; it is removed from the graph.
        basis: ``factor_kernels`` of its weight.

    Returns:
        The new nodes, in order.
    """
    if basis.size == 0:
        raise RewriteError(f"conv {conv.name} has only zero kernels: nothing to separate")
    weight = expect_constant(conv.inputs[1])
    dtype, spatial = weight.dtype, weight.ndim - 2
    source, output = conv.inputs[0], conv.outputs[0]
    bias = [] if is_empty_input(conv, 2) else [conv.inputs[2]]
    attrs = {key: conv.attrs[key] for key in SPATIAL_ATTRIBUTES if key in conv.attrs}
    conv.outputs.clear()
    conv.inputs.clear()
    graph.nodes.remove(conv)
    name = f"{conv.name}_{SUFFIX}"
    nodes: list[gs.Node] = []
    if not basis.uniform:  # channels are ascending, so a uniform basis needs no Gather
        gathered = gs.Variable(f"{name}_gathered")
        indices = gs.Constant(f"{name}_channels", basis.channels.astype(np.int64))
        nodes.append(gs.Node("Gather", f"{name}_gather", {"axis": 1}, [source, indices], [gathered]))
        source = gathered
    attrs |= {
        "group": basis.counts.size if basis.uniform else basis.size,
        "kernel_shape": list(weight.shape[2:]),
    }
    units = gs.Constant(f"{name}_units", np.ascontiguousarray(basis.units[:, None].astype(dtype)))
    depthwise_out = gs.Variable(f"{name}_depthwise")
    nodes.append(gs.Node("Conv", f"{name}_dw", attrs, [source, units], [depthwise_out]))
    mix = basis.mix.reshape(*basis.mix.shape, *([1] * spatial)).astype(dtype)
    pointwise = {"group": 1, "kernel_shape": [1] * spatial}
    mix_tensor = gs.Constant(f"{name}_mix", np.ascontiguousarray(mix))
    nodes.append(gs.Node("Conv", f"{name}_pw", pointwise, [depthwise_out, mix_tensor, *bias], [output]))
    graph.nodes.extend(nodes)
    return nodes
