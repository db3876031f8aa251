"""``--plot DIR``: the budget search's MACs-vs-error curve, and merged layers' weight densities.

Each merged group's producer weights are drawn with their KDE (at the bandwidth whose hashed ranking
the search kept, else a tenth of Scott's), the basin edges and the snapped values. matplotlib is an
optional extra (``red-onnx[plot]``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from red_onnx.analysis.kde import binned_kde, find_basins, scott_bandwidth
from red_onnx.errors import UsageError
from red_onnx.report.report import Report


def _pyplot():
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="red-onnx-mpl-"))
    try:
        import matplotlib
    except ImportError as error:
        raise UsageError("--plot needs matplotlib: pip install 'red-onnx[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Producer node name → its weight values (from initializers or Constant nodes)."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            tensors[node.output[0]] = node.attribute[0].t
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.input[1] in tensors:
            found[node.name] = numpy_helper.to_array(tensors[node.input[1]])
    return found


def write_plots(directory: str | Path, report: Report, model: onnx.ModelProto) -> list[Path]:
    """Write the PNGs for an approximate run; returns their paths (none for an exact run).

    Args:
        directory: Where to write (created if missing).
        report: The run's report (its ``budget`` section).
        model: The input model (the weights whose densities are drawn).
    """
    if not report.budget:
        return []
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [_curve(plt, report.budget, out / "budget_curve.png")]
    weights = _weights(model)
    changed = [g for g in report.budget["groups"] if g["removed"]]
    for index, group in enumerate(changed):
        values = [weights[p].ravel() for p in group["producers"] if p in weights]
        if values:
            written.append(_density(plt, group, np.concatenate(values), out / f"density_{index:02d}.png"))
    return written


def _curve(plt, budget: dict, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    points = sorted((p["macs_fraction"], p["error"]) for p in budget["curve"])
    if points:
        axis.plot(*zip(*points, strict=True), "o-", label="explored (search inputs)")
    axis.plot([budget["macs_fraction"]], [budget["error"]], "r*", markersize=14, label="chosen")
    axis.set_xlabel("fraction of MACs kept (counted)")
    axis.set_ylabel("worst relative L2 error of the outputs")
    axis.invert_xaxis()
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _density(plt, group: dict, values: np.ndarray, path: Path) -> Path:
    bandwidth = group["bandwidth"] or scott_bandwidth(values) / 10
    density = binned_kde(values, bandwidth)
    basins = find_basins(values, density)
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(density.grid, density.values, lw=1, label=f"KDE, h={bandwidth:.3g}")
    for edge in basins.edges:
        axis.axvline(edge, color="grey", lw=0.3)
    axis.plot(basins.representatives, np.zeros_like(basins.representatives), "r|", markersize=12,
              label=f"{len(basins.representatives)} snapped values")  # fmt: skip
    title = f"{group['group'][:60]}: {group['channels']} -> {group['channels'] - group['removed']} channels"
    axis.set_title(f"{title}\nranking: {group['ordering']}", fontsize=9)
    axis.set_xlabel("weight value")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
