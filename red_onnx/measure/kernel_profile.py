"""Where onnxruntime spends a model's time: how much of a run its convolutions and matmuls take.

Removing channels shrinks the layers that carry MACs (convolutions, Gemm, MatMul) in proportion, and
the elementwise work on the removed channels; the rest of a run (layout reorders, pooling, reshapes,
small elementwise ops, onnxruntime's per-op and per-run overhead) barely moves. ``--benchmark``
reports this share next to the latency, so that a latency ratio far above the MACs ratio comes with
its reason: at batch 1 and 1 thread these layers take 26% of PP-OCR cls's run (hard-swish and
squeeze-excite blocks; 21% fewer MACs give about 10% less latency), 55-60% of the two sub-0.05 ms
models' (per-run overhead), 78% of YOLOv8n's, 96-99% of MobileNetV2's and the ResNet-50 layouts'.
It is not a bound: the rest shrinks too, by the elementwise work of the removed channels.

Both times are read from onnxruntime's own profile (``SessionOptions.enable_profiling``) of a session
of the latency service (``ORT_ENABLE_ALL``, its provider and threads), averaged over ``runs`` runs
after the first, which is left out (it allocates): the kernels' and the runs' durations in one
profile, since its bookkeeping lengthens small kernels (divided by an unprofiled run's time, the
bundled digits model's convs took over 100% of it).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from red_onnx.measure.latency import LatencyService

#: onnxruntime kernels whose work scales with the MACs of the layer (after its fusions and layouts).
WEIGHTED_OPS = frozenset({
    "Conv", "ConvTranspose", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv",
    "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "Attention",
})  # fmt: skip
PROFILED_RUNS = 10


@dataclass(frozen=True)
class KernelProfile:
    """Mean microseconds per run: of each onnxruntime op type's kernels, and of the whole run."""

    times: dict[str, float]
    run_time: float  # 0.0 when the profile had no run events (then the kernels' sum stands in)

    @property
    def weighted_time(self) -> float:
        """Mean microseconds per run in :data:`WEIGHTED_OPS`."""
        return sum(value for op, value in self.times.items() if op in WEIGHTED_OPS)

    @property
    def share(self) -> float | None:
        """:attr:`weighted_time` over the run (at most 1); None when nothing was timed."""
        total = self.run_time or sum(self.times.values())
        return min(self.weighted_time / total, 1.0) if total > 0 and self.times else None


def profile_kernels(
    model: onnx.ModelProto | str,
    feed: Mapping[str, np.ndarray],
    service: LatencyService,
    runs: int = PROFILED_RUNS,
) -> KernelProfile:
    """Profile ``runs`` runs of ``model`` after a first one, which is left out (it allocates).

    Args:
        model: The model, or its path.
        feed: Inputs by name (extra names are ignored).
        service: The latency service whose sessions are profiled (provider, threads, optimisations).
        runs: Profiled runs counted.
    """
    with tempfile.TemporaryDirectory(prefix="red_onnx_profile_") as folder:
        options = service.session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = service.session(model, options)
        inputs = {value.name: feed[value.name] for value in session.get_inputs()}
        for _ in range(runs + 1):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    return summed(events)


def summed(events: list[dict]) -> KernelProfile:
    """The mean per run of onnxruntime's profile ``events``, after the end of the first run."""
    run_spans = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    after = run_spans[0][0] + run_spans[0][1] if run_spans else -1
    counted = max(len(run_spans) - 1, 1)
    totals: defaultdict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > after:
            totals[event.get("args", {}).get("op_name", "?")] += float(event["dur"])
    run_time = sum(duration for _, duration in run_spans[1:]) / counted
    return KernelProfile({op: total / counted for op, total in totals.items()}, run_time)
