"""``--benchmark``: onnxruntime latency of the input and the compressed model, side by side.

Median of ``runs`` timed runs after warm-up, interleaved between the two models (the latency service),
graph optimisations on, one execution provider, the thread count stated. Batch 1 and 16: every input is
repeated along its batch axis (:func:`batch_axes`: axis 0 where it is dynamic, and in the other inputs
the axis named like it, e.g. silero-vad's ``state [2, batch, 128]``); a model without a dynamic batch
axis, or whose inputs do not agree on one, is measured at its own batch only, and the report says why.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from red_onnx.errors import RedOnnxError, first_line
from red_onnx.measure.kernel_profile import profile_kernels
from red_onnx.measure.latency import DEFAULT_RUNS, LatencyService
from red_onnx.options import CPU_PROVIDER, InputSpec
from red_onnx.verify.inputs import make_inputs, real_inputs

BATCHES = (1, 16)
NO_DYNAMIC_BATCH = "no input has a dynamic batch axis"


class BatchAxisError(RedOnnxError):
    """The model has no batch axis that every input agrees on; the message says why (one line)."""


@dataclass
class LatencyFigures:
    """Latency before/after at each batch, and how it was measured.

    ``weighted_share``: at the first batch measured, the fraction of a run that onnxruntime's convolution
    and matrix-product kernels take, before and after (both timed in one profile,
    ``red_onnx.measure.kernel_profile``): the part of the time that removing channels shortens in proportion;
    or ``{"skipped": reason}``.
    """

    provider: str
    threads: int | str
    runs: int
    batches: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    weighted_share: dict[str, float | str] | None = None


def _dynamic(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A named dim, an unset one, or a non-positive dim_value (PP-OCR cls declares -1)."""
    return bool(dim.dim_param) or not dim.HasField("dim_value") or dim.dim_value <= 0


def _dims_text(dims: Sequence[onnx.TensorShapeProto.Dimension]) -> str:
    return "[" + ", ".join(d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in dims) + "]"


def _batch_axis_of(
    value: onnx.ValueInfoProto, shape: tuple[int, ...], names: set[str], sizes: set[int]
) -> int | None:
    """The first dynamic axis of ``value`` named like the batch (unnamed: of a batch size); None: static.

    Raises:
        BatchAxisError: ``value`` has dynamic axes, but none of them is like the batch.
    """
    dims = value.type.tensor_type.shape.dim
    for axis, dim in enumerate(dims):
        if _dynamic(dim) and (dim.dim_param in names if dim.dim_param else shape[axis] in sizes):
            return axis
    if not any(_dynamic(dim) for dim in dims):
        return None
    batch = f"{next(iter(names))!r}" if names else f"unnamed, of size {', '.join(map(str, sorted(sizes)))}"
    raise BatchAxisError(f"input {value.name!r} {_dims_text(dims)} has no axis like the batch ({batch})")


def batch_axes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """The batch axis of each input that has one (empty: no input's axis 0 is dynamic).

    Inputs whose axis 0 is dynamic name the batch: their dim_param (the same name in all that name it),
    or, unnamed, their size in ``feed``. In every other input, the first dynamic axis carrying that name
    (or, unnamed, that size) is its batch axis, e.g. silero-vad's ``state [2, batch, 128]``; an input
    without dynamic axes keeps its shape. Scalars are never batched.

    Raises:
        BatchAxisError: The inputs name axis 0 differently, or an input has dynamic axes but none like
            the batch (a state whose batch dim is named otherwise could not follow the batch).
    """
    values = [v for v in real_inputs(model) if v.name in feed and np.ndim(feed[v.name])]
    firsts = {v.name: v.type.tensor_type.shape.dim[0] for v in values if v.type.tensor_type.shape.dim}
    leading = [name for name, dim in firsts.items() if _dynamic(dim)]
    if not leading:
        return {}
    names = {firsts[name].dim_param for name in leading} - {""}
    if len(names) > 1:
        raise BatchAxisError(f"the inputs name their dynamic axis 0 differently ({', '.join(sorted(names))})")
    sizes = {feed[name].shape[0] for name in leading if not firsts[name].dim_param}
    axes = dict.fromkeys(leading, 0)
    for value in values:
        if value.name not in axes:
            axis = _batch_axis_of(value, feed[value.name].shape, names, sizes)
            if axis is not None:
                axes[value.name] = axis
    return axes


