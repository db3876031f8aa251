"""The real zoo models through the approximate pipeline at the default tolerance, checked at their task.

Per model ``compress(path, tolerance=0.02)`` runs once (a module-scoped cache; outputs in tmp), then:
the saved model passes ``onnx.checker``'s full check; every output (YOLOv8n: box coordinates and class
scores apart) stays within the tolerance on inputs neither the search nor the verification saw; and the
model still does its job (``bench/tasks.py``, ``bench/vad.py``): PP-OCR reads the same text, YOLOv8n
finds the same detections, silero-vad streams the same speech probabilities, MobileNetV2 agrees on
top-1. Exact mode: ``tests/test_zoo_exact.py``. Skipped with a reason when the zoo
(``python bench/zoo.py``), the MobileNetV2 export (``bench/models/export_mobilenetv2.py``), espeak-ng or
a test dependency is absent.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from bench.tasks import (
    ZOO_SPECS,
    OcrModels,
    box_iou,
    matched_detections,
    mobilenet_check,
    mobilenet_path,
    ocr_check,
    yolo_check,
)
from bench.vad import TEST_SPEECH, espeak_available, real_inputs, vad_check, vad_windows
from bench.zoo import zoo_dir
from red_onnx import compress
from red_onnx.io.files import save_model
from red_onnx.options import DEFAULT_TOLERANCE, InputSpec
from red_onnx.pipeline import Result
from red_onnx.verify.verifier import Verifier

TOLERANCE = DEFAULT_TOLERANCE
#: Neither the verification (seeds 0, 1) nor the budget search (100-115, 200-215) uses this seed.
HELDOUT_SEED = 3
PPOCR = ("ppocrv4_det.onnx", "ppocr_mobile_cls.onnx", "ppocrv4_rec.onnx")
IMAGE_MODELS = (*PPOCR, "yolov8n_320n.onnx", "mobilenetv2.onnx")
SILERO = ("silero_vad", "silero_vad_op18_ifless", "silero_vad_16k_sequence", "silero_vad_16k_op15",
          "silero_vad_half", "silero_vad_openvino_16k")  # fmt: skip
#: Variants expected to drift beyond 0.02 in streamed speech probability (xfail, strict), with figures.
#: None since the search and the verification measure silero on the calibration stream, each model
#: carrying its own state, and bound every step's change (red_onnx.runtime.stream): 16k_op15 and openvino_16k
#: keep every channel; half merged 5.6% and drifted 0.069 with the stream's relative L2 alone.
SILERO_DRIFT: dict[str, str] = {}


@dataclass
class Run:
    """One compression: the original, the saved result, the run's report and verification inputs."""

    original: Path
    path: Path
    result: Result
    spec: InputSpec


def locate(name: str) -> Path:
    return mobilenet_path() if name == "mobilenetv2.onnx" else zoo_dir() / name


def model_path(name: str) -> Path:
    path = locate(name)
    if not path.is_file():
        how = (
            "python bench/models/export_mobilenetv2.py"
            if name == "mobilenetv2.onnx"
            else "python bench/zoo.py"
        )
        pytest.skip(f"{path} absent; run `{how}` to make it")
    return path


def needs(*modules: str, zoo_sources: bool = True) -> None:
    """Skip unless ``modules`` are installed and (``zoo_sources``) rapidocr's and nudenet's are unpacked."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; run `pip install -e '.[test]'`")
    if zoo_sources and not (zoo_dir() / "python").is_dir():
        pytest.skip(f"rapidocr/nudenet sources absent from {zoo_dir() / 'python'}; run `python bench/zoo.py`")


def silero_inputs(name: str, folder: Path, speech: tuple[str, str] | None = None) -> InputSpec:
    """Real audio chunks (with the state the original carried) as verification inputs."""
    if not espeak_available():
        pytest.skip("espeak-ng not installed (speech for silero-vad); run `apt-get install espeak-ng`")
    original = model_path(f"{name}.onnx")
    target = folder / f"{name}-{'heldout' if speech else 'calibration'}.npz"
    return InputSpec(npz=real_inputs(original, target, *([speech] if speech else [])))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``compressed(name)``: the model through ``compress(tolerance=0.02)``, once per module."""
    runs: dict[str, Run] = {}
    folder = tmp_path_factory.mktemp("zoo-tasks")

    def get(name: str) -> Run:
        if name not in runs:
            file = name if name.endswith(".onnx") else f"{name}.onnx"
            original = model_path(file)
            spec = ZOO_SPECS.get(file) or silero_inputs(name, folder)
            result = compress(original, tolerance=TOLERANCE, input_spec=spec)
            save_model(result.model, folder / file)
            runs[name] = Run(original, folder / file, result, spec)
        return runs[name]

    return get


