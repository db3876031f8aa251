"""Channel activations on the search's inputs (a service the budget search asks).

One onnxruntime run of the base model with the group tensors the consumers read as extra outputs; for
each tensor, every channel's values at the same random positions (at most ``positions`` per input),
as a ``[channels, samples]`` matrix; for a k×k Conv consumer also the Gram of its input patches (the
rows it multiplies with ``W[:, c, tap]``), for the refit tap by tap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import GroupTensor
from red_onnx.errors import first_line
from red_onnx.runtime.tensor_values import run_tensors, tensor_fetch

logger = logging.getLogger(__name__)

#: Positions sampled per input and tensor (all when the tensor has fewer).
POSITIONS = 2048
#: Patches sampled per input for a k×k consumer's Gram (it has channels·taps rows: 288 for 32 channels
#: of a 3×3 conv, 2304 for 256). YOLOv8n with 128 calibration views, MACs 0.9: 0.45 of the original's
#: detections kept with 4096 patches, 0.53 with 16384, at the same run time (0.8: 0.23 and 0.28).
PATCH_POSITIONS = 16384
#: The widest flattened tensor captured row by row (its Gram: 134 MB in float64).
FLATTENED_ROWS_MAX = 4096
#: Patches gathered at once into the Gram (their float64 rows: 75 MB at 2304 rows).
PATCH_BLOCK = 4096


def captured_by_rows(member: GroupTensor, node: gs.Node) -> bool:
    """Whether a consumer's input is captured row by row (attention heads, flattened channels).

    That is a MatMul reading a ``[.., tokens, H·D]`` tensor in blocks of D (attention heads merged
    back), or a Gemm or MatMul reading a flattened ``[N, C·H·W]`` tensor in blocks of H·W
    (:func:`flattened_rows`). Each row of a block is a different feature, read by its own row of the
    consumer's weight: the refit and the local estimate treat them as rows (tokens, or samples, as
    positions).
    """
    if node.op == "MatMul" and member.block > 1 and member.rank >= 3 and member.axis == member.rank - 1:
        return True
    return flattened_rows(member, node)


def flattened_rows(member: GroupTensor, node: gs.Node) -> bool:
    """Whether a consumer reads a flattened ``[N, C·H·W]`` tensor whose rows are captured one by one.

    Each of a channel's H·W elements meets its own weight row, so the exact Gram of the consumer's
    input is over rows (a position per sample); the Gram over channels, a channel's elements as its
    positions, misses the products of different positions. Up to ``FLATTENED_ROWS_MAX`` rows (a
    VGG-style 512×7×7 stays by channels). Digits (64×4×4 into a Gemm), 256 calibration images, 0.6 of
    the MACs: test logit error 0.117 refit by channels, 0.079 with the rows refit offered beside.
    """
    return (
        node.op in ("Gemm", "MatMul")
        and member.block > 1
        and member.rank == 2
        and member.axis == 1
        and member.channels * member.block <= FLATTENED_ROWS_MAX
    )


def channel_rows_sampled(
    value: np.ndarray,
    axis: int,
    block: int,
    rng: np.random.Generator,
    positions: int,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """``[channels, positions]`` of one tensor, at most ``positions`` sampled at random (float64).

    A channel's ``block`` consecutive elements along ``axis`` (Flatten blocks) count as positions.
    ``keep`` (a text model's ``[B, S]`` attention mask) restricts the positions of a tensor whose other
    axes are ``[B, S]`` to the tokens it keeps: padded tokens' activations reach nothing a user reads.
    """
    moved = np.moveaxis(value, axis, 0)
    channels = moved.shape[0] // block
    rows = moved.reshape(channels, block, -1).reshape(channels, -1)
    if keep is not None and block == 1 and moved.shape[1:] == np.shape(keep) and np.any(keep):
        rows = rows[:, np.asarray(keep).reshape(-1) > 0]
    if rows.shape[1] > positions:
        rows = rows[:, np.sort(rng.choice(rows.shape[1], positions, replace=False))]
    return rows.astype(np.float64)


@dataclass(frozen=True)
class ConvTaps:
    """How a Conv consumer reads its input: kernel, strides, dilations and pads per spatial axis."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as ONNX writes them

    @property
    def taps(self) -> int:
        """Kernel positions per input channel."""
        return math.prod(self.kernel)


def conv_taps(node: gs.Node) -> ConvTaps | None:
    """The taps of a k×k Conv consumer (group 1, explicit pads), else None (a 1×1 one, or other ops)."""
    if node.op != "Conv" or int(node.attrs.get("group", 1)) != 1 or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape):
        return None
    kernel = tuple(int(d) for d in shape[2:])
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if math.prod(kernel) == 1 or auto_pad not in ("NOTSET", "VALID"):
        return None
    rank = len(kernel)
    pads = tuple(int(p) for p in node.attrs.get("pads", [0] * 2 * rank))
    pads = pads if auto_pad == "NOTSET" else (0,) * 2 * rank
    return ConvTaps(
        kernel,
        tuple(int(v) for v in node.attrs.get("strides", [1] * rank)),
        tuple(int(v) for v in node.attrs.get("dilations", [1] * rank)),
        pads,
    )


