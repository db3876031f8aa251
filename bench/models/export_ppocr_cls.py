"""PP-OCR's text-direction classifier at its pipeline's input size, and the text-line crops it is run on.

Run from the repository root, after ``python bench/zoo.py`` (needs the zoo's PP-OCR models and
rapidocr-onnxruntime sources, Pillow, OpenCV and scikit-image: the ``test`` extra)::

    python bench/models/export_ppocr_cls.py

The classifier (``ch_ppocr_mobile_v2.0_cls``, a MobileNetV3-style net: depthwise convs, SE blocks,
hard-swish; 2 classes, upright or turned 180°) is a mobile net ``bench/compare.py`` was not tuned on.
Writes into the bench cache (``RED_ONNX_BENCH``, default ``~/.cache/red-onnx/bench``):

- ``ppocr_cls.onnx``: the zoo's ``ppocr_mobile_cls.onnx`` with its input declared
  ``x`` float32 [batch, 3, 48, 192] (the wheel declares [-1, 3, ?, ?]; rapidocr always feeds 48 x 192,
  ``cls_image_shape``), so MACs are counted at the size it runs at. Nothing else changes.
- ``ppocr_cls_views.npz``: ``x`` float32 [N, 3, 48, 192], the text lines that rapidocr's own detector
  (the zoo's PP-OCRv4 det) finds in Pillow-rendered lines (``bench.tasks.OCR_LINES`` and six more, at
  four font sizes) and in ``skimage.data.page()``, cropped and normalised by rapidocr's own code, each
  upright and turned 180°; ``label`` int64 [N]: 0 upright, 1 turned (the truth; fidelity in
  ``bench/compare.py`` is top-1 agreement with the original model).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` and `red_onnx` from a checkout
from bench.data import cache_dir
from bench.tasks import OCR_LINES, rendered_lines, scanned_page, zoo_module
from bench.zoo import zoo_dir

LOG = logging.getLogger("export_ppocr_cls")

HEIGHT, WIDTH = 48, 192
MORE_LINES: tuple[str, ...] = (
    "Meeting moved to Thursday at 10:30",
    "Order #58213 shipped via express mail",
    "Temperature 21.5 C, humidity 43 %",
    "Please keep this receipt for returns",
    "Open Monday to Friday, 9 am - 5 pm",
    "Version 3.2.1 released on 2023-11-02",
)
FONT_SIZES = (18, 24, 32, 40)


def fixed_shape_model(source: Path) -> onnx.ModelProto:
    """The classifier with input ``x`` declared [batch, 3, 48, 192] and output [batch, 2]."""
    model = onnx.load(str(source))
    (graph_input,) = [value for value in model.graph.input if value.name == "x"]
    for dim, value in zip(graph_input.type.tensor_type.shape.dim, ("batch", 3, HEIGHT, WIDTH), strict=True):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    for output in model.graph.output:
        output.type.tensor_type.shape.dim[0].Clear()
        output.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(model, full_check=True)
    return model


def text_line_views() -> tuple[np.ndarray, np.ndarray]:
    """Detected text-line crops, normalised as rapidocr does, upright then turned: ``(x, label)``."""
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    zoo = zoo_dir()
    engine = zoo_module("rapidocr_onnxruntime").RapidOCR(
        det_model_path=str(zoo / "ppocrv4_det.onnx"),
        cls_model_path=str(zoo / "ppocr_mobile_cls.onnx"),
        rec_model_path=str(zoo / "ppocrv4_rec.onnx"),
    )
    images = [rendered_lines(OCR_LINES + MORE_LINES, size) for size in FONT_SIZES] + [scanned_page()]
    crops = []
    for rgb in images:
        bgr, _, _ = engine.preprocess(np.ascontiguousarray(rgb[:, :, ::-1]))  # rapidocr's own steps
        bgr, _ = engine.maybe_add_letterbox(bgr, {})
        boxes, _ = engine.auto_text_det(bgr)
        crops += engine.get_crop_img_list(bgr, boxes or [])
    turned = [np.ascontiguousarray(crop[::-1, ::-1]) for crop in crops]
    x = np.stack([engine.text_cls.resize_norm_img(crop) for crop in crops + turned]).astype(np.float32)
    label = np.repeat(np.array([0, 1], dtype=np.int64), len(crops))
    return x, label


def main() -> int:
    """Write the fixed-shape classifier and its views into the bench cache."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    source = zoo_dir() / "ppocr_mobile_cls.onnx"
    if not source.is_file():
        raise SystemExit(f"{source} is missing; run `python bench/zoo.py` first")
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(fixed_shape_model(source), str(target / "ppocr_cls.onnx"))
    x, label = text_line_views()
    np.savez(target / "ppocr_cls_views.npz", x=x, label=label)
    LOG.info("%d views (%d text lines, upright and turned) in %.1f s", len(x), len(x) // 2,
             time.perf_counter() - start)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
