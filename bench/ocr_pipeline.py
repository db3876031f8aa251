"""PP-OCRv4 detection and recognition compressed with calibration, checked by the whole OCR pipeline.

Each compressed model runs inside rapidocr-onnxruntime 1.4.4's det → cls → rec pipeline (its own pre- and
post-processing, the other two models original) on rendered test pages, and the lines it reads are
compared with the lines the original pipeline reads, line by line. At each fraction of the MACs kept:

* red_onnx calibrated (``calibration`` npz built below, least-squares refit) and with ``--no-refit``
  ("merges only"), both with ``--force-target`` and no latency check;
* onnxsim 0.8.1's calibrated ``apply_structured_wanda_pruning`` on the same calibration samples, bisected on
  its sparsity to the MACs the red_onnx run reached.

Test pages: ``TEST_LINES`` lines of test words (``bench.data``) in the test fonts and sizes,
``LINES_PER_PAGE`` per page. Calibration: pages of other words in other fonts and sizes, run through
the original pipeline; what its detector and recogniser receive is recorded (rapidocr's own
preprocessing), the detector's inputs cut into ``DET_TILE``-pixel tiles, the recogniser's crops resized
as rapidocr does to 48 × 320.

Usage (needs ``python bench/zoo.py`` and onnxsim 0.8.1)::

    python bench/ocr_pipeline.py                         # writes bench/results/ocr_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import (
    CALIBRATION_FONT_SIZES,
    CALIBRATION_FONTS,
    CALIBRATION_WORDS,
    TEST_FONT_SIZES,
    TEST_FONTS,
    TEST_WORDS,
    _font,
    cache_dir,
    paired_bootstrap_ci,
    text_strings,
)
from bench.refit_grid import red_onnx_commit
from bench.tasks import OcrModels, zoo_module
from bench.zoo import zoo_dir

#: Test lines and lines per rendered page. On 200 lines one run read 1.000 of the lines (det at 0.85
#: of its MACs) and 0.970 (rec); the same models on 600 lines 0.985 and 0.975: a few lines either way.
TEST_LINES = 600
LINES_PER_PAGE = 8
#: Calibration pages; each gives its lines to the recogniser and tiles to the detector.
CALIBRATION_PAGES = 40
#: Calibration samples per model (search, cv and held-out parts are red_onnx's own split of these).
#: The recogniser's lines read 0.97 of the test lines as the original did (spaces ignored) at MACs
#: 0.85 with 128, 0.985 with 256 (on 200 test lines); a detector tile is 22 times the work of a line crop.
CALIBRATION_SAMPLES = {"det": 128, "rec": 256}
#: Side of the detector's calibration tiles, cut from its preprocessed input (rapidocr scales pages so
#: the short side is 736 px).
DET_TILE = 320
#: The recogniser's input shape as rapidocr configures it (``rec_img_shape``).
REC_SHAPE = (3, 48, 320)
TARGETS = (0.9, 0.85)
METHODS = ("refit", "refit + sequential", "merges only", "onnxsim Wanda")
RESULTS = Path(__file__).parent / "results" / "ocr_pipeline.json"
WORK = cache_dir() / "ocr_pipeline"
log = logging.getLogger("ocr_pipeline")


def zoo_models() -> OcrModels:
    """The zoo's PP-OCRv4 det, mobile cls and PP-OCRv4 rec."""
    root = zoo_dir()
    return OcrModels(root / "ppocrv4_det.onnx", root / "ppocr_mobile_cls.onnx", root / "ppocrv4_rec.onnx")


