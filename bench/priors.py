"""Which synthetic input prior best predicts a compressed model's error on real data?

For each model, a set of compressed variants spanning a range of errors is built with red_onnx (data
free: ``target_macs`` over a grid, ``force_target=True``, ``latency_check=False``, ``refit=False``, and
several search settings: the search's own prior, ``activations`` on or off, ``hashing`` on or off; for
the two small models ``channel_multiple=1``). Variants whose real-data logits are identical to another's
(the same plan) are kept once. Each variant is then measured against the original model:

- on each prior's synthetic inputs: 16 seeded feeds (``red_onnx.verify.inputs.make_inputs``, seeds
  1000-1015, none of which the search or its held-out check draws), both models run in onnxruntime;
  the error is the relative L2 of all the logits, ``||y' - y|| / ||y||`` over the 16 samples together
  (``worst_seed`` also keeps the largest per-sample error, which is what the fidelity budget bounds);
- on the real test set: the relative L2 of all the logits, and the task metric's loss: test accuracy
  lost (points, labelled models) or top-1 disagreement with the original (MobileNetV2).

The priors (``red_onnx.options.InputSpec``):

- ``normal``: ``InputSpec(prior="normal")``, i.i.d. N(0, 1);
- ``pink``: ``InputSpec(prior="pink")``, spatially correlated 1/f noise, unit variance;
- ``range``: ``InputSpec(ranges={name: (lo, hi)})``, uniform over the range the real inputs have: the
  test set's min and max for digits and MNIST-1D, the ImageNet-normalised image of [0, 1] for
  MobileNetV2.

Per model and prior: Spearman's rank correlation (``scipy.stats.spearmanr``) between the synthetic
error and the real-data error, and between the synthetic error and the task-metric loss, with a
percentile bootstrap 95% interval over variants (2000 resamples, seed 0); paired bootstrap intervals of
the difference in correlation between two priors (same resampled variants); and the median ratio of
real-data error to synthetic error (how far the absolute level is off, which a rank correlation ignores).
As a robustness check the correlations are also computed without the variants whose search fitted
channel activations on synthetic inputs (``activations=True``): those plans are tuned to N(0, 1) inputs,
which flatters that prior's error on them.

Models: ``digits`` (the bundled CNN and its 360-image test split), ``mnist1d`` (``python
bench/models/train_mnist1d.py`` writes it and its 1000-signal test split into the bench cache) and
``mobilenetv2`` (``python bench/models/export_mobilenetv2.py``; the test views of ``bench/data.py``'s
``photo_views``; nine variants; not in the default run: each data-free compression took 76-155 s on
2 shared cores, and the committed results do not include it).

Usage (from the repository root)::

    python bench/priors.py                                   # digits, mnist1d -> bench/results/priors.json
    python bench/priors.py --models mobilenetv2              # adds MobileNetV2 (about 15-25 min)
    python bench/priors.py --models digits mnist1d           # only these (other models' entries are kept)
    python bench/priors.py --models digits --out p.json  # somewhere else
    python bench/priors.py --recompute                       # only the statistics, from the variants kept
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.data import IMAGENET_MEAN, IMAGENET_STD, cache_dir
from red_onnx import compress
from red_onnx.demo import demo_path
from red_onnx.errors import InputError, RedOnnxError
from red_onnx.options import InputSpec
from red_onnx.verify.inputs import make_inputs

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "priors.json"
PRIORS = ("normal", "pink", "range")
#: Seeds of the synthetic measurement: none of the search's (100-115), held-out (200-215), cv (300-315)
#: or verification (0, 1) seeds.
EVAL_SEEDS = tuple(range(1000, 1016))
BOOTSTRAP = 2000
SMALL_TARGETS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5)


@dataclass
class Task:
    """One model: its file, its real test inputs (and labels), the real range, the variants' recipes."""

    name: str
    path: Path
    input_name: str
    test: np.ndarray
    labels: np.ndarray | None
    real_range: tuple[float, float]
    about: str
    #: (search setting name, target, compress keyword arguments)
    recipes: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)


