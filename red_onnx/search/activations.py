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

from red_onnx.errors import first_line
from red_onnx.runtime.tensor_values import run_tensors

logger = logging.getLogger(__name__)

#: Positions sampled per input and tensor (all when the tensor has fewer).
POSITIONS = 2048


def channel_rows_sampled(
    value: np.ndarray, axis: int, block: int, rng: np.random.Generator, positions: int
) -> np.ndarray:
    """``[channels, positions]`` of one tensor, at most ``positions`` sampled at random (float64).

    A channel's ``block`` consecutive elements along ``axis`` (Flatten blocks) count as positions.
    """
    moved = np.moveaxis(value, axis, 0)
    channels = moved.shape[0] // block
    rows = moved.reshape(channels, block, -1).reshape(channels, -1)
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
) -> dict[str, np.ndarray]:
    """Sampled activations of the named tensors.

    Args:
        model: The model to run (not modified).
        feeds: Input dicts, one per synthetic sample batch.
        tensors: Tensor name → (channel axis, block) as the channel analysis found them.
        positions: Positions kept per feed and tensor.
        seed: Seed of the position sampling.

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
        parts = [channel_rows_sampled(np.asarray(run[index]), axis, block, rng, positions) for run in runs]
        captured[name] = np.hstack(parts)
    return captured
