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
    """The producer's weight as ``[out_channels, ...]`` rows, scaled by Gemm's alpha (weight dtype).

    A MatMul whose output columns form channels of several columns (:func:`producer_block`: an
    attention head of D columns) gives one row per channel, its D columns side by side.
    """
    weight = expect_constant(node.inputs[1])
    rows = channel_rows(weight, producer_axis(node), producer_block(node))
    scale = output_scale(node)
    return rows * np.asarray(scale, rows.dtype) if scale != 1.0 else rows


def block_rows(values: np.ndarray, out_rank: int, axis: int, channels: int, block: int) -> np.ndarray | None:
    """A constant broadcast against a tensor whose channels are ``block`` elements of ``axis``, as rows.

    Returns:
        ``[channels, block·k]`` (a channel's block side by side), or None when the constant is not per
        channel (scalar along the axis, or sized otherwise).
    """
    shape = (1,) * (out_rank - values.ndim) + values.shape
    if len(shape) != out_rank or shape[axis] != channels * block or channels * block == 1:
        return None
    return channel_rows(values.reshape(shape).astype(np.float64), axis, block)


def producer_block(node: gs.Node) -> int:
    """Consecutive output columns of a MatMul that make one channel: D for attention heads, else 1.

    The heads of an exported transformer are blocks of D columns of the Q, K and V projections: the
    MatMul's output, after Adds of a constant (its bias), is only reshaped to ``[.., heads, D]``
    (read by Shape nodes besides, for its batch and sequence sizes), or split first (a fused QKV
    projection, its Split or Slice outputs each reshaped so). D is the target's last entry, a constant;
    it must divide the weight's columns. The channel analysis checks the shapes (the reshape must split
    the last axis into exactly [C/D, D]); this function reads the graph only, so that the analysis, the
    constant rule and the editor agree on a producer's channels without the shapes.
    """
    if node.op != "MatMul" or not node.outputs:
        return 1
    weight = constant_values(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return 1
    size = _head_size(_past_bias(node.outputs[0]), split_allowed=True)
    return size if size and size > 1 and weight.shape[1] % size == 0 else 1


def _past_bias(tensor: gs.Tensor) -> gs.Tensor:
    """Past the Adds of a constant that alone read ``tensor`` in turn (a bias, and one the editor added)."""
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Add" and len(tensor.outputs[0].inputs) == 2:
        add = tensor.outputs[0]
        if not any(isinstance(t, gs.Constant) for t in add.inputs) or not add.outputs:
            break
        tensor = add.outputs[0]
    return tensor


def _head_size(tensor: gs.Tensor, *, split_allowed: bool) -> int | None:
    """The last entry D of the head-split Reshape(s) that read ``tensor`` (None: another reader, or none)."""
    sizes: set[int | None] = set()
    for reader in tensor.outputs:
        if reader.op == "Shape":
            continue
        if reader.op == "Reshape" and reader.inputs[0] is tensor:
            sizes.add(_target_last(reader.inputs[1]))
        elif split_allowed and reader.op in ("Split", "Slice") and reader.inputs[0] is tensor:
            sizes |= {_head_size(out, split_allowed=False) for out in reader.outputs if out.outputs}
        else:
            return None
    return sizes.pop() if len(sizes) == 1 else None


def _target_last(target: gs.Tensor) -> int | None:
    """The last entry of a Reshape target when constant (a constant target, or a Concat's last piece)."""
    values = constant_values(target)
    if values is None and target.inputs and target.inputs[0].op == "Concat" and target.inputs[0].inputs:
        values = constant_values(target.inputs[0].inputs[-1])
    if values is None or values.size == 0 or values.dtype.kind not in "iu":
        return None
    return int(values.reshape(-1)[-1])


def conv_has_padding(node: gs.Node) -> bool:
    """Whether a Conv pads its input (explicit pads or SAME auto-padding)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        weight = constant_values(node.inputs[1])
        return weight is None or any(k > 1 for k in weight.shape[2:])
    return any(int(p) != 0 for p in node.attrs.get("pads", []))
