"""The options of a run, with their defaults and validation: light enough for ``red-onnx --help``.

Imports nothing heavier than the standard library (no onnx, onnxruntime or numpy), so the CLI can
build its parser and the API can validate options before any model is read. Every floor may import
it, as it may import :mod:`red_onnx.errors`.

- :class:`InputSpec`: what the user says about the verification inputs (``--input-shape``,
  ``--input-range``, ``--input-value``, ``--calibration`` and its preprocessing, the prior);
  ``parse_input_*`` read the options.
- :class:`Options`: one compression run's settings; :func:`make_options` validates a combination
  (one-line :class:`~red_onnx.errors.UsageError`) and fills the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from red_onnx.errors import UsageError

#: The execution provider separation decisions and ``--benchmark`` are timed on by default.
CPU_PROVIDER = "CPUExecutionProvider"
#: How the budget search finds each group's error alone (``--sensitivity``).
SENSITIVITY_MODES = ("auto", "measured", "calibrated", "local")
#: Default fidelity budget: relative L2 error of every output on the verification inputs.
DEFAULT_TOLERANCE = 0.02
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
#: A result whose error on the held-out inputs exceeds this multiple of the search's (and
#: HELDOUT_FLOOR) did not generalise from the search inputs: a failure under --target-macs unless
#: --force-target. (A patterned --inputs file dealt even/odd measured 0.0023 in the search, 1.29 held out.)
HELDOUT_DRIFT = 2.0
#: Held-out errors below this are never called a drift (ratios of round-off mean nothing).
HELDOUT_FLOOR = 1e-3

#: Ways of drawing float inputs (InputSpec.prior).
PRIORS = ("normal", "pink")
#: How ``--preprocess`` scales the pixels of a folder of calibration images (InputSpec.preprocess; the
#: numbers are in ``red_onnx.io.images``): ImageNet's mean and std over [0, 1], or a plain range.
PREPROCESS_PRESETS = ("imagenet", "0-1", "-1-1", "0-255")


@dataclass(frozen=True)
class InputSpec:
    """How to build the verification inputs.

    Attributes:
        shapes: Full shape per input name (``--input-shape``); replaces the dynamic dims of the
            declared shape (its static dims must agree: onnxruntime rejects anything else).
        ranges: Uniform ``[lo, hi]`` per input (``--input-range``); integers are drawn inclusive.
        values: Constant fill per input (``--input-value``).
        npz: The former name of ``calibration``, kept for the Python API: ``InputSpec(npz=path)`` is
            ``InputSpec(calibration=path)``, and after construction both hold the same path.
        default_dim: Size given to dynamic dims not covered by ``shapes``.
        prior: How float inputs are drawn: ``"normal"`` (i.i.d. standard normal) or ``"pink"``
            (spatially correlated 1/f noise over the trailing axes of inputs of rank ≥ 3, scaled to unit
            variance — closer to images and signals than white noise; ``--input-prior``).
        calibration: The user's samples (``--calibration``, or its other name ``--inputs``), used as
            given; for the inputs they feed they win over ``shapes``, ``ranges`` and ``values``. Either a
            folder of images (:attr:`samples_kind` ``"images"``: PNG, JPEG, BMP or WebP files in
            file-name order, resized to the model's one image input and scaled by ``preprocess``; see
            ``red_onnx.io.images``), or any other path, read as a ``.npz`` file of arrays by input name
            (``"npz"``). Each array has the input's declared shape (a batch on a dynamic axis is
            welcome). For a recurrent model (``red_onnx.runtime.stream``) a data input may have one
            leading axis more: the **step** axis, one call per entry, in stream order (all such arrays
            the same length); a state input holds the stream's initial state at its declared shape.
            Without a step axis, the file's values are fed on every call of a ``STREAM_STEPS``-call
            stream. A state that neither the file nor ``ranges``/``values`` gives starts at zero, where
            deployed streams start (random values can be unreachable: an LSTM's h lies in (-1, 1); and
            measured on silero-vad, onnxruntime's own drift between its optimisation levels over 32
            calls needs rtol 5.0e-5 from a standard-normal state, 5.9e-6 from zero). The rows of a
            batch are split at random between a budget search's parts
            (``red_onnx.verify.inputs.split_rows``).
        preprocess: How a folder's pixels are scaled (``--preprocess``): one of
            :data:`PREPROCESS_PRESETS`; required with a folder of images, refused otherwise.
    """

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    values: Mapping[str, float] = field(default_factory=dict)
    npz: Path | None = None
    default_dim: int = 1
    prior: str = "normal"
    calibration: Path | None = None
    preprocess: str | None = None

    def __post_init__(self) -> None:
        given = [Path(path) for path in (self.calibration, self.npz) if path is not None]
        if len(set(given)) > 1:
            raise UsageError(
                f"calibration {given[0]} and npz {given[1]} differ; npz is the former name of calibration: "
                "give one"
            )
        object.__setattr__(self, "calibration", given[0] if given else None)
        object.__setattr__(self, "npz", self.calibration)
        self.check_calibration()
        if self.prior not in PRIORS:
            raise UsageError(f"input prior {self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.default_dim < 1:
            raise UsageError(f"default dim {self.default_dim} is not a positive integer; use >= 1")
        both = sorted(set(self.ranges) & set(self.values))
        if both:
            raise UsageError(f"inputs {', '.join(both)} have both --input-range and --input-value; give one")

    @property
    def samples_kind(self) -> str | None:
        """What ``calibration`` holds: ``"images"`` (a folder), ``"npz"`` (any other path), or None."""
        if self.calibration is None:
            return None
        return "images" if self.calibration.is_dir() else "npz"

    def check_calibration(self) -> None:
        """Check that ``preprocess`` and ``calibration`` go together (a folder needs it, a file refuses it).

        Run at construction and again when the samples are read (the folder may have appeared since).

        Raises:
            UsageError: An unknown preset, a folder without a preset, or a preset without a folder.
        """
        presets = ", ".join(PREPROCESS_PRESETS)
        path, preset = self.calibration, self.preprocess
        if preset is not None and preset not in PREPROCESS_PRESETS:
            raise UsageError(f"--preprocess {preset!r} is not one of {presets}")
        if path is not None and path.is_dir() and preset is None:
            raise UsageError(
                f"--calibration {path} is a folder of images: say how to scale its pixels with "
                f"--preprocess ({presets})"
            )
        if preset is not None and path is None:
            raise UsageError(
                "--preprocess applies to a folder of images; give the folder with --calibration, "
                "or drop --preprocess"
            )
        if preset is not None and path is not None and path.is_file():
            raise UsageError(
                f"--preprocess applies to a folder of images, and {path} is a file (an .npz is fed as "
                "saved): drop --preprocess"
            )


def _split_option(text: str, option: str, example: str) -> tuple[str, str]:
    """Split ``NAME:REST`` at the last colon (input names such as ``x:0`` keep theirs)."""
    name, sep, rest = text.rpartition(":")
    if not sep or not name.strip():
        raise UsageError(f"bad {option} {text!r}: expected {example}")
    return name.strip(), rest.strip()


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--input-shape NAME:D1,D2,...`` (``NAME:`` alone means a scalar).

    Args:
        text: The option value, e.g. ``"x:1,3,48,320"``.

    Returns:
        The input name and its shape.

    Raises:
        UsageError: The text is malformed or a dimension is negative (0 is a size: an empty tensor).
    """
    example = "NAME:D1,D2,... with integers >= 0, e.g. images:1,3,224,224"
    name, rest = _split_option(text, "--input-shape", example)
    if not rest:
        return name, ()
    try:
        dims = tuple(int(part) for part in rest.split(","))
    except ValueError:
        raise UsageError(f"bad --input-shape {text!r}: expected {example}") from None
    if any(d < 0 for d in dims):
        raise UsageError(f"bad --input-shape {text!r}: dimensions must be integers >= 0")
    return name, dims