def batched_feed(
    model: onnx.ModelProto, spec: InputSpec, batch: int, *, own_batch: bool = False
) -> dict[str, np.ndarray]:
    """The verification feed (its first step) with its first sample repeated ``batch`` times.

    Args:
        model: The model (external data need not be loaded).
        spec: The verification input spec.
        batch: The batch size wanted.
        own_batch: Where the model has no batch axis (:class:`BatchAxisError`, or no dynamic axis 0), return
            the verification feed as it is (the model's own batch) instead of raising.

    Raises:
        BatchAxisError: The model has no batch axis to repeat along, and ``own_batch`` is False.
    """
    feed = make_inputs(model, spec, 0)
    try:
        axes = batch_axes(model, feed)
        if not axes:
            raise BatchAxisError(NO_DYNAMIC_BATCH)
    except BatchAxisError:
        if own_batch:
            return feed
        raise
    for name, axis in axes.items():
        first = feed[name][(slice(None),) * axis + (slice(0, 1),)]
        feed[name] = np.repeat(first, batch, axis=axis)
    return feed


def benchmark(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    spec: InputSpec,
    *,
    provider: str = CPU_PROVIDER,
    runs: int = DEFAULT_RUNS,
    threads: int | None = None,
    batches: Sequence[int] = BATCHES,
) -> LatencyFigures:
    """Measure both models at each batch; the ratio is after / before.

    Args:
        original: The input model.
        compressed: The compressed model.
        spec: The verification input spec (shapes, ranges, values, ``.npz``).
        provider: onnxruntime execution provider.
        runs: Timed runs per model and batch (medians; at least 20 recommended).
        threads: ``intra_op_num_threads`` (None: onnxruntime's default, one per core).
        batches: Batch sizes to try; the first is measured at the model's own batch where it has no
            batch axis (:func:`batched_feed`), the others are then skipped with the reason.
    """
    service = LatencyService(provider=provider, runs=runs, threads=threads)
    figures = LatencyFigures(
        provider, threads if threads is not None else f"default ({os.cpu_count()} cores)", runs
    )
    sessions = [service.session(original), service.session(compressed)]
    for batch in batches:
        try:
            feed = batched_feed(original, spec, batch, own_batch=batch == batches[0])
        except BatchAxisError as reason:
            figures.skipped[str(batch)] = str(reason)
            continue
        try:
            before, after = service.time_sessions(sessions, feed)
        except Exception as error:  # onnxruntime's errors share no base class: a reasoned skip, not a crash
            figures.skipped[str(batch)] = f"onnxruntime could not run this batch: {first_line(error)[:200]}"
            continue
        figures.batches[str(batch)] = {  # significant digits: a 7 µs run rounded to 4 decimals lost 1.5%
            "before_ms": _significant(before * 1e3),
            "after_ms": _significant(after * 1e3),
            "ratio": round(after / before, 4),
        }
        if figures.weighted_share is None:
            share = _weighted_shares((original, compressed), feed, service)
            figures.weighted_share = {**share, "batch": str(batch)}
    return figures


def _significant(value: float, digits: int = 5) -> float:
    """``value`` to ``digits`` significant digits (milliseconds of runs from microseconds to seconds)."""
    return float(f"{value:.{digits}g}")


def _weighted_shares(
    models: tuple[onnx.ModelProto, onnx.ModelProto], feed: dict, service: LatencyService
) -> dict[str, float | str]:
    """Both models' share of a run in convolutions and matmuls, or why it was not measured."""
    try:
        shares = [profile_kernels(m, feed, service).share for m in models]
    except Exception as error:  # onnxruntime's errors share no base class: a reason, not a crash
        return {"skipped": f"onnxruntime could not profile: {first_line(error)[:200]}"}
    before, after = shares
    if before is None or after is None:
        return {"skipped": "onnxruntime's profile timed no kernel"}
    return {"before": round(before, 4), "after": round(after, 4)}
