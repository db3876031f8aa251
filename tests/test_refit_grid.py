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
