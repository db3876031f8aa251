"""The report: what was done, what it saved, what stayed and why, and the proof (verification)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from red_onnx.measure.metrics import ModelFigures
from red_onnx.passes.infra import PassResult
from red_onnx.rewrite.separation import SUFFIX as SEPARATION_SUFFIX

#: The name of the separation pass, whose statistics hold the per-conv decisions.
SEPARATION_PASS = "separate_depthwise"


@dataclass(frozen=True)
class LayerReport:
    """Channels and MACs of one weighted layer before and after."""

    name: str
    op: str
    channels_before: int
    channels_after: int
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class PassReport:
    """One pass: time, whether it changed the model, its statistics and skips."""

    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    skips: list[dict[str, str]]


#: Version of the ``--json`` report's layout (``docs/report.md``): raised when a field changes meaning
#: or goes; new fields may appear within a version.
SCHEMA_VERSION = 4


@dataclass(frozen=True)
class FrozenGroup:
    """A channel group that could not change, and why."""

    group: str
    reason: str


@dataclass
class Report:
    """Everything a user needs to trust (or refuse) the result."""

    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    size_before: int = 0
    size_after: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    passes: list[PassReport] = field(default_factory=list)
    frozen: list[FrozenGroup] = field(default_factory=list)
    kept_zero_channels: list[dict[str, str]] = field(default_factory=list)
    overridable_initializers: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    budget: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None  # what the checks and the search ran on (docs/report.md)
    unchanged: bool = False  # no rewrite applied: the output is the input model as it was

    def add_pass(self, result: PassResult, name: str) -> None:
        """Record a pass result."""
        skips = [s.to_dict() for s in result.skips]
        self.passes.append(PassReport(name, round(result.seconds, 4), result.modified, result.stats, skips))

    def set_figures(self, before: ModelFigures, after: ModelFigures) -> None:
        """Fill the headline and per-layer figures."""
        self.params_before, self.params_after = before.params, after.params
        self.macs_before, self.macs_after = before.macs, after.macs
        self.layers = []
        for name, layer in before.layers.items():
            new = after.layers.get(name)
            channels, macs = (new.channels, new.macs) if new else _separated_figures(after, name)
            self.layers.append(LayerReport(name, layer.op, layer.channels, channels, layer.macs, macs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``--json`` file; its fields are documented in ``docs/report.md``)."""
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        data["frozen"] = [{"group": f.group, "reason": f.reason} for f in self.frozen]
        return data

    def to_json(self) -> str:
        """The JSON text, stable key order."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    def headline(self) -> dict[str, Any]:
        """The few figures written into the output model's provenance.

        With ``latency_decisions`` when the latency check timed separation candidates: their decisions
        can differ between runs, so the model says which they were (:meth:`latency_decisions`).
        """
        verification = self.verification or {}
        headline = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "verified": verification.get("passed"),
            "max_rel_err": verification.get("max_rel_err"),
        }
        measured = self.latency_decisions()
        if measured:
            headline["latency_decisions"] = measured
        return headline

    def latency_decisions(self) -> dict[str, Any] | None:
        """The separation decisions a measurement made, compactly: conv name → verdict.

        The gains stay in the report's pass statistics: they vary from run to run, and the output's
        bytes should not where the decisions agree.

        Returns:
            ``{"provider", "min_gain", "band", "convs": {name: verdict}}``, or None when no decision
            was measured (computed decisions repeat exactly and are not listed).
        """
        item = next((p for p in self.passes if p.name == SEPARATION_PASS), None)
        if item is None:
            return None
        stats = item.stats
        convs = {c["name"]: c["verdict"] for c in stats["convs"] if c.get("gain") is not None}
        if not convs:
            return None
        gate = {key: stats[key] for key in ("provider", "min_gain", "band")}
        return {**gate, "convs": convs}


def _separated_figures(after: ModelFigures, name: str) -> tuple[int, int]:
    """Channels and MACs of a conv rewritten as Gather → depthwise → pointwise (0, 0: removed)."""
    parts = [after.layers.get(f"{name}_{SEPARATION_SUFFIX}_{part}") for part in ("dw", "pw")]
    if parts[1] is None:
        return 0, 0
    return parts[1].channels, sum(part.macs for part in parts if part is not None)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}" if before else "-"


def _human(count: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(count) < 1000:
            return f"{count:.4g}{unit}"
        count /= 1000
    return f"{count:.4g}P"


def _macs_label(input_shapes: dict[str, list[int]]) -> str:
    """The MACs line's label: with "(N rows)" where every input carries one batch of N > 1 rows."""
    shapes = list(input_shapes.values())
    leading = {shape[0] for shape in shapes if shape}
    if shapes and all(shapes) and len(leading) == 1 and min(leading) > 1:
        return f"MACs ({min(leading)} rows)"
    return "MACs"