def _settings(name: str, real_range: tuple[float, float], multiple: int | None) -> dict[str, dict[str, Any]]:
    """The search settings the variants are built with (all with ``refit=False``)."""
    base = {"refit": False, "channel_multiple": multiple}
    ranged = InputSpec(ranges={name: real_range})
    return {
        "normal": base,
        "pink": base | {"input_spec": InputSpec(prior="pink")},
        "range": base | {"input_spec": ranged},
        "activations": base | {"activations": True},
        "no_hashing": base | {"hashing": False},
    }


def _input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _small(name: str, path: Path, test: np.ndarray, labels: np.ndarray, about: str) -> Task:
    real_range = (float(test.min()), float(test.max()))
    input_name = _input_name(path)
    settings = _settings(input_name, real_range, 1)
    recipes = [(setting, t, kwargs) for setting, kwargs in settings.items() for t in SMALL_TARGETS]
    return Task(name, path, input_name, test, labels, real_range, about, recipes)


def digits_task() -> Task:
    from bench.data import load_digits_test

    test, labels = load_digits_test()
    return _small("digits", demo_path(), test, labels, f"the bundled digits test split ({len(test)} images)")


def mnist1d_task() -> Task:
    from bench.data import load_mnist1d_test

    path = cache_dir() / "mnist1d_cnn.onnx"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/models/train_mnist1d.py` first")
    test, labels = load_mnist1d_test()
    return _small("mnist1d", path, test, labels, f"the MNIST-1D test split ({len(test)} signals)")


def mobilenetv2_task() -> Task:
    from bench.data import photo_views

    path = cache_dir() / "mobilenetv2.onnx"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/models/export_mobilenetv2.py` first")
    test, _, about = photo_views(calibration_views=2)
    low = float(np.min(-IMAGENET_MEAN / IMAGENET_STD))
    high = float(np.max((1 - IMAGENET_MEAN) / IMAGENET_STD))
    input_name = _input_name(path)
    settings = _settings(input_name, (low, high), None)
    # 0.95 already lost 53% top-1 agreement data-free, 0.9 78%: the informative targets are near 1
    plan = [("normal", (0.99, 0.98, 0.97, 0.95, 0.9)), ("pink", (0.98, 0.95)), ("range", (0.98, 0.95))]
    recipes = [(setting, t, settings[setting]) for setting, targets in plan for t in targets]
    about_test = f"photo test views: {about['test']}"
    return Task("mobilenetv2", path, input_name, test, None, (low, high), about_test, recipes)


TASKS = {"digits": digits_task, "mnist1d": mnist1d_task, "mobilenetv2": mobilenetv2_task}


def prior_spec(prior: str, task: Task) -> InputSpec:
    """The measurement's input spec for ``prior``."""
    if prior == "range":
        return InputSpec(ranges={task.input_name: task.real_range})
    return InputSpec(prior=prior)


def synthetic_batch(model: onnx.ModelProto, spec: InputSpec) -> np.ndarray:
    """The 16 seeded feeds of ``spec`` as one batch (each feed is one sample)."""
    name = model.graph.input[0].name
    return np.concatenate([make_inputs(model, spec, seed)[name] for seed in EVAL_SEEDS])


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: batch[i : i + chunk]})[0] for i in range(0, len(batch), chunk)]
    return np.concatenate(parts).astype(np.float64)


def rel_l2(outputs: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-30))


def worst_seed(outputs: np.ndarray, reference: np.ndarray) -> float:
    return max(rel_l2(o, r) for o, r in zip(outputs, reference, strict=True))


