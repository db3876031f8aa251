"""Uneven depthwise separation (RED's third technique), kept only where it is measured faster.

For every group-1 Conv with a k×k (or k, or k×k×k) kernel, k > 1: factor its kernels per input channel
into repeated unit kernels (``red_onnx.analysis.separation``); when the separated form has fewer MACs
(``U·K + O·U < O·I·K``), ask the latency probe to time the conv alone and its separated form at the
input shape the model runs at, and rewrite (``red_onnx.rewrite.separation``) only when the separated
form is at least ``min_gain`` faster. Without a probe (``--no-latency-check``) MACs alone decide. 1×1
convs are never candidates (``u_c ≤ 1``: the separated form costs more). The rewrite is exact, so the
exact mode applies it too; on trained weights kernels rarely repeat and the report says so per conv.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import user_frozen
from red_onnx.analysis.reasons import Reason
from red_onnx.analysis.separation import (
    KernelBasis,
    break_even_units,
    conv_macs,
    factor_kernels,
    separated_macs,
    units_lower_bound,
)
from red_onnx.errors import InternalError
from red_onnx.io.graph import WorkingModel, constant_values, expect_constant, is_empty_input
from red_onnx.measure.latency import LatencyProbe
from red_onnx.passes.infra import Pass, PassResult, Skip, require_constant_weights
from red_onnx.rewrite.separation import separate_conv

Shapes = Mapping[str, "tuple[int, ...] | None"]
#: A factorisation rebuilding some kernel worse than this (relative L2) is not an exact re-expression.
EXACT_FACTOR_ERROR = 1e-5
#: The separated form must be measured at least this much faster (medians; guards against noise).
DEFAULT_MIN_GAIN = 0.05
#: Seed of the probe inputs.
PROBE_SEED = 0


@dataclass(frozen=True)
class ConvDecision:
    """What the pass decided for one k×k conv, with the figures behind it (one report row)."""

    name: str
    out_channels: int
    in_channels: int
    kernel: list[int]
    units: int
    break_even: float
    macs_before: int
    macs_after: int
    latency_before_ms: float | None
    latency_after_ms: float | None
    separated: bool
    decision: str


def probe_models(
    conv: gs.Node, basis: KernelBasis, input_shape: Sequence[int]
) -> tuple[onnx.ModelProto, ...]:
    """The conv alone and its separated form, as two one-input models at ``input_shape``."""
    weight = expect_constant(conv.inputs[1])
    inputs = [gs.Constant("w", weight)]
    if not is_empty_input(conv, 2):
        inputs.append(gs.Constant("b", expect_constant(conv.inputs[2])))
    models = []
    for separate in (False, True):
        source = gs.Variable("x", dtype=weight.dtype, shape=list(input_shape))
        output = gs.Variable("y", dtype=weight.dtype)
        node = gs.Node("Conv", "conv", dict(conv.attrs), [source, *inputs], [output])
        graph = gs.Graph(nodes=[node], inputs=[source], outputs=[output], opset=13)
        if separate:
            separate_conv(graph, node, basis)
        models.append(gs.export_onnx(graph.cleanup().toposort()))
    return models[0], models[1]


class SeparateDepthwise(Pass):
    """Rewrite k×k convs whose kernels repeat as Gather → depthwise → pointwise, where it pays."""

    name = "separate_depthwise"

    def __init__(
        self,
        *,
        shapes: Callable[[WorkingModel], Shapes],
        latency: LatencyProbe | None,
        freeze: Sequence[str] = (),
        min_gain: float = DEFAULT_MIN_GAIN,
    ) -> None:
        """Configure the pass.

        Args:
            shapes: Tensor shapes of a working model (the shape service).
            latency: The latency oracle; None decides on MACs alone (``--no-latency-check``).
            freeze: Node-name glob patterns of convs to leave alone.
            min_gain: The fraction of time the separated form must save to be kept.
        """
        self.shapes, self.latency, self.freeze, self.min_gain = shapes, latency, tuple(freeze), min_gain

    def requires(self, model: WorkingModel) -> None:
        """Weights are constants (normalised at import)."""
        require_constant_weights(model, self.name)

    def call(self, model: WorkingModel) -> PassResult:
        """Decide and rewrite every candidate conv of the main graph."""
        shapes = self.shapes(model)
        decisions: list[ConvDecision] = []
        skips: list[Skip] = []
        for conv in [n for n in model.graph.nodes if n.op == "Conv"]:
            weight = constant_values(conv.inputs[1]) if len(conv.inputs) > 1 else None
            if weight is not None and math.prod(weight.shape[2:]) <= 1:
                continue  # 1×1: u_c <= 1, the separated form never has fewer MACs
            reason = self._unsupported(conv, weight, shapes)
            if reason:
                skips.append(Skip(conv.name, reason))
                continue
            if weight is None:  # _unsupported gives a reason for every conv without a constant weight
                raise InternalError(f"conv {conv.name!r} without a constant weight passed the checks")
            decision = self._decide(model.graph, conv, weight, shapes)
            decisions.append(decision)
        separated = [d for d in decisions if d.separated]
        if separated:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {
            "separated": len(separated),
            "candidates": len(decisions),
            "convs": [asdict(d) for d in decisions],
        }
        if self.latency is not None:
            stats["provider"] = self.latency.provider
        return PassResult(model, bool(separated), stats, skips)

    def _unsupported(self, conv: gs.Node, weight: np.ndarray | None, shapes: Shapes) -> str | None:
        """Why ``conv`` cannot be a candidate, or None."""
        frozen = user_frozen(conv.name, self.freeze)
        if frozen:
            return frozen
        if weight is None or weight.ndim < 3:
            return Reason.SEP_WEIGHT
        if int(conv.attrs.get("group", 1)) != 1:
            return Reason.SEP_NOT_GROUP1.format(group=conv.attrs.get("group"))
        source, output = shapes.get(conv.inputs[0].name), shapes.get(conv.outputs[0].name)
        if not source or not output or any(not isinstance(d, int) or d < 1 for d in (*source, *output)):
            return Reason.SEP_SHAPE
        return None

    def _decide(self, graph: gs.Graph, conv: gs.Node, weight: np.ndarray, shapes: Shapes) -> ConvDecision:
        """Bound U cheaply, factor, count MACs, probe if needed, and rewrite when it pays."""
        row = _row(conv, weight, shapes, units_lower_bound(weight))
        if row["macs_after"] >= row["macs_before"]:
            return ConvDecision(**row, decision=Reason.SEP_NO_MACS_RANK.format(**row))
        basis = factor_kernels(weight)
        row = _row(conv, weight, shapes, basis.size)
        if basis.size == 0:
            return ConvDecision(**row, decision=Reason.SEP_ZERO)
        if basis.error > EXACT_FACTOR_ERROR:
            return ConvDecision(**row, decision=Reason.SEP_INEXACT.format(error=basis.error))
        if row["macs_after"] >= row["macs_before"]:
            return ConvDecision(**row, decision=Reason.SEP_NO_MACS.format(**row))
        if self.latency is None:
            separate_conv(graph, conv, basis)
            return ConvDecision(**{**row, "separated": True}, decision=Reason.SEP_DONE_MACS)
        source_shape = shapes[conv.inputs[0].name]
        if source_shape is None:  # _unsupported refuses a conv whose input shape is unknown
            raise InternalError(f"conv {conv.name!r}: the input shape is unknown after the checks")
        before, after = probe_models(conv, basis, source_shape)
        feed = {"x": np.random.default_rng(PROBE_SEED).standard_normal(source_shape).astype(weight.dtype)}
        t_before, t_after = self.latency.compare(before, after, feed)
        before_ms, after_ms = t_before * 1e3, t_after * 1e3
        timed = {"before_ms": before_ms, "after_ms": after_ms, "provider": self.latency.provider}
        row |= {
            "latency_before_ms": round(before_ms, 4),
            "latency_after_ms": round(after_ms, 4),
        }
        if t_after > (1.0 - self.min_gain) * t_before:
            return ConvDecision(**row, decision=Reason.SEP_SLOWER.format(**timed, gain=self.min_gain))
        separate_conv(graph, conv, basis)
        return ConvDecision(**{**row, "separated": True}, decision=Reason.SEP_DONE.format(**timed))


def _row(conv: gs.Node, weight: np.ndarray, shapes: Shapes, units: int) -> dict:
    """The figures of a decision row for ``units`` unit kernels (no latency, not separated)."""
    out_channels, in_channels, *kernel = weight.shape
    size = math.prod(kernel)
    output = shapes[conv.outputs[0].name]
    if output is None:  # _unsupported refuses a conv whose output shape is unknown
        raise InternalError(f"conv {conv.name!r}: the output shape is unknown after the checks")
    pixels = math.prod(output) // out_channels
    return {
        "name": conv.name, "out_channels": out_channels, "in_channels": in_channels, "kernel": kernel,
        "units": units, "break_even": round(break_even_units(out_channels, in_channels, size), 2),
        "macs_before": conv_macs(out_channels, in_channels, size, pixels),
        "macs_after": separated_macs(out_channels, units, size, pixels),
        "latency_before_ms": None, "latency_after_ms": None, "separated": False,
    }  # fmt: skip