def _parse_floats(text: str, option: str, example: str, count: int) -> tuple[str, list[float]]:
    name, rest = _split_option(text, option, example)
    try:
        numbers = [float(part) for part in rest.split(",")]
    except ValueError:
        raise UsageError(f"bad {option} {text!r}: expected {example}") from None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise UsageError(f"bad {option} {text!r}: expected {example} with finite numbers")
    return name, numbers


def parse_input_range(text: str) -> tuple[str, tuple[float, float]]:
    """Parse ``--input-range NAME:LO,HI`` (uniform in ``[LO, HI]``).

    Raises:
        UsageError: The text is malformed, a bound is not finite, or ``LO > HI``.
    """
    name, (lo, hi) = _parse_floats(text, "--input-range", "NAME:LO,HI, e.g. x:-1,1", 2)
    if lo > hi:
        raise UsageError(f"bad --input-range {text!r}: LO {lo:g} is above HI {hi:g}; swap them")
    return name, (lo, hi)


def parse_input_value(text: str) -> tuple[str, float]:
    """Parse ``--input-value NAME:V`` (every element equals ``V``).

    Raises:
        UsageError: The text is malformed or the value is not finite.
    """
    name, (value,) = _parse_floats(text, "--input-value", "NAME:VALUE, e.g. sr:16000", 1)
    return name, value


