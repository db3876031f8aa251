"""bench/refit_grid.py's metrics and tables, and bench/data.py's photo split (no compression run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bench import refit_grid
from bench.data import photo_sources, photo_views

HAS_ONNXSIM = importlib.util.find_spec("onnxsim") is not None
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None


def test_score_labelled_counts_correct_and_relative_error() -> None:
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    figures, correct = refit_grid.score(logits, reference, np.array([0, 1, 1]))
    assert correct.tolist() == [1, 0, 0]
    assert figures["accuracy"] == pytest.approx(1 / 3)
    assert figures["rel_l2"] == pytest.approx(np.sqrt(8) / np.sqrt(12))


def test_score_unlabelled_agreement_top5_and_kl() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(20, 10)) * 4
    figures, correct = refit_grid.score(reference.copy(), reference, None)
    assert correct.all() and figures["agreement"] == 1.0 and figures["top5"] == 1.0
    assert figures["kl"] == pytest.approx(0.0, abs=1e-9) and figures["rel_l2"] == 0.0
    shuffled = reference[:, ::-1].copy()
    figures, _ = refit_grid.score(shuffled, reference, None)
    assert figures["agreement"] < 1.0 and figures["kl"] > 0.0
    assert figures["confident_views"] == int((refit_grid._softmax(reference).max(axis=1) >= 0.5).sum())


def _results() -> dict:
    cell = {"macs": 0.9, "accuracy": 0.95, "rel_l2": 0.1, "search_error": 0.05, "heldout_error": 0.07}
    cells = {
        key: dict(cell)
        for key in ("data_free", "refit_32", "refit_64", "merges_only_64", "onnxsim_l2", "onnxsim_wanda_64")
    }
    cells["onnxsim_l2"] |= {"accuracy": 0.5, "bisected_to": 0.9}
    ci = {"refit_64 - onnxsim_l2": [0.45, 0.4, 0.5], "refit_64 - data_free": [0.0, -0.01, 0.01]}
    row = {"target": 0.9, "cells": cells, "ci": ci}
    model = {"metric": "accuracy", "test_samples": 100, "original": {"accuracy": 0.96}, "rows": [row]}
    return {"samples": [32, 64], "models": {"toy": model}}


def test_tables_show_every_method_and_interval() -> None:
    results = _results()
    model = results["models"]["toy"]
    table = refit_grid.fidelity_table(model, [32, 64])
    assert "| refit N=32 | refit N=64 | merges only N=64 | onnxsim L2 | onnxsim Wanda N=64 |" in table
    assert "| 0.90 | 0.950 @ 0.90 |" in table and "0.500 @ 0.90" in table
    assert "| 0.90 | 0.100 |" in refit_grid.error_table(model, [32, 64])
    intervals = refit_grid.interval_table(model, [32, 64])
    assert "+0.450 [+0.400, +0.500]" in intervals and "refit N=64 − onnxsim L2" in intervals
    assert "toy (100 test samples, original accuracy 0.9600)" in refit_grid.markdown(results)


def test_failed_cell_reads_failed() -> None:
    model = _results()["models"]["toy"]
    model["rows"][0]["cells"]["refit_32"] = {"error": "target not reached"}
    assert "| failed |" in refit_grid.fidelity_table(model, [32, 64])


@pytest.mark.skipif(not HAS_ONNXSIM, reason="onnxsim is not installed: `pip install onnxsim==0.8.1`")
def test_bisect_meets_the_tightest_tolerance_it_can() -> None:
    import onnx

    from bench.baseline import macs
    from red_onnx import compress
    from red_onnx.demo import demo_path

    folded = compress(onnx.load(str(demo_path())), exact=True).model
    pruned, sparsity, tolerance = refit_grid.bisect(folded, 0.8, None)
    assert tolerance in refit_grid.MACS_TOLERANCES and sparsity > 0
    assert abs(macs(pruned) / macs(folded) - 0.8) <= tolerance


def _write_photos(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(6):  # a KDE wallpaper at two sizes: one source, the larger file
        folder = root / "usr/share/wallpapers" / f"W{index}" / "contents/images"
        folder.mkdir(parents=True)
        for side in (320, 400):
            pixels = rng.integers(0, 255, (side, side + 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{side + 40}x{side}.png")
    gnome = root / "usr/share/backgrounds/gnome"
    gnome.mkdir(parents=True)
    for variant in ("l", "d"):  # light and dark: one source
        Image.fromarray(rng.integers(0, 255, (330, 330, 3), dtype=np.uint8)).save(gnome / f"a-{variant}.webp")
    Image.fromarray(np.zeros((256, 256, 3), dtype=np.uint8)).save(gnome / "flat-l.webp")  # too small


def test_photo_sources_group_sizes_and_variants(tmp_path: Path) -> None:
    _write_photos(tmp_path)
    sources = photo_sources(tmp_path, bundled=False)
    assert list(sources) == ["gnome/a", *(f"kde/W{index}" for index in range(6))]
    assert all(Path(path).name == "440x400.png" for key, path in sources.items() if key.startswith("kde/"))


@pytest.mark.skipif(not HAS_SKIMAGE, reason="views need scikit-image: `pip install scikit-image`")
def test_photo_views_split_by_source(tmp_path: Path) -> None:
    _write_photos(tmp_path)
    test, calibration, about = photo_views(12, 3, 0.4, size=32, root=tmp_path, bundled=False)
    assert calibration.shape == (12, 3, 32, 32) and test.shape == (4 * 3, 3, 32, 32)
    assert not set(about["test_sources"].split(", ")) & set(about["calibration_sources"].split(", "))
    again = photo_views(12, 3, 0.4, size=32, root=tmp_path, bundled=False)
    assert np.array_equal(again[0], test) and np.array_equal(again[1], calibration)


def _zoo_results() -> dict:
    cell = {"macs": 0.9, "passed": 0.95, "kept": 0.9, "extra": 2, "rel_l2": 0.1, "seconds": 3.0}
    cells = {key: dict(cell) for key in ("data_free", "refit_64", "merges_only_64", "onnxsim_l2")}
    cells["onnxsim_l2"] = {"error": "onnxsim keeps 0.950 of the MACs"}
    ci = {"refit_64 - data_free": [0.05, 0.01, 0.09]}
    row = {
        "target": 0.9,
        "cells": cells,
        "ci": ci,
        "ci_by": {"detection": {"refit_64 - data_free": [0.2, 0.1, 0.3]}},
    }
    fields = [["passed", "images passed"], ["kept", "detections kept"], ["extra", "extra"]]
    model = {
        "metric": "passed",
        "test_samples": 50,
        "original": {"passed": 1.0},
        "rows": [row],
        "fields": fields,
    }
    return {"samples": [64], "models": {"zoo": model}}


def test_fields_table_and_other_vectors() -> None:
    results = _zoo_results()
    model = results["models"]["zoo"]
    table = refit_grid.fields_table(model, [64])
    assert "| images passed | detections kept | extra | seconds |" in table
    assert "| 0.90 | refit N=64 | 0.900 | 0.950 | 0.900 | 2 | 3.0 |" in table
    assert "| 0.90 | onnxsim L2 | failed |" in table
    assert refit_grid.other_vectors(model) == ["detection"]
    assert "+0.200 [+0.100, +0.300]" in refit_grid.interval_table(model, [64], which="detection")
    assert "+0.050 [+0.010, +0.090]" in refit_grid.interval_table(model, [64])
    assert "per detection:" in refit_grid.markdown(results)


def test_ocr_scorer_agreement_accuracy_and_turn_decision() -> None:
    reference = np.array([[0.9, 0.1], [0.05, 0.95], [0.2, 0.8], [0.6, 0.4]])
    outputs = np.array([[0.8, 0.2], [0.15, 0.85], [0.6, 0.4], [0.6, 0.4]])
    figures, vectors = refit_grid.ocr_scorer(np.array([0, 1, 1, 1]))(outputs, reference)
    assert vectors["agreement"].tolist() == [1, 1, 0, 1] and figures["agreement"] == 0.75
    assert figures["accuracy"] == 0.5  # truth: the third and fourth are turned
    assert vectors["decision"].tolist() == [1, 0, 1, 1]  # p(180) 0.95 > 0.9 turns, 0.85 does not


def test_pruned_structure_counts_narrowed_convs() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def conv_model(widths: tuple[int, int]) -> onnx.ModelProto:
        weights = [numpy_helper.from_array(np.zeros((width, 3, 1, 1), np.float32), f"w{i}")
                   for i, width in enumerate(widths)]  # fmt: skip
        nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], name=f"c{i}") for i in range(2)]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
        outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)]
        return helper.make_model(helper.make_graph(nodes, "g", [x], outputs, weights))

    structure = refit_grid.pruned_structure(conv_model((8, 4)), conv_model((6, 4)))
    assert structure == {
        "convs": 2,
        "convs_pruned": 1,
        "channels": 12,
        "channels_removed": 2,
        "convs_missing": 0,
    }


def test_text_lines_calibration_and_test_share_no_word() -> None:
    from bench import data

    assert not set(data.CALIBRATION_WORDS) & set(data.TEST_WORDS)
    assert not set(data.CALIBRATION_FONTS) & set(data.TEST_FONTS)
    assert not set(data.CALIBRATION_FONT_SIZES) & set(data.TEST_FONT_SIZES)
    lines = data.text_strings(20, data.TEST_WORDS, seed=1)
    assert len(set(lines)) == 20 and lines == data.text_strings(20, data.TEST_WORDS, seed=1)
    crops, described = data.text_line_crops(lines[:2], data.TEST_FONTS, data.TEST_FONT_SIZES, seed=2)
    assert all(crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[1] > crop.shape[0] for crop in crops)
    assert len(described) == 2


def test_calibration_draws_runs_each_draw_on_its_own_rows() -> None:
    from bench import calibration_draws

    first, again, second = (calibration_draws.draw_rows(64, 16, draw) for draw in (0, 0, 1))
    assert first.tolist() == again.tolist() and first.tolist() != second.tolist()
    assert len(set(first.tolist())) == 16 and first.tolist() == sorted(first.tolist()) and first.max() < 64
    result = calibration_draws.run("digits", 0.8, draws=2, samples=16, pool=64, sensitivity="measured")
    assert [row["draw"] for row in result["draws"]] == [0, 1] and result["sensitivity"] == "measured"
    assert result["test_samples"] == 360
    for row in result["draws"]:
        assert row["macs"] <= 0.8 + 0.01 and 0.5 < row["accuracy"] <= 1.0
        assert row["heldout_error"] is not None and row["search_error"] is not None