def render_table(report: Report, *, max_layers: int = 40) -> str:
    """A terminal rendering of the report."""
    lines = [
        f"{'':22}{'before':>14}{'after':>14}{'ratio':>9}",
        f"{'parameters':22}{_human(report.params_before):>14}{_human(report.params_after):>14}"
        f"{_ratio(report.params_after, report.params_before):>9}",
        f"{_macs_label(report.input_shapes):22}{_human(report.macs_before):>14}{_human(report.macs_after):>14}"
        f"{_ratio(report.macs_after, report.macs_before):>9}",
        f"{'file size (bytes)':22}{_human(report.size_before):>14}{_human(report.size_after):>14}"
        f"{_ratio(report.size_after, report.size_before):>9}",
        "",
    ]
    changed = [layer for layer in report.layers if layer.channels_after != layer.channels_before]
    lines.append(f"layers: {len(report.layers)} weighted, {len(changed)} changed")
    for layer in changed[:max_layers]:
        lines.append(
            f"  {layer.name[:48]:48} {layer.op:13} {layer.channels_before:>6} -> {layer.channels_after:<6}"
        )
    if len(changed) > max_layers:
        lines.append(f"  ... {len(changed) - max_layers} more (see --json)")
    if report.unchanged:
        lines.append("no rewrite applied: the output is the input model as it was, with provenance metadata")
    lines.append("passes:")
    for item in report.passes:
        stats = ", ".join(f"{k}={v}" for k, v in item.stats.items() if not isinstance(v, (list, dict)))
        lines.append(f"  {item.name:18} {item.seconds:7.2f}s  {stats}")
    lines += _render_frozen(report, max_layers)
    lines += _render_separation(report, max_layers)
    if report.budget:
        budget = report.budget
        merged = [g for g in budget["groups"] if g["removed"]]
        how = {"local": "estimated on its consumers", "calibrated": "estimated, calibrated by one run"}
        basis = how.get(budget.get("sensitivity", "measured"), "measured")
        lines.append(
            f"merged groups: {len(merged)} (channels, ranking used, error of that group alone, {basis})"
        )
        for group in merged[:max_layers]:
            alone = group["error_alone"]
            kept = group["channels"] - group["removed"]
            shown = "-" if alone is None else format(alone, ".3g")
            name, ranking = group["group"][:40], group["ordering"][:32]
            unit = "heads" if group.get("unit") == "heads" else ""
            lines.append(f"  {name:40} {group['channels']:>5} -> {kept:<5} {unit:5} {ranking:32} {shown}")
        search, heldout = _parts_measured(report.inputs, budget.get("measured_on", "search"))
        lines.append(
            f"budget search ({budget.get('sensitivity', 'measured')} sensitivity): "
            f"{budget['evaluations']} measurements in {budget['seconds']:.1f}s; error "
            f"{budget['error']:.3g} on search inputs{search}, {budget['heldout_error']:.3g} held out"
            f"{heldout}{_after_correction(budget)}; MACs kept {budget['macs_fraction']:.3f}"
        )
        if budget.get("correction"):
            lines.append(_render_correction(budget["correction"]))
    if report.verification:
        measured = (report.budget or {}).get("measured_on", "search")
        lines.append(_render_verification(report.verification, report.inputs, measured))
        lines += [f"  note: {note}" for note in (report.inputs or {}).get("range_notes") or []]
    lines += _render_latency(report.latency)
    if report.accuracy:
        acc = report.accuracy
        lines.append(
            f"accuracy on the bundled test split ({acc['samples']} samples): "
            f"{acc['before']:.4f} before, {acc['after']:.4f} after"
        )
    return "\n".join(lines)


