"""GPU latency before/after compression, for when an NVIDIA GPU machine is lent (one prepared run).

That machine (docs/gpu.md) has torch with CUDA but onnxruntime with the CPU provider only and
no network, so the models run there through onnx2torch (pure Python, brought as a wheel). Three steps:

    python bench/gpu_latency.py prepare DIR            # here: compress the models into DIR (+ the wheel)
    python bench/gpu_latency.py run DIR --out FILE     # there: time every model on the GPU
    python bench/gpu_latency.py table FILE             # the markdown table of the eager ratios

``prepare`` compresses each present model as ``bench/latency_table.py`` does (same inputs, same runs:
``tolerance 0.02`` for all, and for conv nets ``target 0.8`` at the default channel multiple, 16, and at 8)
and writes each model as a **skeleton**: the graph, every integer tensor and every float tensor of up to
1024 values as they are, and for each larger float tensor (initializer or Constant value) only its dims,
mean and standard deviation (``manifest.json``). ``run`` refills those tensors with seeded normal values
of that mean and deviation: a float kernel's latency does not depend on the values, and the files that
travel to that machine are capped at 64 MiB (the zoo with its compressed copies is ~200 MB). The outputs
are therefore not compared there; onnxruntime checks them here.

``run`` converts each model with onnx2torch and runs it on CUDA (cuDNN benchmark on, TF32 off), each
model in its own process, in torch eager and as a CUDA graph replay, float32 and float16, batch 1, 16
and 64 (repeated along axis 0 where the model has a batch axis; 64 scales the batch-16 shapes),
interleaving the original, each compressed model and **the original again** (the A/A check of the
noise). Medians of ``--runs`` timed runs after warm-up, CUDA-synchronised. It writes a JSON file: per
model, mode, dtype and batch the median ms of each, the latency ratio next to the MACs ratio and, where
a compressed model is slower than the A/A noise allows, the rewrites its report lists. Models onnx2torch
cannot convert (If/Loop/LSTM: silero-vad, left out here) and cases that fail (float16 kernels, CUDA
graph captures) are listed with the reason. Nothing in the library or the tests needs a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Models timed (label, file as in bench/latency_table.py); silero-vad (If/Loop) is left out.
MODELS = (("digits (bundled)", "digits_cnn.onnx"), ("mnist1d", "mnist1d_cnn.onnx"),
          ("PP-OCRv4 det", "ppocrv4_det.onnx"), ("PP-OCR mobile cls", "ppocr_mobile_cls.onnx"),
          ("PP-OCRv4 rec", "ppocrv4_rec.onnx"), ("YOLOv8n (nudenet 320n)", "yolov8n_320n.onnx"),
          ("MobileNetV2", "mobilenetv2.onnx"), ("conv5m (ResNet-50 layout)", "conv5m.onnx"),
          ("conv25m (ResNet-50)", "conv25m.onnx"))  # fmt: skip
BATCHES = (1, 16)
#: Float tensors with more values than this travel as (dims, mean, std) and are refilled there.
KEPT_VALUES = 1024
WHEEL = "onnx2torch==1.5.15"
#: A run is slower only beyond max(A/A noise, this): bench/latency_table.py's NOISE_FLOOR, restated because
#: ``run`` imports nothing of red_onnx or bench/ (the GPU machine lacks onnx-graphsurgeon).
NOISE_FLOOR = 0.03


# ---------------------------------------------------------------- here: compress and skeletonise
def _float_tensors(model: Any) -> list[tuple[str, Any]]:
    """(key, TensorProto) of every float initializer and Constant value.

    PaddlePaddle exports keep weights in Constant nodes; the key is the initializer's name or
    ``Constant:<output>``.
    """
    from onnx import TensorProto

    tensors = [(t.name, t) for t in model.graph.initializer]
    constants = [node for node in model.graph.node if node.op_type == "Constant"]
    tensors += [(f"Constant:{node.output[0]}", attribute.t)
                for node in constants
                for attribute in node.attribute if attribute.name == "value"]  # fmt: skip
    return [(key, t) for key, t in tensors if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]


def skeleton(model: Any) -> dict[str, dict[str, Any]]:
    """Strip ``model``'s large float tensors in place; their dims, dtype, mean and std by key."""
    from onnx import numpy_helper

    stripped = {}
    for key, tensor in _float_tensors(model):
        values = numpy_helper.to_array(tensor)
        if values.size <= KEPT_VALUES:
            continue
        stripped[key] = {"dims": list(values.shape), "dtype": str(values.dtype),
                         "mean": float(values.mean()), "std": float(values.std())}  # fmt: skip
        for field in ("raw_data", "float_data", "int32_data"):
            tensor.ClearField(field)
    return stripped


