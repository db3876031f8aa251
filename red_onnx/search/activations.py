"""Channel activations on the synthetic verification inputs (a service the budget search asks).

One onnxruntime run of the base model with the group tensors the consumers read as extra outputs; for
each tensor, every channel's values at the same random positions (at most ``positions`` per input),
as a ``[channels, samples]`` matrix. No data beyond the seeded synthetic inputs is used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import GroupTensor
from red_onnx.errors import first_line
from red_onnx.runtime.tensor_values import run_tensors

logger = logging.getLogger(__name__)

#: Positions sampled per input and tensor (all when the tensor has fewer).
POSITIONS = 2048


def captured_by_rows(member: GroupTensor, node: gs.Node) -> bool:
    """Whether a consumer's input is captured row by row (attention heads merged back).

    That is a MatMul reading a ``[.., tokens, H·D]`` tensor in blocks of D. Each of a head's D rows is
    a different feature, read by its own row of the output projection: the refit and the local estimate
    treat them as rows (the tokens as positions). A Flatten block (``[N, C·H·W]`` into a Gemm) stays
    one channel with its block as positions: per row it would have a position per sample only.
    """
    return node.op == "MatMul" and member.block > 1 and member.rank >= 3 and member.axis == member.rank - 1


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
