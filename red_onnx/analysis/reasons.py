"""Every reason a group is frozen or a channel is kept, defined once, so that each reaches the report."""

from __future__ import annotations


class Reason:
    """Reason templates, filled with ``str.format``."""

    GRAPH_OUTPUT = "tensor '{tensor}' is a graph output (its shape never changes)"
    GRAPH_INPUT = "tensor '{tensor}' is a graph input (its channels cannot be deleted)"
    SUBGRAPH_READ = "tensor '{tensor}' is read inside an If/Loop/Scan body"
    UNKNOWN_SHAPE = "the channel count of tensor '{tensor}' is unknown (shape inference could not tell)"
    AXIS_CONFLICT = "tensor '{tensor}' is reached with two different channel axes"
    SELF_COUPLED = "channels of tensor '{tensor}' are coupled to each other"
    USER_FROZEN = "layer '{node}' matches --freeze pattern '{pattern}'"
    UNSUPPORTED_OP = "{op} node '{node}' is not understood by the channel analysis"
    CUSTOM_DOMAIN = "{op} node '{node}' is from domain '{domain}'"
    ORT_FUSED = (
        "{op} node '{node}' is an onnxruntime-fused transformer op (com.microsoft): compress the model as "
        "exported, then run onnxruntime's transformer optimizer on the result"
    )
    MIXES_CHANNELS = "{op} node '{node}' mixes channels"
    WEIGHT_NOT_CONSTANT = "the weight of {op} node '{node}' is not a constant"
    WEIGHT_GRAPH_INPUT = "the weight '{tensor}' of {op} node '{node}' is a graph input (fed at run time)"
    QUANTIZED_WEIGHT = (
        "the weight of {op} node '{node}' is dequantized by DequantizeLinear node '{source}' "
        "(quantized layers are kept as they are)"
    )
    QUANTIZED_OP = "{op} node '{node}' computes on quantized integers (quantized layers are kept as they are)"
    WEIGHT_OVERRIDABLE = "the weight '{tensor}' of {op} node '{node}' is an initializer a caller may override"
    SHARED_WEIGHT = "the weight '{tensor}' of {op} node '{node}' is shared by {count} nodes"
    GROUPED_CONV = "{op} node '{node}' is a grouped convolution (group={group})"
    DEPTHWISE_MULTIPLIER = "depthwise {op} node '{node}' has channel multiplier {multiplier}"
    WRONG_AXIS = "{op} node '{node}' reads tensor '{tensor}' on axis {axis}, not its channel axis"
    GEMM_FULL_C = "Gemm node '{node}' has a full [M, N] C matrix, not a per-channel bias"
    VARIABLE_PARAMETER = "{op} node '{node}' takes a non-constant parameter '{tensor}'"
    BAD_BROADCAST = "{op} node '{node}' broadcasts '{tensor}' across the channel axis"
    CHANNEL_AXIS_ATTR = "{op} node '{node}' pads, resizes or slices along the channel axis"
    RESHAPE = "{op} node '{node}' reshapes the channel axis in a way that is not a flatten"
    EXTRA_OUTPUT = "{op} node '{node}' has an extra output in use"
    FOREIGN_TENSOR = "tensor '{tensor}' already belongs to another group"
    PRODUCER_BLOCK = (
        "{op} node '{node}' writes '{tensor}', reached in channels of {block} columns, while its weight's "
        "columns form channels of {expected}"
    )
    MATRIX_AXIS = (
        "{op} node '{node}' multiplies two computed tensors and reads '{tensor}' on axis {axis}, one of its "
        "two matrix axes (only a batch axis, such as the heads of attention, is kept apart)"
    )
    RESHAPE_SPLIT = (
        "{op} node '{node}' splits the channel axis of '{tensor}' into the axes {dims} (only a split into "
        "[heads, head size] is understood)"
    )
    RESHAPE_TARGET_SOURCE = (
        "{op} node '{node}' takes its target shape '{tensor}' from {source} (only a constant, or a Concat of "
        "constants and dimensions read at run time, is understood)"
    )
    RESHAPE_TARGET_ENTRY = (
        "{op} node '{node}' takes entry {axis} of its target shape, the channel axis, from '{tensor}', "
        "computed at run time"
    )
    RESHAPE_TARGET_AFTER = (
        "{op} node '{node}' builds its target shape with '{tensor}', computed at run time, after entry "
        "{axis}, the channel axis (where that entry lies is known only at run time)"
    )
    SHAPE_READ = (
        "{op} node '{node}' reads the size of axis {axis}, the channel axis, of '{tensor}' (through "
        "'{reader}'), so a computed size would change with the channel count"
    )

    # Why a channel that looks removable stays (report of the constant/unused rule).
    CONST_PADDED = "constant channel meets padding in {op} node '{node}' (border values differ)"
    CONST_MIXED = "constant channel is combined with a non-constant tensor in {op} node '{node}'"
    CONST_UNKNOWN_OP = "constant channel passes {op} node '{node}', whose effect on constants is not modelled"
    CONST_CONSUMER = "constant channel reaches {op} node '{node}', which cannot absorb a constant input"
    CONST_CONV_TRANSPOSE = (
        "constant channel reaches ConvTranspose node '{node}', whose strides or borders make its "
        "contribution differ by position (it folds only at stride 1, output_padding 0, "
        "pads >= dilation·(kernel-1))"
    )
    CONST_VARIABLE_BIAS = (
        "constant channel reaches {op} node '{node}', whose bias '{tensor}' is not a constant (it cannot "
        "absorb the channel)"
    )

    # Why a k×k conv is not separated (uneven depthwise separation, passes/separate_depthwise.py).
    SEP_NOT_GROUP1 = "grouped Conv (group={group}): only group-1 convs are separated"
    SEP_WEIGHT = "its weight is not a constant"
    SEP_SHAPE = "the shape of its input or output is unknown"
    SEP_ZERO = "all its kernels are zero (its output is its bias: the constant-channel rule's case)"
    SEP_INEXACT = "its kernels do not factor exactly (worst relative error {error:.1e})"
    SEP_NO_MACS = "U = {units} unit kernels; separation needs U < {break_even:.1f} to cut MACs"
    SEP_NO_MACS_RANK = (
        "U >= {units} (sum of its kernel matrices' ranks); separation needs U < {break_even:.1f} to cut MACs"
    )
    SEP_SLOWER = (
        "measured {after_ms:.3f} ms separated vs {before_ms:.3f} ms on {provider}: not {gain:.0%} faster"
    )
    SEP_DONE_MACS = "separated on MACs alone (--no-latency-check)"
    SEP_DONE = "separated: measured {after_ms:.3f} ms vs {before_ms:.3f} ms on {provider}"
