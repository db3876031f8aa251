"""red_onnx on a BERT reaction classifier (rxnfp, 50 classes) against pruning baselines at equal MACs.

The model and its data are written first by ``bench/models/export_rxn_classifier.py``
(``~/.cache/red-onnx/bench/rxn_classifier.onnx``: 12 layers, hidden 256, 4 heads of 64, FFN 512;
``rxn_classifier_data/``: ``calibration.npz`` 128 reactions, ``test.npz`` 197 reactions, tokenised at
sequence 128, inputs ``input_ids`` and ``attention_mask``, and ``predictions.json`` with each
reaction's intended class). This script

1. compresses the model at each target fraction of MACs (default 0.9, 0.8, 0.7, 0.6) in these settings:

   - ``data-free``, ``calibrated``, ``calibrated-norefit``: ``red_onnx.compress`` with
     ``InputSpec(shapes={...: (1, 128)})``, with ``InputSpec(npz=calibration.npz)`` (refit on, the
     default), and with ``refit=False``; always ``force_target=True``, ``latency_check=False``,
     ``raise_on_failure=False``;
   - ``onnxsim-heads-wanda``: ``onnxsim.apply_attention_head_wanda_pruning`` on the model as exported.
     onnxsim 0.8.1 matches none of its 12 attention blocks: its decomposed-attention matcher wants a
     constant head-split Reshape shape (the export computes it at run time from ``Shape``), Q/K/V
     projections that are a bare MatMul or a Gemm (each has its bias in a separate ``Add``, and a Gemm
     takes only 2-D inputs), and an additive mask whose declared shape shows its head axis (shape
     inference leaves all four axes of the ``[batch, 1, seq, seq]`` mask unknown). The first and the
     third could be supplied without changing the function; the biases could not;
   - ``onnxsim-ffn-wanda``: ``onnxsim.apply_structured_wanda_pruning`` on the model with each erf GELU
     fused into one ``com.microsoft`` ``Gelu`` node (the same function; on the decomposed GELU onnxsim
     prunes only the pooler). It also prunes the pooler's neurons (pooler ``Gemm``, ``Tanh``,
     classifier), at the same sparsity;
   - ``ffn-weight-norm``: the same fraction of FFN neurons removed in every layer, those with the
     smallest ``||W1 column|| * ||W2 row||`` (weights only);

   the onnxsim settings are calibrated on the same 128 calibration rows (one batch). A baseline's
   sparsity is found by bisection so that its MACs kept at ``[1, 128]`` inputs match the target within
   0.005; a baseline that prunes nothing, cannot reach the target or fails is recorded as such;
   ``calibrated-norefit`` runs last, after every other setting at every target;
2. measures each result on the 197 test reactions against the original model: agreement of the
   arg-max labels, accuracy against the intended classes, mean KL divergence of the original's softmax
   from the compressed model's, and the relative L2 error of the logits (per reaction, then the mean);
3. counts the MACs kept at ``[1, 128]`` and ``[1, 32]`` inputs (``red_onnx.measure.metrics.measure``
   with the tensor shapes of one onnxruntime run, so that the attention MatMuls are counted; the
   report's own figure, at the calibration batch or at ``[1, 128]`` data-free, is kept as well), the
   attention heads and FFN neurons left in each layer (from the widths of the compressed model's
   query / key / value and FFN-input MatMuls), and times the original and the compressed model with
   onnxruntime (``ORT_ENABLE_ALL``, 2 intra-op threads, batch 1, one row of real tokens without
   padding, 3 warm-up runs each, then 100 runs alternating original / compressed; medians and their
   ratio) at sequence lengths 32 and 128, and the original against itself at the start and at the
   end of each invocation, for the noise;
4. writes ``bench/results/rxn_classifier.json`` after every run (a later run resumes: complete runs
   already in the file are kept unless ``--fresh``; runs not asked for this time stay in the file);
5. compares ``calibrated`` with each baseline and with ``calibrated-norefit`` at the same target: paired
   bootstrap (over the test reactions, 1000 resamples, seed 0) 95% intervals of the difference in
   agreement and in KL divergence.

red_onnx runs are stored under ``runs``, baselines under ``baselines``, the comparisons under
``comparisons``. The compressed models are not saved.

Usage::

    python bench/models/export_rxn_classifier.py    # once
    python bench/rxn_classifier.py                  # every setting at every target
    python bench/rxn_classifier.py --targets 0.8 --settings ffn-weight-norm --out rxn_ffn.json
    python bench/rxn_classifier.py --fresh          # forget earlier runs in the results file
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` and `red_onnx` from a checkout
from bench import text_encoder as te

CACHE = Path(os.path.expanduser("~/.cache/red-onnx/bench"))
MODEL = CACHE / "rxn_classifier.onnx"
DATA = CACHE / "rxn_classifier_data"
RESULTS = Path(__file__).resolve().parent / "results" / "rxn_classifier.json"
SEQ = 128
TARGETS = (0.9, 0.8, 0.7, 0.6)
OURS = ("data-free", "calibrated", "calibrated-norefit")
BASELINES = ("onnxsim-heads-wanda", "onnxsim-ffn-wanda", "ffn-weight-norm")
SETTINGS = OURS + BASELINES
#: Run after every other setting at every target.
LAST = ("calibrated-norefit",)
INPUTS = ("input_ids", "attention_mask")
MACS_SEQS = (SEQ, 32)
LATENCY_SEQS = (32, SEQ)
LAYERS = 12
HIDDEN = 256
HEAD_SIZE = 64
FFN_WIDTH = 512
EVAL_BATCH = 32
#: Timed runs per model and length: more than the encoder's 20, the runs being short (10 to 30 ms).
LATENCY_RUNS = 100
#: Fields a run must have to be kept when the script resumes.
COMPLETE_FIELDS = ("per_row", "macs_kept_s128", "macs_kept_s32", "latency", "per_layer")
#: The per-layer MatMuls whose output widths give the units left: ``(layer, kind)`` from a node name.
UNIT_NODE = re.compile(r"/layer\.(\d+)/(?:attention/self/(query|key|value)|(intermediate)/dense)/MatMul$")


# ---------------------------------------------------------------------------------------------------
# Pure helpers: the metrics on logits, the units per layer, the comparisons, the run order.


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def per_row_metrics(ref: np.ndarray, got: np.ndarray, intended: np.ndarray) -> dict[str, np.ndarray]:
    """Per reaction: label agreement, correctness, KL divergence and relative L2 error of the logits.

    Args:
        ref: The original model's logits, ``[N, classes]``.
        got: The compressed model's logits on the same rows.
        intended: The intended class of each row, ``[N]``.

    Returns:
        ``agree`` (1 where both arg-max labels match), ``correct`` (1 where ``got``'s label is the
        intended class), ``kl`` (``KL(softmax(ref) || softmax(got))``, nats) and ``rel_l2``
        (``||got - ref|| / ||ref||``), each ``[N]``.
    """
    ref64, got64 = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref64.shape != got64.shape or ref64.ndim != 2 or len(intended) != len(ref64):
        raise ValueError(f"shapes differ: {ref64.shape}, {got64.shape}, {len(intended)} labels")
    label = got64.argmax(axis=1)
    p = softmax(ref64)
    log_p = ref64 - ref64.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = got64 - got64.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return {
        "agree": (label == ref64.argmax(axis=1)).astype(np.float64),
        "correct": (label == np.asarray(intended)).astype(np.float64),
        "kl": np.maximum((p * (log_p - log_q)).sum(axis=1), 0.0),
        "rel_l2": np.linalg.norm(got64 - ref64, axis=1) / np.maximum(np.linalg.norm(ref64, axis=1), 1e-30),
    }


def summary_of(per_row: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Means over the rows of :func:`per_row_metrics`' values, and the largest KL divergence."""
    return {
        "agreement": float(np.mean(per_row["agree"])),
        "accuracy": float(np.mean(per_row["correct"])),
        "kl_mean": float(np.mean(per_row["kl"])),
        "kl_max": float(np.max(per_row["kl"])),
        "rel_l2_mean": float(np.mean(per_row["rel_l2"])),
    }


