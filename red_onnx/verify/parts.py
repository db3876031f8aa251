"""The parts of an output measured on their own: a packed head's slices of different scale, its boxes.

An output of rank >= 3 whose axis-1 entries differ in scale by more than ``SCALE_GAP`` (a YOLO head
``[N, 4 + classes, boxes]``: coordinates next to class scores) is also measured per contiguous slice of
similar scale (:func:`scale_slices`, :func:`measured_parts`), so the small part cannot be destroyed
inside the budget of the large one; a detection head's boxes are measured against their own size,
weighted by their confidence (:func:`is_box_head`, :func:`box_error`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from red_onnx.verify.compare import compare_outputs

#: Neighbouring axis-1 entries of an output whose RMS differ by more than this start a new slice.
SCALE_GAP = 10.0
#: In a packed output, slices this narrow are measured entry by entry (box coordinates).
ENTRY_SLICE_MAX = 4


def measured_parts(reference: np.ndarray, slices: list[slice] | None = None) -> list[slice]:
    """The parts of axis 1 measured on their own: :func:`scale_slices`, split further in a packed output.

    Every entry of a slice of at most ``ENTRY_SLICE_MAX`` entries is measured on its own (YOLO's x, y,
    w, h: x and y are several times larger than w and h, so measured together a 4-7% change of w and h
    hid under a 2% budget and moved detections' IoU below 0.9 on natural images). ``slices``: the
    :func:`scale_slices` of ``reference`` where already computed.
    """
    parts = scale_slices(reference) if slices is None else slices
    if len(parts) == 1:
        return parts
    split: list[slice] = []
    for part in parts:
        width = part.stop - part.start
        split += (
            [slice(k, k + 1) for k in range(part.start, part.stop)] if width <= ENTRY_SLICE_MAX else [part]
        )
    return split


def is_box_head(reference: np.ndarray, slices: list[slice] | None = None) -> bool:
    """Whether ``reference`` looks like a packed detection head ``[N, 4 + classes, boxes]`` in x, y, w, h.

    Its first :func:`scale_slices` slice (``slices``, where already computed) is entries 0-3, and entries
    2 and 3 (width, height) are never negative.
    """
    if reference.ndim != 3 or reference.shape[1] < 5 or not np.issubdtype(reference.dtype, np.floating):
        return False
    parts = scale_slices(reference) if slices is None else slices
    return len(parts) > 1 and parts[0] == slice(0, 4) and bool((reference[:, 2:4] >= 0).all())


def box_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """How far the boxes that matter moved relative to their own size: ``‖Δ(x, y, w, h)‖ / √(w·h)``.

    A detection keeps IoU >= 0.9 only if its box moves by a few percent of *its* size; relative L2 over
    the whole head measures moves against the image-sized x and y instead (YOLOv8n at 0.02: 0.008 on
    natural images while 50-pixel boxes moved 8-11 pixels). The mean square is weighted by each box's
    confidence (:func:`box_weights`): the boxes of a head's background anchors, which no detection
    reads, outnumber the rest by far (YOLOv8n at 0.9 of the MACs, 128 calibration views: with every
    box alike the search kept 0.63 of the original's 60 test detections at IoU >= 0.9, weighted 0.85).
    """
    ref = np.asarray(reference[:, :4], np.float64)
    moved = np.linalg.norm(np.asarray(candidate[:, :4], np.float64) - ref, axis=1)
    size = np.sqrt(ref[:, 2] * ref[:, 3])
    size = np.maximum(size, 1e-6 * max(float(size.max()), 1e-30))
    error = moved / size
    if not np.isfinite(error).all():
        return math.inf
    weights = box_weights(candidate, reference)
    return float(np.sqrt(np.sum(weights * error**2) / np.sum(weights)))


def box_weights(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each box's weight in :func:`box_error`: its highest class score, the reference's or the candidate's.

    Both, so that a box the candidate makes confident counts too. Where the class scores are not
    probabilities (outside [0, 1], or not finite) or all zero, every box weighs the same.
    """
    ref, cand = (np.asarray(values[:, 4:], np.float64) for values in (reference, candidate))
    uniform = np.ones(ref.shape[:1] + ref.shape[2:])
    if not (np.isfinite(ref).all() and np.isfinite(cand).all()):
        return uniform
    if min(ref.min(), cand.min()) < 0.0 or max(ref.max(), cand.max()) > 1.0:
        return uniform
    weights = np.maximum(ref.max(axis=1), cand.max(axis=1))
    return weights if weights.sum() > 0.0 else uniform


def scale_slices(reference: np.ndarray, gap: float = SCALE_GAP) -> list[slice]:
    """Contiguous slices of axis 1 whose entries have similar scale (one slice for most outputs)."""
    moved = np.moveaxis(np.asarray(reference, np.float64), 1, 0).reshape(reference.shape[1], -1)
    rms = np.sqrt(np.mean(moved**2, axis=1)) + 1e-30
    ratio = rms[1:] / rms[:-1]
    cuts = np.flatnonzero((ratio > gap) | (ratio < 1.0 / gap)) + 1
    bounds = [0, *cuts.tolist(), len(rms)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def part_errors(
    name: str, actual: np.ndarray | None, expected: np.ndarray, slices: list[slice] | None
) -> dict[str, float]:
    """Relative L2 error of output ``name`` and of each measured part of a packed head (``name[a:b]``).

    Args:
        name: The output's name.
        actual: The candidate's output (None: missing).
        expected: The reference output.
        slices: :func:`scale_slices` of ``expected`` (None: the output is measured whole only).
    """
    pieces: dict[str, tuple[np.ndarray | None, np.ndarray]] = {name: (actual, expected)}
    parts = [] if slices is None or actual is None else measured_parts(expected, slices)
    if actual is not None and len(parts) > 1:
        pieces |= {
            f"{name}[{part.start}:{part.stop}]": (actual[:, part], expected[:, part]) for part in parts
        }
    return {label: compare_outputs(label, cand, ref).rel_l2_err for label, (cand, ref) in pieces.items()}