def _render_frozen(report: Report, limit: int) -> list[str]:
    lines = []
    if report.frozen:
        lines.append(f"frozen groups: {len(report.frozen)}")
        lines += [f"  {f.group[:40]:40} {f.reason}" for f in report.frozen[:limit]]
    if report.kept_zero_channels:
        lines.append(f"all-zero channels kept: {len(report.kept_zero_channels)}")
        lines += [f"  {k['channel'][:40]:40} {k['reason']}" for k in report.kept_zero_channels[:limit]]
    if report.overridable_initializers:
        lines.append(f"initializers a caller may override (frozen): {len(report.overridable_initializers)}")
    return lines


def _render_separation(report: Report, limit: int) -> list[str]:
    """Per k×k conv that would cut MACs: U, MACs, latency and the decision; the rest summed up."""
    item = next((p for p in report.passes if p.name == SEPARATION_PASS), None)
    if item is None or not item.stats.get("candidates"):
        return []
    stats, convs = item.stats, item.stats["convs"]
    paying = [c for c in convs if c["macs_after"] < c["macs_before"]]
    probe = stats.get("provider", "MACs only: --no-latency-check")
    lines = [
        f"depthwise separation ({probe}): {stats['separated']} of {len(convs)} k×k convs separated; "
        f"{len(convs) - len(paying)} have too many distinct kernels to cut MACs (U >= break-even)"
    ]
    if stats.get("measured"):
        low, high = stats["min_gain"] - stats["band"], stats["min_gain"] + stats["band"]
        lines.append(
            f"  {stats['measured']} decided by measured latency (can differ between runs; --latency-cache "
            f"replays them): separated at a gain >= {high:.0%}, kept below {low:.0%}, re-measured in "
            f"between ({stats['marginal']} kept as marginal)"
        )
    for conv in paying[:limit]:
        timed = ""
        if conv["latency_before_ms"] is not None:
            gains = ", then ".join(f"{gain:+.1%}" for gain in conv.get("gains") or [])
            timed = f" {conv['latency_before_ms']:.3f} -> {conv['latency_after_ms']:.3f} ms, gain {gains}"
        macs = _ratio(conv["macs_after"], conv["macs_before"])
        verdict = conv.get("verdict") or ("separated" if conv["separated"] else "kept")
        by = f" [{conv['decided_by']}]" if conv.get("decided_by") else ""
        lines.append(f"  {conv['name'][:40]:40} U={conv['units']:<5} MACs {macs}{timed}: {verdict}{by}")
    return lines


def _render_latency(latency: dict[str, Any] | None) -> list[str]:
    """The --benchmark figures: median latency before/after per batch."""
    if not latency:
        return []
    lines = [
        f"latency (onnxruntime {latency['provider']}, threads {latency['threads']}, median of "
        f"{latency['runs']} runs after warm-up):"
    ]
    for batch, row in latency["batches"].items():
        lines.append(
            f"  batch {batch:>3}: {row['before_ms']:.3f} ms -> {row['after_ms']:.3f} ms (x{row['ratio']:.3f})"
        )
    lines += [f"  batch {batch:>3}: not measured: {why}" for batch, why in latency["skipped"].items()]
    share = latency.get("weighted_share")
    if share and "skipped" in share:
        lines.append(f"  share of the run in convolutions and matmuls: not measured: {share['skipped']}")
    elif share:
        lines.append(
            f"  convolutions and matmuls: {share['before']:.0%} -> {share['after']:.0%} of the run "
            f"(batch {share['batch']}, onnxruntime's profiler): the part that fewer channels shorten"
        )
    return lines


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _after_correction(budget: dict[str, Any]) -> str:
    """Where the sequential refit was kept: the held-out error is the corrected model's; the one before."""
    before = budget.get("heldout_error_uncorrected")
    return "" if before is None else f" after the sequential refit ({before:.3g} before it)"


