"""The ``red-onnx`` command: argument parsing, exit codes, progress display; no logic of its own.

``red-onnx --help`` and ``--version`` import nothing heavier than the standard library: the pipeline
(onnx, onnxruntime, numpy) is imported when a run starts. Exit codes: 0 done; 1 verification failed
or target unreachable (nothing written); 2 bad input or usage (one line, no traceback, nothing
written); 3 internal error (a bug; ``-v`` prints the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from red_onnx._version import __version__
from red_onnx.errors import InternalError, RedOnnxError, UsageError, VerificationError
from red_onnx.options import (
    CPU_PROVIDER,
    PREPROCESS_PRESETS,
    SENSITIVITY_MODES,
    InputSpec,
    parse_input_range,
    parse_input_shape,
    parse_input_value,
)

if TYPE_CHECKING:
    from red_onnx.pipeline import Result

logger = logging.getLogger("red_onnx")
#: Exit code of an unexpected exception (a bug), next to 0 done, 1 verification failed, 2 bad input/usage.
INTERNAL_ERROR = 3

DESCRIPTION = """\
Make an exported ONNX model smaller and faster without retraining, and prove what was done with
onnxruntime.

By default the run is exact: only function-preserving rewrites (BatchNorm and per-channel affine
folding, merging of identical, scaled, constant and unused channels, uneven depthwise separation
where it is measured faster), verified element-wise against the original. --tolerance or
--target-macs turn on approximate merging (experimental), which trades fidelity for size.
With no arguments: run on the bundled demo model and print its accuracy before and after."""

EPILOG = """\
examples:
  red-onnx model.onnx model.red.onnx                       exact (the default)
  red-onnx model.onnx model.red.onnx --tolerance 0.05      every output within 5% relative L2
  red-onnx model.onnx model.red.onnx --target-macs 0.8     keep 80% of the MACs, report the error
  red-onnx model.onnx model.red.onnx --calibration calib.npz
                                                           verify (and search) on your own samples
  red-onnx model.onnx model.red.onnx --calibration images/ --preprocess imagenet --target-macs 0.8
                                                           ... or on a folder of images
  red-onnx model.onnx --dry-run --json report.json         report only, write nothing

OUT is written only after verification passed, atomically; an existing OUT is replaced. The input
is never modified.

