"""Speed at scale: wall time, stage times and peak memory of the full pipeline on big models.

For each model (``bench/models/export_speed.py`` builds them into ``<bench cache>/speed/``; missing ones
are exported first) and each mode (``--target-macs 0.8`` and ``--exact`` by default), this runs the real
command line, ``red-onnx IN OUT --target-macs 0.8 --json R.json``, in a **fresh subprocess** and records:

- wall time of the process (interpreter start to exit), its CPU time (user + system, less sensitive to
  the other workers on a shared machine), the import time and the time of ``red_onnx.cli.main``;
- the time of every pipeline stage (from the CLI's progress callback: load — which includes the
  reference session and outputs —, normalise, each pass, the budget search with its number of
  measurements, merge_near, separation, verification, saving), and the report's own ``passes[].seconds``
  and ``budget.seconds``;
- latency-probe time (``LatencyService.compare`` wrapped in the child: the separation pass's timed
  probes, cache misses only) and the wall time excluding it (the pipeline's own time);
- the MACs and parameter fractions reached (the error, for target runs);
- peak RSS of the process (``wait4`` ru_maxrss) above the post-import baseline of a process that only
  does ``import red_onnx``, also as a multiple of the model file's size, and per stage the highest RSS
  sampled (every 20 ms) above that baseline — a breakdown of where the memory goes;
- ``onnxsim.simplify`` on the same model in its own fresh subprocess in the same run (load, simplify,
  save times), and the ratios red-onnx ``cli.main`` (load to save) / onnxsim load+simplify+save, and
  process wall / process wall (which adds each tool's interpreter start and imports);
- per mode, the growth of time with parameter count over the conv nets: exponent of a log-log fit
  (1.0 = linear) and the ratios between consecutive sizes.

A run that fails (exit 1, e.g. a target the model cannot reach, or 2) is recorded with its error line,
never hidden; one over ``--timeout`` is interrupted (SIGINT, then SIGKILL) and recorded with the stage
it was in. ``--profile NAME`` profiles the first target run of NAME with pyinstrument (a dev-only tool:
``pip install pyinstrument``; the row is marked ``profiled``) into ``bench/results/speed_profile_*.txt``.
A model named twice in ``--models`` is run twice (noise estimate on a shared machine).

Usage::

    python bench/speed.py                                   # conv1m conv5m conv25m transformer25m
    python bench/speed.py --models conv25m conv25m --profile conv25m
    python bench/speed.py --large                           # adds conv100m, transformer85m (GBs of RAM, long)

Markdown tables to stdout; everything to ``bench/results/speed.json`` (``--out``); ``--from-json F``
re-derives and prints a stored run, written back into F (not over the results). Only the standard
library is imported here at the top: the child processes must carry nothing but red_onnx.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODELS = ("conv1m", "conv5m", "conv25m", "transformer25m")
LARGE_MODELS = ("conv100m", "transformer85m")
#: ``target`` lets ``--sensitivity auto`` choose (calibrated above 1 GMAC per input, measured below);
#: the ``target-*`` modes force one way of finding each group's error (``red_onnx.search.budget``).
MODES = {
    "target": ["--target-macs", "{target}"],
    "target-measured": ["--target-macs", "{target}", "--sensitivity", "measured"],
    "target-calibrated": ["--target-macs", "{target}", "--sensitivity", "calibrated"],
    "target-local": ["--target-macs", "{target}", "--sensitivity", "local"],
    "exact": ["--exact"],
}
SAMPLE_SECONDS = 0.02
#: Fitted against parameter count: process wall and ``cli.main`` (no interpreter start and imports, whose
#: fixed ~2-4 s flatten the small sizes) without latency probes, CPU seconds, peak RSS over the baseline.
GROWTH_METRICS = ("wall_excl_probes_s", "main_excl_probes_s", "cpu_s", "peak_over_baseline")
GRACE_SECONDS = 60.0
MB = 1e6


# ---------------------------------------------------------------- child side (runs inside the subprocess)


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class StageRecorder:
    """Timestamps pipeline stages into a JSON-lines file, with the highest RSS sampled in each stage."""

    def __init__(self, path: Path, started: float) -> None:
        self.file = path.open("w", buffering=1)
        self.started, self.stage, self.stage_peak = started, "start", 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            rss = _proc_status()["VmRSS"]
            with self.lock:
                self.stage_peak = max(self.stage_peak, rss)

    def __call__(self, label: str, **extra: Any) -> None:
        """Close the current stage (its sampled peak) and open ``label``."""
        status = _proc_status()
        with self.lock:
            peak, self.stage_peak = max(self.stage_peak, status["VmRSS"]), status["VmRSS"]
            event = {
                "stage": label,
                "t": round(time.perf_counter() - self.started, 4),
                "rss": status["VmRSS"],
            }
            event |= {"hwm": status["VmHWM"], "previous_peak": peak, **extra}
            self.file.write(json.dumps(event) + "\n")

    def close(self) -> None:
        """Stop sampling."""
        self.stop.set()
        self.file.close()


def _instrument(record: StageRecorder) -> dict[str, float]:
    """Wrap the CLI's progress callback, compress, save and the latency probes to feed ``record``."""
    from red_onnx import cli, pipeline
    from red_onnx.io import files as io
    from red_onnx.measure import latency

    probes = {"seconds": 0.0, "measured": 0, "calls": 0}
    original_call, original_compress = cli._ProgressBar.__call__, pipeline.compress
    original_compare, original_save = latency.LatencyService.compare, io.save_model

    def progress(self: Any, stage: str) -> None:
        record(stage)
        original_call(self, stage)

    def compress(*args: Any, **kwargs: Any) -> Any:
        try:
            return original_compress(*args, **kwargs)
        finally:
            record("compress_end")

    def compare(self: Any, *args: Any, **kwargs: Any) -> Any:
        before, started = self.probes, time.perf_counter()
        try:
            return original_compare(self, *args, **kwargs)
        finally:
            probes["seconds"] += time.perf_counter() - started
            probes["measured"] += self.probes - before
            probes["calls"] += 1

    def save(*args: Any, **kwargs: Any) -> Any:
        record("save")
        return original_save(*args, **kwargs)

    cli._ProgressBar.__call__, pipeline.compress = progress, compress
    latency.LatencyService.compare, io.save_model = compare, save
    return probes


