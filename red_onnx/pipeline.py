"""Orchestration: load, normalise, run the passes, verify, and build the report.

The pipeline owns the order of the passes and the verification verdict; passes only decide and
rewrite. Nothing is written to disk here (the CLI saves, atomically, after a passed verification).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from red_onnx import graph as graph_utils
from red_onnx import io, metrics, verify
from red_onnx._version import __version__
from red_onnx.errors import InputError, VerificationError
from red_onnx.pass_infra import Pass
from red_onnx.passes.fold_affine import FoldAffine
from red_onnx.passes.fold_batchnorm import FoldBatchNorm
from red_onnx.passes.merge_exact import MergeExact
from red_onnx.report import FrozenGroup, Report
from red_onnx.shapes import ShapeService
from red_onnx.verify import InputSpec, Verifier, make_inputs

logger = logging.getLogger(__name__)
ort.set_default_logger_severity(4)

#: Exact-mode tolerances: element-wise |y' - y| <= atol·max(1, max|y|) + rtol·|y|.
EXACT_RTOL = 1e-5
EXACT_ATOL = 1e-6
#: Seeds of the verification inputs.
VERIFY_SEEDS = (0, 1)

Progress = Callable[[str], None]
ModelSource = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class Options:
    """Options of one compression run (what the output's provenance records).

    Attributes:
        exact: Only function-preserving rewrites.
        freeze: Node-name glob patterns of layers to protect.
        input_spec: How verification inputs are built.
        verify: Whether to verify with onnxruntime (on by default; off only for analysis tools).
    """

    exact: bool = False
    freeze: tuple[str, ...] = ()
    input_spec: InputSpec = field(default_factory=InputSpec)
    verify: bool = True

    def provenance(self) -> dict[str, object]:
        """The options as recorded in the output model (no paths that differ between machines)."""
        spec = asdict(self.input_spec)
        spec["npz"] = Path(spec["npz"]).name if spec["npz"] else None
        return {"exact": self.exact, "freeze": list(self.freeze), "input_spec": spec}


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


def default_passes(options: Options, shapes: ShapeService) -> list[Pass]:
    """The pass list: normalisation, then the rewrites the mode allows."""
    passes: list[Pass] = [FoldBatchNorm(), FoldAffine()]
    passes.append(MergeExact(shapes=shapes, freeze=options.freeze))
    return passes


def compress(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    exact: bool = False,
    freeze: Sequence[str] = (),
    input_spec: InputSpec | None = None,
    verify: bool = True,
    raise_on_failure: bool = True,
    progress: Progress | None = None,
) -> Result:
    """Compress an ONNX model without data, and prove what was done with onnxruntime.

    Args:
        model_or_path: The model, or the path of an ``.onnx`` file (external data next to it).
        exact: Only function-preserving rewrites (until the RED passes land, every run is exact).
        freeze: Node-name glob patterns of layers whose channels must not change.
        input_spec: Shapes, ranges, values or an ``.npz`` for the verification inputs.
        verify: Verify the result with onnxruntime (graph optimisations off and at ORT_ENABLE_ALL).
        raise_on_failure: Raise :class:`VerificationError` (with ``.result``) when verification fails.
        progress: Called with the name of each stage as it starts.

    Returns:
        The rewritten model and the report.

    Raises:
        InputError: The model cannot be read, validated or run by onnxruntime.
        VerificationError: The result differs from the input beyond tolerance.
    """
    notify = progress or (lambda stage: None)
    options = Options(exact=exact, freeze=tuple(freeze), input_spec=input_spec or InputSpec(), verify=verify)
    notify("load")
    original, size_before, source = _load(model_or_path)
    shapes = ShapeService(make_inputs(original, options.input_spec, VERIFY_SEEDS[0]))
    working = graph_utils.import_model(original)
    report = Report(
        input_shapes={k: list(v) for k, v in shapes.input_shapes.items()},
        options=options.provenance(),
        size_before=size_before,
    )
    report.overridable_initializers = sorted(working.overridable)
    notify("normalise")
    graph_utils.normalise_constants(working)
    before = metrics.measure(graph_utils.export_model(working), shapes.input_shapes)
    for item in default_passes(options, shapes):
        notify(item.name)
        report.add_pass(item(working), item.name)
    _collect_skips(report)
    candidate = graph_utils.export_model(working)
    report.set_figures(before, metrics.measure(candidate, shapes.input_shapes))
    if verify:
        notify("verify")
        _verify(source if source is not None else original, candidate, options, report)
    candidate = graph_utils.export_model(working, metadata=_provenance(options, report))
    report.size_after = io.model_nbytes(candidate)
    result = Result(candidate, report)
    if raise_on_failure and verify and not result.verified:
        error = VerificationError(_failure_message(report))
        error.result = result
        raise error
    return result


def _collect_skips(report: Report) -> None:
    for item in report.passes:
        if item.name != MergeExact.name:
            continue
        for skip in item.skips:
            if "[" in skip["subject"] and skip["subject"].endswith("]"):
                report.kept_zero_channels.append({"channel": skip["subject"], "reason": skip["reason"]})
            else:
                report.frozen.append(FrozenGroup(skip["subject"], skip["reason"]))


def _verify(original: ModelSource, candidate: onnx.ModelProto, options: Options, report: Report) -> None:
    """Verify ``candidate`` against ``original``; models over the protobuf limit go by path."""
    with tempfile.TemporaryDirectory(prefix="red-onnx-") as scratch:
        reference = _as_source(original, Path(scratch) / "reference.onnx")
        target = _as_source(candidate, Path(scratch) / "candidate.onnx")
        verifier = Verifier(reference, options.input_spec, seeds=VERIFY_SEEDS)
        result = verifier.check(target, rtol=EXACT_RTOL, atol=EXACT_ATOL)
        report.verification = result.to_dict()
        if result.passed:
            io.check_model(target)


def _as_source(model: ModelSource, scratch: Path) -> ModelSource:
    """The model itself, or a path to it when it is too large to hand over serialized."""
    if isinstance(model, onnx.ModelProto) and io.model_nbytes(model) > verify.MAX_PROTO_BYTES:
        io.save_model(model, scratch)
        return scratch
    return model


def _provenance(options: Options, report: Report) -> dict[str, str]:
    return {
        "red_onnx.version": __version__,
        "red_onnx.options": json.dumps(options.provenance(), sort_keys=True),
        "red_onnx.summary": json.dumps(report.headline(), sort_keys=True),
    }


def _failure_message(report: Report) -> str:
    verification = report.verification or {}
    failed = [o for o in verification.get("outputs", []) if not o.get("passed")]
    worst = failed[0] if failed else {}
    return (
        f"verification failed: output '{worst.get('name')}' differs by max rel err "
        f"{worst.get('max_rel_err')} (needed rtol {worst.get('needed_rtol')}, allowed {EXACT_RTOL}); "
        "nothing was written — please report this model"
    )
