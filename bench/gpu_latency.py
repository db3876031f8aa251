"""GPU latency before/after compression, for when an NVIDIA GPU machine is lent (one prepared run).

That machine (../shared/docs/gpu.md) has torch with CUDA but onnxruntime with the CPU provider only and
no network, so the models run there through onnx2torch (pure Python, brought as a wheel). Two steps:

    python bench/gpu_latency.py prepare DIR [--tolerance 0.02]   # here: compress the zoo models into
                                                                 # DIR, with the onnx2torch wheel
    python bench/gpu_latency.py run DIR                          # there: time each pair on the GPU

``run`` converts each ``NAME.onnx`` / ``NAME.red.onnx`` pair with onnx2torch, runs it in torch eager on
CUDA (float32, TF32 off so the comparison is strict), batch 1 and 16 where the batch axis is dynamic,
``--runs`` timed runs after warm-up (CUDA-synchronised), and writes ``DIR/gpu_latency.json`` and a
markdown table: median ms before/after, the latency ratio next to the MACs ratio recorded by
``prepare``, and, where the compressed model is slower, the rewrites its report lists (merges,
separations). Models onnx2torch cannot convert (If/Loop/LSTM: silero-vad) are listed with the reason.
Everything here is optional: nothing in the library or the tests needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
ZOO = Path.home() / ".cache" / "red-onnx" / "zoo"
BENCH = Path.home() / ".cache" / "red-onnx" / "bench"
#: name -> (path, input shape at batch 1); small enough together for the 64 MiB the GPU machine takes.
MODELS = {
    "digits": (ROOT.parent / "models" / "digits_cnn.onnx", None),
    "yolov8n": (ZOO / "yolov8n_320n.onnx", [1, 3, 320, 320]),
    "mobilenetv2": (BENCH / "mobilenetv2.onnx", None),
    "ppocr_cls": (ZOO / "ppocr_mobile_cls.onnx", [1, 3, 48, 192]),
}
BATCHES = (1, 16)


def prepare(directory: Path, tolerance: float) -> None:
    """Compress each present model into ``directory`` with its report, and fetch the onnx2torch wheel."""
    import onnx

    import red_onnx
    from red_onnx.input_spec import InputSpec
    from red_onnx.io import save_model

    directory.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (path, shape) in MODELS.items():
        if not path.exists():
            print(f"skipped {name}: {path} absent")
            continue
        model = onnx.load(str(path))
        first = model.graph.input[0].name
        spec = InputSpec(shapes={first: tuple(shape)}) if shape else InputSpec()
        result = red_onnx.compress(model, tolerance=tolerance, input_spec=spec)
        onnx.save(model, str(directory / f"{name}.onnx"))
        save_model(result.model, directory / f"{name}.red.onnx")
        report = result.report
        passes = {p.name: p.stats for p in report.passes if p.modified}
        manifest[name] = {
            "input": first, "shape": list(result.report.input_shapes[first]),
            "macs_ratio": report.macs_after / report.macs_before, "rewrites": sorted(passes),
        }  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(directory),
            "onnx2torch==1.5.15",
        ],
        check=True,
    )
    print(f"prepared {directory}: {', '.join(manifest)} (+ onnx2torch wheel)")


def _time(module: object, example: object, runs: int, cuda: bool) -> float:
    """Median milliseconds of ``module(example)`` on CUDA (warm-up first, synchronised)."""
    import torch

    with torch.inference_mode():
        for _ in range(10):
            module(example)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            module(example)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(directory: Path, runs: int, device: str) -> None:
    """Time every prepared pair on the GPU; write ``gpu_latency.json`` and print a table."""
    for wheel in directory.glob("onnx2torch-*.whl"):
        sys.path.insert(0, str(wheel))  # a pure-Python wheel imports from the zip
    import onnx
    import torch
    from onnx2torch import convert

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = []
    for name, entry in manifest.items():
        try:
            modules = [
                convert(onnx.load(str(directory / f"{name}{s}.onnx"))).to(device).eval() for s in ("", ".red")
            ]
        except Exception as error:  # onnx2torch raises plain exceptions for ops it lacks
            rows.append({"model": name, "skipped": f"onnx2torch cannot convert it: {error}"})
            continue
        for batch in BATCHES:
            shape = [batch, *entry["shape"][1:]]
            example = torch.from_numpy(
                np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            ).cuda()
            try:
                before, after = (_time(m, example, runs, device == "cuda") for m in modules)
            except RuntimeError as error:
                rows.append({"model": name, "batch": batch, "skipped": str(error).splitlines()[0]})
                continue
            rows.append({
                "model": name, "batch": batch, "before_ms": round(before, 3), "after_ms": round(after, 3),
                "latency_ratio": round(after / before, 3), "macs_ratio": round(entry["macs_ratio"], 3),
                "slower_because_of": entry["rewrites"] if after > before else [],
            })  # fmt: skip
    device = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU (torch {device}, a dry run)"
    (directory / "gpu_latency.json").write_text(
        json.dumps({"device": device, "runs": runs, "rows": rows}, indent=2)
    )
    print(f"device: {device}, torch {torch.__version__} eager, float32 (TF32 off), median of {runs} runs")
    for row in rows:
        print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    making = sub.add_parser("prepare", help="compress the models into DIR (on this machine)")
    making.add_argument("directory", type=Path)
    making.add_argument("--tolerance", type=float, default=0.02)
    timing = sub.add_parser("run", help="time the pairs in DIR on the GPU")
    timing.add_argument("directory", type=Path)
    timing.add_argument("--runs", type=int, default=50)
    timing.add_argument("--device", default="cuda", help="cuda (the point), or cpu to dry-run the script")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.directory, args.tolerance)
    else:
        run(args.directory, args.runs, args.device)


if __name__ == "__main__":
    main()
