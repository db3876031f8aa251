"""Prove that a rewritten ONNX model computes the same function as the original, with onnxruntime.

The :class:`Verifier` builds seeded synthetic inputs once (``red_onnx.verify.inputs``; or takes the user's
``--calibration`` samples), runs the reference model at every requested onnxruntime graph-optimisation level
(``red_onnx.runtime.sessions``), and compares each candidate against the reference at the same level *and*
against the unoptimised reference, so a rewrite can neither hide behind nor be blamed for onnxruntime's
own fusions.

Per output, the metrics and the pass rule of ``red_onnx.verify.compare``, worst over seeds, levels and both
references, with the model's own numerical noise allowed on top (``red_onnx.verify.noise``: float16 rounding,
onnxruntime's drift between its levels). :class:`VerificationResult` is the verdict. For budget
searches, :meth:`Verifier.rel_l2_errors` also measures the parts of packed outputs (``verify.parts``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from red_onnx.errors import InputError, UsageError
from red_onnx.io.memory import release_free_memory
from red_onnx.options import InputSpec
from red_onnx.runtime.sessions import (
    HeldSessions,
    ModelLike,
    check_level,
    load_structure,
    model_source,
    open_session,
    session_runner,
)
from red_onnx.runtime.stream import (
    Feed,
    Runner,
    StatePair,
    carried,
    confirm_pairs,
    find_state_pairs,
    per_stream,
    run_stream,
    worst_step_error,
)
from red_onnx.verify.compare import OutputCheck, compare_outputs, merge_checks, token_rows
from red_onnx.verify.input_spec import defaulted_dims_hint
from red_onnx.verify.inputs import (
    build_feed,
    load_samples,
    make_inputs,
    real_inputs,
    rows_part,
    step_count,
    stepped_names,
)
from red_onnx.verify.noise import DRIFT_FACTOR, ROUNDING_UNITS, max_drift, noise_allowance, rounding_unit
from red_onnx.verify.parts import box_error, is_box_head, part_errors, scale_slices
from red_onnx.verify.synthetic import IntegerRole, drawn_ints_hint, integer_roles

logger = logging.getLogger(__name__)

#: Calls per synthetic verification stream of a recurrent model. Measured on silero-vad (LSTM, 128
#: units) over 121 real speech chunks: after a 1% disturbance of the state, the speech probabilities still
#: moved by 1.5e-2 16 calls later and by 2e-3 24 calls later; the h half of the state fell back from 0.13
#: to 0.02 within 16 calls, the c half kept about 0.2 to the end. 32 calls cover that horizon; each call
#: is one onnxruntime run per seed in every search measurement, so not more.
STREAM_STEPS = 32
#: Parts of the calibration samples a Verifier can use (see Verifier and verify.inputs.SPLIT_SHARES).
PARTS = ("all", "search", "cv", "heldout")


def _json_float(value: float | None) -> float | None:
    """Strict-JSON number: non-finite values (a failed output's errors) become None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class VerificationResult:
    """The verdict of :meth:`Verifier.check` and its numbers."""

    passed: bool
    max_abs_err: float
    max_rel_err: float
    outputs: list[OutputCheck]
    levels: list[str]
    rtol: float
    atol: float
    seeds: list[int]
    rounding_floor: float = 0.0
    stream: dict[str, Any] | None = None  # recurrent models: the state pairs, steps and streams compared

    @property
    def worst_rel_l2(self) -> float:
        """The largest relative L2 error over all outputs (0.0 for a model without outputs)."""
        return max((o.rel_l2_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite numbers (inf errors of a failed output) become None."""
        outputs = []
        for out in self.outputs:
            row = asdict(out)
            row["shape"] = list(out.shape)
            for key in ("max_abs_err", "max_rel_err", "rel_l2_err", "cosine", "needed_rtol"):
                row[key] = _json_float(row[key])
            row["top1_agreement"] = _json_float(out.top1_agreement)
            row["pooled_cosine"] = _json_float(out.pooled_cosine)
            outputs.append(row)
        return {
            "passed": self.passed,
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "rtol": self.rtol, "atol": self.atol, "rounding_floor": self.rounding_floor,
            "levels": list(self.levels), "seeds": list(self.seeds),
            "outputs": outputs, **({"stream": self.stream} if self.stream else {}),
        }  # fmt: skip

    def summary(self) -> str:
        """One line: the verdict and the worst output's numbers."""
        verdict = "passed" if self.passed else "FAILED"
        if not self.outputs:
            return f"verification {verdict} (no outputs)"
        worst = max(self.outputs, key=lambda o: (not o.passed, o.needed_rtol, o.rel_l2_err))
        return (
            f"verification {verdict} at rtol {self.rtol:g}, atol {self.atol:g}: worst output "
            f"{worst.name!r} max abs err {worst.max_abs_err:.3g}, rel L2 err "
            f"{worst.rel_l2_err:.3g}, needs rtol {worst.needed_rtol:.3g}"
        )


class Verifier:
    """Runs a reference model once per level and checks candidates against it.

    A **recurrent** model (state pairs such as ``state -> stateN``, ``runtime.stream``) is verified on
    streams: per seed, ``STREAM_STEPS`` calls with seeded step inputs from the zero state (or the
    steps of a ``--calibration`` file, see :class:`InputSpec`), each model carrying its own state from
    call to call; an output's values over all steps form the one array every metric and check compares,
    so what the state accumulates is bounded, not only each call. When the file gives every input, the
    seeds would only repeat it: one stream is run.

    ``part`` selects the part of the calibration samples used (synthetic inputs ignore it: their seeds
    already differ): ``"all"``; ``"search"``, ``"cv"`` or ``"heldout"``, disjoint parts for a budget
    search, the choice of its settings and its held-out re-check. A batch is split at random, seeded
    (``verify.inputs.split_rows``: half search, a quarter each cv and held out; with 2 rows cv uses the
    search row) when every array of the samples shares one leading size >= 2 on a dynamic axis. A
    recurrent model's steps are cut in two for ``"search"`` and ``"heldout"`` (the held-out half starts
    from the state the reference carried out of the first); ``"cv"`` uses the whole stream. Samples
    that cannot be split are used whole, and the log says so.

    ``structure`` is the reference as a ModelProto when the caller holds one while passing a path or
    bytes (its inputs and outputs are read from it instead of loading the file again). ``held``: the
    reference's sessions shared with other verifiers of the same model (its ``source`` is used for
    the reference runs then, ``reference`` only for its inputs).

    Attributes:
        inputs: The feeds the reference runs on: one per seed (:func:`make_inputs`); for a recurrent
            model every step of every stream, with the state the unoptimised reference carried in.
        pairs: The recurrent state pairs (empty: the model is verified call by call, as a batch).
        sessions_built: How many onnxruntime sessions this verifier has created (for reports).
    """

    def __init__(
        self,
        reference: ModelLike,
        spec: InputSpec,
        *,
        seeds: Sequence[int] = (0,),
        levels: Sequence[str] = ("disable_all", "enable_all"),
        providers: Sequence[str] = ("CPUExecutionProvider",),
        part: str = "all",
        structure: onnx.ModelProto | None = None,
        held: HeldSessions | None = None,
    ) -> None:
        self.spec = spec
        self.held = held
        self.seeds = [int(s) for s in seeds]
        self.levels = [str(level) for level in levels]
        self.providers = list(providers)
        if not self.seeds or not self.levels:
            raise UsageError("verification needs at least one seed and one optimisation level")
        for level in self.levels:
            check_level(level)
        if part not in PARTS:
            raise UsageError(f"unknown inputs part {part!r}; use one of {', '.join(PARTS)}")
        self.part = part
        # bytes are a snapshot: later edits don't leak
        self._reference = held.source if held is not None else model_source(reference)
        structure = structure if structure is not None else load_structure(reference)
        self.rounding_floor = ROUNDING_UNITS * rounding_unit(structure)
        roles = integer_roles(structure)
        hints = (
            defaulted_dims_hint(real_inputs(structure), spec),
            drawn_ints_hint(real_inputs(structure), spec, roles),
        )
        self._shape_hint = "; ".join(hint for hint in hints if hint) or None  # for a failed reference run
        self._reference_cache: dict[str, list[Feed]] = {}
        self._fed: list[list[Feed]] = []  # a stream's feeds as the unoptimised reference saw them
        self.sessions_built = 0
        self.pairs = find_state_pairs(structure)
        if self.pairs:
            self.pairs = self._confirmed(structure)
        self._steps: list[list[Feed]] = self._streams(structure) if self.pairs else []
        self._inputs: list[Feed] = [] if self.pairs else self._batch_inputs(structure)
        self._masks = [_token_weights(feed, roles) for feed in self._inputs]

    @property
    def inputs(self) -> list[Feed]:
        """The feeds the reference runs on (see the class docstring)."""
        if not self.pairs:
            return self._inputs
        self.reference_outputs("disable_all")
        return [feed for step in self._fed for feed in step]

    @property
    def steps(self) -> int:
        """Calls per stream (1 for a model without recurrent state)."""
        return len(self._steps) if self.pairs else 1

    def _batch_inputs(self, structure: onnx.ModelProto) -> list[Feed]:
        """One feed per seed; the selected part of a samples batch (see the class docstring)."""
        feeds = [make_inputs(structure, self.spec, seed) for seed in self.seeds]
        if self.part == "all" or self.spec.calibration is None:
            return feeds
        return rows_part(feeds, structure, set(load_samples(structure, self.spec)), self.part)

    def _confirmed(self, structure: onnx.ModelProto) -> list[StatePair]:
        """The state pairs whose output comes back with the state's shape and dtype (one reference call)."""
        arrays = load_samples(structure, self.spec)
        stepped = stepped_names(structure, arrays, self.pairs)
        states = [pair.input for pair in self.pairs]
        feed = build_feed(structure, self.spec, arrays, stepped, self.seeds[0], 0, states)
        with self._shape_hinted():
            session = self._session(self._reference, "disable_all", reference=True)
            got = session_runner(session, "disable_all", reference=True)([feed])[0]
        kept = confirm_pairs(self.pairs, feed, got)
        for pair in self.pairs:
            if pair not in kept:
                logger.warning("output %r does not come back with the shape of %r: not streamed as its "
                               "state", pair.output, pair.input)  # fmt: skip
        return kept

    def _streams(self, structure: onnx.ModelProto) -> list[list[Feed]]:
        """``[step][stream]`` feeds of a recurrent model (the selected part; see the class docstring)."""
        arrays = load_samples(structure, self.spec)
        stepped = stepped_names(structure, arrays, self.pairs)
        count = step_count(arrays, stepped, self.spec.calibration) or STREAM_STEPS
        states = [pair.input for pair in self.pairs]
        seeded = any(
            vi.name not in arrays and vi.name not in self.spec.values and vi.name not in states
            for vi in real_inputs(structure)
        )
        seeds = self.seeds if seeded else self.seeds[:1]
        steps = [
            [build_feed(structure, self.spec, arrays, stepped, seed, t, states) for seed in seeds]
            for t in range(count)
        ]
        if self.part == "all":
            return steps
        if self.part == "cv":
            logger.info("a recurrent model's cv part uses the whole stream")
            return steps
        if not stepped or count < 2:
            logger.info("the calibration file holds no steps to split: the %s part uses all of it", self.part)
            return steps
        cut = (count + 1) // 2
        if self.part == "search":
            return steps[:cut]
        session = self._session(self._reference, "disable_all", reference=True)
        _, outputs = run_stream(
            session_runner(session, "disable_all", reference=True), steps[:cut], self.pairs
        )
        return [carried(steps[cut], outputs[-1], self.pairs), *steps[cut + 1 :]]

    def head(self, count: int) -> Verifier:
        """A verifier of the first ``count`` feeds (or streams), sharing the reference outputs so far."""
        first = copy.copy(self)
        first.seeds = self.seeds[:count]
        first._inputs = self._inputs[:count]
        first._steps = [step[:count] for step in self._steps]
        first._fed = [step[:count] for step in self._fed]
        first._reference_cache = {level: outputs[:count] for level, outputs in self._reference_cache.items()}
        first.sessions_built = 0
        return first

    def reference_outputs(self, level: str) -> list[dict[str, np.ndarray]]:
        """Return the reference outputs at ``level``, one dict per seed or stream (computed once)."""
        check_level(level)
        if level not in self._reference_cache:
            with self._shape_hinted():
                self._reference_cache[level] = self._run_source(self._reference, level, reference=True)
        return self._reference_cache[level]

    @contextlib.contextmanager
    def _shape_hinted(self) -> Iterator[None]:
        """Around a reference run: its InputError also says how the inputs were made, and how to set them.

        That is the sizes the dynamic dims had, and the integer inputs drawn at random.
        """
        try:
            yield
        except InputError as error:
            if self._shape_hint is None:
                raise
            raise InputError(f"{error}; {self._shape_hint}") from error

    def outputs_of(self, runner: Runner) -> list[Feed]:
        """Outputs of ``runner`` (one model call per feed) on this verifier's inputs, as the reference's are.

        A model without state: ``runner(inputs)``, one dict per seed. A recurrent one: every stream run
        step by step with the state that ``runner`` itself returned the step before, each output joined
        over the steps (``runtime.stream.per_stream``), one dict per stream. The budget search measures
        through this with its simulator.
        """
        if not self.pairs:
            return runner(self._inputs)
        return per_stream(run_stream(runner, self._steps, self.pairs)[1])

    def run(self, model: ModelLike, level: str) -> list[dict[str, np.ndarray]]:
        """Run a candidate model on every feed at ``level`` (a recurrent one: on its streams).

        Raises:
            VerificationError: onnxruntime cannot load or run the candidate.
        """
        check_level(level)
        return self._run_source(model_source(model), level, reference=False)

    def check(self, candidate: ModelLike, *, rtol: float = 1e-5, atol: float = 1e-6) -> VerificationResult:
        """Compare ``candidate`` with the reference at every level and with unoptimised reference.

        Args:
            candidate: The rewritten model (a ModelProto or a path).
            rtol: Relative tolerance of the element-wise pass rule.
            atol: Absolute tolerance, in units of ``max(1, max |y|)`` of each output.

        Returns:
            The worst metrics per output over seeds, levels and references, and the verdict.
        """
        source = model_source(candidate)
        per_output: dict[str, list[OutputCheck]] = {}
        for level in sorted({*self.levels, "disable_all"}):
            self.reference_outputs(level)  # a broken input model is the input's fault: InputError first
        for level in self.levels:
            got = self._run_source(source, level, reference=False)
            for ref_level in sorted({level, "disable_all"}):
                allowances = self._allowances(level, ref_level)
                refs = self.reference_outputs(ref_level)
                _collect(got, refs, rtol, atol, per_output, allowances, self._masks)
        outputs = [merge_checks(checks) for checks in per_output.values()]
        result = VerificationResult(
            passed=all(o.passed for o in outputs),
            max_abs_err=max((o.max_abs_err for o in outputs), default=0.0),
            max_rel_err=max((o.max_rel_err for o in outputs), default=0.0),
            outputs=outputs, levels=list(self.levels), rtol=rtol, atol=atol,
            seeds=list(self.seeds), rounding_floor=self.rounding_floor, stream=self.stream_summary(),
        )  # fmt: skip
        logger.debug("%s", result.summary())
        return result

    def stream_summary(self) -> dict[str, Any] | None:
        """For a recurrent model: its state pairs, the calls per stream and the streams (else None)."""
        if not self.pairs:
            return None
        pairs = [[pair.input, pair.output] for pair in self.pairs]
        return {"pairs": pairs, "steps": self.steps, "streams": len(self._steps[0])}

    def _allowances(self, level: str, ref_level: str) -> list[dict[str, np.ndarray | float]]:
        """Per seed and output: the model's own noise allowed on top of the pass rule.

        The float16 rounding floor (``rounding_floor·(max|y| + |y|)``), plus, when the candidate at
        ``level`` is compared with the reference at another ``ref_level``, how far the reference itself
        moves between the two levels (a candidate equal to the reference then passes by construction),
        plus ``DRIFT_FACTOR`` times the largest such move (when both levels were run).
        """
        allowances: list[dict[str, np.ndarray | float]] = []
        refs = self.reference_outputs(ref_level)
        drifts = self.reference_outputs(level) if level != ref_level else refs
        disabled, enabled = (self._reference_cache.get(name) for name in ("disable_all", "enable_all"))
        for k, (ref, other) in enumerate(zip(refs, drifts, strict=True)):
            allowed: dict[str, np.ndarray | float] = {}
            for name, values in ref.items():
                allowed[name] = noise_allowance(values, other.get(name), self.rounding_floor)
                if disabled and enabled:  # a reassociation may move it as far as onnxruntime's own fusions do
                    drift = max_drift(disabled[k][name], enabled[k].get(name))
                    allowed[name] = allowed[name] + DRIFT_FACTOR * drift
            allowances.append(allowed)
        return allowances

    def rel_l2_errors(self, candidate: ModelLike, level: str = "enable_all") -> dict[str, float]:
        """Worst relative L2 error per output over the seeds, at one level (for budget searches).

        An output of rank >= 3 whose axis-1 entries differ in scale by more than ``SCALE_GAP`` (a YOLO
        head [N, 4 + classes, boxes]: coordinates next to class scores) is also measured per contiguous
        slice of similar scale, keyed ``name[start:stop]``, so the small part cannot be destroyed
        inside the budget of the large one (``red_onnx.verify.parts``); a detection head's boxes per box
        (``name[0:4] per box``), a recurrent model's worst step (``name worst step``).
        Missing outputs, shape mismatches and non-finite values give ``inf``.
        """
        return self.rel_l2_errors_of(self.run(candidate, level), level)

    @property
    def token_masks(self) -> list[np.ndarray | None]:
        """Per feed, a text model's ``[B, S]`` attention mask (None for other models, or a stream)."""
        return list(self._masks) if len(self._masks) == len(self._inputs) else []

    def rel_l2_errors_of(self, got: Sequence[Feed], level: str) -> dict[str, float]:
        """:meth:`rel_l2_errors` of outputs already computed as :meth:`outputs_of` computes them.

        A text model's ``[B, S, H]`` outputs are measured at the tokens its attention mask keeps
        (``compare.token_rows``), as the verdict measures them.
        """
        worst: dict[str, float] = {}
        masks = self.token_masks
        for index, (cand, ref) in enumerate(zip(got, self.reference_outputs(level), strict=True)):
            mask = masks[index] if index < len(masks) else None
            for name, expected in ref.items():
                actual = cand.get(name)
                kept = token_rows(expected, mask)
                if kept is not None and actual is not None and actual.shape == expected.shape:
                    expected, actual = kept, token_rows(actual, mask)
                # the output when it has the expected shape, else None
                same = actual if actual is not None and actual.shape == expected.shape else None
                slices = scale_slices(expected) if same is not None and expected.ndim >= 3 else None
                errors = part_errors(name, actual, expected, slices)  # a head packing different scales
                if self.pairs and same is not None:
                    errors[f"{name} worst step"] = worst_step_error(same, expected, self.steps)
                if same is not None and is_box_head(expected, slices):
                    errors[f"{name}[0:4] per box"] = box_error(same, expected)
                for label, err in errors.items():
                    worst[label] = max(worst.get(label, 0.0), err)
        return worst

    def _session(self, source: bytes | str, level: str, *, reference: bool) -> ort.InferenceSession:
        if reference and self.held is not None:
            session, opened = self.held.session(level)
            self.sessions_built += int(opened)
            return session
        session = open_session(source, level, self.providers, reference=reference)
        self.sessions_built += 1
        return session

    def _run_source(self, source: bytes | str, level: str, *, reference: bool) -> list[Feed]:
        runner = session_runner(self._session(source, level, reference=reference), level, reference=reference)
        if not self.pairs:
            outputs = runner(self._inputs)
        else:
            fed, steps = run_stream(runner, self._steps, self.pairs)
            if reference and level == "disable_all":
                self._fed = fed
            outputs = per_stream(steps)
        del runner  # the session: its weights' copy goes back to the system before the next one opens
        release_free_memory("the next session")  # (conv25m: a session closed kept ~130 MB of RSS)
        return outputs


def _token_weights(feed: Feed, roles: Mapping[str, IntegerRole]) -> np.ndarray | None:
    """A text model's token weights for ``pooled_cosine``: its one attention mask, or ones shaped as its ids.

    None for a model without token ids (no ``pooled_cosine`` then: a ``[B, C, N]`` detection head or a
    sequence of class scores is no sentence embedding).
    """
    masks = [name for name, role in roles.items() if role.kind == "mask"]
    ids = [name for name, role in roles.items() if role.kind == "ids"]
    if len(masks) == 1:
        return np.asarray(feed[masks[0]])
    return np.ones(np.shape(feed[ids[0]])) if len(ids) == 1 and np.ndim(feed[ids[0]]) == 2 else None


def _collect(
    got: Sequence[Feed], refs: Sequence[Feed], rtol: float, atol: float,
    per_output: dict[str, list[OutputCheck]], allowances: Sequence[Mapping[str, np.ndarray | float]],
    masks: Sequence[np.ndarray | None],
) -> None:  # fmt: skip
    """Append one check per (seed, reference output) to ``per_output`` (``masks``: per feed, or empty)."""
    for index, (cand, ref, allowed) in enumerate(zip(got, refs, allowances, strict=True)):
        mask = masks[index] if index < len(masks) else None
        for name, expected in ref.items():
            check = compare_outputs(
                name, cand.get(name), expected, rtol=rtol, atol=atol, allowance=allowed.get(name, 0.0),
                mask=mask,
            )  # fmt: skip
            per_output.setdefault(name, []).append(check)
