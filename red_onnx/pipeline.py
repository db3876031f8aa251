"""Orchestration: load, normalise, run the pass list, verify, and build the report.

The pipeline owns the order of the passes (:func:`pass_list`, run by a
:class:`~red_onnx.passes.infra.PassManager`) and the verification verdict; passes only decide and
rewrite. Nothing is written to disk here (the CLI saves, atomically, after a passed verification).
May import every floor.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from red_onnx import io
from red_onnx._version import __version__
from red_onnx.errors import InputError, UsageError, VerificationError
from red_onnx.io import graph as graph_utils
from red_onnx.io import wire
from red_onnx.io.memory import release_free_memory
from red_onnx.measure import metrics
from red_onnx.measure.latency import LatencyProbe, LatencyService
from red_onnx.options import HELDOUT_DRIFT, HELDOUT_FLOOR, Options, make_options
from red_onnx.passes.correct_consumers import CorrectConsumers
from red_onnx.passes.fold_affine import FoldAffine
from red_onnx.passes.fold_batchnorm import FoldBatchNorm
from red_onnx.passes.infra import Pass, PassManager, PassStep
from red_onnx.passes.merge_exact import MergeExact
from red_onnx.passes.merge_near import MergeNear
from red_onnx.passes.separate_depthwise import SeparateDepthwise
from red_onnx.report.report import FrozenGroup, Report
from red_onnx.runtime import sessions
from red_onnx.runtime.sessions import HeldSessions, model_source
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.correction import correct_plan
from red_onnx.verify.inputs import describe_inputs, make_inputs
from red_onnx.verify.verifier import Verifier

logger = logging.getLogger(__name__)
ort.set_default_logger_severity(4)

#: Exact-mode tolerances: element-wise |y' - y| <= atol·max(1, max|y|) + rtol·|y|.
EXACT_RTOL = 1e-5
EXACT_ATOL = 1e-6
#: Seeds of the verification inputs (the budget search measures on others).
VERIFY_SEEDS = (0, 1)
#: The search aims this fraction under --tolerance: the final check adds ORT_ENABLE_ALL and other seeds
#: (YOLOv8n at T = 0.05 measured 0.049 in the search and failed the final check without it).
SEARCH_MARGIN = 0.8

Progress = Callable[[str], None]
ModelSource = onnx.ModelProto | str | os.PathLike[str]
#: How the checks are handed the input: the proto, or the path it was read from.
Reference = onnx.ModelProto | Path


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


@dataclass
class Run:
    """One run's state between its stages: what the pass list and the verification need.

    Attributes:
        options: The run's options.
        notify: Called with the name of each stage as it starts.
        reference_model: The input model, or its path when it came from a file (the checks read it).
        structure: The input model (its structure only, without weight values, when it came from a
            file).
        reference: The input model's verifier, its reference outputs computed at load (None for a
            proto over the protobuf limit, verified by path later).
        held: The input's unoptimised session, held for the budget search's reference runs.
        shapes: The shape service at the verification inputs.
        report: The report being filled.
        corrections: The sequential correction's weights per node output, for its pass (none: no
            correction kept).
    """

    options: Options
    notify: Progress
    reference_model: Reference
    structure: onnx.ModelProto
    reference: Verifier | None
    held: HeldSessions | None
    shapes: ShapeService
    report: Report
    corrections: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)


def compress(
    model_or_path: ModelSource,
    options: Options | None = None,
    *,
    latency: LatencyProbe | None = None,
    raise_on_failure: bool = True,
    progress: Progress | None = None,
    **settings: Any,
) -> Result:
    """Compress an ONNX model, and prove what was done with onnxruntime.

    Args:
        model_or_path: The model, or the path of an ``.onnx`` file (external data next to it).
        options: The run's options (from :func:`~red_onnx.options.make_options`); or give its keyword
            arguments here as ``settings`` (``exact``, ``tolerance``, ``target_macs``,
            ``channel_multiple``, ``freeze``, ``input_spec``, ``verify``, ``hashing``, ``refit``,
            ``activations``, ``separation``, ``provider``, ``latency_check``, ``latency_cache``,
            ``sensitivity``, ``force_target``, ``sequential_refit``).
            Without ``tolerance`` or ``target_macs`` the run is exact.
        latency: A latency oracle to use instead of a ``LatencyService`` on the options' provider
            (tests).
        raise_on_failure: Raise :class:`VerificationError` (with ``.result``) when verification fails.
        progress: Called with the name of each stage as it starts.
        **settings: The keyword arguments of :func:`~red_onnx.options.make_options`.

    Returns:
        The rewritten model and the report.

    Raises:
        UsageError: Contradictory options (``exact`` with ``tolerance`` or ``target_macs``; both
            ``options`` and ``settings``).
        InputError: The model cannot be read, validated or run by onnxruntime.
        VerificationError: The result differs from the input beyond tolerance, or ``target_macs``
            cannot be reached (nothing is returned then).
    """
    if options is not None and settings:
        raise UsageError(
            f"give compress() an Options object or keyword settings, not both: {sorted(settings)}"
        )
    options = options or make_options(**settings)
    run, working, before = _start(model_or_path, options, progress or _silent)
    results = PassManager(pass_list(run, latency), progress=run.notify)(working)
    for item in results:
        run.report.add_pass(item, item.name)
    _collect_skips(run.report)
    candidate, metadata = _export(working, before, run)
    del working  # not alive through the verification; a graph's nodes and tensors refer to each other:
    gc.collect()  # only the cycle collector frees them and the weights they hold
    return _finish(candidate, metadata, run, any(item.name == MergeNear.name for item in results),
                   raise_on_failure)  # fmt: skip


def pass_list(run: Run, latency: LatencyProbe | None = None) -> list[PassStep]:
    """The passes of a run, in order: normalisation, exact rewrites, approximate merging, separation.

    Approximate merging is a step that runs the budget search on the model the exact passes left, and
    builds the pass that applies the merges it chose (none: nothing to apply).
    """
    options = run.options
    steps: list[PassStep] = [
        FoldBatchNorm(),
        FoldAffine(),
        MergeExact(shapes=run.shapes, freeze=options.freeze, channel_multiple=options.channel_multiple),
    ]
    if options.approximate:
        steps.append(lambda working: _searched_merges(working, run))
        steps.append(lambda working: CorrectConsumers(weights=run.corrections) if run.corrections else None)
    if options.separation:
        if latency is None and options.latency_check:
            latency = LatencyService(provider=options.provider, cache_file=options.latency_cache)
        probe = latency if options.latency_check else None
        steps.append(SeparateDepthwise(shapes=run.shapes, latency=probe, freeze=options.freeze))
    return steps


def _silent(stage: str) -> None:
    del stage


def _start(
    model_or_path: ModelSource, options: Options, notify: Progress
) -> tuple[Run, graph_utils.WorkingModel, metrics.ModelFigures]:
    """Load and check the input, compute its reference outputs, import and normalise the working model.

    Returns:
        The run's state, the working model, and the input's figures (parameters, MACs, layers).
    """
    notify("load")
    original, size_before, source = _load(model_or_path)
    if options.approximate:
        _check_measurable(size_before)
    # verification and the search read the input by path when it came from a file (no serialized copy)
    reference_model = source if source is not None else original
    reference = _reference_verifier(reference_model, options, original, verify=options.verify)
    # the unoptimised reference session stays open for the budget search's reference runs, released
    # once they are done (conv25m --target-macs 0.8: its second opening beside the working model was
    # the run's peak)
    held = reference.held if reference is not None else None
    shapes = ShapeService(make_inputs(original, options.input_spec, VERIFY_SEEDS[0]))
    release_free_memory("import")  # the file's bytes and the reference sessions' copies
    working = graph_utils.import_model(original)
    inputs = describe_inputs(original, options.input_spec)  # reads constants: before the structure
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
    report.inputs = inputs
    notify("normalise")
    graph_utils.normalise_constants(working)
    structure, _ = graph_utils.export_light(working)  # dims only: figures need no weight values
    before = metrics.measure(structure, shapes.input_shapes, shapes(working))
    run = Run(options, notify, reference_model, original, reference, held, shapes, report)
    return run, working, before


def _export(
    working: graph_utils.WorkingModel, before: metrics.ModelFigures, run: Run
) -> tuple[onnx.ModelProto | None, Sequence[tuple[str, str]]]:
    """The figures after, and the rewritten model (None when no rewrite applied) with the input's metadata."""
    report = run.report
    if any(item.modified for item in report.passes):
        structure, _ = graph_utils.export_light(working)  # metrics.measure copies the model it is given
        report.set_figures(before, metrics.measure(structure, run.shapes.input_shapes, run.shapes(working)))
        del structure
        return graph_utils.export_model(working), working.metadata
    report.set_figures(before, before)  # the output is the input: its figures are the ones before
    return None, working.metadata