def assert_valid_and_within_tolerance(run: Run, heldout: InputSpec) -> None:
    onnx.checker.check_model(str(run.path), full_check=True)
    report = run.result.report
    assert report.verification["passed"], report.verification
    parts = report.verification.get("slices") or {
        o["name"]: o["rel_l2_err"] for o in report.verification["outputs"]
    }
    assert max(parts.values()) <= TOLERANCE, parts
    assert report.budget is not None and report.budget["heldout_error"] <= TOLERANCE
    verifier = Verifier(run.original, heldout, seeds=(HELDOUT_SEED,))  # onnxruntime runs the saved file
    for level in verifier.levels:
        errors = verifier.rel_l2_errors(run.path, level)
        assert max(errors.values()) <= TOLERANCE, (level, errors)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_models_valid_and_within_tolerance_on_a_heldout_seed(compressed, name: str) -> None:
    run = compressed(name)
    assert_valid_and_within_tolerance(run, run.spec)


def test_ppocr_pipeline_reads_the_same_text(compressed) -> None:
    needs("cv2", "pyclipper", "shapely", "yaml", "skimage", "PIL")
    original, candidate = (OcrModels(*(compressed(name).original for name in PPOCR)),
                           OcrModels(*(compressed(name).path for name in PPOCR)))  # fmt: skip
    check = ocr_check(original, candidate)
    assert check.figures["original_character_accuracy_rendered"] >= 0.9, check.figures  # the task is real
    assert check.passed, check.figures


def test_yolo_keeps_raw_outputs_and_detections_on_natural_images(compressed) -> None:
    needs("cv2", "skimage")
    run = compressed("yolov8n_320n.onnx")
    check = yolo_check(run.original, run.path, TOLERANCE)
    assert check.figures["detections"] >= 5, check.figures  # the original finds something to keep
    assert check.passed, check.figures


def test_mobilenet_top1_agreement_on_natural_images(compressed) -> None:
    needs("skimage", zoo_sources=False)
    run = compressed("mobilenetv2.onnx")
    check = mobilenet_check(run.original, run.path)
    assert check.passed, check.figures


def silero_params() -> list[object]:
    """The variants, those that drift marked as expected failures (strict: a fix must update this)."""
    drift = [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=SILERO_DRIFT[n])) for n in SILERO_DRIFT
    ]
    return [*(n for n in SILERO if n not in SILERO_DRIFT), *drift]


@pytest.mark.parametrize("name", silero_params())
def test_silero_valid_and_within_tolerance_on_heldout_speech(compressed, name: str, tmp_path: Path) -> None:
    run = compressed(name)
    assert_valid_and_within_tolerance(run, silero_inputs(name, tmp_path, TEST_SPEECH))


@pytest.mark.parametrize("name", silero_params())
def test_silero_streams_the_same_speech_probabilities(compressed, name: str) -> None:
    run = compressed(name)
    check = vad_check(run.original, run.path, TOLERANCE)
    for figures in check.figures.values():  # the original tells speech from silence and noise
        assert figures["mean_prob_speech"] > 0.7 > 0.1 > figures["mean_prob_silence_noise"], figures
    assert check.passed, check.figures


def test_default_pipeline_removes_macs_on_at_least_four_real_models(compressed) -> None:
    names = (*IMAGE_MODELS, *(SILERO if espeak_available() else ()))  # silero needs espeak-ng's speech
    present = [n for n in names if locate(n if n.endswith(".onnx") else f"{n}.onnx").is_file()]
    if len(present) < 4:
        pytest.skip(f"only {len(present)} real models present; run `python bench/zoo.py`")
    reports = {name: compressed(name).result.report for name in present}
    removed = [name for name, report in reports.items() if report.macs_after < report.macs_before]
    assert len(removed) >= 4, {name: (r.macs_before, r.macs_after) for name, r in reports.items()}


def test_detection_matching_needs_the_same_class_and_iou_at_least_0_9() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    face = {"class": "FACE_MALE", "score": 0.9, "box": [0, 0, 10, 10]}
    taller = {"class": "FACE_MALE", "score": 0.8, "box": [0, 0, 10, 11]}  # IoU 100/110
    wider = {"class": "FACE_MALE", "score": 0.8, "box": [0, 0, 12, 10]}  # IoU 100/120
    assert matched_detections([face], [taller]) == 1
    assert matched_detections([face], [wider]) == 0
    assert matched_detections([face], [{**taller, "class": "FEET_COVERED"}]) == 0
    assert matched_detections([face, face], [taller]) == 1  # one candidate stands for one detection


def test_vad_windows_prefix_each_chunk_with_the_previous_tail() -> None:
    audio = np.arange(1000, dtype=np.float32) + 1.0
    windows = vad_windows(audio, 16000)
    assert windows.shape == (2, 576)
    assert not windows[0, :64].any() and np.array_equal(windows[0, 64:], audio[:512])
    assert np.array_equal(windows[1, :64], audio[448:512]) and np.array_equal(windows[1, 64:552], audio[512:])
    assert not windows[1, 552:].any()  # the last chunk is padded with zeros
    assert vad_windows(audio, 8000).shape == (4, 288)