@dataclass(frozen=True)
class Options:
    """Options of one compression run (what the output's provenance records).

    Build it with :func:`make_options`, which validates combinations and fills the defaults.

    Attributes:
        exact: Only function-preserving rewrites.
        approximate: Run the budget search and approximate merging (asked for by a tolerance or a
            target; without either the run is exact).
        tolerance: Largest allowed relative L2 error of each output (approximate mode).
        target_macs: Fraction of MACs to keep; overrides ``tolerance`` (approximate mode).
        channel_multiple: Kept channel counts are on multiples of this (default: 16 with
            ``target_macs``, else 8; exact merges round counts up).
        hashing: Let KDE-hashed weights rank merge candidates too (approximate mode; off = ablation).
        refit: With activations, let the least-squares refit rank removals too (off = ablation).
        activations: Let least-squares fits of channel activations on the verification inputs rank
            merge candidates too. Off by default: on synthetic inputs it picks channels that are idle
            on noise but matter on real data (measured: MobileNetV2 top-1 agreement 0.39 at 95% of
            the MACs with a synthetic error of 0.0); on by default when ``--calibration`` gives real
            inputs.
        freeze: Node-name glob patterns of layers to protect.
        input_spec: How verification inputs are built.
        verify: Whether to verify with onnxruntime (on by default; off only for analysis tools).
        separation: Try uneven depthwise separation of k×k convs (exact; kept where it pays).
        provider: The onnxruntime execution provider separation decisions are measured on.
        latency_check: Measure before separating (False: decide on MACs alone).
        latency_cache: A JSON file of separation timings to replay, where new ones are recorded
            (``--latency-cache``): repeats a latency-checked run exactly.
        force_target: With ``target_macs``, write the result even when its error on the held-out
            inputs is far above the search's (``--force-target``; otherwise that is a failure).
        sensitivity: How the budget search finds each group's error alone: "measured", "calibrated"
            (estimated from one activation capture, scaled per group by one run), "local" (the
            estimate only) or "auto" (calibrated above 1 GMAC per sample, measured below).
        sequential_refit: After the merges, refit the Convs and Gemms that lost inputs on the
            merged model's own inputs, in graph order (``red_onnx.search.correction``); kept only
            where it lowers the output error on the cv rows (approximate mode; on by default with
            ``--calibration``).
    """

    exact: bool = False
    approximate: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    target_macs: float | None = None
    channel_multiple: int = DEFAULT_CHANNEL_MULTIPLE
    hashing: bool = True
    refit: bool = True
    activations: bool = False
    freeze: tuple[str, ...] = ()
    input_spec: InputSpec = field(default_factory=InputSpec)
    verify: bool = True
    separation: bool = True
    provider: str = CPU_PROVIDER
    latency_check: bool = True
    sensitivity: str = "auto"
    latency_cache: Path | None = None
    force_target: bool = False
    sequential_refit: bool = False

    def provenance(self) -> dict[str, object]:
        """The options as recorded in the output model (no paths that differ between machines)."""
        spec = asdict(self.input_spec)
        for key in ("npz", "calibration"):  # the same path under its two names: the name only
            spec[key] = Path(spec[key]).name if spec[key] else None
        recorded: dict[str, object] = {"exact": self.exact, "freeze": list(self.freeze), "input_spec": spec}
        recorded |= {
            "separation": self.separation,
            "provider": self.provider,
            "latency_check": self.latency_check,
        }
        if self.latency_cache is not None:  # its name only, like the .npz's
            recorded["latency_cache"] = self.latency_cache.name
        if self.approximate:
            recorded |= {"tolerance": self.tolerance, "target_macs": self.target_macs,
                         "channel_multiple": self.channel_multiple, "hashing": self.hashing,
                         "refit": self.refit, "activations": self.activations,
                         "force_target": self.force_target,
                         "sequential_refit": self.sequential_refit}  # fmt: skip
        return recorded