def code_digest() -> str:
    """sha256 (12 hex digits) of the red_onnx source files this process imported, read right after import.

    The library may be edited while a long benchmark runs; runs whose digests differ measured different
    code (the tables say so).
    """
    import hashlib

    digest = hashlib.sha256()
    files = sorted(
        {
            m.__file__
            for n, m in sys.modules.items()
            if n.split(".")[0] == "red_onnx" and getattr(m, "__file__", None)
        }
    )
    for name in files:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:12]


def child_main(events: Path, summary: Path, profile: Path | None, argv: list[str]) -> int:
    """Run ``red-onnx argv`` in this process, instrumented (and profiled when ``profile`` is given)."""
    started = time.perf_counter()
    import red_onnx.cli

    imported = time.perf_counter() - started
    digest = code_digest()
    record = StageRecorder(events, started)
    record("imported")
    after_import = _proc_status()["VmRSS"]
    probes = _instrument(record)
    profiler = None
    if profile is not None:
        from pyinstrument import Profiler  # dev-only tool

        profiler = Profiler(interval=0.02)
        profiler.start()
    code = 130
    try:
        code = red_onnx.cli.main(argv)
    finally:
        record("done")
        if profiler is not None:
            profiler.stop()
            profile.write_text(profiler.output_text(unicode=False, color=False, show_all=False) + "\n")
        main_seconds = time.perf_counter() - started - imported
        record.close()
        data = {"rc": code, "import_s": imported, "main_s": main_seconds, "rss_after_import": after_import}
        data["code_digest"] = digest
        summary.write_text(json.dumps({**data, "probes": probes, **_proc_status()}))
    return code


# ---------------------------------------------------------------- parent side: processes