exit codes:
  0  done
  1  verification failed, or --target-macs cannot be reached or does not hold on held-out inputs
     (nothing written)
  2  bad input or usage: one line on stderr, nothing written
  3  internal error: a bug to report (-v prints the traceback), nothing written"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see red-onnx --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface, its options in groups: basic, fidelity, inputs, speed, output."""
    parser = _Parser(
        prog="red-onnx",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    basic = parser.add_argument_group("basic")
    basic.add_argument("input", nargs="?", metavar="IN", help="the .onnx model to compress (never modified)")
    basic.add_argument("output", nargs="?", metavar="OUT", help="where to write the compressed model")
    basic.add_argument(
        "--exact",
        action="store_true",
        help="only function-preserving rewrites (the default without a budget)",
    )
    basic.add_argument(
        "--tolerance",
        type=float,
        metavar="T",
        help="approximate merging: largest relative L2 error allowed on every output, on the "
        "verification inputs (experimental)",
    )
    basic.add_argument(
        "--target-macs",
        type=float,
        metavar="F",
        help="approximate merging: fraction of the MACs to keep; the error reached is reported "
        "(overrides --tolerance)",
    )
    basic.add_argument(
        "--force-target",
        action="store_true",
        help="with --target-macs: write the result even when its error on held-out inputs is more than "
        "twice the search's (otherwise a failure, exit 1)",
    )
    basic.add_argument("--dry-run", action="store_true", help="report without writing the model")
    fidelity = parser.add_argument_group("fidelity (approximate merging)")
    fidelity.add_argument(
        "--freeze",
        metavar="NAME",
        action="append",
        default=[],
        help="protect layers whose node name matches (glob; repeatable)",
    )
    fidelity.add_argument(
        "--channel-multiple",
        type=int,
        metavar="N",
        help="keep channel counts on multiples of N, per Split chunk / Concat part (default 16 with "
        "--target-macs, else 8; exact merges round up; narrower layers use a smaller power of two)",
    )
    fidelity.add_argument(
        "--sensitivity",
        choices=SENSITIVITY_MODES,
        default="auto",
        help="how the search finds each layer group's error: measured (a run per group and level), "
        "calibrated (estimated from one activation capture, one run per group), local (estimate only); "
        "auto: calibrated above 1 GMAC per input, measured below",
    )
    fidelity.add_argument(
        "--activations",
        choices=("auto", "on", "off"),
        default="auto",
        help="rank merge candidates by fits of channel activations too (auto: with --calibration, or "
        "with --target-macs and --input-range; on N(0,1) or pink synthetic inputs, or under a tolerance "
        "on synthetic inputs, it measured worse on real data)",
    )
    fidelity.add_argument(
        "--sequential-refit",
        choices=("auto", "on", "off"),
        default="auto",
        help="after the merges, refit each conv and Gemm that lost inputs on the inputs it now "
        "receives, in graph order; kept only where it lowers the output error on the cv rows (auto: "
        "only with --calibration)",
    )
    fidelity.add_argument(
        "--no-hashing",
        action="store_true",
        help="rank merge candidates on the raw weights only (the ablation without KDE hashing)",
    )
    fidelity.add_argument(
        "--no-refit",
        action="store_true",
        help="compensate removals by merges only, never by the least-squares refit of the kept channels "
        "(the ablation; the refit needs --calibration)",
    )
    inputs = parser.add_argument_group(
        "inputs",
        "the verification (and search) inputs: synthetic from the declared types unless --calibration",
    )
    inputs.add_argument(
        "--calibration",
        metavar="PATH",
        help="your own samples (real data: what the figures should be measured on): a FILE.npz of arrays "
        "by input name, or a folder of images (PNG, JPEG, BMP, WebP; needs --preprocess) fed to the "
        "model's one image input in file-name order; its rows are split at random between the search, "
        "the choice of its settings and the held-out check",
    )
    inputs.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="the former name of --calibration, with the same meaning (give one of the two)",
    )
    inputs.add_argument(
        "--preprocess",
        choices=PREPROCESS_PRESETS,
        help="with a folder of images: how pixels are scaled. imagenet: RGB in [0,1], then mean "
        "(0.485,0.456,0.406) and std (0.229,0.224,0.225); 0-1, -1-1, 0-255: that range. Each image is "
        "resized (bilinear, aspect kept) to cover the input's height and width, then centre-cropped; "
        "dynamic ones come from --input-shape, else 224 with imagenet",
    )
    inputs.add_argument(
        "--input-shape",
        metavar="NAME:D1,D2,...",
        action="append",
        default=[],
        help="shape of an input, e.g. x:1,3,48,320 (dynamic dims are otherwise 1)",
    )
    inputs.add_argument(
        "--input-range",
        metavar="NAME:LO,HI",
        action="append",
        default=[],
        help="draw an input uniformly in [LO, HI], e.g. image:0,1",
    )
    inputs.add_argument(
        "--input-value",
        metavar="NAME:V",
        action="append",
        default=[],
        help="fill an input with one value, e.g. sr:16000",
    )
    inputs.add_argument(
        "--input-prior",
        choices=("normal", "pink"),
        default="normal",
        help="synthetic float inputs: i.i.d. normal, or spatially correlated 1/f noise",
    )
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--benchmark",
        action="store_true",
        help="time the input and the output with onnxruntime (median of 20 runs, batch 1 and 16)",
    )
    speed.add_argument(
        "--threads", type=int, metavar="N", help="onnxruntime intra-op threads for --benchmark (default: all)"
    )
    speed.add_argument(
        "--provider",
        default=CPU_PROVIDER,
        metavar="NAME",
        help="onnxruntime execution provider that separation candidates and --benchmark are timed on "
        "(default CPU)",
    )
    speed.add_argument(
        "--no-separation",
        action="store_true",
        help="never rewrite k×k convs as Gather + depthwise + pointwise (uneven depthwise separation)",
    )
    speed.add_argument(
        "--no-latency-check",
        action="store_true",
        help="separate wherever it cuts MACs, without timing it (a CPU result never stands for a GPU)",
    )
    speed.add_argument(
        "--latency-cache",
        metavar="FILE",
        help="replay the separation timings recorded in FILE (JSON; created when missing) and record new "
        "ones there: the same file repeats a latency-checked run byte for byte",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        metavar="PATH",
        help="write the report as JSON (also when verification fails; the model is not)",
    )
    output.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNGs: the MACs-vs-error curve and merged layers' weight densities "
        "(approximate runs; needs matplotlib)",
    )
    output.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    output.add_argument(
        "-v", "--verbose", action="count", default=0, help="log diagnostics (-vv: more); tracebacks of bugs"
    )
    output.add_argument("--version", action="version", version=f"red-onnx {__version__}")
    return parser


def _input_spec(args: argparse.Namespace) -> InputSpec:
    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    ranges = dict(parse_input_range(text) for text in args.input_range)
    values = dict(parse_input_value(text) for text in args.input_value)
    if args.calibration and args.inputs:
        raise UsageError("--inputs is the former name of --calibration; give one of them, not both")
    path = args.calibration or args.inputs
    return InputSpec(
        shapes=shapes, ranges=ranges, values=values, prior=args.input_prior,
        calibration=Path(path) if path else None, preprocess=args.preprocess,
    )  # fmt: skip


