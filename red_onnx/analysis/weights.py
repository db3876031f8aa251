"""Where a channel lives in each weighted op's tensors (docs/method.md, "Where the channels are").

One table, used by analysis (reading rows) and rewrite (editing them), so the layouts are written once.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.io.graph import constant_values, expect_constant, is_empty_input


def producer_axis(node: gs.Node) -> int:
    """Axis of the weight (input 1) that holds the node's output channels."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # MatMul B[K, N]


def consumer_axis(node: gs.Node) -> int:
    """Axis of the weight (input 1) that holds the node's input channels."""
    if node.op == "Conv":
        return 1
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return 0  # MatMul B[K, N]


def channel_rows(array: np.ndarray, axis: int, block: int = 1) -> np.ndarray:
    """View ``array`` as ``[channels, block * rest]`` along ``axis`` (a copy when needed)."""
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0] // block, -1)


def output_scale(node: gs.Node) -> float:
    """Gemm's alpha (1 for other ops): the factor applied to the weight product."""
    return float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0


def producer_bias(node: gs.Node, channels: int) -> np.ndarray:
    """The per-output-channel bias a producer adds (Gemm: beta·C), zeros when absent."""
    if node.op == "MatMul" or is_empty_input(node, 2):
        return np.zeros(channels)
    bias = expect_constant(node.inputs[2]).astype(np.float64)
    if node.op == "Gemm":
        bias = float(node.attrs.get("beta", 1.0)) * bias
    return np.broadcast_to(bias.reshape(-1), (channels,)).copy() if bias.size == 1 else bias.reshape(-1)


def producer_rows(node: gs.Node) -> np.ndarray:
    """The producer's weight as ``[out_channels, ...]`` rows, scaled by Gemm's alpha (weight dtype)."""
    weight = expect_constant(node.inputs[1])
    rows = channel_rows(weight, producer_axis(node))
    scale = output_scale(node)
    return rows * np.asarray(scale, rows.dtype) if scale != 1.0 else rows


def conv_has_padding(node: gs.Node) -> bool:
    """Whether a Conv pads its input (explicit pads or SAME auto-padding)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        weight = constant_values(node.inputs[1])
        return weight is None or any(k > 1 for k in weight.shape[2:])
    return any(int(p) != 0 for p in node.attrs.get("pads", []))