def run_process(command: list[str], timeout: float) -> dict[str, Any]:
    """Run ``command``; wall and CPU seconds, peak RSS (bytes), exit code, stderr; SIGINT on timeout."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    streams: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=name, s=stream: streams.__setitem__(n, s.read()), daemon=True)
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    timed_out, deadline = False, started + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        now = time.perf_counter()
        if not timed_out and now > deadline:
            timed_out, deadline = True, now + GRACE_SECONDS
            process.send_signal(signal.SIGINT)
        elif timed_out and now > deadline:
            process.kill()
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    return {
        "rc": process.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
        "stdout": streams.get("stdout", ""), "stderr": streams.get("stderr", ""),
    }  # fmt: skip


def import_baseline() -> dict[str, int]:
    """RSS (bytes) of a fresh process after ``import red_onnx`` (and its peak while importing)."""
    code = (
        "import json, red_onnx\n"
        "s = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')"
        " if l[:5] in ('VmRSS', 'VmHWM')}\nprint(json.dumps(s))"
    )
    result = run_process([sys.executable, "-c", code], 600)
    values = json.loads(result["stdout"])
    return {"rss": values["VmRSS"], "hwm": values["VmHWM"]}


def error_line(stderr: str) -> str | None:
    """The CLI's one-line error, else the last line of stderr (a traceback's exception)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    flagged = [line for line in lines if line.startswith("red-onnx: ")]
    return (flagged or lines or [None])[-1]


# ---------------------------------------------------------------- parent side: one red-onnx run


#: Display names of the stages that the progress labels do not name well.
STAGE_NAMES = {"imported": "cli start", "verify": "verify+check", "compress_end": "cli", "save": "save+json"}
#: Column order of the stage table (the pipeline's order).
STAGE_ORDER = (
    "import", "cli start", "load", "normalise", "fold_batchnorm", "fold_affine", "merge_exact", "budget",
    "merge_near", "separate_depthwise", "verify+check", "cli", "save+json",
)  # fmt: skip


def stage_times(events: list[dict[str, Any]], summary: dict[str, Any] | None, baseline: int) -> list[dict]:
    """Collapse the event log into stages: seconds, budget measurements, peak RSS above ``baseline``.

    The first stage is the import of red_onnx (from the child's summary); ``measure N`` labels of the
    budget search are counted into the budget stage.
    """
    stages: list[dict[str, Any]] = []
    if summary:
        stages.append({"stage": "import", "seconds": round(summary["import_s"], 3), "measurements": 0})
        stages[-1]["peak_mb"] = round((summary["rss_after_import"] - baseline) / MB, 1)
    for event, following in itertools.pairwise(events):
        label = event["stage"]
        inside = label.startswith("measure") or label == "capture activations"  # budget sub-steps
        if inside and stages and stages[-1]["stage"] == "budget":
            current = stages[-1]
            current["measurements"] += label.startswith("measure")
        else:
            current = {
                "stage": STAGE_NAMES.get(label, label),
                "seconds": 0.0,
                "measurements": 0,
                "peak_mb": 0.0,
            }
            stages.append(current)
        current["seconds"] = round(current["seconds"] + following["t"] - event["t"], 3)
        current["peak_mb"] = max(current["peak_mb"], round((following["previous_peak"] - baseline) / MB, 1))
    return stages


def last_stage(stages: list[dict[str, Any]]) -> str | None:
    """The pipeline stage the process was in when compress returned or raised (or when it stopped)."""
    names = [stage["stage"] for stage in stages]
    inside = stages[: names.index("cli")] if "cli" in names else stages
    if not inside:
        return None
    last = inside[-1]
    return f"{last['stage']} (measurement {last['measurements']})" if last["measurements"] else last["stage"]


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """What the red-onnx JSON report says about time, MACs and error."""
    budget = report.get("budget") or {}
    verification = report.get("verification") or {}
    separation = next((p for p in report.get("passes", []) if p["name"] == "separate_depthwise"), None)
    return {
        "params_before": report["params_before"], "params_after": report["params_after"],
        "macs_ratio": report["macs_after"] / report["macs_before"] if report["macs_before"] else None,
        "params_ratio": report["params_after"] / report["params_before"] if report["params_before"] else None,
        "passes_s": {p["name"]: p["seconds"] for p in report.get("passes", [])},
        "budget_s": budget.get("seconds"), "budget_evaluations": budget.get("evaluations"),
        "budget_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
        "sensitivity": budget.get("sensitivity"), "verified": verification.get("passed"),
        "worst_rel_l2": _worst_rel_l2(verification),
        "separated": separation["stats"].get("separated") if separation else None,
        "separation_candidates": separation["stats"].get("candidates") if separation else None,
    }  # fmt: skip