def _finish(
    candidate: onnx.ModelProto | None,
    metadata: Sequence[tuple[str, str]],
    run: Run,
    merged: bool,
    raise_on_failure: bool,
) -> Result:
    """Verify the candidate (the input itself when no rewrite applied), add provenance, give the verdict."""
    options, report = run.options, run.report
    if candidate is None:  # no rewrite applied: the input as it was, not its normalised form
        candidate = _input_copy(run.reference_model)
        report.unchanged = True
    if options.verify:
        run.notify("verify")
        with tempfile.TemporaryDirectory(prefix="red-onnx-") as scratch:
            path = _write_scratch(candidate, Path(scratch))  # a weight at a time (no serialized copy)
            del candidate  # not alive beside the checks' sessions: they read the file
            release_free_memory("verification")  # with the working graph's arrays
            _verify(run.reference_model, str(path), options, report, run.reference, merged)
            candidate = onnx.load(str(path))
        release_free_memory("saving")  # the checks' sessions
    graph_utils.set_metadata(candidate, metadata, _provenance(options, report))
    report.size_after = io.model_nbytes(candidate)
    result = Result(candidate, report)
    if raise_on_failure and options.verify and not result.verified:
        error = VerificationError(_failure_message(report, options, merged))
        error.result = result
        raise error
    return result