def render_page(
    lines: list[str], rng: np.random.Generator, fonts: tuple, sizes: tuple
) -> tuple[np.ndarray, list[float]]:
    """``lines`` drawn one under the other, each in a seeded font, size and grey.

    Returns:
        ``(page, centres)``: RGB uint8 [H, W, 3] and the vertical centre of each line's ink, in pixels.
    """
    from PIL import Image, ImageDraw

    chosen = [(fonts[int(rng.integers(len(fonts)))], int(sizes[int(rng.integers(len(sizes)))]))
              for _ in lines]  # fmt: skip
    height = sum(round(1.9 * size) for _, size in chosen) + 48
    width = max(_font(name, size).getbbox(text)[2] for text, (name, size) in zip(lines, chosen, strict=True))
    image = Image.new("L", (width + 96, height), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(image)
    top, centres = 24, []
    for text, (name, size) in zip(lines, chosen, strict=True):
        indent = int(rng.integers(16, 64))
        font = _font(name, size)
        draw.text((indent, top), text, fill=int(rng.integers(0, 70)), font=font)
        box = font.getbbox(text)
        centres.append(top + (box[1] + box[3]) / 2)
        top += round(1.9 * size)
    return np.repeat(np.asarray(image)[:, :, None], 3, axis=2), centres


def pages(
    count: int, words: tuple[str, ...], fonts: tuple, sizes: tuple, seed: int
) -> tuple[list, list, list]:
    """``count`` seeded lines of ``words``, ``LINES_PER_PAGE`` to a page.

    Returns:
        ``(pages, lines of each page, line centres of each page)``.
    """
    strings = text_strings(count, words, seed=seed)
    rng = np.random.default_rng(seed + 100)
    groups = [strings[i : i + LINES_PER_PAGE] for i in range(0, count, LINES_PER_PAGE)]
    rendered = [render_page(group, rng, fonts, sizes) for group in groups]
    return [page for page, _ in rendered], groups, [centres for _, centres in rendered]


def engine(models: OcrModels) -> Any:
    """A rapidocr pipeline on ``models``."""
    RapidOCR = zoo_module("rapidocr_onnxruntime").RapidOCR  # noqa: N806 (a class)
    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    return RapidOCR(det_model_path=str(models.det), cls_model_path=str(models.cls),
                    rec_model_path=str(models.rec))  # fmt: skip


def read_pages(models: OcrModels, images: list[np.ndarray]) -> list[list[tuple[float, str]]]:
    """Per page, each read line as (vertical centre of its box, text), top to bottom."""
    ocr = engine(models)
    read = []
    for image in images:
        result, _ = ocr(np.ascontiguousarray(image[:, :, ::-1]))  # rapidocr takes BGR like cv2.imread
        lines = [(float(np.mean([point[1] for point in box])), text) for box, text, _ in result or []]
        read.append(sorted(lines))
    return read


def by_line(read: list[tuple[float, str]], centres: list[float]) -> list[str]:
    """The text read for each rendered line: the boxes whose centre is nearest its centre, left to right."""
    texts: list[list[str]] = [[] for _ in centres]
    for centre, text in read:
        texts[int(np.argmin([abs(centre - c) for c in centres]))].append(text)
    return [" ".join(parts) for parts in texts]


def capture_calibration(
    models: OcrModels, images: list[np.ndarray], samples: dict[str, int], seed: int
) -> dict[str, np.ndarray]:
    """What the original pipeline's detector and recogniser receive on ``images``, as calibration arrays.

    Returns:
        ``{"det": [samples["det"], 3, DET_TILE, DET_TILE], "rec": [samples["rec"], 3, 48, 320]}``
        float32, seeded.
    """
    ocr = engine(models)
    det_inputs: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    session = ocr.text_det.infer
    recognise = ocr.text_rec

    def det_session(inputs: np.ndarray) -> Any:
        det_inputs.append(np.asarray(inputs))
        return session(inputs)

    def rec_call(img_list: Any, *args: Any, **kwargs: Any) -> Any:
        crops.extend(img_list if isinstance(img_list, list) else [img_list])
        return recognise(img_list, *args, **kwargs)

    ocr.text_det.infer = det_session
    ocr.text_rec = rec_call  # an instance attribute: rapidocr calls self.text_rec(...) unbound
    for image in images:
        ocr(np.ascontiguousarray(image[:, :, ::-1]))
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(samples["det"]):
        page = det_inputs[int(rng.integers(len(det_inputs)))][0]
        top = int(rng.integers(0, max(page.shape[1] - DET_TILE, 0) + 1))
        left = int(rng.integers(0, max(page.shape[2] - DET_TILE, 0) + 1))
        tile = np.zeros((3, DET_TILE, DET_TILE), np.float32) + page[:, :1, :1]  # pad with the background
        cut = page[:, top : top + DET_TILE, left : left + DET_TILE]
        tile[:, : cut.shape[1], : cut.shape[2]] = cut
        tiles.append(tile)
    recogniser = zoo_module("rapidocr_onnxruntime.ch_ppocr_rec.text_recognize").TextRecognizer
    shaped = SimpleNamespace(rec_image_shape=list(REC_SHAPE))
    if len(crops) < samples["rec"]:
        asked = samples["rec"]
        raise ValueError(f"{len(crops)} line crops for {asked} recogniser samples: render more pages")
    order = rng.permutation(len(crops))[: samples["rec"]]
    rec = [recogniser.resize_norm_img(shaped, crops[i], REC_SHAPE[2] / REC_SHAPE[1]) for i in order]
    return {"det": np.stack(tiles).astype(np.float32), "rec": np.stack(rec).astype(np.float32)}


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


def macs_at(model: onnx.ModelProto, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of ``model`` on one input of ``shape`` (red_onnx's counter)."""
    from red_onnx.measure.metrics import measure

    return measure(model, {model.graph.input[0].name: shape}).macs


def compress_red(
    path: Path, calibration: Path, target: float, refit: bool, sequential: bool = False
) -> tuple[onnx.ModelProto, dict]:
    """red_onnx on ``calibration`` at ``target`` (``--force-target``, no latency check;
    ``sequential``: ``--sequential-refit``)."""
    from red_onnx import InputSpec, compress

    started = time.perf_counter()
    result = compress(str(path), target_macs=target, input_spec=InputSpec(npz=calibration), refit=refit,
                      force_target=True, latency_check=False, raise_on_failure=False,
                      sequential_refit=sequential)  # fmt: skip
    budget = result.report.budget or {}
    chosen = [group["ordering"] for group in budget.get("groups", []) if group.get("removed")]
    return result.model, {
        "macs": result.report.macs_after / result.report.macs_before,
        "search_error": budget.get("error"), "heldout_error": budget.get("heldout_error"),
        "orderings": {name: chosen.count(name) for name in sorted(set(chosen))},
        "seconds": round(time.perf_counter() - started, 1),
    } | ({"correction": _correction(budget["correction"])} if "correction" in budget else {})  # fmt: skip


def _correction(summary: dict[str, Any]) -> dict[str, Any]:
    """The sequential refit's figures of a run's report (``budget.correction``), without its layers."""
    return {key: value for key, value in summary.items() if key not in ("layers", "skipped")}


def wanda_to_macs(
    path: Path, batches: list[dict[str, np.ndarray]], fraction: float, shape: tuple[int, ...]
) -> tuple[onnx.ModelProto, dict]:
    """onnxsim's calibrated Wanda pruning, its sparsity bisected until the MACs kept are nearest ``fraction``.

    The BatchNorm-folded model is pruned (the only form onnxsim prunes); MACs are counted on ``shape``.
    """
    import onnxsim

    from red_onnx import compress

    started = time.perf_counter()
    original = onnx.load(str(path))
    base = macs_at(original, shape)
    folded = compress(original, exact=True).model
    low, high, best = 0.0, 0.95, None
    for _ in range(WANDA_STEPS):
        sparsity = (low + high) / 2
        pruned = onnxsim.apply_structured_wanda_pruning(folded, calibration_data=batches, sparsity=sparsity)
        kept = macs_at(pruned, shape) / base
        if best is None or abs(kept - fraction) < abs(best[2] - fraction):
            best = (pruned, sparsity, kept)
        if abs(kept - fraction) <= WANDA_TOLERANCE:
            break
        low, high = (sparsity, high) if kept > fraction else (low, sparsity)
    assert best is not None
    return best[0], {"macs": best[2], "sparsity": round(best[1], 4), "bisected_to": fraction,
                     "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


#: Bisection steps and the MACs gap at which onnxsim's sparsity is taken.
WANDA_STEPS = 12
WANDA_TOLERANCE = 0.003


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def squeeze(text: str) -> str:
    """``text`` without spaces: PP-OCRv4's recogniser reads Latin word gaps unreliably (see the doc)."""
    return "".join(text.split())


def fp16_rounded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float32 initializer rounded to float16 and back (as an fp16 deployment)."""
    from onnx import numpy_helper

    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for initializer in rounded.graph.initializer:
        if initializer.data_type == onnx.TensorProto.FLOAT:
            values = numpy_helper.to_array(initializer).astype(np.float16).astype(np.float32)
            initializer.CopyFrom(numpy_helper.from_array(values, initializer.name))
    return rounded


def read_lines(models: OcrModels, test: tuple[list, list, list]) -> list[str]:
    """The text read for each test line, pages in order."""
    images, _, centres = test
    return [text for read, page in zip(read_pages(models, images), centres, strict=True)
            for text in by_line(read, page)]  # fmt: skip


def score(read: list[str], reference: list[str], truth: list[str]) -> tuple[dict, dict]:
    """Lines read as the original reads them (exactly; spaces ignored) and against the rendered truth."""
    pairs = list(zip(read, reference, strict=True))
    same = np.array([a == b for a, b in pairs], np.int8)
    same_squeezed = np.array([squeeze(a) == squeeze(b) for a, b in pairs], np.int8)
    correct = np.array([squeeze(a) == squeeze(b) for a, b in zip(read, truth, strict=True)], np.int8)
    figures = {"identical": float(same.mean()), "identical_ignoring_spaces": float(same_squeezed.mean()),
               "correct_ignoring_spaces": float(correct.mean()),
               "differences": [[b, a] for a, b in pairs if a != b][:8]}  # fmt: skip
    return figures, {"identical": same, "identical_ignoring_spaces": same_squeezed}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

KINDS = {"det": (1, 3, DET_TILE, DET_TILE), "rec": (1, *REC_SHAPE)}


def run(
    targets: list[float], samples: dict[str, int], methods: list[str], out: Path, test_lines: int = TEST_LINES
) -> dict:
    """Every method at every target on det and on rec, then det and rec by red_onnx together."""
    import dataclasses

    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    models = zoo_models()
    test = pages(test_lines, TEST_WORDS, TEST_FONTS, TEST_FONT_SIZES, seed=1)
    truth = [line for page in test[1] for line in page]
    calibration_pages = pages(CALIBRATION_PAGES * LINES_PER_PAGE, CALIBRATION_WORDS, CALIBRATION_FONTS,
                              CALIBRATION_FONT_SIZES, seed=3)  # fmt: skip
    captured = capture_calibration(models, calibration_pages[0], samples, seed=5)
    npz = {}
    for kind, array in captured.items():
        npz[kind] = WORK / f"calibration_{kind}_{samples[kind]}.npz"
        np.savez(npz[kind], x=array)
    reference = read_lines(models, test)
    original, _ = score(reference, reference, truth)
    result: dict[str, Any] = {
        "test_lines": len(truth), "test_pages": len(test[0]), "calibration_pages": len(calibration_pages[0]),
        "calibration_samples": samples, "det_tile": DET_TILE, "rec_shape": list(REC_SHAPE),
        "original": {"correct_ignoring_spaces": original["correct_ignoring_spaces"],
                     "correct_exactly": float(np.mean(np.array(reference) == np.array(truth)))},
        "macs": {kind: macs_at(onnx.load(str(getattr(models, kind))), KINDS[kind]) for kind in KINDS},
        "rows": [], "red_onnx_commit": red_onnx_commit(),
    }  # fmt: skip
    # how many lines a change that deployments make anyway already moves: the original's weights
    # rounded to float16 (nothing removed)
    result["fp16_weights"] = {}
    for kind in KINDS:
        path = WORK / f"{kind}_fp16_weights.onnx"
        onnx.save(fp16_rounded(onnx.load(str(getattr(models, kind)))), str(path))
        figures, _ = score(read_lines(dataclasses.replace(models, **{kind: path}), test), reference, truth)
        result["fp16_weights"][kind] = figures
        log.info("%s with float16-rounded weights: %s", kind, figures)
    for target in targets:
        row: dict[str, Any] = {"target": target, "cells": {}}
        for kind in KINDS:
            vectors: dict[str, dict] = {}
            for method in methods:
                key = f"{kind} {method}"
                try:
                    if method == "onnxsim Wanda":
                        reached = row["cells"].get(f"{kind} refit", {}).get("macs", target)
                        batches = [{"x": captured[kind][i : i + 8]} for i in range(0, samples[kind], 8)]
                        model, info = wanda_to_macs(getattr(models, kind), batches, reached, KINDS[kind])
                    else:
                        refit, sequential = method != "merges only", method == "refit + sequential"
                        model, info = compress_red(
                            getattr(models, kind), npz[kind], target, refit, sequential
                        )
                    path = WORK / f"{kind}_{method.replace(' ', '_')}_{target}.onnx"
                    onnx.save(model, str(path))
                    read = read_lines(dataclasses.replace(models, **{kind: path}), test)
                    figures, vectors[method] = score(read, reference, truth)
                    row["cells"][key] = info | figures | {"path": path.name}
                except Exception as error:  # a failed cell is recorded, the grid goes on
                    row["cells"][key] = {"failed": f"{type(error).__name__}: {error}"}
                log.info("%s %s: %s", target, key, {k: v for k, v in row["cells"][key].items()
                                                      if k != "differences"})  # fmt: skip
            row["cells"].update(intervals(kind, vectors))
        for method in ("refit", "refit + sequential"):
            both = {kind: WORK / f"{kind}_{method.replace(' ', '_')}_{target}.onnx" for kind in KINDS}
            if all(path.is_file() for path in both.values()) and method in methods:
                read = read_lines(dataclasses.replace(models, **both), test)
                row["cells"][f"det+rec {method}"] = score(read, reference, truth)[0]
        result["rows"].append(row)
        result["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def intervals(kind: str, vectors: dict[str, dict]) -> dict[str, dict]:
    """Refit minus each other method, lines identical ignoring spaces and exactly: paired bootstrap CIs."""
    cells = {}
    for other in vectors:
        if other == "refit" or "refit" not in vectors:
            continue
        cells[f"{kind} refit - {other}"] = {
            field: paired_bootstrap_ci(vectors["refit"][field], vectors[other][field])._asdict()
            for field in ("identical_ignoring_spaces", "identical")
        }
    return cells


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="MACs fractions kept")
    parser.add_argument("--det-samples", type=int, default=CALIBRATION_SAMPLES["det"], help="detector tiles")
    parser.add_argument("--rec-samples", type=int, default=CALIBRATION_SAMPLES["rec"], help="line crops")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--test-lines", type=int, default=TEST_LINES, help="rendered test lines")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    samples = {"det": args.det_samples, "rec": args.rec_samples}
    result = run(args.targets, samples, args.methods, args.out, args.test_lines)
    print(json.dumps({"seconds": result["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