def make_options(
    *,
    exact: bool = False,
    tolerance: float | None = None,
    target_macs: float | None = None,
    channel_multiple: int | None = None,
    freeze: Sequence[str] = (),
    input_spec: InputSpec | None = None,
    verify: bool = True,
    hashing: bool = True,
    refit: bool = True,
    activations: bool | None = None,
    separation: bool = True,
    provider: str = CPU_PROVIDER,
    latency_check: bool = True,
    sensitivity: str = "auto",
    latency_cache: str | Path | None = None,
    force_target: bool = False,
    sequential_refit: bool | None = None,
) -> Options:
    """Validate an option combination (one-line UsageError) and fill the defaults.

    Args:
        exact: Only function-preserving rewrites (an error with ``tolerance`` or ``target_macs``).
        tolerance: Largest allowed relative L2 error of each output on the verification inputs;
            giving it (or ``target_macs``) turns on approximate merging under that budget. Without
            either, the run is exact.
        target_macs: Fraction of MACs to keep (overrides ``tolerance``; the error reached is reported).
        channel_multiple: Kept channel counts are multiples of this (default: 16 with ``target_macs``,
            else 8).
        freeze: Node-name glob patterns of layers whose channels must not change.
        input_spec: Shapes, ranges, values or the calibration samples for the verification inputs.
        verify: Verify the result with onnxruntime (graph optimisations off and at ORT_ENABLE_ALL).
        hashing: Let KDE-hashed weights rank merge candidates too (False: the ablation without it).
        refit: With activations, let the least-squares refit of the kept channels rank removals too
            (False: the ablation without it).
        activations: Let fits of channel activations rank candidates too, and the refit compensate
            them (None: when ``input_spec.calibration`` gives real inputs, or with ``target_macs``
            where synthetic inputs are drawn in ranges ``input_spec.ranges`` gives; on N(0, 1) or
            pink inputs alone it measured worse on real data, MNIST-1D at 0.8 of the MACs test
            accuracy 0.985 → 0.901, and under a tolerance it removes what real inputs need).
        separation: Try uneven depthwise separation of k×k convs (exact; only where it is measured
            faster, or cuts MACs when ``latency_check`` is False).
        provider: onnxruntime execution provider that separation candidates are timed on (checked
            against this onnxruntime build when separation is timed).
        latency_check: Time separation candidates (False: decide on MACs alone).
        latency_cache: A JSON file of separation timings: replayed where they match, new ones recorded
            (created when missing); the same file repeats a latency-checked run byte for byte.
        force_target: With ``target_macs``, write the result even when its error on the held-out
            inputs is more than ``HELDOUT_DRIFT`` times the search's (else a failure, exit code 1).
        sensitivity: How the budget search finds each group's error alone: ``"measured"`` (a run per
            group, level and ranking), ``"calibrated"`` (estimated from one activation capture, scaled
            per group by one one-sample run), ``"local"`` (the estimate only) or ``"auto"`` (calibrated
            above 1 GMAC per verification sample, measured below).
        sequential_refit: After the merges, refit each Conv and Gemm that lost input channels on
            the inputs it receives in the merged model, in graph order, towards the exact-rewritten
            model's output of that node; kept only where it lowers the output error on the cv rows.
            None: on in approximate runs with ``input_spec.calibration`` (real samples), off on
            synthetic inputs (digits data-free at 0.56 of the MACs: output error 0.467 → 0.438 and
            test accuracy 0.978 → 0.975). True without ``tolerance`` or ``target_macs`` is an error.

    Returns:
        The validated options.

    Raises:
        UsageError: A contradictory or out-of-range option.
    """
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
    if force_target and target_macs is None:
        raise UsageError("--force-target only applies to --target-macs; give the fraction of MACs to keep")
    approximate = not exact and (tolerance is not None or target_macs is not None)
    if sequential_refit and not approximate:
        raise UsageError("--sequential-refit on corrects merges: give --tolerance or --target-macs with it")
    cache = None if latency_cache is None else Path(latency_cache)
    if cache is not None:
        if not latency_check:
            raise UsageError("--latency-cache replays the latency check; it cannot take --no-latency-check")
        if cache.is_dir() or not cache.resolve().parent.is_dir():
            raise UsageError(f"--latency-cache {cache}: give a file path in an existing directory")
    if separation and latency_check:
        from red_onnx.measure.latency import check_provider  # onnxruntime: only when it is needed

        check_provider(provider)
    calibrated = input_spec is not None and input_spec.calibration is not None
    # under a MACs target, synthetic inputs in given ranges fit the activations well enough to choose
    # the channels: data-free digits at 0.6 of the MACs, test accuracy 0.9833 ranked on weights,
    # 0.9861 with activations (relative L2 0.41 → 0.22); PP-OCR's classifier at 0.95, 0.865 → 0.938 of
    # the crops alike. Not under a tolerance: the refit meets it on synthetic draws by removing what
    # real inputs need (--tolerance 0.02: PP-OCRv4 det+cls+rec read 1 of 11 lines alike, YOLOv8n kept
    # 9 of 15 detections; ranked on weights, all of them)
    ranged = (
        input_spec is not None
        and input_spec.calibration is None
        and bool(input_spec.ranges)
        and target_macs is not None
    )
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
        refit=refit,
        activations=(calibrated or ranged) if activations is None else activations,
        freeze=tuple(freeze),
        input_spec=input_spec or InputSpec(),
        verify=verify,
        separation=separation,
        provider=provider,
        latency_check=latency_check,
        sensitivity=sensitivity,
        latency_cache=cache,
        force_target=force_target,
        sequential_refit=approximate and calibrated if sequential_refit is None else sequential_refit,
    )