def _render_correction(correction: dict[str, Any]) -> str:
    """The sequential refit's line: nodes corrected, and the output errors it was judged on."""
    considered = len(correction.get("layers", []))
    head = f"sequential refit: {correction.get('corrected', 0)} of {considered} layers refit"
    if "cv_error_before" not in correction or correction.get("reason"):
        return (
            f"{head}; not kept: {correction['reason']}"
            if "reason" in correction
            else f"{head}; nothing changed"
        )
    before, after = correction["cv_error_before"], correction["cv_error_after"]
    cv = f"output error on the cv rows {before:.3g} -> {after:.3g}"
    if not correction["kept"]:
        return f"{head}; not kept ({cv}, not 1% lower)"
    heldout = f"{correction['heldout_error_before']:.3g} -> {correction['heldout_error_after']:.3g}"
    return f"{head}; kept ({cv}; held out {heldout})"


def _parts_measured(inputs: dict[str, Any] | None, measured: str = "search") -> tuple[str, str]:
    """What the search's and the held-out figures were measured on, as short suffixes.

    `` (6 of 12 images)`` and `` (3)`` for split samples, `` (3 cv rows of 12, unseen by the fits)``
    where the search measured on its cv part (``measured``); for synthetic inputs, where each part
    draws seeds of its own, `` (draws unseen by the fits)`` where fits were made, else nothing;
    `` (all of NAME)`` for samples used whole by every part.
    """
    if not inputs or not inputs.get("samples"):
        return (" (draws unseen by the fits)" if measured == "cv" else ""), ""
    samples = inputs["samples"]
    if not inputs.get("split"):
        return f" (all of {inputs['file']})", f" (all of {inputs['file']})"
    unit = "images" if inputs.get("kind") == "images" else "rows"
    heldout = f" ({samples['heldout']})"
    if measured == "cv":
        return f" ({samples['cv']} cv {unit} of {inputs['total']}, unseen by the fits)", heldout
    return f" ({samples['search']} of {inputs['total']} {unit})", heldout


def _render_verification(
    verification: dict[str, Any], inputs: dict[str, Any] | None = None, measured: str = "search"
) -> str:
    verdict = "PASSED" if verification.get("passed") else "FAILED"
    criterion = f" [{verification['criterion']}]" if verification.get("criterion") else ""
    worst = max((o.get("rel_l2_err") or 0.0 for o in verification.get("outputs", [])), default=0.0)
    named = verification.get("inputs") or f"seeds {verification.get('seeds')}"
    levels = ", ".join(verification.get("levels", []))
    heldout = verification.get("heldout_error")
    if verification.get("target"):  # no bound was asked: figures, not a verdict
        state = "target reached" if verification.get("passed") else "target reached, NOT WRITTEN"
        search_on, heldout_on = _parts_measured(inputs, measured)
        return (
            f"{state} (no fidelity bound was asked): worst rel L2 {worst:.3g} on {named} (onnxruntime, "
            f"levels {levels}); search {_figure(verification.get('search_error'))}{search_on}, held out "
            f"{_figure(heldout)}{heldout_on} [{verification.get('criterion')}]"
        ) + _pooled(verification)
    held = "" if heldout is None else f", held out {heldout:.3g}{_parts_measured(inputs)[1]}"
    line = (
        f"verification {verdict} (onnxruntime, levels {levels}, "
        f"{named}): max abs err {verification.get('max_abs_err'):.3g}, "
        f"max rel err {verification.get('max_rel_err'):.3g}, worst rel L2 {worst:.3g}{held}{criterion}"
    )
    if verification.get("full_check"):
        line += f"\n  full ONNX check {verification['full_check']}"
    return line + _pooled(verification)


def _pooled(verification: dict[str, Any]) -> str:
    """The least token-pooled cosine of ``[B, S, H]`` outputs (sentence embeddings), where there are any."""
    outputs = verification.get("outputs", [])
    pooled = [(o["name"], o["pooled_cosine"]) for o in outputs if o.get("pooled_cosine") is not None]
    if not pooled:
        return ""
    name, value = min(pooled, key=lambda item: item[1])
    return f"\n  token-pooled cosine of {name!r} (mean over the sequence, weighted by the mask): {value:.4f}"
