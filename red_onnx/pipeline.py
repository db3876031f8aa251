"""Orchestration: load, normalise, run the passes, verify, and build the report.

The pipeline owns the order of the passes and the verification verdict; passes only decide and
rewrite. Nothing is written to disk here (the CLI saves, atomically, after a passed verification).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from red_onnx import io
from red_onnx._version import __version__
from red_onnx.errors import InputError, UsageError, VerificationError
from red_onnx.io import graph as graph_utils
from red_onnx.io import wire
from red_onnx.io.memory import release_free_memory
from red_onnx.measure import metrics
from red_onnx.measure.latency import CPU_PROVIDER, LatencyProbe, LatencyService, check_provider
from red_onnx.passes.fold_affine import FoldAffine
from red_onnx.passes.fold_batchnorm import FoldBatchNorm
from red_onnx.passes.infra import Pass
from red_onnx.passes.merge_exact import MergeExact
from red_onnx.passes.merge_near import MergeNear
from red_onnx.passes.separate_depthwise import SeparateDepthwise
from red_onnx.report.report import FrozenGroup, Report
from red_onnx.runtime import sessions
from red_onnx.runtime.sessions import HeldSessions, model_source
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.budget import SENSITIVITY_MODES, BudgetSearch
from red_onnx.verify.input_spec import InputSpec
from red_onnx.verify.inputs import make_inputs
from red_onnx.verify.verifier import Verifier

logger = logging.getLogger(__name__)
ort.set_default_logger_severity(4)

#: Exact-mode tolerances: element-wise |y' - y| <= atol·max(1, max|y|) + rtol·|y|.
EXACT_RTOL = 1e-5
EXACT_ATOL = 1e-6
#: Seeds of the verification inputs (the budget search measures on others).
VERIFY_SEEDS = (0, 1)
#: Default fidelity budget: relative L2 error of every output on the verification inputs.
DEFAULT_TOLERANCE = 0.02
#: The search aims this fraction under --tolerance: the final check adds ORT_ENABLE_ALL and other seeds
#: (YOLOv8n at T = 0.05 measured 0.049 in the search and failed the final check without it).
SEARCH_MARGIN = 0.8
#: Default channel multiple. Measured here (bench/channel_multiple.py, six 3x3 convs at 56x56, ORT CPU):
#: odd inner widths ran 1.10-1.27x slower than 64, multiples of 4 cost nothing extra, and latency only
#: dropped at multiples of 16 (48: 0.63x, 32: 0.34x). 8 never slows a layer down and keeps steps fine:
#: the exact mode's default (it rounds kept counts *up*, keeping redundant channels).
DEFAULT_CHANNEL_MULTIPLE = 8
#: Default channel multiple with --target-macs (a request for speed). On the conv nets of
#: bench/latency_table.py (bench/results/latency_tolerance16.json): at --target-macs 0.8, 16 met the
#: latency target (≥0.8× the MACs reduction) on every conv net above 1 ms where 8 met it on three of
#: six. --tolerance keeps 8: at 0.02 on the trained zoo, 16 gave up the little it removes (YOLOv8n's
#: 0.2% of MACs went to 0, PP-OCRv4 rec's 0.44% to 0) for no measured latency change.
DEFAULT_TARGET_CHANNEL_MULTIPLE = 16

Progress = Callable[[str], None]
ModelSource = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class Options:
    """Options of one compression run (what the output's provenance records).

    Attributes:
        exact: Only function-preserving rewrites.
        approximate: Run the budget search and approximate merging (asked for by a tolerance or a
            target; until the benchmarks of the hashing issue land, the default run stays exact).
        tolerance: Largest allowed relative L2 error of each output (approximate mode).
        target_macs: Fraction of MACs to keep; overrides ``tolerance`` (approximate mode).
        channel_multiple: Kept channel counts are on multiples of this (default: 16 with
            ``target_macs``, else 8; exact merges round counts up).
        hashing: Let KDE-hashed weights rank merge candidates too (approximate mode; off = ablation).
        activations: Let least-squares fits of channel activations on the verification inputs rank
            merge candidates too. Off by default: on synthetic inputs it picks channels that are idle
            on noise but matter on real data (measured: MobileNetV2 top-1 agreement 0.39 at 95% of
            the MACs with a synthetic error of 0.0); on by default when ``--inputs`` gives real inputs.
        freeze: Node-name glob patterns of layers to protect.
        input_spec: How verification inputs are built.
        verify: Whether to verify with onnxruntime (on by default; off only for analysis tools).
        separation: Try uneven depthwise separation of k×k convs (exact; kept where it pays).
        provider: The onnxruntime execution provider separation decisions are measured on.
        latency_check: Measure before separating (False: decide on MACs alone).
        sensitivity: How the budget search finds each group's error alone: "measured", "calibrated"
            (estimated from one activation capture, scaled per group by one run), "local" (the
            estimate only) or "auto" (calibrated above 1 GMAC per sample, measured below).
    """

    exact: bool = False
    approximate: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    target_macs: float | None = None
    channel_multiple: int = DEFAULT_CHANNEL_MULTIPLE
    hashing: bool = True
    activations: bool = False
    freeze: tuple[str, ...] = ()
    input_spec: InputSpec = field(default_factory=InputSpec)
    verify: bool = True
    separation: bool = True
    provider: str = CPU_PROVIDER
    latency_check: bool = True
    sensitivity: str = "auto"

    def provenance(self) -> dict[str, object]:
        """The options as recorded in the output model (no paths that differ between machines)."""
        spec = asdict(self.input_spec)
        spec["npz"] = Path(spec["npz"]).name if spec["npz"] else None
        recorded: dict[str, object] = {"exact": self.exact, "freeze": list(self.freeze), "input_spec": spec}
        recorded |= {
            "separation": self.separation,
            "provider": self.provider,
            "latency_check": self.latency_check,
        }
        if self.approximate:
            recorded |= {"tolerance": self.tolerance, "target_macs": self.target_macs,
                         "channel_multiple": self.channel_multiple, "hashing": self.hashing,
                         "activations": self.activations}  # fmt: skip
        return recorded


def make_options(
    *,
    exact: bool,
    tolerance: float | None,
    target_macs: float | None,
    channel_multiple: int | None,
    freeze: Sequence[str],
    input_spec: InputSpec | None,
    verify: bool,
    hashing: bool = True,
    activations: bool | None = None,
    separation: bool = True,
    provider: str = CPU_PROVIDER,
    latency_check: bool = True,
    sensitivity: str = "auto",
) -> Options:
    """Validate option combinations (one-line UsageError) and fill defaults."""
    if sensitivity not in SENSITIVITY_MODES:
        raise UsageError(f"--sensitivity {sensitivity!r} is not one of {', '.join(SENSITIVITY_MODES)}")
    if exact and (tolerance is not None or target_macs is not None):
        raise UsageError("--exact keeps the function exactly; it cannot take --tolerance or --target-macs")
    if tolerance is not None and not 0 < tolerance < 1:
        raise UsageError(f"--tolerance must be in (0, 1), got {tolerance}")
    if target_macs is not None and not 0 < target_macs <= 1:
        raise UsageError(f"--target-macs is the fraction of MACs to keep, in (0, 1], got {target_macs}")
    if channel_multiple is not None and channel_multiple < 1:
        raise UsageError(f"--channel-multiple must be at least 1, got {channel_multiple}")
    if separation and latency_check:
        check_provider(provider)
    approximate = not exact and (tolerance is not None or target_macs is not None)
    if channel_multiple is None:  # a target implies approximate mode (with --exact it raised above)
        targeted = target_macs is not None
        channel_multiple = DEFAULT_TARGET_CHANNEL_MULTIPLE if targeted else DEFAULT_CHANNEL_MULTIPLE
    return Options(
        exact=exact,
        approximate=approximate,
        tolerance=DEFAULT_TOLERANCE if tolerance is None else float(tolerance),
        target_macs=target_macs,
        channel_multiple=int(channel_multiple),
        hashing=hashing,
        activations=(input_spec is not None and input_spec.npz is not None)
        if activations is None
        else activations,
        freeze=tuple(freeze),
        input_spec=input_spec or InputSpec(),
        verify=verify,
        separation=separation,
        provider=provider,
        latency_check=latency_check,
        sensitivity=sensitivity,
    )


@dataclass
class Result:
    """The outcome of :func:`compress`: the rewritten model and its report."""

    model: onnx.ModelProto
    report: Report

    @property
    def verified(self) -> bool:
        """Whether onnxruntime verification passed (False when it was not run)."""
        return bool(self.report.verification and self.report.verification.get("passed"))


def _load(model_or_path: ModelSource) -> tuple[onnx.ModelProto, int, Path | None]:
    """The model, its size, and its path when it came from a file (verification reads it there)."""
    if isinstance(model_or_path, onnx.ModelProto):
        io.validate_model(model_or_path)
        return model_or_path, io.model_nbytes(model_or_path), None
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise InputError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    path = Path(model_or_path)
    model = io.load_model(path)
    return model, io.model_nbytes(model), path


def _input_copy(model_or_path: onnx.ModelProto | Path) -> onnx.ModelProto:
    """The input model again, as a new proto (read from its file, or a copy of the one given).

    A run where no rewrite applied returns this instead of the normalised graph: constant folding,
    dead-node removal and reordering alone are not worth a graph the user did not write (silero-vad
    came out with one Constant node as an initializer and nothing else changed).
    """
    if isinstance(model_or_path, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        return copy
    return onnx.load(str(model_or_path))  # validated at load already; its external data read again


def exact_passes(options: Options, shapes: ShapeService) -> list[Pass]:
    """Normalisation and the function-preserving rewrites, in order."""
    merge = MergeExact(shapes=shapes, freeze=options.freeze, channel_multiple=options.channel_multiple)
    return [FoldBatchNorm(), FoldAffine(), merge]


def compress(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    exact: bool = False,
    tolerance: float | None = None,
    target_macs: float | None = None,
    channel_multiple: int | None = None,
    hashing: bool = True,
    activations: bool | None = None,
    freeze: Sequence[str] = (),
    input_spec: InputSpec | None = None,
    verify: bool = True,
    separation: bool = True,
    provider: str = CPU_PROVIDER,
    latency_check: bool = True,
    latency: LatencyProbe | None = None,
    sensitivity: str = "auto",
    raise_on_failure: bool = True,
    progress: Progress | None = None,
) -> Result:
    """Compress an ONNX model without data, and prove what was done with onnxruntime.

    Args:
        model_or_path: The model, or the path of an ``.onnx`` file (external data next to it).
        exact: Only function-preserving rewrites (an error with ``tolerance`` or ``target_macs``).
        tolerance: Largest allowed relative L2 error of each output on the verification inputs;
            giving it (or ``target_macs``) turns on approximate merging under that budget. Without
            either, the run is exact (until the hashing issue's benchmarks set a default).
        target_macs: Fraction of MACs to keep (overrides ``tolerance``; the error reached is reported).
        channel_multiple: Kept channel counts are multiples of this (default: 16 with ``target_macs``,
            else 8).
        hashing: Let KDE-hashed weights rank merge candidates too (False: the ablation without it).
        activations: Let fits of channel activations rank candidates too (None: only when
            ``input_spec.npz`` gives real inputs; on synthetic inputs it measured worse on real data).
        freeze: Node-name glob patterns of layers whose channels must not change.
        input_spec: Shapes, ranges, values or an ``.npz`` for the verification inputs.
        verify: Verify the result with onnxruntime (graph optimisations off and at ORT_ENABLE_ALL).
        separation: Try uneven depthwise separation of k×k convs (exact; only where it is measured
            faster, or cuts MACs when ``latency_check`` is False).
        provider: onnxruntime execution provider that separation candidates are timed on.
        latency_check: Time separation candidates (False: decide on MACs alone).
        latency: A latency oracle to use instead of a ``LatencyService`` on ``provider`` (tests).
        sensitivity: How the budget search finds each group's error alone: ``"measured"`` (a run per
            group, level and ranking), ``"calibrated"`` (estimated from one activation capture, scaled
            per group by one one-sample run), ``"local"`` (the estimate only) or ``"auto"`` (calibrated
            above 1 GMAC per verification sample, measured below). Only the bisected prefixes are
            measured on the outputs in the estimated modes.
        raise_on_failure: Raise :class:`VerificationError` (with ``.result``) when verification fails.
        progress: Called with the name of each stage as it starts.

    Returns:
        The rewritten model and the report.

    Raises:
        UsageError: Contradictory options (``exact`` with ``tolerance`` or ``target_macs``).
        InputError: The model cannot be read, validated or run by onnxruntime.
        VerificationError: The result differs from the input beyond tolerance, or ``target_macs``
            cannot be reached (nothing is returned then).
    """
    options = make_options(
        exact=exact, tolerance=tolerance, target_macs=target_macs, channel_multiple=channel_multiple,
        freeze=freeze, input_spec=input_spec, verify=verify, hashing=hashing, activations=activations,
        separation=separation, provider=provider, latency_check=latency_check, sensitivity=sensitivity,
    )  # fmt: skip
    notify = progress or (lambda stage: None)
    notify("load")
    original, size_before, source = _load(model_or_path)
    if options.approximate:
        _check_measurable(size_before)
    # verification and the search read the input by path when it came from a file (no serialized copy)
    reference_model = source if source is not None else original
    reference = _reference_verifier(reference_model, options, original, verify=verify)
    # the unoptimised reference session stays open for the budget search's reference runs, released
    # once they are done (conv25m --target-macs 0.8: its second opening beside the working model was
    # the run's peak)
    held = reference.held if reference is not None else None
    shapes = ShapeService(make_inputs(original, options.input_spec, VERIFY_SEEDS[0]))
    release_free_memory("import")  # the file's bytes and the reference sessions' copies
    working = graph_utils.import_model(original)
    if source is not None:  # the checks read the file: the input proto is not needed past its structure
        graph_utils.detach_from_input(working)
        original = wire.structure_of(original)
        release_free_memory("normalisation")  # the input proto (conv25m: 97 MB)
    report = Report(
        input_shapes={k: list(v) for k, v in shapes.input_shapes.items()},
        options=options.provenance(),
        size_before=size_before,
    )
    report.overridable_initializers = sorted(working.overridable)
    notify("normalise")
    graph_utils.normalise_constants(working)
    structure, _ = graph_utils.export_light(working)  # dims only: figures need no weight values
    before = metrics.measure(structure, shapes.input_shapes, shapes(working))
    del structure
    _exact_rewrites(working, options, shapes, report, notify)
    merged = options.approximate and _approximate(
        working, reference_model, original, options, shapes, report, notify, held
    )
    if options.separation:
        _separate(working, options, shapes, report, notify, latency)
    rewritten = any(item.modified for item in report.passes)
    if rewritten:
        structure, _ = graph_utils.export_light(working)  # metrics.measure copies the model it is given
        report.set_figures(before, metrics.measure(structure, shapes.input_shapes, shapes(working)))
        del structure
    else:  # the output is the input: its figures are the ones before
        report.set_figures(before, before)
    candidate = graph_utils.export_model(working) if rewritten else None
    input_metadata = working.metadata
    del working, original  # not alive through the verification (exact conv25m: -96 MB); a proto input
    # stays, as reference_model. A graph's nodes and tensors refer to each other: only the cycle
    # collector frees them and the weights they hold (exact conv25m peak 740 → 581-646 MB with it now)
    gc.collect()
    if candidate is None:  # no rewrite applied: the input as it was, not its normalised form
        candidate = _input_copy(reference_model)
        report.unchanged = True
    if verify:
        notify("verify")
        with tempfile.TemporaryDirectory(prefix="red-onnx-") as scratch:
            path = _write_scratch(candidate, Path(scratch))  # a weight at a time (no serialized copy)
            del candidate  # not alive beside the checks' sessions: they read the file
            release_free_memory("verification")  # with the working graph's arrays
            _verify(reference_model, str(path), options, report, reference, merged)
            candidate = onnx.load(str(path))
        release_free_memory("saving")  # the checks' sessions
    graph_utils.set_metadata(candidate, input_metadata, _provenance(options, report))
    report.size_after = io.model_nbytes(candidate)
    result = Result(candidate, report)
    if raise_on_failure and verify and not result.verified:
        error = VerificationError(_failure_message(report, options, merged))
        error.result = result
        raise error
    return result


def _exact_rewrites(
    working: graph_utils.WorkingModel,
    options: Options,
    shapes: ShapeService,
    report: Report,
    notify: Progress,
) -> None:
    """Run :func:`exact_passes` on ``working`` (no pass outlives this call: they hold the graph's arrays)."""
    for item in exact_passes(options, shapes):
        notify(item.name)
        report.add_pass(item(working), item.name)
    _collect_skips(report)


def _check_measurable(size: int) -> None:
    """Refuse approximate merging of a model over the protobuf limit (the search measures in memory)."""
    if size > sessions.MAX_PROTO_BYTES:
        raise UsageError(
            f"approximate merging (--tolerance, --target-macs) cannot measure models over "
            f"{sessions.MAX_PROTO_BYTES / 2**30:.1f} GB yet (this one: {size / 2**30:.1f} GB); use --exact"
        )


def _reference_verifier(
    model: ModelSource, options: Options, structure: onnx.ModelProto, *, verify: bool
) -> Verifier | None:
    """The verifier of the input model, its unoptimised outputs (and with ``verify`` all) computed now.

    Fails early (InputError) when onnxruntime cannot run the input model on the verification inputs;
    the final verification reuses it, without opening the input's sessions again next to the candidate's
    (the optimised reference session was the verification's memory peak). None for a proto over the
    protobuf limit (verified by path later).
    """
    if isinstance(model, onnx.ModelProto) and io.model_nbytes(model) > sessions.MAX_PROTO_BYTES:
        return None
    held = HeldSessions(model_source(model)) if options.approximate else None
    verifier = Verifier(model, options.input_spec, seeds=VERIFY_SEEDS, structure=structure, held=held)
    levels = sorted(verifier.levels, key=lambda level: level == "disable_all") if verify else ["disable_all"]
    for level in levels:  # the held (unoptimised) session last: not open beside the optimised one
        verifier.reference_outputs(level)
    return verifier


def _approximate(
    working: graph_utils.WorkingModel,
    original: ModelSource,
    structure: onnx.ModelProto,
    options: Options,
    shapes: ShapeService,
    report: Report,
    notify: Progress,
    held: HeldSessions | None = None,
) -> bool:
    """Search the merge budget on the exact-rewritten model, then apply the chosen merges.

    ``original`` is the input model (its path when it came from a file), ``structure`` the loaded input,
    ``held`` its sessions opened at load (released once the search has its reference outputs).

    Returns:
        Whether anything was merged (when not, the result is verified as an exact rewrite).
    """
    notify("budget")
    started = time.perf_counter()
    search = BudgetSearch(
        working, original, options.input_spec, shapes,
        freeze=options.freeze, channel_multiple=options.channel_multiple, hashing=options.hashing,
        activations=options.activations, sensitivity=options.sensitivity, progress=notify,
        reference_structure=structure, held=held,
    )  # fmt: skip
    if options.target_macs is None:
        outcome = search.within_tolerance(options.tolerance * SEARCH_MARGIN)
    else:
        outcome, reachable = search.to_target(options.target_macs)
        if reachable > options.target_macs:
            raise VerificationError(
                f"--target-macs {options.target_macs} cannot be reached: the lowest fraction of MACs "
                f"this model reaches is {reachable:.3f}; nothing was written"
            )
    report.budget = {**outcome.to_dict(), "seconds": round(time.perf_counter() - started, 3)}
    merges = {name: search.merges[name][count] for name, count in outcome.counts.items() if count}
    del search  # its sessions, Gram matrices and model copy: not alive while the merges are applied
    gc.collect()  # the search's groups and graph views are cyclic
    release_free_memory("merging")
    if not merges:
        return False
    merge = MergeNear(shapes=shapes, merges=merges, freeze=options.freeze)
    notify(merge.name)
    report.add_pass(merge(working), merge.name)
    return True


def _separate(
    working: graph_utils.WorkingModel,
    options: Options,
    shapes: ShapeService,
    report: Report,
    notify: Progress,
    latency: LatencyProbe | None,
) -> None:
    """Uneven depthwise separation of the k×k convs where it is measured faster (or cuts MACs)."""
    if latency is None and options.latency_check:
        latency = LatencyService(provider=options.provider)
    separation = SeparateDepthwise(
        shapes=shapes, latency=latency if options.latency_check else None, freeze=options.freeze
    )
    notify(separation.name)
    report.add_pass(separation(working), separation.name)


def _collect_skips(report: Report) -> None:
    for item in report.passes:
        if item.name != MergeExact.name:
            continue
        for skip in item.skips:
            if "[" in skip["subject"] and skip["subject"].endswith("]"):
                report.kept_zero_channels.append({"channel": skip["subject"], "reason": skip["reason"]})
            else:
                report.frozen.append(FrozenGroup(skip["subject"], skip["reason"]))


def _verify(
    original: ModelSource,
    candidate: str,
    options: Options,
    report: Report,
    verifier: Verifier | None = None,
    merged: bool = False,
) -> None:
    """Verify the model file ``candidate`` against ``original`` (with ``verifier`` when given).

    Exact mode passes when every element is within ``EXACT_ATOL·max(1, max|y|) + EXACT_RTOL·|y|``;
    the tolerance mode when every output's relative L2 error is within the tolerance; the target-MACs
    mode reports the error reached and passes when the model runs with finite outputs.
    """
    with tempfile.TemporaryDirectory(prefix="red-onnx-") as scratch:
        if verifier is None:
            reference = _as_source(original, Path(scratch) / "reference.onnx")
            verifier = Verifier(reference, options.input_spec, seeds=VERIFY_SEEDS)
        result = verifier.check(candidate, rtol=EXACT_RTOL, atol=EXACT_ATOL)
        checked = result.to_dict()
        if not merged:  # exact rewrites only (also when the budget search merged nothing)
            checked["criterion"] = (
                f"element-wise within atol {EXACT_ATOL}·max(1,max|y|) + rtol {EXACT_RTOL}·|y|"
            )
            if result.rounding_floor:
                checked["criterion"] += f" + {result.rounding_floor:.3g}·(max|y| + |y|) (float16 rounding)"
        elif options.target_macs is None:
            parts: dict[str, float] = {}
            for level in verifier.levels:
                for label, error in verifier.rel_l2_errors(candidate, level).items():
                    parts[label] = max(parts.get(label, 0.0), error)
            checked["criterion"] = (
                f"relative L2 error of every output (per part of similar scale) <= {options.tolerance}"
            )
            checked["slices"] = {k: (v if math.isfinite(v) else None) for k, v in parts.items()}
            checked["passed"] = all(error <= options.tolerance for error in parts.values())
        else:
            checked["criterion"] = "target MACs: error reported, outputs must be finite"
            checked["passed"] = all(math.isfinite(o.rel_l2_err) for o in result.outputs)
        report.verification = checked
        if checked["passed"]:
            io.check_model(candidate)


def _write_scratch(model: onnx.ModelProto, scratch: Path) -> Path:
    """Write ``model`` for the checks: streamed (``wire.write_model``), above the limit with external data."""
    path = scratch / "candidate.onnx"
    if io.model_nbytes(model) > sessions.MAX_PROTO_BYTES:
        io.save_model(model, path)
        return path
    try:
        with open(path, "wb") as stream:
            wire.write_model(model, stream)
    except OSError as error:
        raise InputError(
            f"cannot write the rewritten model to {scratch} for its checks ({error.strerror or error}); "
            f"free {io.model_nbytes(model) / 1e6:.0f} MB there or point TMPDIR elsewhere"
        ) from error
    return path


def _as_source(model: ModelSource, scratch: Path) -> ModelSource:
    """How ``model`` is handed to the checks: a path when too large to serialize, else the model."""
    if not isinstance(model, onnx.ModelProto) or io.model_nbytes(model) <= sessions.MAX_PROTO_BYTES:
        return model
    io.save_model(model, scratch)
    return scratch


def _provenance(options: Options, report: Report) -> dict[str, str]:
    return {
        "red_onnx.version": __version__,
        "red_onnx.options": json.dumps(options.provenance(), sort_keys=True),
        "red_onnx.summary": json.dumps(report.headline(), sort_keys=True),
    }


def _failure_message(report: Report, options: Options, merged: bool) -> str:
    verification = report.verification or {}
    outputs = verification.get("outputs", [])
    if not merged:
        worst = next((o for o in outputs if not o.get("passed")), {})
        return (
            f"verification failed: output '{worst.get('name')}' differs by max rel err "
            f"{worst.get('max_rel_err')} (needed rtol {worst.get('needed_rtol')}, allowed {EXACT_RTOL}); "
            "nothing was written — please report this model"
        )
    worst = max(outputs, key=lambda o: o.get("rel_l2_err") or math.inf, default={})
    return (
        f"verification failed on held-out inputs: output '{worst.get('name')}' has relative L2 error "
        f"{worst.get('rel_l2_err')}, over the tolerance {options.tolerance}; nothing was written — "
        "try a smaller --tolerance, or pass your own --inputs"
    )