def feed_shapes(model: Any, spec: Any) -> dict[str, Any]:
    """Per batch, each input's shape and dtype as bench/latency_table.py feeds it; or why not."""
    from red_onnx.measure.benchmark import BatchAxisError, batched_feed

    shapes: dict[str, Any] = {}
    for batch in BATCHES:
        try:
            feed = batched_feed(model, spec, batch, own_batch=batch == BATCHES[0])
        except BatchAxisError as reason:
            shapes[str(batch)] = {"skipped": str(reason)}
            continue
        shapes[str(batch)] = {name: {"shape": list(v.shape), "dtype": str(v.dtype)}
                              for name, v in feed.items()}  # fmt: skip
    return shapes


def save_skeleton(path: Path, target: Path) -> dict[str, Any]:
    """Write ``path``'s skeleton to ``target``; the stripped tensors' statistics."""
    import onnx

    model = onnx.load(str(path))
    stripped = skeleton(model)
    onnx.save(model, str(target))
    return stripped


def run_entry(figures: dict[str, Any], directory: Path, name: str) -> dict[str, Any]:
    """A compressed run's manifest entry: its skeleton written to ``directory / name``, or why it failed."""
    if "path" not in figures:
        return {"failed": figures.get("failed", "no model written")}
    return {
        "file": name, "stripped": save_skeleton(Path(figures["path"]), directory / name),
        **{key: figures[key] for key in ("macs_ratio", "verified", "rewrites", "op_changes")},
    }  # fmt: skip


def model_entry(
    label: str, file: str, directory: Path, scratch: Path, multiples: list[int]
) -> dict[str, Any] | None:
    """Compress one model as the latency table does; its manifest entry (None where it is absent)."""
    import onnx

    from bench.latency_table import compressed_runs, model_source

    stem = file.removesuffix(".onnx")
    path, spec = model_source(file, scratch)
    if spec is None:
        print(f"skipped {label}: {path} absent", file=sys.stderr)
        return None
    print(f"{label}: compressing ...", file=sys.stderr, flush=True)
    compressed = compressed_runs(file, path, spec, scratch, multiples)
    inputs = feed_shapes(onnx.load(str(path), load_external_data=False), spec)
    original = {"file": f"{stem}.onnx", "stripped": save_skeleton(path, directory / f"{stem}.onnx")}
    runs = {run: run_entry(figures, directory, f"{stem}.{index}.onnx")
            for index, (run, figures) in enumerate(compressed.items(), start=1)}  # fmt: skip
    return {"label": label, "inputs": inputs, "original": original, "runs": runs}