def _worst_rel_l2(verification: dict[str, Any]) -> float | None:
    errors = [o.get("rel_l2_err") for o in verification.get("outputs", []) if o.get("rel_l2_err") is not None]
    return max(errors) if errors else None


def run_red_onnx(
    model: Path, mode: str, args: argparse.Namespace, baseline: int, profile: Path | None
) -> dict:
    """One fresh ``red-onnx`` process on ``model`` in ``mode``, instrumented; its record."""
    with tempfile.TemporaryDirectory(prefix="red-onnx-speed-") as scratch:
        work = Path(scratch)
        flags = [part.format(target=args.target_macs) for part in MODES[mode]]
        argv = [str(model), str(work / "out.onnx"), *flags, "--json", str(work / "report.json"), "-q"]
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(work / "events.jsonl")]
        command += [str(work / "summary.json"), str(profile or "-"), "--", *argv]
        process = run_process(command, args.timeout)
        events = _read_lines(work / "events.jsonl")
        summary = _read_json(work / "summary.json")
        report = _read_json(work / "report.json")
    shown = [*argv[:1], "OUT", *flags, "--json", "R.json", "-q"]  # without the scratch folder
    record = {"mode": mode, "command": "red-onnx " + " ".join(shown), **process}
    record |= {"error": error_line(process["stderr"]) if process["rc"] else None, "summary": summary}
    stages = stage_times(events, summary, baseline)
    record |= {"stages": stages, "last_stage": last_stage(stages)}
    record |= report_figures(report) if report else {}
    probe_s = (summary or {}).get("probes", {}).get("seconds", 0.0)
    record |= {"probe_s": probe_s, "wall_excl_probes_s": process["wall_s"] - probe_s}
    record["main_excl_probes_s"] = summary["main_s"] - probe_s if summary else None
    record |= {"peak_over_baseline": process["peak_rss"] - baseline, "profiled": profile is not None}
    del record["stdout"]
    record["stderr"] = process["stderr"][-4000:]
    return record


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_onnxsim(model: Path, timeout: float) -> dict[str, Any]:
    """``onnxsim.simplify`` on ``model`` in a fresh process: load, simplify and save seconds, peak RSS."""
    code = (
        "import json, sys, time, onnx, onnxsim\n"
        "t0 = time.perf_counter(); m = onnx.load(sys.argv[1]); t1 = time.perf_counter()\n"
        "s, ok = onnxsim.simplify(m); t2 = time.perf_counter(); onnx.save(s, sys.argv[2])\n"
        "print(json.dumps({'load_s': t1 - t0, 'simplify_s': t2 - t1, 'save_s': time.perf_counter() - t2,"
        " 'ok': bool(ok), 'nodes_before': len(m.graph.node), 'nodes_after': len(s.graph.node),"
        " 'version': onnxsim.__version__}))\n"
    )
    with tempfile.TemporaryDirectory(prefix="red-onnx-speed-") as scratch:
        process = run_process([sys.executable, "-c", code, str(model), f"{scratch}/sim.onnx"], timeout)
    lines = process["stdout"].strip().splitlines()
    result = {k: process[k] for k in ("rc", "timed_out", "wall_s", "cpu_s", "peak_rss")}
    result["error"] = error_line(process["stderr"]) if process["rc"] else None
    return result | (json.loads(lines[-1]) if process["rc"] == 0 and lines else {})


# ---------------------------------------------------------------- models, growth, tables