def conv_windows(value: np.ndarray, taps: ConvTaps) -> np.ndarray:
    """``[N, C, *outputs, *kernel]``: every patch the Conv reads, a view of the padded input."""
    rank = len(taps.kernel)
    pads = [(0, 0), (0, 0), *zip(taps.pads[:rank], taps.pads[rank:], strict=True)]
    padded = np.pad(value, pads)
    spans = [(k - 1) * d + 1 for k, d in zip(taps.kernel, taps.dilations, strict=True)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=tuple(range(2, 2 + rank)))
    steps = (slice(None), slice(None), *(slice(None, None, s) for s in taps.strides))
    return windows[steps + tuple(slice(None, None, d) for d in taps.dilations)]


def _sampled(windows: np.ndarray, rank: int, rng: np.random.Generator, positions: int) -> np.ndarray:
    """Flat indices of at most ``positions`` output positions (sorted; all when there are fewer)."""
    count = windows.shape[0] * math.prod(windows.shape[2 : 2 + rank])
    return np.arange(count) if count <= positions else np.sort(rng.choice(count, positions, replace=False))


def patch_rows(windows: np.ndarray, rank: int, picked: np.ndarray) -> np.ndarray:
    """``[channels·taps, len(picked)]`` float64: the patches at the flat output positions ``picked``."""
    outputs = (windows.shape[0], *windows.shape[2 : 2 + rank])
    index = np.unravel_index(picked, outputs)
    selector: tuple = (index[0], slice(None), *index[1:])
    return windows[selector].reshape(picked.size, -1).T.astype(np.float64)  # from [P, C, *kernel]


def patch_rows_sampled(
    value: np.ndarray, taps: ConvTaps, rng: np.random.Generator, positions: int
) -> np.ndarray:
    """``[channels·taps, positions]``: the consumer's input patches at sampled output positions (float64).

    Row ``c·taps + t`` is channel ``c`` at kernel tap ``t`` (taps in C order over the kernel axes), what
    the Conv multiplies with ``W[:, c, *tap]``; zero padding included, strides and dilations applied.
    """
    windows = conv_windows(value, taps)
    return patch_rows(windows, len(taps.kernel), _sampled(windows, len(taps.kernel), rng, positions))


def patch_grams(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    tensors: Mapping[str, ConvTaps],
    *,
    positions: int = PATCH_POSITIONS,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Augmented Grams ``[x; 1]·[x; 1]ᵀ`` of k×k Conv consumers' input patches (``patch_rows_sampled``).

    Tensor name → ``[channels·taps + 1, channels·taps + 1]`` float64, summed over the feeds (one run
    each, a batch of rows a few at a time; at most ``positions`` patches a feed, gathered
    ``PATCH_BLOCK`` at a time). Empty when a run fails.
    """
    names = list(tensors)
    rng = np.random.default_rng(seed)
    grams: dict[str, np.ndarray] = {}
    try:
        fetch = tensor_fetch(model, names)
        for feed in feeds:
            for name, value in zip(names, fetch(names, feed), strict=True):
                rank = len(tensors[name].kernel)
                windows = conv_windows(np.asarray(value), tensors[name])
                picked = _sampled(windows, rank, rng, positions)
                for start in range(0, picked.size, PATCH_BLOCK):
                    rows = patch_rows(windows, rank, picked[start : start + PATCH_BLOCK])
                    augmented = np.vstack([rows, np.ones((1, rows.shape[1]))])
                    gram = augmented @ augmented.T
                    grams[name] = gram if name not in grams else grams[name] + gram
    except Exception as error:  # onnxruntime's errors share no base class; the other rankings still work
        logger.warning("could not capture the consumers' input patches: %s", first_line(error))
        return {}
    return grams


def capture(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    tensors: Mapping[str, tuple[int, int]],
    *,
    positions: int = POSITIONS,
    seed: int = 0,
    masks: Sequence[np.ndarray | None] = (),
) -> dict[str, np.ndarray]:
    """Sampled activations of the named tensors.

    Args:
        model: The model to run (not modified).
        feeds: Input dicts, one per synthetic sample batch.
        tensors: Tensor name → (channel axis, block) as the channel analysis found them.
        positions: Positions kept per feed and tensor.
        seed: Seed of the position sampling.
        masks: Per feed, a text model's attention mask (``channel_rows_sampled``'s ``keep``), or none.

    Returns:
        Tensor name → ``[channels, samples]`` (float64); empty when the run fails.
    """
    names = list(tensors)
    try:
        runs = run_tensors(model, names, feeds)
    except Exception as error:
        logger.warning("could not capture activations: %s", first_line(error))
        return {}
    rng = np.random.default_rng(seed)
    captured = {}
    for index, name in enumerate(names):
        axis, block = tensors[name]
        parts = [
            channel_rows_sampled(np.asarray(run[index]), axis, block, rng, positions, _mask(masks, k))
            for k, run in enumerate(runs)
        ]
        captured[name] = np.hstack(parts)
    return captured


def _mask(masks: Sequence[np.ndarray | None], index: int) -> np.ndarray | None:
    """The mask of feed ``index``, or None."""
    return masks[index] if index < len(masks) else None