def measure_variants(task: Task, log=print) -> dict[str, Any]:
    """Build the task's variants and measure each on the priors' inputs and on the real test set."""
    original = onnx.load(str(task.path))
    batches = {prior: synthetic_batch(original, prior_spec(prior, task)) for prior in PRIORS}
    reference_session = _session(task.path)
    references = {prior: run(reference_session, batch) for prior, batch in batches.items()}
    real_reference = run(reference_session, task.test)
    base_accuracy = None if task.labels is None else float(np.mean(real_reference.argmax(1) == task.labels))
    variants, seen, failures = [], {}, []
    started = time.perf_counter()
    for setting, target, kwargs in task.recipes:
        t0 = time.perf_counter()
        try:
            result = compress(task.path, target_macs=target, latency_check=False, force_target=True,
                              raise_on_failure=False, **kwargs)  # fmt: skip
        except RedOnnxError as error:
            failures.append({"setting": setting, "target": target, "error": str(error).splitlines()[0]})
            continue
        seconds = time.perf_counter() - t0
        session = _session(result.model)
        real = run(session, task.test)
        key = real.astype(np.float32).tobytes()
        label = f"{setting}@{target}"
        if key in seen:
            seen[key]["duplicates"].append(label)
            log(f"  {task.name} {label}: same plan as {seen[key]['label']} ({seconds:.1f} s)")
            continue
        row: dict[str, Any] = {
            "label": label, "setting": setting, "target": target,
            "macs": result.report.macs_after / result.report.macs_before,
            "compress_seconds": round(seconds, 2), "duplicates": [],
            "real_rel_l2": rel_l2(real, real_reference),
            "agreement": float(np.mean(real.argmax(1) == real_reference.argmax(1))),
        }  # fmt: skip
        if task.labels is not None:
            row["accuracy"] = float(np.mean(real.argmax(1) == task.labels))
            row["task_loss"] = 100.0 * (base_accuracy - row["accuracy"])
        else:
            row["task_loss"] = 100.0 * (1.0 - row["agreement"])
        for prior in PRIORS:
            outputs = run(session, batches[prior])
            row[f"{prior}_rel_l2"] = rel_l2(outputs, references[prior])
            row[f"{prior}_worst_seed"] = worst_seed(outputs, references[prior])
        seen[key] = row
        variants.append(row)
        log(f"  {task.name} {label}: macs {row['macs']:.3f}, real {row['real_rel_l2']:.4f}, loss "
            f"{row['task_loss']:+.2f}, normal {row['normal_rel_l2']:.4f}, pink {row['pink_rel_l2']:.4f}, "
            f"range {row['range_rel_l2']:.4f} ({seconds:.1f} s)")  # fmt: skip
    return {
        "about": task.about, "real_range": list(task.real_range), "test_samples": len(task.test),
        "task_metric": "accuracy lost (points)" if task.labels is not None else "top-1 disagreement (%)",
        "base_accuracy": base_accuracy, "recipes": len(task.recipes), "failures": failures,
        "seconds": round(time.perf_counter() - started, 1), "variants": variants,
    }  # fmt: skip


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def correlations(variants: list[dict[str, Any]], n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of each prior's error against the real-data error and the task loss, with CIs."""
    count = len(variants)
    targets = {"real_rel_l2": np.array([v["real_rel_l2"] for v in variants]),
               "task_loss": np.array([v["task_loss"] for v in variants])}  # fmt: skip
    errors = {p: np.array([v[f"{p}_rel_l2"] for v in variants]) for p in PRIORS}
    draws = np.random.default_rng(seed).integers(0, count, size=(n_boot, count))
    out: dict[str, Any] = {"variants": count, "priors": {}, "differences": {}}
    boots: dict[tuple[str, str], np.ndarray] = {}
    for prior in PRIORS:
        entry: dict[str, Any] = {}
        for key, real in targets.items():
            rho = _spearman(errors[prior], real)
            boot = np.array([_spearman(errors[prior][d], real[d]) for d in draws])
            boots[prior, key] = boot
            low, high = np.nanquantile(boot, [0.025, 0.975])
            entry[key] = {"rho": rho, "low": float(low), "high": float(high)}
        ratio = targets["real_rel_l2"] / np.maximum(errors[prior], 1e-30)
        entry["median_real_over_synthetic"] = float(np.median(ratio))
        entry["ratio_range"] = [float(ratio.min()), float(ratio.max())]
        out["priors"][prior] = entry
    for i, a in enumerate(PRIORS):
        for b in PRIORS[i + 1 :]:
            for key in targets:
                diff = boots[a, key] - boots[b, key]
                low, high = np.nanquantile(diff, [0.025, 0.975])
                rho = out["priors"][a][key]["rho"] - out["priors"][b][key]["rho"]
                out["differences"][f"{a}-{b}:{key}"] = {"diff": rho, "low": float(low), "high": float(high)}
    return out


#: The search setting whose plans fit activations on synthetic inputs (left out of the robustness check).
FITTED = "activations"


def with_correlations(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its correlations over all variants, and over those not built with ``FITTED``."""
    others = [v for v in result["variants"] if v["setting"] != FITTED]
    return result | {"correlations": correlations(result["variants"]),
                     "correlations_without_fits": correlations(others)}  # fmt: skip


def _interval(cell: dict[str, float]) -> str:
    return f"{cell['rho']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}]"


def markdown(data: dict[str, Any]) -> str:
    """The results as a Markdown table: per model and prior, rho against real error and task loss."""
    lines = [
        "| model | variants | prior | ρ vs real-data L2 [95% CI] | ρ vs task loss [95% CI] | "
        "ρ vs real-data L2 without activation fits | real / synthetic error (median) |",
        "|---|---:|---|---|---|---|---:|",
    ]  # fmt: skip
    for name, model in data["models"].items():
        stats, robust = model["correlations"], model["correlations_without_fits"]
        for prior in PRIORS:
            entry = stats["priors"][prior]
            lines.append(
                f"| {name} | {stats['variants']} | {prior} | {_interval(entry['real_rel_l2'])} | "
                f"{_interval(entry['task_loss'])} | {_interval(robust['priors'][prior]['real_rel_l2'])} "
                f"({robust['variants']}) | {entry['median_real_over_synthetic']:.2f} |"
            )
    return "\n".join(lines)


def difference_table(data: dict[str, Any]) -> str:
    """Paired bootstrap intervals of the difference in rho between two priors, per model."""
    lines = ["| model | priors | Δρ vs real-data L2 [95% CI] | Δρ vs task loss [95% CI] |",
             "|---|---|---|---|"]  # fmt: skip
    for name, model in data["models"].items():
        diffs = model["correlations"]["differences"]
        for i, a in enumerate(PRIORS):
            for b in PRIORS[i + 1 :]:
                cells = [diffs[f"{a}-{b}:{key}"] for key in ("real_rel_l2", "task_loss")]
                shown = [f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]" for c in cells]
                lines.append(f"| {name} | {a} − {b} | {shown[0]} | {shown[1]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(TASKS), default=["digits", "mnist1d"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--recompute", action="store_true",
                        help="only recompute the correlations of the variants already in --out")  # fmt: skip
    args = parser.parse_args(argv)
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.setdefault("models", {})
    if args.recompute:
        data["models"] = {name: with_correlations(model) for name, model in data["models"].items()}
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        args.models = []
    data["eval_seeds"] = [EVAL_SEEDS[0], EVAL_SEEDS[-1]]
    data["bootstrap"] = BOOTSTRAP
    data["environment"] = {"python": platform.python_version(), "onnxruntime": ort.__version__,
                           "red_onnx": version("red-onnx")}  # fmt: skip
    for name in args.models:
        print(f"{name}:", flush=True)
        result = measure_variants(TASKS[name](), log=lambda line: print(line, flush=True))
        data["models"][name] = with_correlations(result)
        data["models"] = {k: data["models"][k] for k in TASKS if k in data["models"]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"{name}: {len(result['variants'])} variants in {result['seconds']} s", flush=True)
    print(markdown(data))
    print()
    print(difference_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