def _input_files(path: Path) -> set[Path]:
    """The input model and the external data files it reads (all must stay untouched)."""
    import onnx
    from onnx import external_data_helper

    files = {path.resolve()}
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return files
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.add((path.parent / location).resolve())
    return files


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that would overwrite an input or land nowhere."""
    protected = _input_files(Path(args.input)) if args.input else set()
    if args.input is not None and args.output is None and not args.dry_run:
        raise UsageError("give an output path (red-onnx IN.onnx OUT.onnx), or --dry-run to only report")
    targets = {"--json": args.json}
    if args.output is not None and not args.dry_run:
        targets |= {"the output": args.output, "the output's external data": f"{args.output}.data"}
    for label, target in targets.items():
        if target is None:
            continue
        path = Path(target)
        if path.resolve() in protected:
            raise UsageError(f"{label} {target} is an input file; the input is never overwritten")
        if path.is_dir():
            raise UsageError(f"{label} {target} is a directory; give a file path")
        if not path.resolve().parent.is_dir():
            raise UsageError(f"cannot write {label} {target}: directory {path.parent} does not exist")
    if args.json and args.output and Path(args.json).resolve() == Path(args.output).resolve():
        raise UsageError(f"--json {args.json} is the output model path; give the report its own file")


class _ProgressBar:
    """A tqdm bar over the pipeline stages, on stderr when it is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc="red-onnx", unit="step", leave=False, file=sys.stderr)

    def __call__(self, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(stage)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_latency(result: Result, source: Path, args: argparse.Namespace) -> None:
    """Time the input and the output (``--benchmark``) into the report."""
    from red_onnx.io import files
    from red_onnx.measure.benchmark import benchmark

    original = files.load_model(source)
    figures = benchmark(
        original, result.model, _input_spec(args), provider=args.provider, threads=args.threads
    )
    result.report.latency = asdict(figures)


def _run(args: argparse.Namespace) -> int:
    from red_onnx import demo, pipeline
    from red_onnx.io import files
    from red_onnx.report.report import render_table

    _check_paths(args)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    source = Path(args.input) if args.input else demo.demo_path()
    progress = _ProgressBar(not args.quiet)
    try:
        result = pipeline.compress(
            source, exact=args.exact, tolerance=args.tolerance, target_macs=args.target_macs,
            channel_multiple=args.channel_multiple, hashing=not args.no_hashing, refit=not args.no_refit,
            activations={"auto": None, "on": True, "off": False}[args.activations], freeze=args.freeze,
            input_spec=_input_spec(args), separation=not args.no_separation, provider=args.provider,
            latency_check=not args.no_latency_check, sensitivity=args.sensitivity, progress=progress,
            latency_cache=args.latency_cache, force_target=args.force_target,
            sequential_refit={"auto": None, "on": True, "off": False}[args.sequential_refit],
        )  # fmt: skip
    except VerificationError as error:
        progress.close()
        failed: Result | None = getattr(error, "result", None)
        if failed is not None and args.json:  # the failed run's figures: the model is not written
            _write_json(failed, Path(args.json))
        if failed is not None and not args.quiet:
            print(render_table(failed.report))
        raise
    progress.close()
    if args.input is None:
        _add_demo_accuracy(result, source)
    if args.benchmark:
        _add_latency(result, source, args)
    if args.output and not args.dry_run:
        result.report.size_after = files.save_model(result.model, args.output)
    if args.json:
        _write_json(result, Path(args.json))
    if args.plot:
        import onnx

        from red_onnx.report.plots import write_plots

        write_plots(args.plot, result.report, onnx.load(str(source)))
    if not args.quiet:
        print(render_table(result.report))
        if args.output and not args.dry_run:
            print(f"wrote {args.output}")
    return 0


def _add_demo_accuracy(result: Result, source: Path) -> None:
    from red_onnx import demo

    before, samples = demo.accuracy(source)
    after, _ = demo.accuracy(result.model)
    result.report.accuracy = {"before": before, "after": after, "samples": samples}


def _write_json(result: Result, path: Path) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(result.report.to_json() + "\n")
    temp.replace(path)


def _attached_presets(argv: Sequence[str]) -> list[str]:
    """Read ``--preprocess -1-1`` as ``--preprocess=-1-1`` (argparse takes ``-1-1`` for an option)."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] == "--preprocess" and arg in PREPROCESS_PRESETS:
            joined[-1] = f"--preprocess={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``red-onnx`` console script."""
    verbose = 0
    try:
        args = build_parser().parse_intermixed_args(_attached_presets(sys.argv[1:] if argv is None else argv))
        verbose = args.verbose
        logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(name)s: %(message)s")
        return _run(args)
    except InternalError as error:
        return _internal_error(error, verbose)
    except RedOnnxError as error:
        print(f"red-onnx: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("red-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: one line (traceback with -v), never a half-written output
        return _internal_error(error, verbose)


def _internal_error(error: Exception, verbose: int) -> int:
    """Report a bug in one line (with ``-v``, its traceback first); exit code 3."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    first = str(error).splitlines()[0] if str(error) else ""
    print(
        f"red-onnx: internal error: {type(error).__name__}: {first}; "
        "nothing was written — please report it (run with -v for the traceback)",
        file=sys.stderr,
    )
    return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