def ensure_models(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Export the missing models (torch, in its own process); path, parameters and size of each."""
    missing = sorted({n for n in names if not model_path(n).exists()})
    if missing:
        script = ROOT / "bench" / "models" / "export_speed.py"
        subprocess.run([sys.executable, str(script), "--models", *missing], check=True, cwd=ROOT)
    return {name: _model_info(model_path(name)) for name in dict.fromkeys(names)}


def model_path(name: str) -> Path:
    """Where ``export_speed.py`` caches model ``name`` (not imported here: it imports torch)."""
    return (
        Path(os.environ.get("RED_ONNX_BENCH", Path.home() / ".cache" / "red-onnx" / "bench"))
        / "speed"
        / f"{name}.onnx"
    )


def _model_info(path: Path) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(path))
    params = sum(math.prod(t.dims) for t in proto.graph.initializer)
    return {"path": str(path), "params": params, "size": path.stat().st_size}


def growth(runs: list[dict[str, Any]], infos: dict[str, dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """Log-log slope of time and memory against parameters over the conv nets (1.0 = linear).

    Per size, the smallest value over its successful unprofiled runs (noise from other processes only
    adds time), or over its profiled runs when it has no other.
    """
    points: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        if run["mode"] == mode and run["model"].startswith("conv") and run["rc"] == 0:
            points.setdefault(infos[run["model"]]["params"], []).append(run)
    for params, group in points.items():
        points[params] = [r for r in group if not r["profiled"]] or group
    if len(points) < 2:
        return None
    params = sorted(points)
    result: dict[str, Any] = {"mode": mode, "params": params}
    for metric in GROWTH_METRICS:
        values = [min(r[metric] for r in points[p]) for p in params]
        result[metric] = {
            "values": values,
            "exponent": _slope([math.log(p) for p in params], [math.log(max(v, 1e-9)) for v in values]),
            "ratio_per_param_ratio": [(v2 / v1) / (p2 / p1) for p1, p2, v1, v2 in _pairs(params, values)],
        }
    return result


def _slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )


def _pairs(params: list[int], values: list[float]) -> list[tuple[int, int, float, float]]:
    return [(params[i], params[i + 1], values[i], values[i + 1]) for i in range(len(params) - 1)]


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def onnxsim_ratios(run: dict[str, Any], sim: dict[str, Any] | None) -> dict[str, float | None]:
    """red-onnx against onnxsim: ``cli.main`` (load to save) / load+simplify+save, and process walls."""
    if not sim or sim.get("rc") != 0 or not run.get("summary"):
        return {"onnxsim_s": None, "onnxsim_ratio": None, "onnxsim_wall_ratio": None}
    core = sim["load_s"] + sim["simplify_s"] + sim["save_s"]
    ratios = {
        "onnxsim_ratio": run["summary"]["main_s"] / core,
        "onnxsim_wall_ratio": run["wall_s"] / sim["wall_s"],
    }
    return {"onnxsim_s": core, **ratios}


def runs_table(runs: list[dict[str, Any]], infos: dict[str, dict[str, Any]]) -> list[str]:
    """The main table: one row per red-onnx run."""
    lines = [
        "| model | params | file MB | mode | run | exit | wall s | main s | CPU s | wall excl. probes s"
        " | probes s | budget s (measurements) | verify s | MACs kept | error (verification)"
        " | peak RSS over baseline MB (× file) | onnxsim s | main / onnxsim | wall / onnxsim wall |",
        "|" + "---|" * 19,
    ]
    for run in runs:
        size = infos[run["model"]]["size"]
        stage = {s["stage"]: s for s in run["stages"]}
        budget = stage.get("budget")
        budget_cell = f"{_fmt(run.get('budget_s'))} ({budget['measurements']})" if budget else "-"
        exit_code = "timeout" if run["timed_out"] else str(run["rc"])
        tag = f"{run['repeat']}{' (profiled)' if run['profiled'] else ''}"
        main_s = (run.get("summary") or {}).get("main_s")
        lines.append(
            f"| {run['model']} | {infos[run['model']]['params'] / 1e6:.2f}M | {size / MB:.1f} | {run['mode']}"
            f" | {tag} | {exit_code} | {run['wall_s']:.1f} | {_fmt(main_s)} | {run['cpu_s']:.1f}"
            f" | {run['wall_excl_probes_s']:.1f} | {run['probe_s']:.2f} | {budget_cell}"
            f" | {_fmt(stage.get('verify+check', {}).get('seconds'))} | {_fmt(run.get('macs_ratio'), '.3f')}"
            f" | {_fmt(run.get('worst_rel_l2'), '.3g')} | {run['peak_over_baseline'] / MB:.0f}"
            f" ({run['peak_over_baseline'] / size:.1f}×) | {_fmt(run['onnxsim_s'], '.2f')}"
            f" | {_fmt(run['onnxsim_ratio'])} | {_fmt(run['onnxsim_wall_ratio'])} |"
        )
    return lines


def stages_table(runs: list[dict[str, Any]]) -> list[str]:
    """Per run: seconds / peak RSS above the baseline (MB) of every stage."""
    present = {stage["stage"] for run in runs for stage in run["stages"]}
    names = [name for name in STAGE_ORDER if name in present]
    names += sorted(present - set(names))
    lines = ["| model | mode | run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
    for run in runs:
        cells = {s["stage"]: f"{s['seconds']:.2f} s / {s['peak_mb']:.0f} MB" for s in run["stages"]}
        row = " | ".join(cells.get(name, "-") for name in names)
        lines.append(f"| {run['model']} | {run['mode']} | {run['repeat']} | {row} |")
    return lines


def growth_table(growths: list[dict[str, Any]]) -> list[str]:
    """Exponent of the log-log fit, and (t2/t1)/(p2/p1) between consecutive conv sizes."""
    if not growths:
        return ["(growth with parameters: needs two conv sizes that ran to the end)"]
    lines = [
        "| mode | metric | values at "
        + ", ".join(f"{p / 1e6:.1f}M" for p in growths[0]["params"])
        + " params | exponent (1 = linear) | (ratio / params ratio) between sizes |",
        "|---|---|---|---|---|",
    ]
    for item in growths:
        for metric in GROWTH_METRICS:
            figures = item[metric]
            scale, unit = (MB, " MB") if metric == "peak_over_baseline" else (1.0, " s")
            values = ", ".join(f"{v / scale:.0f}{unit}" for v in figures["values"])
            ratios = ", ".join(f"{r:.2f}" for r in figures["ratio_per_param_ratio"])
            lines.append(f"| {item['mode']} | {metric} | {values} | {figures['exponent']:.2f} | {ratios} |")
    return lines


def onnxsim_table(sims: dict[str, dict[str, Any]]) -> list[str]:
    """onnxsim per model: load, simplify, save, wall, peak RSS."""
    lines = [
        "| model | exit | load s | simplify s | save s | wall s | peak RSS MB | nodes |",
        "|" + "---|" * 8,
    ]
    for name, sim in sims.items():
        nodes = f"{sim.get('nodes_before', '-')} → {sim.get('nodes_after', '-')}"
        lines.append(
            f"| {name} | {'timeout' if sim['timed_out'] else sim['rc']} | {_fmt(sim.get('load_s'), '.2f')}"
            f" | {_fmt(sim.get('simplify_s'), '.2f')} | {_fmt(sim.get('save_s'), '.2f')}"
            f" | {sim['wall_s']:.1f} | {sim['peak_rss'] / MB:.0f} | {nodes} |"
        )
    return lines


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=[*DEFAULT_MODELS, *LARGE_MODELS],
        default=list(DEFAULT_MODELS),
        help="a name twice runs it twice",
    )
    parser.add_argument(
        "--large", action="store_true", help=f"also {', '.join(LARGE_MODELS)} (lots of memory)"
    )
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["target", "exact"])
    parser.add_argument("--target-macs", type=float, default=0.8)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per red-onnx run")
    parser.add_argument("--profile", default=None, help="model whose first target run is profiled")
    parser.add_argument("--no-onnxsim", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="re-derive and print a stored run (into it, or --out)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/speed.json")
    return parser.parse_args(argv)


def profile_path(name: str) -> Path:
    """``bench/results/speed_profile_25m.txt`` for conv25m, ``..._transformer25m.txt`` for the encoder."""
    return RESULTS / f"speed_profile_{name.removeprefix('conv')}.txt"


def run_all(args: argparse.Namespace, infos: dict[str, dict[str, Any]], log: Callable[[str], None]) -> dict:
    """Every model occurrence: onnxsim once, then each mode; the collected records."""
    baseline = import_baseline()
    log(f"post-import baseline RSS: {baseline['rss'] / MB:.0f} MB")
    runs: list[dict[str, Any]] = []
    sims: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for name in args.models:
        seen[name] = seen.get(name, 0) + 1
        info = infos[name]
        sim = None if args.no_onnxsim else run_onnxsim(Path(info["path"]), args.timeout)
        if sim is not None:
            sims[f"{name} #{seen[name]}"] = sim
            log(f"{name}: onnxsim {sim['wall_s']:.1f} s (rc {sim['rc']})")
        for mode in args.modes:
            profiled = mode == "target" and name == args.profile and seen[name] == 1
            profile = profile_path(name) if profiled else None
            record = run_red_onnx(Path(info["path"]), mode, args, baseline["rss"], profile)
            record |= onnxsim_ratios(record, sim)
            runs.append({"model": name, "repeat": seen[name], "onnxsim": sim, **record})
            outcome = f"rc {record['rc']}, {record['wall_s']:.1f} s, {record['error'] or 'ok'}"
            log(f"{name} {mode} #{seen[name]}: {outcome}")
    growths = [g for g in (growth(runs, infos, mode) for mode in args.modes) if g]
    return {"baseline": baseline, "runs": runs, "onnxsim": sims, "growth": growths}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``--child`` is the instrumented red-onnx process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        events, summary, profile = argv[1], argv[2], argv[3]
        return child_main(Path(events), Path(summary), None if profile == "-" else Path(profile), argv[5:])
    args = parse_args(argv)
    data = measure(args) if args.from_json is None else rederive(json.loads(args.from_json.read_text()))
    out = args.out or args.from_json or RESULTS / "speed.json"  # a re-derived run stays where it was
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print_tables(data)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Export what is missing, run everything, and collect the results with the machine's description."""
    if args.large:
        args.models += [m for m in LARGE_MODELS if m not in args.models]
    infos = ensure_models(args.models)
    data = run_all(args, infos, lambda message: print(message, file=sys.stderr, flush=True))
    import onnxruntime

    data |= {"models": infos, "options": {k: str(v) for k, v in vars(args).items()}}
    data["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    data["machine"]["onnxruntime"] = onnxruntime.__version__
    data["git"] = git_state()
    return data


def git_state() -> dict[str, Any]:
    """HEAD and whether the library sources differ from it (at the end of the run)."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "red_onnx", "passes"], capture_output=True, text=True, cwd=ROOT
    ).stdout.splitlines()
    return {"head": head, "library_changes": changed}


def rederive(data: dict[str, Any]) -> dict[str, Any]:
    """Recompute what is derived from the stored runs (last stage, growth) without running anything."""
    for run in data["runs"]:
        run["last_stage"] = last_stage(run["stages"])
        summary = run.get("summary")
        run["main_excl_probes_s"] = summary["main_s"] - run["probe_s"] if summary else None
    modes = dict.fromkeys(run["mode"] for run in data["runs"])
    data["growth"] = [g for g in (growth(data["runs"], data["models"], mode) for mode in modes) if g]
    return data


def print_tables(data: dict[str, Any]) -> None:
    """The markdown tables, then one line per failed or interrupted run."""
    tables = [
        runs_table(data["runs"], data["models"]),
        stages_table(data["runs"]),
        growth_table(data["growth"]),
    ]
    print("\n\n".join("\n".join(table) for table in [*tables, onnxsim_table(data["onnxsim"])]))
    digests = {}
    for run in data["runs"]:
        digest = (run.get("summary") or {}).get("code_digest", "unknown")
        digests.setdefault(digest, []).append(f"{run['model']} {run['mode']} #{run['repeat']}")
    if len(digests) > 1:
        print("\nWARNING: the library changed during this benchmark; runs measured different code:")
        for digest, names in digests.items():
            print(f"  {digest}: {', '.join(names)}")
    for run in data["runs"]:
        if run["rc"] or run["timed_out"]:
            where = f"exit {run['rc']}{' (timeout)' if run['timed_out'] else ''} in stage {run['last_stage']}"
            print(f"\n{run['model']} {run['mode']} #{run['repeat']}: {where}: {run['error']}")


if __name__ == "__main__":
    sys.exit(main())
