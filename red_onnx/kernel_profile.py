"""Where onnxruntime spends a model's time: the share of its kernel time in convolutions and matmuls.

Removing channels shrinks the layers that carry MACs (convolutions, Gemm, MatMul) in proportion, and
the elementwise work on the removed channels; the rest of onnxruntime's time (layout reorders,
pooling, reshapes, small elementwise ops, per-op overhead) barely moves. ``--benchmark`` reports this
share next to the latency, so that a latency ratio far above the MACs ratio comes with its reason: on
PP-OCR cls (hard-swish and squeeze-excite blocks) these layers are 39% of the kernel time at batch 1
(YOLOv8n: 82%), and 21% fewer MACs give about 10% less latency.

The share is read from onnxruntime's own profile (``SessionOptions.enable_profiling``) of a session
like the latency service's (``ORT_ENABLE_ALL``, the same provider and threads), over ``runs`` runs
after the first, which is left out (it allocates).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

#: onnxruntime kernels whose work scales with the MACs of the layer (after its fusions and layouts).
WEIGHTED_OPS = frozenset({
    "Conv", "ConvTranspose", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv",
    "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "Attention",
})  # fmt: skip
PROFILED_RUNS = 10


def kernel_time_by_op(
    model: onnx.ModelProto | str,
    feed: Mapping[str, np.ndarray],
    *,
    provider: str,
    threads: int | None,
    runs: int = PROFILED_RUNS,
) -> dict[str, float]:
    """Microseconds of kernel time per onnxruntime op type over ``runs`` runs (the first left out).

    Args:
        model: The model, or its path.
        feed: Inputs by name (extra names are ignored).
        provider: onnxruntime execution provider.
        threads: ``intra_op_num_threads`` (None: onnxruntime's default).
        runs: Profiled runs counted.
    """
    with tempfile.TemporaryDirectory(prefix="red_onnx_profile_") as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        if threads is not None:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, str) else model.SerializeToString()
        session = ort.InferenceSession(source, options, providers=[provider])
        inputs = {value.name: feed[value.name] for value in session.get_inputs()}
        for _ in range(runs + 1):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    return _summed(events)


def _summed(events: list[dict]) -> dict[str, float]:
    """Kernel microseconds per op type, after the end of the first run (its allocations)."""
    first_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    after = first_runs[0][1] if first_runs else -1
    totals: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > after:
            totals[event.get("args", {}).get("op_name", "?")] += float(event["dur"])
    return dict(totals)


def weighted_share(times: Mapping[str, float]) -> float | None:
    """The fraction of the kernel time spent in :data:`WEIGHTED_OPS` (None: nothing was timed)."""
    total = sum(times.values())
    if total <= 0:
        return None
    return sum(value for op, value in times.items() if op in WEIGHTED_OPS) / total