def joined_row(input_ids: np.ndarray, attention_mask: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """One row of ``length`` real tokens without padding, from padded tokenised rows.

    The first row's first token (``[CLS]``) and its last real token (``[SEP]``) frame the other rows'
    inner tokens, joined in order and truncated to fit.

    Args:
        input_ids: ``[N, S]`` token ids.
        attention_mask: ``[N, S]``, 1 on real tokens.
        length: Tokens in the row.

    Returns:
        ``{"input_ids", "attention_mask"}``, each ``[1, length]`` int64 (the mask all ones).
    """
    rows = [ids[mask.astype(bool)] for ids, mask in zip(input_ids, attention_mask, strict=True)]
    first, last = int(rows[0][0]), int(rows[0][-1])
    inner = np.concatenate([row[1:-1] for row in rows])
    if len(inner) < length - 2:
        raise ValueError(f"{len(inner)} real tokens, fewer than the {length - 2} wanted")
    ids = np.concatenate([[first], inner[: length - 2], [last]]).astype(np.int64)[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def units_per_layer(channels: Mapping[str, int]) -> list[dict[str, int | None]]:
    """Widths of each layer's query, key, value and FFN-input MatMuls, by node name.

    Args:
        channels: Output channels by node name (``ModelFigures.layers``' ``channels``).

    Returns:
        One entry per layer (``layer``, ``query``, ``key``, ``value``, ``ffn``), in layer order; a
        width whose node is missing is None.
    """
    layers: dict[int, dict[str, int | None]] = {}
    for name, width in channels.items():
        match = UNIT_NODE.search(name)
        if match is None:
            continue
        index, kind = int(match.group(1)), match.group(2) or "ffn"
        entry = layers.setdefault(
            index, {"layer": index, "query": None, "key": None, "value": None, "ffn": None}
        )
        entry[kind] = int(width)
    return [layers[i] for i in sorted(layers)]


def removed_per_layer(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Heads and FFN neurons removed per layer, from :func:`units_per_layer` before and after.

    A head is counted removed when its ``HEAD_SIZE`` columns left the query, key and value MatMuls
    alike; ``heads_consistent`` is False where the three widths differ (the query's is counted then).

    Returns:
        ``heads_removed`` and ``ffn_removed`` (one count per layer, None where a node is missing),
        their totals, and ``heads_consistent``.
    """
    after_by = {entry["layer"]: entry for entry in after}
    heads: list[int | None] = []
    ffn: list[int | None] = []
    consistent = True
    for old in before:
        new = after_by.get(old["layer"], {})
        widths = [new.get(kind) for kind in ("query", "key", "value")]
        if widths[0] is None or old["query"] is None:
            heads.append(None)
        else:
            heads.append((old["query"] - widths[0]) // HEAD_SIZE)
            consistent &= len(set(widths)) == 1 and widths[0] % HEAD_SIZE == 0
        ffn.append(None if new.get("ffn") is None or old["ffn"] is None else old["ffn"] - new["ffn"])
    return {
        "heads_removed": heads,
        "ffn_removed": ffn,
        "heads_removed_total": sum(h for h in heads if h is not None),
        "ffn_removed_total": sum(f for f in ffn if f is not None),
        "heads_consistent": consistent,
    }


def other_layers_changed(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, list[int]]:
    """Weighted layers outside the per-layer attention / FFN MatMuls whose output width changed."""
    return {
        name: [int(width), int(after[name])]
        for name, width in before.items()
        if name in after and after[name] != width and UNIT_NODE.search(name) is None
    }


def comparisons(
    runs: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]], ours: str = "calibrated"
) -> list[dict[str, Any]]:
    """Paired bootstrap intervals of ``ours`` minus each baseline, and minus ``calibrated-norefit``.

    Args:
        runs: red_onnx runs (with ``per_row`` where evaluated).
        baselines: Baseline runs (with ``per_row`` where they pruned something).
        ours: The red_onnx setting compared.

    Returns:
        One entry per (target, other run) with both evaluated: the differences in agreement and in KL
        divergence (``ours - other``), each with its 95% interval, and the MACs kept of both.
    """
    mine = {row["target"]: row for row in runs if row.get("setting") == ours and "per_row" in row}
    others = [row for row in runs if row.get("setting") == "calibrated-norefit"] + list(baselines)
    out = []
    for other in others:
        me = mine.get(other.get("target"))
        if me is None or "per_row" not in other:
            continue
        a, b = me["per_row"], other["per_row"]
        out.append({
            "target": other["target"], "ours": me["label"], "other": other["label"],
            "ours_macs_kept_s128": me.get("macs_kept_s128"),
            "other_macs_kept_s128": other.get("macs_kept_s128"),
            "other_matched": other.get("bisection", {}).get("matched", True),
            "agreement_difference": te.paired_bootstrap(a["agree"], b["agree"]),
            "kl_difference": te.paired_bootstrap(a["kl"], b["kl"]),
        })  # fmt: skip
    return out


def run_order(targets: Sequence[float], settings: Sequence[str]) -> list[tuple[float, str]]:
    """``(target, setting)`` pairs: targets in the order given, the settings of ``LAST`` after all others."""
    first = [(t, s) for t in targets for s in settings if s not in LAST]
    return first + [(t, s) for s in LAST if s in settings for t in targets]


def is_complete(row: Mapping[str, Any]) -> bool:
    """Whether a stored run needs no new run: no error, and every field this script records now."""
    if "error" in row:
        return False
    return row.get("status") == "pruned nothing" or all(name in row for name in COMPLETE_FIELDS)


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def markdown(data: Mapping[str, Any]) -> str:
    """The results as a Markdown table: one row per run, red_onnx's and the baselines', by target."""
    head = ("| target | setting | MACs kept [1,128] / [1,32] | agreement | accuracy | KL mean | rel L2 "
            "| latency ratio s32 / s128 | heads / FFN removed | seconds |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    rank = {name: i for i, name in enumerate(SETTINGS)}
    rows = sorted([*data.get("runs", []), *data.get("baselines", [])],
                  key=lambda r: (-r["target"], rank.get(r["setting"], len(rank))))  # fmt: skip
    for row in rows:
        latency = row.get("latency", {})
        if "error" in row:
            lines.append(f"| {row['target']} | {row['setting']} | error: {row['error']} | | | | | | | |")
            continue
        if row.get("status") == "pruned nothing":
            lines.append(f"| {row['target']} | {row['setting']} | pruned nothing | | | | | | | "
                         f"{_fmt(row.get('seconds'), '.0f')} |")  # fmt: skip
            continue
        unmatched = " (not matched)" if row.get("status") == "target not reached" else ""
        macs = (
            f"{_fmt(row.get('macs_kept_s128'), '.3f')} / {_fmt(row.get('macs_kept_s32'), '.3f')}{unmatched}"
        )
        ratios = [_fmt(latency.get(str(n), {}).get("ratio"), ".2f") for n in LATENCY_SEQS]
        lines.append(
            f"| {row['target']} | {row['setting']} "
            f"| {macs} "
            f"| {_fmt(row.get('agreement'), '.3f')} | {_fmt(row.get('accuracy'), '.3f')} "
            f"| {_fmt(row.get('kl_mean'), '.4f')} | {_fmt(row.get('rel_l2_mean'), '.3f')} "
            f"| {' / '.join(ratios)} "
            f"| {row.get('heads_removed_total', '-')} / {row.get('ffn_removed_total', '-')} "
            f"| {_fmt(row.get('seconds'), '.0f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Running and measuring models.


def logits_of(model: Any, feeds: Mapping[str, np.ndarray], batch: int = EVAL_BATCH) -> np.ndarray:
    """The ``logits`` of ``model`` (a path or a ModelProto) on ``feeds``, in batches."""
    sess = te.session(model)
    n = len(feeds["input_ids"])
    return np.concatenate([sess.run(["logits"], {k: v[i : i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)])  # fmt: skip


@functools.cache
def _test_rows() -> dict[str, np.ndarray]:
    return {k: v for k, v in np.load(DATA / "test.npz").items()}


def feed_of(length: int) -> dict[str, np.ndarray]:
    """One row of ``length`` real test-reaction tokens, no padding (:func:`joined_row`)."""
    rows = _test_rows()
    return joined_row(rows["input_ids"], rows["attention_mask"], length)


def figures_at(model: Any, length: int) -> Any:
    """``metrics.measure`` of ``model`` at ``[1, length]`` inputs, with measured MatMul shapes."""
    from red_onnx.measure import metrics

    feed = feed_of(length)
    shapes = {name: tuple(array.shape) for name, array in feed.items()}
    return metrics.measure(model, shapes, known=te.measured_shapes(model, feed))


def _channels(figures: Any) -> dict[str, int]:
    return {name: layer.channels for name, layer in figures.layers.items()}


class Timer:
    """Times compressed models against the original, interleaved, at each of ``LATENCY_SEQS``."""

    def __init__(self, original: Any, runs: int = LATENCY_RUNS) -> None:
        self.original = te.session(original, optimized=True)
        self.runs = runs
        self.feeds = {length: feed_of(length) for length in LATENCY_SEQS}

    def __call__(self, model: Any) -> dict[str, Any]:
        """``{str(length): latency_summary(...)}`` for ``model`` against the original."""
        sess = te.session(model, optimized=True)
        out = {}
        for length, feed in self.feeds.items():
            runners = [
                functools.partial(self.original.run, None, feed),
                functools.partial(sess.run, None, feed),
            ]
            a, b = te.interleaved_times(runners, runs=self.runs)
            out[str(length)] = te.latency_summary(a, b)
        return out


def measure_model(model: Any, base: Mapping[int, Any], timer: Timer | None) -> dict[str, Any]:
    """MACs and parameters kept, units removed per layer, other layers changed, latency.

    Args:
        model: The compressed model.
        base: The original's figures by sequence length.
        timer: Times the model against the original; None skips the timing.
    """
    row: dict[str, Any] = {}
    for length in MACS_SEQS:
        figures = figures_at(model, length)
        row[f"macs_kept_s{length}"] = figures.macs / base[length].macs
        if length == SEQ:
            row["params_kept"] = figures.params / base[length].params
            before, after = _channels(base[length]), _channels(figures)
            row["per_layer"] = units_per_layer(after)
            row |= removed_per_layer(units_per_layer(before), row["per_layer"])
            row["other_layers_changed"] = other_layers_changed(before, after)
    if timer is not None:
        row["latency"] = timer(model)
    return row


def run_baseline(
    setting: str, target: float, model: Any, calibration: list[dict[str, np.ndarray]], base: Mapping[int, Any]
) -> tuple[dict[str, Any], Any]:
    """Prune ``model`` with a baseline at the sparsity whose MACs kept at ``[1, 128]`` match ``target``.

    Returns:
        The row (notes, status, sparsity, bisection, MACs kept) and the pruned model (None if it pruned
        nothing).
    """
    prune, notes = te.baseline_pruner(setting, model, calibration)
    row: dict[str, Any] = {k: v.replace("this script", "bench/text_encoder.py") for k, v in notes.items()}
    best: dict[str, Any] = {}

    def kept_at(s: float) -> float:
        pruned = prune(s)
        kept = figures_at(pruned, SEQ).macs / base[SEQ].macs
        if not best or abs(kept - target) < abs(best["kept"] - target):
            best.update(kept=kept, model=pruned)
        return kept

    found = te.bisect_sparsity(kept_at, target)
    row["sparsity"] = found.sparsity
    row["bisection"] = {"matched": found.matched, "steps": len(found.trace),
                        "trace": [[round(s, 6), round(k, 6)] for s, k in found.trace]}  # fmt: skip
    row["macs_kept"] = found.macs_kept
    if found.macs_kept >= 1 - 1e-9:
        row["status"] = "pruned nothing"
        return row, None
    row["status"] = "ok" if found.matched else "target not reached"
    return row, best["model"]


def _load_old(path: Path, fresh: bool) -> dict[str, dict[str, dict[str, Any]]]:
    if fresh or not path.exists():
        return {"runs": {}, "baselines": {}}
    data = json.loads(path.read_text())
    return {key: {r["label"]: r for r in data.get(key, [])} for key in ("runs", "baselines")}


def _order(rows: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rank = {name: i for i, name in enumerate(SETTINGS)}
    return sorted(rows.values(), key=lambda r: (-r["target"], rank.get(r["setting"], len(rank)), r["label"]))


def _line(row: Mapping[str, Any]) -> str:
    latency = row.get("latency", {})
    return (
        f"{row['label']}: {row.get('status', '')} sparsity {_fmt(row.get('sparsity'), '.4f')} "
        f"macs {_fmt(row.get('macs_kept'), '.3f')} (s128 {_fmt(row.get('macs_kept_s128'), '.3f')}, "
        f"s32 {_fmt(row.get('macs_kept_s32'), '.3f')}) heads -{row.get('heads_removed_total', '-')} "
        f"ffn -{row.get('ffn_removed_total', '-')} agree {_fmt(row.get('agreement'), '.3f')} "
        f"acc {_fmt(row.get('accuracy'), '.3f')} kl {_fmt(row.get('kl_mean'), '.4f')} "
        f"latency x{_fmt(latency.get('32', {}).get('ratio'), '.3f')} (s32) "
        f"x{_fmt(latency.get(str(SEQ), {}).get('ratio'), '.3f')} (s128) ({row.get('seconds')} s)"
        f"{' ERROR ' + row['error'] if 'error' in row else ''}"
        f"{' MEASURE ERROR ' + row['measure_error'] if 'measure_error' in row else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--fresh", action="store_true", help="drop earlier runs from the results file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--latency-runs", type=int, default=LATENCY_RUNS, help="timed runs per model and length")
    args = ap.parse_args(argv)
    missing = [p for p in (MODEL, DATA / "calibration.npz", DATA / "test.npz", DATA / "predictions.json")
               if not p.exists()]  # fmt: skip
    if missing:
        raise SystemExit(f"{missing[0]} is missing: run bench/models/export_rxn_classifier.py first")

    import onnx
    import onnxruntime as ort
    import onnxsim

    calib_path = DATA / "calibration.npz"
    calib = {k: v for k, v in np.load(calib_path).items()}
    test = _test_rows()
    predictions = json.loads((DATA / "predictions.json").read_text())
    test_answers = [r for r in predictions["reactions"] if r["split"] == "test"]
    intended = np.array([r["intended"] for r in test_answers])
    if len(intended) != len(test["input_ids"]):
        raise SystemExit(
            f"predictions.json has {len(intended)} test reactions, test.npz {len(test['input_ids'])}"
        )
    calibration = [calib]  # one batch of all the calibration rows, for onnxsim

    original = onnx.load(str(MODEL))
    ref = logits_of(MODEL, test)
    ref_labels = ref.argmax(axis=1)
    base = {length: figures_at(original, length) for length in MACS_SEQS}
    timer = Timer(original, args.latency_runs) if args.latency_runs > 0 else None
    latency_aa = timer(original) if timer is not None else None

    old = _load_old(args.out, args.fresh)
    rows: dict[str, dict[str, dict[str, Any]]] = {key: dict(old[key]) for key in old}
    result: dict[str, Any] = {
        "model": "rxnfp bert_ft_10k_25s (BERT, 12 layers, hidden 256, 4 heads of 64, FFN 512, 50 reaction "
                 "classes)",
        "source": "PyPI rxnfp==0.1.0 (bench/models/export_rxn_classifier.py)",
        "onnx": MODEL.name, "sequence_length": SEQ,
        "calibration": len(calib["input_ids"]), "test": len(test["input_ids"]),
        "original_accuracy_test": float(np.mean(ref_labels == intended)),
        "original_labels_match_predictions_json": bool(
            np.array_equal(ref_labels, [r["label"] for r in test_answers])),
        "metrics": {"agreement": "arg-max label equal to the original's",
                    "accuracy": "arg-max label equal to the intended class",
                    "kl_mean": "mean over reactions of KL(softmax(original) || softmax(compressed)), nats",
                    "rel_l2_mean": "mean over reactions of ||logits - original|| / ||original||"},
        "original_macs": {str(length): base[length].macs for length in MACS_SEQS},
        "original_params": base[SEQ].params,
        "original_per_layer": units_per_layer(_channels(base[SEQ])),
        "macs_tolerance": te.MACS_TOLERANCE,
        "onnxsim_calibration": f"the {len(calib['input_ids'])} calibration rows as one batch",
        "latency_method": {"onnxruntime": ort.__version__, "graph_optimization": "ORT_ENABLE_ALL",
                           "intra_op_threads": te.THREADS, "batch": 1, "warmup": te.LATENCY_WARMUP,
                           "runs": args.latency_runs, "order": "original and compressed alternating",
                           "sequence_lengths": list(LATENCY_SEQS), "cpu_count": os.cpu_count()},
        "latency_original_vs_itself": latency_aa,
        "onnxsim": getattr(onnxsim, "__version__", None),
        "bootstrap": {"resamples": te.BOOTSTRAP_RESAMPLES, "seed": te.BOOTSTRAP_SEED,
                      "paired_over": "test reactions"},
        "runs": [], "baselines": [], "comparisons": [],
    }  # fmt: skip

    def save() -> None:
        result["runs"], result["baselines"] = _order(rows["runs"]), _order(rows["baselines"])
        result["comparisons"] = comparisons(result["runs"], result["baselines"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    shapes = {name: (1, SEQ) for name in INPUTS}
    for target, setting in run_order(args.targets, args.settings):
        label = f"{setting}@{target}"
        key = "runs" if setting in OURS else "baselines"
        if label in rows[key] and is_complete(rows[key][label]):
            print(f"{label}: kept from {args.out}")
            continue
        row: dict[str, Any] = {"label": label, "setting": setting, "target": target}
        t0 = time.perf_counter()
        try:
            if setting in OURS:
                out = te.compress_ours(MODEL, setting, target, shapes, calib_path)
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row.update(te.summarize(out.report))
                model = out.model
            else:
                found, model = run_baseline(setting, target, original, calibration, base)
                row.update(found)
                row["seconds"] = round(time.perf_counter() - t0, 1)
            if model is not None:
                per_row = per_row_metrics(ref, logits_of(model, test), intended)
                row.update(summary_of(per_row))
                row["per_row"] = {"agree": per_row["agree"].astype(int).tolist(),
                                  "correct": per_row["correct"].astype(int).tolist(),
                                  "kl": [float(f"{x:.6g}") for x in per_row["kl"]],
                                  "rel_l2": [float(f"{x:.6g}") for x in per_row["rel_l2"]]}  # fmt: skip
                try:  # the compression is kept in the file even if the measuring fails
                    row.update(measure_model(model, base, timer))
                except Exception as error:
                    row["measure_error"] = te.first_line(error)
            del model
        except Exception as error:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["error"] = te.first_line(error)
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
        rows[key][label] = row
        save()
        print(_line(row), flush=True)
    if timer is not None:
        result["latency_original_vs_itself_end"] = timer(original)
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