def prepare(directory: Path, multiples: list[int], only: list[str] | None) -> None:
    """Compress each present model as the latency table does and write the skeletons to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        for label, file in MODELS:
            stem = file.removesuffix(".onnx")
            if only and stem not in only:
                continue
            entry = model_entry(label, file, directory, Path(scratch_name), multiples)
            if entry is not None:
                manifest[stem] = entry
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(directory), WHEEL],
                   check=True)  # fmt: skip
    size = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
    print(f"prepared {directory} ({size:.1f} MiB): {', '.join(manifest)} (+ the onnx2torch wheel)")


# ---------------------------------------------------------------- there: refill, convert, time
def refilled(directory: Path, skeleton_entry: dict[str, Any], seed: int) -> Any:
    """The skeleton with its stripped tensors refilled (seeded normal of each tensor's mean and std)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(directory / skeleton_entry["file"]))
    rng = np.random.default_rng(seed)
    stats = skeleton_entry["stripped"]
    for key, tensor in _float_tensors(model):
        if key in stats:
            entry = stats[key]
            values = rng.normal(entry["mean"], entry["std"], entry["dims"]).astype(entry["dtype"])
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return with_conv_ranks(constants_as_initializers(model))


def with_conv_ranks(model: Any) -> Any:
    """Shapes inferred, and a rank for each Conv output shape inference left unranked.

    onnx2torch converts a BatchNormalization only when its input's rank is known; behind PP-OCRv4 rec's
    dynamic Reshapes inference leaves three Conv outputs unranked (a Conv's output has its weight's rank).
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = model.graph
    ranked = {v.name for v in [*graph.value_info, *graph.input, *graph.output]
              if v.type.tensor_type.HasField("shape") and len(v.type.tensor_type.shape.dim)}  # fmt: skip
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for node in graph.node:
        output = node.output[0]
        if node.op_type == "Conv" and output not in ranked and node.input[1] in ranks:
            for stale in [v for v in graph.value_info if v.name == output]:
                graph.value_info.remove(stale)
            dims = ["?"] * ranks[node.input[1]]  # the rank is what onnx2torch reads
            graph.value_info.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, dims))
    return model


def constants_as_initializers(model: Any) -> Any:
    """Constant nodes' tensors as initializers (onnx2torch takes a Conv's weight only from one)."""
    kept = []
    for node in model.graph.node:
        values = [a.t for a in node.attribute if a.name == "value"] if node.op_type == "Constant" else []
        if values and len(node.attribute) == 1:
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(values[0])
            tensor.name = node.output[0]
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _time(call: Any, runs: int, sync: Any, repeat: int) -> list[float]:
    """Milliseconds per call of ``call()``: ``runs`` timings of ``repeat`` calls each, after warm-up."""
    for _ in range(3):
        call()
    sync()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        sync()
        times.append((time.perf_counter() - started) * 1e3 / repeat)
    return times


def time_interleaved(calls: list[Any], runs: int, sync: Any, repeat: int = 1) -> list[float]:
    """Median ms of each call, timed in ``rounds`` interleaved blocks (drift hits all alike)."""
    rounds = 5
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for index, call in enumerate(calls):
            samples[index] += _time(call, max(1, runs // rounds), sync, repeat)
    return [statistics.median(values) for values in samples]


def make_feed(torch: Any, shapes: dict[str, Any], dtype: Any, device: str) -> list[Any]:
    """Seeded standard-normal inputs of the recorded shapes (integer inputs: zeros)."""
    rng = np.random.default_rng(0)
    feed = []
    for entry in shapes.values():
        if entry["dtype"].startswith("float"):
            values = torch.from_numpy(rng.standard_normal(entry["shape"]).astype(np.float32)).to(dtype)
        else:
            values = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        feed.append(values.to(device))
    return feed


def shapes_at(entry: dict[str, Any], batch: int) -> dict[str, Any]:
    """The prepared input shapes at ``batch``; other batches scale axis 0 of the batch-16 shapes."""
    if str(batch) in entry["inputs"]:
        return entry["inputs"][str(batch)]
    sixteen = entry["inputs"].get("16", {"skipped": "no batch 16 prepared"})
    if "skipped" in sixteen:
        return sixteen
    return {name: {**value, "shape": [batch if axis == 0 and size == 16 else size
                                      for axis, size in enumerate(value["shape"])]}
            for name, value in sixteen.items()}  # fmt: skip


def graphed(torch: Any, module: Any, feed: list[Any]) -> Any:
    """``module(*feed)`` captured in a CUDA graph: its replay (no Python or launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            module(*feed)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(*feed)
    return graph.replay


def converted(directory: Path, entry: dict[str, Any], runs: list[str], device: str) -> list[Any]:
    """The original and each of ``runs``, refilled and converted by onnx2torch, on ``device`` in eval mode."""
    from onnx2torch import convert

    models = [entry["original"], *(entry["runs"][run] for run in runs)]
    return [convert(refilled(directory, model, 0)).to(device).eval() for model in models]


def case_medians(
    torch: Any, modules: list[Any], feed: list[Any], mode: str, runs: int, sync: Any
) -> list[float]:
    """Median ms of each module on ``feed`` and of the first again (A/A), in eager or CUDA graph ``mode``."""
    with torch.inference_mode():
        if mode == "graph":
            calls = [graphed(torch, m, feed) for m in modules]
        else:
            calls = [lambda m=m, feed=feed: m(*feed) for m in modules]
        return time_interleaved([*calls, calls[0]], runs, sync, 10 if mode == "graph" else 1)


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message (its type where the message is empty), at most 200 characters."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def time_case(
    torch: Any, modules: list[Any], entry: dict[str, Any], runs: list[str], row: dict[str, Any], args: Any
) -> dict[str, Any]:
    """``row`` (model, mode, dtype, batch) with the medians of ``modules`` summarised, or why not."""
    shapes = shapes_at(entry, row["batch"])
    if "skipped" in shapes:
        return {**row, "skipped": shapes["skipped"]}
    feed = make_feed(torch, shapes, getattr(torch, row["dtype"]), args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    try:
        medians = case_medians(torch, modules, feed, row["mode"], args.runs, sync)
    except Exception as error:  # a kernel, converter or capture that does not take this case
        return {**row, "skipped": first_line(error)}
    finally:  # the calls (and their CUDA graphs) are gone with case_medians' frame
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row | summarise(medians, runs, entry["runs"])


def time_model(stem: str, entry: dict[str, Any], directory: Path, args: Any) -> list[dict[str, Any]]:
    """Rows of one model: per dtype, mode (eager, CUDA graph) and batch, original / each run / original."""
    import torch

    runs = [run for run, figures in entry["runs"].items() if "file" in figures]
    try:
        base = converted(directory, entry, runs, args.device)
    except Exception as error:  # onnx2torch raises plain exceptions for ops it lacks
        return [{"model": stem, "skipped": f"onnx2torch cannot convert it: {first_line(error)}"}]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        modules = [copy.deepcopy(m).to(dtype) for m in base] if dtype != torch.float32 else base
        for mode in args.modes:
            for batch in args.batches:
                row = {"model": stem, "mode": mode, "dtype": dtype_name, "batch": batch}
                rows.append(time_case(torch, modules, entry, runs, row, args))
        del modules
    return rows


def summarise(medians: list[float], runs: list[str], figures: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the original, the A/A noise, and what made a slower run slower."""
    original, again = medians[0], medians[-1]
    noise = abs(again / original - 1)
    margin = max(noise, NOISE_FLOOR)
    after = {}
    for run, median in zip(runs, medians[1:-1], strict=True):
        ratio = median / original
        slower_because_of = figures[run]["rewrites"] if ratio > 1 + margin else []
        after[run] = {"ms": round(median, 4), "latency_ratio": round(ratio, 3),
                      "macs_ratio": round(figures[run]["macs_ratio"], 3),
                      "slower_because_of": slower_because_of}  # fmt: skip
    return {"original_ms": round(original, 4), "aa_ms": round(again, 4), "aa_noise": round(noise, 3),
            "after": after}  # fmt: skip


def _stub_torchvision() -> None:
    """For a CPU dry run where torchvision is absent: onnx2torch imports it only for NMS and RoiAlign."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is None:
        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]
        stub.ops.batched_nms = stub.ops.nms = stub.ops.roi_align = None  # type: ignore[attr-defined]
        sys.modules |= {"torchvision": stub, "torchvision.ops": stub.ops}  # type: ignore[attr-defined]


def child_command(directory: Path, stem: str, child: Path, args: Any) -> list[str]:
    """The command that times ``stem`` alone in its own process, writing ``child``."""
    options = ["--runs", str(args.runs), "--device", args.device, "--modes", *args.modes,
               "--dtypes", *args.dtypes, "--batches", *map(str, args.batches)]  # fmt: skip
    return [sys.executable, __file__, "run", str(directory), "--out", str(child), "--models", stem, *options]


def time_in_processes(directory: Path, stems: list[str], args: Any) -> None:
    """Time each of ``stems`` in its own process; gather their rows in ``args.out`` after each."""
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for stem in stems:
        child = args.out.with_suffix(f".{stem}.json")
        subprocess.run(child_command(directory, stem, child, args), check=False)
        if child.exists():
            result = json.loads(child.read_text())
            rows += result["rows"]
            child.unlink()
        else:
            rows.append({"model": stem, "skipped": "its process wrote nothing (see its output)"})
        args.out.write_text(json.dumps({**result, "rows": rows}, indent=1))


def run(directory: Path, args: Any) -> None:
    """Time every prepared model, each in its own process; write ``args.out`` (JSON), print each row.

    A CUDA graph capture that fails (onnx2torch's Reshape/Resize copy shape tensors from the host)
    leaves its memory and stream state behind; a process per model keeps that from the next model.
    """
    manifest = json.loads((directory / "manifest.json").read_text())
    stems = [stem for stem in manifest if not args.models or stem in args.models]
    if len(stems) > 1:
        time_in_processes(directory, stems, args)
        return
    time_models(directory, manifest, stems, args)


def time_models(directory: Path, manifest: dict[str, Any], stems: list[str], args: Any) -> None:
    """Time ``stems`` in this process; write ``args.out`` after each model."""
    for wheel in directory.glob("onnx2torch-*.whl"):
        sys.path.insert(0, str(wheel))  # a pure-Python wheel imports from the zip
    import torch

    if args.device != "cuda":
        _stub_torchvision()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dry_run = f"CPU (torch {args.device}, a dry run)"
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else dry_run
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "runs": args.runs, "rows": []}
    for stem in stems:
        started = time.perf_counter()
        rows = time_model(stem, manifest[stem], directory, args)
        result["rows"] += rows
        for row in rows:
            print(json.dumps(row), flush=True)
        print(f"{stem}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(result, indent=1))  # after each model: a timeout keeps the rest
    print(f"device: {device}, torch {torch.__version__} (TF32 off), median of {args.runs} runs", flush=True)


def _cell(row: dict[str, Any] | None, run: str) -> str:
    """One latency ratio; "—" where that case was not timed (``table`` keeps only timed rows)."""
    if row is None or run not in row["after"]:
        return "—"
    return f"{row['after'][run]['latency_ratio']:.2f}"


def _before(index: dict[tuple[str, str, int], Any], model: str) -> str:
    """The original's float32 ms at batch 1 and 64."""
    return " / ".join(f"{index[(model, 'float32', b)]['original_ms']:.2f}" if (model, "float32", b) in index
                      else "—" for b in (1, 64))  # fmt: skip


def table(path: Path) -> str:
    """A markdown table of a results file (bench/results/gpu_latency.json): eager latency ratios."""
    data = json.loads(path.read_text())
    rows = [r for r in data["eager"] if "after" in r]
    index = {(r["model"], r["dtype"], r["batch"]): r for r in rows}
    lines = ["| model | run | MACs ratio | before ms f32 b1 / b64 | latency ratio f32 b1 / b16 / b64 | "
             "latency ratio f16 b1 / b16 / b64 | A/A noise (max) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        noise = max(r["aa_noise"] for r in mine)
        for run in mine[0]["after"]:
            cells = {d: " / ".join(_cell(index.get((model, d, b)), run) for b in (1, 16, 64))
                     for d in ("float32", "float16")}  # fmt: skip
            macs = mine[0]["after"][run]["macs_ratio"]
            lines.append(f"| {model} | {run} | {macs:.3f} | {_before(index, model)} | {cells['float32']} | "
                         f"{cells['float16']} | ±{noise:.1%} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    making = sub.add_parser("prepare", help="compress the models into DIR (on this machine)")
    making.add_argument("directory", type=Path)
    making.add_argument("--multiples", type=int, nargs="*", default=[8])
    making.add_argument("--models", nargs="*", help="file stems (default: all present)")
    timing = sub.add_parser("run", help="time the models in DIR on the GPU")
    timing.add_argument("directory", type=Path)
    timing.add_argument("--out", type=Path, required=True)
    timing.add_argument("--runs", type=int, default=50)
    timing.add_argument("--dtypes", nargs="*", default=["float32", "float16"])
    timing.add_argument("--batches", type=int, nargs="*", default=[*BATCHES, 64])
    graph_help = "eager; graph: CUDA graph replay"
    timing.add_argument("--modes", nargs="*", default=["eager", "graph"], help=graph_help)
    timing.add_argument("--models", nargs="*", help="file stems (default: all prepared)")
    timing.add_argument("--device", default="cuda", help="cuda (the point), or cpu to dry-run the script")
    render = sub.add_parser("table", help="print the markdown table of a results file")
    render.add_argument("results", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.directory, args.multiples, args.models)
    elif args.step == "table":
        print(table(args.results))
    else:
        run(args.directory, args)


if __name__ == "__main__":
    main()
