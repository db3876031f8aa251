"""Regenerate the README's zoo table: every real model exact and at the default tolerance, task-checked.

Usage (from the repository root; the zoo and its sources: ``python bench/zoo.py``; MobileNetV2:
``python bench/models/export_mobilenetv2.py``; silero-vad's speech: ``apt-get install espeak-ng``)::

    python bench/zoo_table.py              # prints the markdown table, writes bench/results/zoo.json
    python bench/zoo_table.py --no-light   # without the onnx package's nine light graphs (exact only)

Per model: ``compress(exact=True)`` and ``compress(tolerance=0.02)`` with the verification inputs of
``bench/tasks.py`` (silero-vad: real audio chunks, ``bench/vad.py``), then the task check of the
tolerance run (the same checks as ``tests/test_zoo_tasks.py``). Models that are absent are left out
with a note on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.tasks import (
    ZOO_SPECS,
    OcrModels,
    TaskCheck,
    mobilenet_check,
    mobilenet_path,
    ocr_check,
    yolo_check,
)
from bench.vad import espeak_available, real_inputs, vad_check
from bench.zoo import zoo_dir
from red_onnx import compress
from red_onnx.io.files import save_model
from red_onnx.options import DEFAULT_TOLERANCE, InputSpec
from red_onnx.pipeline import Result

#: (row label, file) of the real models, in table order.
REAL_MODELS: tuple[tuple[str, str], ...] = (
    ("PP-OCRv4 det", "ppocrv4_det.onnx"), ("PP-OCR mobile cls", "ppocr_mobile_cls.onnx"),
    ("PP-OCRv4 rec", "ppocrv4_rec.onnx"), ("YOLOv8n (nudenet 320n)", "yolov8n_320n.onnx"),
    ("MobileNetV2", "mobilenetv2.onnx"), ("silero-vad", "silero_vad.onnx"),
    ("silero-vad op18 ifless", "silero_vad_op18_ifless.onnx"),
    ("silero-vad 16k sequence", "silero_vad_16k_sequence.onnx"),
    ("silero-vad 16k op15", "silero_vad_16k_op15.onnx"), ("silero-vad half", "silero_vad_half.onnx"),
    ("silero-vad openvino 16k", "silero_vad_openvino_16k.onnx"),
)  # fmt: skip
LIGHT_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                "squeezenet", "vgg19", "zfnet512")  # fmt: skip


def _count(value: int) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.3f}G"
    if value >= 1e6:
        return f"{value / 1e6:.3f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else str(value)


def _finite(value: float | None) -> float:
    """A report number; None (a non-finite error in the JSON-ready report) is infinite."""
    return float("inf") if value is None else float(value)


def _figures(result: Result, seconds: float) -> dict[str, Any]:
    report = result.report
    verification = report.verification or {}
    parts = verification.get("slices") or {
        o["name"]: o["rel_l2_err"] for o in verification.get("outputs", [])
    }
    parts = {name: _finite(error) for name, error in parts.items()}
    return {
        "params_before": report.params_before, "params_after": report.params_after,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "verified": result.verified,
        "needed_rtol": max((_finite(o["needed_rtol"]) for o in verification.get("outputs", [])), default=0.0),
        "rel_l2": parts, "heldout_error": (report.budget or {}).get("heldout_error"),
        "input_shapes": report.input_shapes, "seconds": round(seconds, 1),
    }  # fmt: skip


def _compress(path: Path, spec: InputSpec, target: Path | None = None, **options: Any) -> dict[str, Any]:
    started = time.perf_counter()
    result = compress(path, input_spec=spec, raise_on_failure=False, **options)
    if target is not None:
        save_model(result.model, target)
    return _figures(result, time.perf_counter() - started)


def _spec(file: str, path: Path, folder: Path) -> InputSpec | None:
    if file in ZOO_SPECS:
        return ZOO_SPECS[file]
    if not espeak_available():
        print(f"{file}: espeak-ng absent (apt-get install espeak-ng); left out", file=sys.stderr)
        return None
    return InputSpec(npz=real_inputs(path, folder / f"{path.stem}.npz"))


def run_real(folder: Path) -> dict[str, dict[str, Any]]:
    """Exact and tolerance runs of every present real model (compressed files saved in ``folder``)."""
    rows = {}
    for label, file in REAL_MODELS:
        path = mobilenet_path() if file == "mobilenetv2.onnx" else zoo_dir() / file
        spec = _spec(file, path, folder) if path.is_file() else None
        if spec is None:
            print(f"{file}: absent; left out", file=sys.stderr)
            continue
        print(f"{label} ...", file=sys.stderr, flush=True)
        rows[file] = {"label": label, "original": path, "compressed": folder / file,
                      "exact": _compress(path, spec, exact=True)}  # fmt: skip
        rows[file]["tolerance"] = _compress(path, spec, folder / file, tolerance=DEFAULT_TOLERANCE)
    return rows


def run_tasks(rows: dict[str, dict[str, Any]]) -> None:
    """Attach each row's task check (the OCR pipeline's to all three PP-OCR rows)."""
    paths = {file: (row["original"], row["compressed"]) for file, row in rows.items()}
    checks: dict[str, TaskCheck] = {}
    ocr = ("ppocrv4_det.onnx", "ppocr_mobile_cls.onnx", "ppocrv4_rec.onnx")
    if all(name in paths for name in ocr):
        check = ocr_check(OcrModels(*(paths[n][0] for n in ocr)), OcrModels(*(paths[n][1] for n in ocr)))
        checks |= dict.fromkeys(ocr, check)
    for file, (original, candidate) in paths.items():
        if file.startswith("yolo"):
            checks[file] = yolo_check(original, candidate, DEFAULT_TOLERANCE)
        elif file.startswith("mobilenet"):
            checks[file] = mobilenet_check(original, candidate)
        elif file.startswith("silero"):
            checks[file] = vad_check(original, candidate, DEFAULT_TOLERANCE)
    for file, check in checks.items():
        rows[file]["task"] = {"passed": check.passed, "summary": check.summary, "figures": check.figures}


def run_light() -> dict[str, dict[str, Any]]:
    """Exact runs of the onnx package's light model-zoo graphs."""
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    rows = {}
    for name in LIGHT_MODELS:
        print(f"light {name} ...", file=sys.stderr, flush=True)
        rows[name] = {"label": f"light {name} (onnx test graph)",
                      "exact": _compress(folder / f"light_{name}.onnx", InputSpec(), exact=True)}  # fmt: skip
    return rows