def _check_measurable(size: int) -> None:
    """Refuse approximate merging of a model over the protobuf limit (the search measures in memory)."""
    if size > sessions.MAX_PROTO_BYTES:
        raise UsageError(
            f"approximate merging (--tolerance, --target-macs) cannot measure models over "
            f"{sessions.MAX_PROTO_BYTES / 2**30:.1f} GB yet (this one: {size / 2**30:.1f} GB); use --exact"
        )


def _reference_verifier(
    model: Reference, options: Options, structure: onnx.ModelProto, *, verify: bool
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


def _searched_merges(working: graph_utils.WorkingModel, run: Run) -> Pass | None:
    """Search the merge budget on the exact-rewritten model; the pass that applies the chosen merges.

    Returns:
        The merge pass, or None when the search chose nothing (the result is then verified as an exact
        rewrite).

    Raises:
        VerificationError: ``--target-macs`` cannot be reached (the lowest reachable fraction named).
    """
    options = run.options
    run.notify("budget")
    started = time.perf_counter()
    search = BudgetSearch(
        working, run.reference_model, options.input_spec, run.shapes,
        freeze=options.freeze, channel_multiple=options.channel_multiple, hashing=options.hashing,
        refit=options.refit, activations=options.activations, sensitivity=options.sensitivity,
        progress=run.notify, reference_structure=run.structure, held=run.held,
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
    run.report.budget = {**outcome.to_dict(), "seconds": round(time.perf_counter() - started, 3)}
    merges = search.final_plan(outcome.counts)
    if options.sequential_refit and merges:
        run.notify("sequential refit")
        started = time.perf_counter()
        correction, summary = correct_plan(search, merges)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        run.report.budget["correction"] = summary
        dropped = _dropped_correction(options, run.report.budget, summary) if correction is not None else None
        if dropped is not None:
            summary["kept"], summary["reason"], correction = False, dropped, None
        if correction is not None:  # the drift check and the verdict judge the model written
            run.report.budget["heldout_error_uncorrected"] = run.report.budget["heldout_error"]
            run.report.budget["heldout_error"] = summary["heldout_error_after"]
            run.corrections = correction.weights
    del search  # its sessions, Gram matrices and model copy: not alive while the merges are applied
    gc.collect()  # the search's groups and graph views are cyclic
    release_free_memory("merging")
    if not merges:
        return None
    return MergeNear(shapes=run.shapes, merges=merges, freeze=options.freeze)


def _heldout_passes(options: Options, budget: dict[str, Any], heldout: float) -> bool:
    """Whether a held-out error passes the run's check of it.

    Within the tolerance; with ``--target-macs``, within ``HELDOUT_DRIFT`` times the search's error
    (above ``HELDOUT_FLOOR``) unless ``--force-target``.
    """
    if options.target_macs is None:
        return heldout <= options.tolerance
    return options.force_target or not _drifted(budget.get("error"), heldout)


def _drifted(search: float | None, heldout: float) -> bool:
    """Whether the held-out error is over ``HELDOUT_DRIFT`` times the search's (and ``HELDOUT_FLOOR``)."""
    return search is not None and heldout > max(HELDOUT_DRIFT * search, HELDOUT_FLOOR)


def _dropped_correction(options: Options, budget: dict[str, Any], summary: dict[str, Any]) -> str | None:
    """Why a sequential refit kept on the cv rows is not written, or None.

    It is not where its held-out error would fail the run's held-out check and the uncorrected
    model's passes: a correction chosen on a few cv rows must not turn a result that verifies into a
    failure (the budget search backs off on the held-out rows the same way).
    """
    before, after = budget["heldout_error"], summary["heldout_error_after"]
    if _heldout_passes(options, budget, before) and not _heldout_passes(options, budget, after):
        return (
            f"held out {after:.3g} would fail the held-out check; the uncorrected model's {before:.3g} passes"
        )
    return None


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
    original: Reference,
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
        checked["inputs"] = _inputs_phrase(report.inputs)
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
            heldout = _budget_error(report, "heldout_error")
            checked["criterion"] = (
                f"relative L2 error of every output (per part of similar scale) <= {options.tolerance}, "
                f"on {checked['inputs']} and on the search's held-out inputs"
            )
            checked["slices"] = {k: (v if math.isfinite(v) else None) for k, v in parts.items()}
            checked["heldout_error"] = heldout
            within = all(error <= options.tolerance for error in parts.values())
            checked["passed"] = within and (heldout is None or heldout <= options.tolerance)
        else:
            search, heldout = _budget_error(report, "error"), _budget_error(report, "heldout_error")
            drift = heldout is not None and _drifted(search, heldout)
            checked["criterion"] = (
                f"target MACs: no fidelity bound was asked; outputs finite, and the held-out error within "
                f"{HELDOUT_DRIFT:g}x the search's"
                + (" (not enforced: --force-target)" if options.force_target else "")
            )
            checked["target"] = True
            checked["search_error"], checked["heldout_error"] = search, heldout
            finite = all(math.isfinite(o.rel_l2_err) for o in result.outputs)
            checked["passed"] = finite and (not drift or options.force_target)
        report.verification = checked
        if checked["passed"]:
            _full_check(candidate, original, checked)


def _inputs_phrase(inputs: dict[str, Any] | None) -> str:
    """What the verification ran on, in words (``verification.inputs`` of the report)."""
    inputs = inputs or {}
    if inputs.get("kind") == "images":
        return f"the {inputs['total']} images in {inputs['file']}/ (--preprocess {inputs['preset']})"
    if inputs.get("kind") == "npz":
        return f"the inputs of {inputs['file']}"
    return f"synthetic inputs, seeds {list(VERIFY_SEEDS)}"


def _budget_error(report: Report, key: str) -> float | None:
    """The budget search's error on its search (``"error"``) or held-out inputs; None without a search."""
    value = (report.budget or {}).get(key)
    return None if value is None else float(value)


def _full_check(candidate: str, original: Reference, checked: dict[str, Any]) -> None:
    """The full ONNX check of the rewritten model (checker and strict shape inference).

    When the input model fails the same check (onnxruntime runs it all the same), the rewritten
    model's failure is not the rewrite's: the check is skipped with a note in ``checked``.

    Raises:
        VerificationError: The rewritten model fails the check and the input passes it.
    """
    try:
        io.check_model(candidate, label="the rewritten model")
    except VerificationError:
        try:
            io.check_model(original, label="the input model")
        except VerificationError as error:
            checked["full_check"] = f"skipped: {error}"
            logger.warning("full ONNX check skipped: %s", error)
            return
        raise


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


def _as_source(model: Reference, scratch: Path) -> Reference:
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
        worst: dict[str, Any] = next((o for o in outputs if not o.get("passed")), {})
        return (
            f"verification failed: output '{worst.get('name')}' differs by max rel err "
            f"{worst.get('max_rel_err')} (needed rtol {worst.get('needed_rtol')}, allowed {EXACT_RTOL}); "
            "nothing was written — please report this model"
        )
    if verification.get("target"):
        return (
            f"the result reaches --target-macs {options.target_macs} but does not generalise: its error on "
            f"held-out inputs is {verification.get('heldout_error'):.3g}, more than {HELDOUT_DRIFT:g}x the "
            f"{verification.get('search_error'):.3g} the search measured; nothing was written — pass more "
            "varied --calibration samples, or --force-target to write it regardless"
        )
    heldout = verification.get("heldout_error")
    if heldout is not None and heldout > options.tolerance:
        return (
            f"verification failed on the search's held-out inputs: relative L2 error {heldout:.3g}, over "
            f"the tolerance {options.tolerance}; nothing was written — try a smaller --tolerance, or pass "
            "more varied --calibration samples"
        )
    worst_l2: dict[str, Any] = max(outputs, key=lambda o: o.get("rel_l2_err") or math.inf, default={})
    return (
        f"verification failed on held-out inputs: output '{worst_l2.get('name')}' has relative L2 error "
        f"{worst_l2.get('rel_l2_err')}, over the tolerance {options.tolerance}; nothing was written — "
        "try a smaller --tolerance, or pass your own samples with --calibration"
    )
