"""``--benchmark``: onnxruntime latency of the input and the compressed model, side by side.

Median of ``runs`` timed runs after warm-up, interleaved between the two models (the latency service),
graph optimisations on, one execution provider, the thread count stated. Batch 1 and 16: the batch is
axis 0 of every input whose axis 0 is dynamic; a model without one is measured at its own batch only,
and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from red_onnx.errors import first_line
from red_onnx.latency import CPU_PROVIDER, DEFAULT_RUNS, LatencyService
from red_onnx.verify import InputSpec, make_inputs, real_inputs

BATCHES = (1, 16)


@dataclass
class LatencyFigures:
    """Latency before/after at each batch, and how it was measured."""

    provider: str
    threads: int | str
    runs: int
    batches: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _batched_feed(model: onnx.ModelProto, spec: InputSpec, batch: int) -> dict[str, np.ndarray] | None:
    """The verification feed at ``batch`` (axis 0 of inputs whose axis 0 is dynamic); None if none is."""
    feed = make_inputs(model, spec, 0)
    dynamic = []
    for value in real_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if dims and (dims[0].dim_param or not dims[0].HasField("dim_value")):
            dynamic.append(value.name)
    if not dynamic:
        return None
    return {
        name: np.repeat(array[:1], batch, axis=0) if name in dynamic and array.ndim else array
        for name, array in feed.items()
    }


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
        batches: Batch sizes to try.
    """
    service = LatencyService(provider=provider, runs=runs, threads=threads)
    figures = LatencyFigures(
        provider, threads if threads is not None else f"default ({os.cpu_count()} cores)", runs
    )
    sessions = [service.session(original), service.session(compressed)]
    for batch in batches:
        feed = _batched_feed(original, spec, batch)
        if feed is None and batch == batches[0]:
            feed = make_inputs(original, spec, 0)  # the model's own (static) batch
        if feed is None:
            figures.skipped[str(batch)] = "no input has a dynamic batch axis"
            continue
        try:
            before, after = service.time_sessions(sessions, feed)
        except Exception as error:  # onnxruntime's errors share no base class: a reasoned skip, not a crash
            figures.skipped[str(batch)] = f"onnxruntime could not run this batch: {first_line(error)[:200]}"
            continue
        figures.batches[str(batch)] = {
            "before_ms": round(before * 1e3, 4),
            "after_ms": round(after * 1e3, 4),
            "ratio": round(after / before, 4),
        }
    return figures