def _after(row: dict[str, Any], key: str) -> str:
    exact = _count(row["exact"][key])
    return f"{exact} / {_count(row['tolerance'][key])}" if "tolerance" in row else exact


def _counted(row: dict[str, Any], key: str) -> str:
    """``key`` (``params_before``, ``macs_before``) or after (``params``, ``macs``: exact / 0.02).

    n/a where every weight sits inside an If (the counts do not look into subgraphs).
    """
    if row["exact"]["macs_before"] == 0:
        return "n/a (inside If)"
    return _count(row["exact"][key]) if key.endswith("before") else _after(row, f"{key}_after")


def _shapes(rows: dict[str, dict[str, Any]]) -> str:
    """A footnote: the input shapes the real models' MACs were counted at."""
    shapes = []
    for row in rows.values():
        if "task" in row:
            dims = ["x".join(map(str, shape)) for shape in row["exact"]["input_shapes"].values() if shape]
            shapes.append(f"{row['label']} {' '.join(dims)}")
    return "MACs are counted at the verification inputs: " + "; ".join(shapes) + "."


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """The README table."""
    lines = [
        "| model | params before | params after (exact / 0.02) | MACs before | MACs after (exact / 0.02) "
        "| exact mode | 0.02: worst rel L2 (verification / held-out) | task check (0.02 model) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        exact = row["exact"]
        verdict = f"{'pass' if exact['verified'] else 'FAIL'} (needs rtol {exact['needed_rtol']:.2g})"
        error, task = "—", "—"
        if "tolerance" in row:
            approx = row["tolerance"]
            heldout = approx["heldout_error"]
            error = f"{max(approx['rel_l2'].values()):.4f} / {heldout:.4f}" if heldout is not None else "—"
        if "task" in row:
            task = f"{'pass' if row['task']['passed'] else 'FAIL'}: {row['task']['summary']}"
        counts = " | ".join(_counted(row, key) for key in ("params_before", "params", "macs_before", "macs"))
        lines.append(f"| {row['label']} | {counts} | {verdict} | {error} | {task} |")
    return "\n".join([*lines, "", _shapes(rows)])


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-light", action="store_true", help="leave out the onnx light graphs")
    parser.add_argument("--from-json", type=Path, help="only print the table of an earlier zoo.json")
    args = parser.parse_args()
    if args.from_json:
        print(markdown(json.loads(args.from_json.read_text())))
        return 0
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    with tempfile.TemporaryDirectory(prefix="zoo-table-") as scratch:
        rows = run_real(Path(scratch))
        run_tasks(rows)
    if not args.no_light:
        rows |= run_light()
    args.out.mkdir(parents=True, exist_ok=True)
    recorded = {
        file: {k: v for k, v in row.items() if k not in ("original", "compressed")}
        for file, row in rows.items()
    }
    (args.out / "zoo.json").write_text(json.dumps(recorded, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
