"""Uneven depthwise separation (RED's third technique), kept only where it is measured faster.

For every group-1 Conv with a k×k (or k, or k×k×k) kernel, k > 1: factor its kernels per input channel
into repeated unit kernels (``red_onnx.analysis.separation``); when the separated form has fewer MACs
(``U·K + O·U < O·I·K``), ask the latency probe to time the conv alone and its separated form at the
input shape the model runs at, and rewrite (``red_onnx.rewrite.separation``) only when the separated
form is clearly faster. Without a probe (``--no-latency-check``) MACs alone decide. 1×1 convs are never
candidates (``u_c ≤ 1``: the separated form costs more). The rewrite is exact, so the exact mode applies
it too; on trained weights kernels rarely repeat and the report says so per conv.

A measured gain (``1 - after/before``) is noisy, so the decision has a hysteresis band around
``min_gain``: at ``min_gain + band`` or above the conv is separated, below ``min_gain - band`` it is kept
("kept: slower"), and in between it is re-measured once with ``REMEASURE_RUNS`` runs; still in between,
it is kept ("kept: marginal"). The band is measured: the 24 convs that ``compress(exact=True)`` times on
the onnx light models, each probe pair compared 8 times by ``LatencyService`` (20 runs, CPU, 2 cores):
a gain strays from its conv's median gain by 0.006 at the median, 0.035 at p75 and 0.17 at p90 with
onnxruntime's default threads (60 runs: 0.040 and 0.096), by 0.001, 0.005 and 0.013 (max 0.062) at one
thread. ±0.05 covers the common scatter, not all of it: with all threads on a busy machine the stems
of light ResNet-50 and DenseNet measured +0.2 in some runs and -0.4 in others, and a gain can sit at
an edge (light SqueezeNet's stem: 0.08 to 0.11). So every measured decision is reported with its
gains, and ``--latency-cache`` replays them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

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
#: Half-width of the hysteresis band around ``min_gain``: separated at ``min_gain + band`` or more.
DEFAULT_BAND = 0.05
#: Timed runs per model of the re-measurement of a gain inside the band (the first measurement: 20).
REMEASURE_RUNS = 60
#: The short verdicts of a decision (``ConvDecision.verdict``).
SEPARATED, KEPT, KEPT_SLOWER, KEPT_MARGINAL = "separated", "kept", "kept: slower", "kept: marginal"
#: What decided (``ConvDecision.decided_by``): only "latency" is a measurement, the rest are computed.
BY_LATENCY, BY_MACS, BY_RANK, BY_FACTORS = "latency", "MACs", "rank bound", "factorisation"
#: Seed of the probe inputs.
PROBE_SEED = 0


@dataclass(frozen=True)
class ConvDecision:
    """What the pass decided for one k×k conv, with the figures behind it (one report row).

    Attributes:
        latency_before_ms: Measured time of the conv (the deciding measurement; None: not measured).
        latency_after_ms: Measured time of its separated form.
        decision: The decision in a sentence.
        verdict: "separated", "kept: slower", "kept: marginal" (measured), or "separated"/"kept".
        decided_by: "latency" (measured: can differ between runs), or computed: "MACs", "rank bound"
            (the cheap lower bound of U), "factorisation" (all-zero or inexact kernels).
        gain: The deciding measured gain, ``1 - after/before`` (None: not measured).
        gains: Every measured gain, in order (two when the first fell inside the band).
        min_gain: The threshold the gain was held against (None: not measured).
        band: The half-width of the hysteresis band around it (None: not measured).
    """

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
    verdict: str
    decided_by: str
    gain: float | None = None
    gains: list[float] = field(default_factory=list)
    min_gain: float | None = None
    band: float | None = None


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
        band: float = DEFAULT_BAND,
    ) -> None:
        """Configure the pass.

        Args:
            shapes: Tensor shapes of a working model (the shape service).
            latency: The latency oracle; None decides on MACs alone (``--no-latency-check``).
            freeze: Node-name glob patterns of convs to leave alone.
            min_gain: The fraction of time the separated form must save to be kept.
            band: Half-width of the hysteresis band around ``min_gain`` (0: a plain threshold).
        """
        if band < 0:
            raise InternalError(f"the hysteresis band must be >= 0, got {band}")
        self.shapes, self.latency, self.freeze, self.min_gain = shapes, latency, tuple(freeze), min_gain
        self.band = band

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
            measured = [d for d in decisions if d.decided_by == BY_LATENCY]
            stats |= {
                "provider": self.latency.provider,
                "measured": len(measured),
                "marginal": sum(d.verdict == KEPT_MARGINAL for d in measured),
                "min_gain": self.min_gain,
                "band": self.band,
            }
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
            return _computed(row, Reason.SEP_NO_MACS_RANK.format(**row), BY_RANK)
        basis = factor_kernels(weight)
        row = _row(conv, weight, shapes, basis.size)
        if basis.size == 0:
            return _computed(row, Reason.SEP_ZERO, BY_FACTORS)
        if basis.error > EXACT_FACTOR_ERROR:
            return _computed(row, Reason.SEP_INEXACT.format(error=basis.error), BY_FACTORS)
        if row["macs_after"] >= row["macs_before"]:
            return _computed(row, Reason.SEP_NO_MACS.format(**row), BY_MACS)
        if self.latency is None:
            separate_conv(graph, conv, basis)
            return _computed(row, Reason.SEP_DONE_MACS, BY_MACS, separated=True)
        source_shape = shapes[conv.inputs[0].name]
        if source_shape is None:  # _unsupported refuses a conv whose input shape is unknown
            raise InternalError(f"conv {conv.name!r}: the input shape is unknown after the checks")
        probes = probe_models(conv, basis, source_shape)
        decision = self._timed(self.latency, probes, source_shape, weight.dtype, row)
        if decision.separated:
            separate_conv(graph, conv, basis)
        return decision

    def _timed(
        self,
        latency: LatencyProbe,
        probes: Sequence[onnx.ModelProto],
        shape: Sequence[int],
        dtype: np.dtype,
        row: dict,
    ) -> ConvDecision:
        """Time the conv and its separated form; decide with the hysteresis band (re-measured inside it).

        Args:
            latency: The latency probe.
            probes: The conv alone and its separated form (:func:`probe_models`).
            shape: The conv's input shape.
            dtype: Its weight's type (the probe input's).
            row: The decision's figures so far (:func:`_row`).
        """
        low, high = self.min_gain - self.band, self.min_gain + self.band
        feed = {"x": np.random.default_rng(PROBE_SEED).standard_normal(shape).astype(dtype)}
        gains: list[float] = []
        for runs in (None, REMEASURE_RUNS):  # the second measurement only inside the band
            if runs is None:
                t_before, t_after = latency.compare(probes[0], probes[1], feed)
            else:
                t_before, t_after = latency.compare(probes[0], probes[1], feed, runs=runs)
            gains.append(1.0 - t_after / t_before if t_before > 0 else 0.0)
            if not low <= gains[-1] < high:
                break
        gain = gains[-1]
        timed = {"before_ms": t_before * 1e3, "after_ms": t_after * 1e3, "provider": latency.provider}
        row |= {
            "latency_before_ms": round(t_before * 1e3, 4), "latency_after_ms": round(t_after * 1e3, 4),
            "gain": round(gain, 4), "gains": [round(g, 4) for g in gains], "min_gain": self.min_gain,
            "band": self.band, "decided_by": BY_LATENCY,
        }  # fmt: skip
        again = f", re-measured in {REMEASURE_RUNS} runs" if len(gains) > 1 else ""
        if gain >= high:
            done = f"{Reason.SEP_DONE.format(**timed)} ({gain:.1%} faster{again})"
            return ConvDecision(**{**row, "separated": True}, decision=done, verdict=SEPARATED)
        if gain < low:
            slower = f"{Reason.SEP_SLOWER.format(**timed, gain=self.min_gain)} (gain {gain:+.1%}{again})"
            return ConvDecision(**row, decision=slower, verdict=KEPT_SLOWER)
        marginal = (
            f"{Reason.SEP_SLOWER.format(**timed, gain=high)} (marginal: gains {gains[0]:+.1%}, then "
            f"{gain:+.1%} in {REMEASURE_RUNS} runs, both within {low:.0%} to {high:.0%}; kept)"
        )
        return ConvDecision(**row, decision=marginal, verdict=KEPT_MARGINAL)


def _computed(row: dict, decision: str, decided_by: str, *, separated: bool = False) -> ConvDecision:
    """A decision computed without a measurement (the same in every run)."""
    verdict = SEPARATED if separated else KEPT
    return ConvDecision(
        **{**row, "separated": separated}, decision=decision, verdict=verdict, decided_by=decided_by
    )


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
