"""Run a feed that holds a batch of many samples a few rows at a time, outputs joined as one run's.

A calibration file is fed as one batch (``--calibration`` with 128 images is one feed of 128 rows).
onnxruntime sizes its memory arena to the largest run a session sees and keeps it: PP-OCRv4 det on 128
tiles of 320² (``--target-macs 0.9``) grew each reference session by ~3 GB and peaked at 15.5 GB RSS in
89 s, most of it arenas at batch 128. In chunks of rows a session holds one chunk's intermediate
tensors: 2.4 GB in 47 s, the same plan and errors.

Chunking is used only where it gives the one-run outputs: the batched inputs share one leading size on
a dynamic axis, and, checked once per chunker on the first three rows, each output has that leading
axis and the rows run together give what they give one by one (a model that mixes its samples, or
hard-codes its batch, is run whole).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Input elements (all batched inputs together) per chunk of rows: 2M float32 is 8 MB, six 320² RGB
#: tiles. PP-OCRv4 det, 128 tiles: 6-row chunks ran as fast as one 128-row run.
CHUNK_ELEMENTS = 1 << 21

#: Rows run together and one by one to decide whether a session's feeds may be chunked.
CHECKED_ROWS = 3
#: Largest difference, relative to the tensor's largest magnitude, between rows run together and apart.
RELATIVE_ROUNDING = 1e-5

Feed = Mapping[str, np.ndarray]
#: Runs the model on one feed and returns its outputs in a fixed order.
RunValues = Callable[[Feed], Sequence[np.ndarray]]


def _leading_size(feed: Feed, names: Sequence[str]) -> int | None:
    """The one leading size of the batched arrays of ``feed`` (None: absent, scalar, or sizes differ)."""
    arrays = [feed.get(name) for name in names]
    if not arrays or any(not isinstance(a, np.ndarray) or a.ndim == 0 for a in arrays):
        return None
    sizes = {a.shape[0] for a in arrays if isinstance(a, np.ndarray)}
    return sizes.pop() if len(sizes) == 1 else None


class RowChunks:
    """Runs feeds whose batched inputs hold many rows in chunks of rows (see the module docstring).

    Args:
        names: The inputs that carry the batch (axis 0), each declared with a dynamic axis 0; other
            arrays of a feed (weights fed as inputs) go whole to every chunk.
        elements: Input elements per chunk (all of ``names`` together; None: ``CHUNK_ELEMENTS``).
    """

    def __init__(self, names: Sequence[str], elements: int | None = None) -> None:
        self.names = list(names)
        self.elements = elements if elements is not None else CHUNK_ELEMENTS
        self.safe: bool | None = None  # decided on the first feed large enough to chunk
        self.per_row: list[int] = []  # per output: its leading size for one row ([B·S, H]: S)

    def rows_per_chunk(self, feed: Feed) -> int | None:
        """Rows per chunk for ``feed``, or None where it is run whole (too few rows, no batch)."""
        count = _leading_size(feed, self.names)
        if count is None or count < 2:
            return None
        per_row = sum(math.prod(feed[name].shape[1:]) for name in self.names)
        rows = max(1, self.elements // max(per_row, 1))
        return rows if rows < count else None

    def run(self, run_values: RunValues, feed: Feed) -> list[np.ndarray]:
        """``run_values(feed)``, in chunks of rows where that gives the same outputs."""
        rows = self.rows_per_chunk(feed)
        if rows is not None and self.safe is None:
            self.safe = self._separable(run_values, feed)
        if rows is None or not self.safe:
            return list(run_values(feed))
        count = feed[self.names[0]].shape[0]
        parts = [run_values(self._rows(feed, start, start + rows)) for start in range(0, count, rows)]
        joined = [np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in range(len(parts[0]))]
        for value, per_row in zip(joined, self.per_row, strict=True):
            if value.shape[:1] != (count * per_row,):  # checked on the first rows; a later chunk disagrees
                logger.info("running %d rows whole (an output's leading size: %s)", count, value.shape[:1])
                return list(run_values(feed))
        return joined

    def _rows(self, feed: Feed, start: int, stop: int) -> dict[str, np.ndarray]:
        return {**feed, **{name: feed[name][start:stop] for name in self.names}}

    def _separable(self, run_values: RunValues, feed: Feed) -> bool:
        """Whether the first ``CHECKED_ROWS`` rows run together give, on axis 0, what each gives alone.

        Checked once. An output's leading size may be a multiple of the rows (a ``[B·S, H]`` reshape of
        ``[B, S, H]``): the chunks then join in the same order. Three rows, not two: a model that
        mixes rows two apart (a dilated convolution over axis 0) shows it only then.
        """
        count = min(CHECKED_ROWS, feed[self.names[0]].shape[0])
        try:
            together = [np.asarray(v) for v in run_values(self._rows(feed, 0, count))]
            alone = [[np.asarray(v) for v in run_values(self._rows(feed, k, k + 1))] for k in range(count)]
        except Exception as error:  # onnxruntime's errors share no base class; the whole run still works
            logger.info("running batches whole (a run of %d rows failed: %s)", count, error)
            return False
        self.per_row = []
        for index, joined in enumerate(together):
            parts = [values[index] for values in alone]
            per_row = parts[0].shape[0] if parts[0].ndim >= 1 else 0
            shaped = per_row >= 1 and all(part.shape == parts[0].shape for part in parts)
            shaped = shaped and joined.shape == (count * per_row, *parts[0].shape[1:])
            numeric = all(v.dtype.kind in "biuf" for v in (joined, *parts))
            if not (shaped and numeric and _same(joined, np.concatenate(parts))):
                logger.info("running batches whole (output %d changes when its rows run apart)", index)
                self.per_row = []
                return False
            self.per_row.append(per_row)
        return True


def _same(joined: np.ndarray, apart: np.ndarray) -> bool:
    """Whether ``joined`` equals ``apart`` up to rounding at the tensor's scale.

    Kernels chosen by batch size round differently: PP-OCRv4 det's tensors of magnitude ~3000 differ by
    4e-4 between one run of two rows and two runs of one.
    """
    if joined.size == 0:
        return True
    scale = float(np.abs(joined).max()) if joined.dtype.kind == "f" else 0.0
    difference = np.abs(joined.astype(np.float64) - apart.astype(np.float64)).max()
    return bool(difference <= RELATIVE_ROUNDING * scale + 1e-6)


def dynamic_leading(shapes: Mapping[str, Sequence[object]]) -> list[str]:
    """The names whose declared axis 0 is dynamic (a symbolic or unknown dim), from onnxruntime's shapes."""
    return [name for name, shape in shapes.items() if len(shape) >= 1 and not isinstance(shape[0], int)]
