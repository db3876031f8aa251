"""The report: what was done, what it saved, what stayed and why, and the proof (verification)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from red_onnx.metrics import ModelFigures
from red_onnx.pass_infra import PassResult


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
            channels, macs = (new.channels, new.macs) if new else (0, 0)
            self.layers.append(LayerReport(name, layer.op, layer.channels, channels, layer.macs, macs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``--json`` file)."""
        data = asdict(self)
        data["frozen"] = [{"group": f.group, "reason": f.reason} for f in self.frozen]
        return data

    def to_json(self) -> str:
        """The JSON text, stable key order."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    def headline(self) -> dict[str, Any]:
        """The few figures written into the output model's provenance."""
        verification = self.verification or {}
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "verified": verification.get("passed"),
            "max_rel_err": verification.get("max_rel_err"),
        }


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}" if before else "-"


def _human(count: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(count) < 1000:
            return f"{count:.4g}{unit}"
        count /= 1000
    return f"{count:.4g}P"


def render_table(report: Report, *, max_layers: int = 40) -> str:
    """A terminal rendering of the report."""
    lines = [
        f"{'':22}{'before':>14}{'after':>14}{'ratio':>9}",
        f"{'parameters':22}{_human(report.params_before):>14}{_human(report.params_after):>14}"
        f"{_ratio(report.params_after, report.params_before):>9}",
        f"{'MACs':22}{_human(report.macs_before):>14}{_human(report.macs_after):>14}"
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
    lines.append("passes:")
    for item in report.passes:
        stats = ", ".join(f"{k}={v}" for k, v in item.stats.items())
        lines.append(f"  {item.name:16} {item.seconds:7.2f}s  {stats}")
    lines += _render_frozen(report, max_layers)
    if report.budget:
        budget = report.budget
        merged = [g for g in budget["groups"] if g["removed"]]
        lines.append(f"merged groups: {len(merged)} (channels, ranking used, error of that group alone)")
        for group in merged[:max_layers]:
            alone = group["error_alone"]
            kept = group["channels"] - group["removed"]
            shown = "-" if alone is None else format(alone, ".3g")
            name, ranking = group["group"][:40], group["ordering"][:32]
            lines.append(f"  {name:40} {group['channels']:>5} -> {kept:<5} {ranking:32} {shown}")
        lines.append(
            f"budget search: {budget['evaluations']} measurements in {budget['seconds']:.1f}s; error "
            f"{budget['error']:.3g} on search inputs, {budget['heldout_error']:.3g} held out; "
            f"MACs kept {budget['macs_fraction']:.3f}"
        )
    if report.verification:
        lines.append(_render_verification(report.verification))
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


def _render_verification(verification: dict[str, Any]) -> str:
    verdict = "PASSED" if verification.get("passed") else "FAILED"
    criterion = f" [{verification['criterion']}]" if verification.get("criterion") else ""
    worst = max((o.get("rel_l2_err") or 0.0 for o in verification.get("outputs", [])), default=0.0)
    return (
        f"verification {verdict} (onnxruntime, levels {', '.join(verification.get('levels', []))}, "
        f"seeds {verification.get('seeds')}): max abs err {verification.get('max_abs_err'):.3g}, "
        f"max rel err {verification.get('max_rel_err'):.3g}, worst rel L2 {worst:.3g}{criterion}"
    )
