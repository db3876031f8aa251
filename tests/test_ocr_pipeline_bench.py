"""bench/ocr_pipeline.py's page layout, line matching and scoring (no OCR or compression run)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench import ocr_pipeline
from bench.data import TEST_FONT_SIZES, TEST_FONTS, TEST_WORDS

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_each_read_box_goes_to_the_nearest_rendered_line_left_to_right() -> None:
    read = [(10.0, "Hunter"), (11.0, "needle"), (52.0, "Dragon pepper"), (95.0, "stray")]
    assert ocr_pipeline.by_line(read, [10.5, 50.0, 90.0]) == ["Hunter needle", "Dragon pepper", "stray"]
    assert ocr_pipeline.by_line([], [10.0, 20.0]) == ["", ""]


def test_score_counts_lines_identical_exactly_and_with_spaces_ignored() -> None:
    reference = ["Dragonpepper filter", "Motion #16904", "Frame cotton"]
    read = ["Dragon pepper filter", "Motion #16904", "Frame cottan"]
    truth = ["Dragon pepper filter", "Motion #16904", "Frame cotton"]
    figures, vectors = ocr_pipeline.score(read, reference, truth)
    assert vectors["identical"].tolist() == [0, 1, 0]
    assert vectors["identical_ignoring_spaces"].tolist() == [1, 1, 0]
    assert figures["identical"] == pytest.approx(1 / 3)
    assert figures["identical_ignoring_spaces"] == pytest.approx(2 / 3)
    assert figures["correct_ignoring_spaces"] == pytest.approx(2 / 3)
    assert figures["differences"] == [["Dragonpepper filter", "Dragon pepper filter"],
                                      ["Frame cotton", "Frame cottan"]]  # fmt: skip


def test_fp16_rounded_rounds_float_weights_only_and_keeps_the_input() -> None:
    import onnx
    from onnx import helper, numpy_helper

    weight = np.array([1.0001, 3.14159265, 1e-8], np.float32)
    steps = np.array([1, 2, 3], np.int64)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(steps, "steps")],
    )  # fmt: skip
    model = helper.make_model(graph)
    rounded = {i.name: numpy_helper.to_array(i) for i in ocr_pipeline.fp16_rounded(model).graph.initializer}
    np.testing.assert_array_equal(rounded["w"], weight.astype(np.float16).astype(np.float32))
    assert rounded["w"].dtype == np.float32 and not np.array_equal(rounded["w"], weight)
    np.testing.assert_array_equal(rounded["steps"], steps)
    assert numpy_helper.to_array(model.graph.initializer[0]).tolist() == weight.tolist()  # not changed


def test_intervals_put_the_refit_against_each_other_method() -> None:
    ones, zeros = np.ones(10, np.int8), np.zeros(10, np.int8)
    vectors = {
        "refit": {"identical": ones, "identical_ignoring_spaces": ones},
        "merges only": {"identical": zeros, "identical_ignoring_spaces": ones},
    }
    cells = ocr_pipeline.intervals("rec", vectors)
    assert list(cells) == ["rec refit - merges only"]
    assert cells["rec refit - merges only"]["identical"]["estimate"] == 1.0
    assert cells["rec refit - merges only"]["identical_ignoring_spaces"]["estimate"] == 0.0


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the fonts come with matplotlib")
def test_pages_lay_out_every_line_once_with_its_centre_inside_the_page() -> None:
    images, lines, centres = ocr_pipeline.pages(10, TEST_WORDS, TEST_FONTS, TEST_FONT_SIZES, seed=1)
    assert [len(page) for page in lines] == [ocr_pipeline.LINES_PER_PAGE, 10 - ocr_pipeline.LINES_PER_PAGE]
    for image, page, page_centres in zip(images, lines, centres, strict=True):
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert len(page_centres) == len(page) and np.all(np.diff(page_centres) > 0)
        assert page_centres[0] > 0 and page_centres[-1] < image.shape[0]
