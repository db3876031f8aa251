"""Calibration samples: --calibration (an .npz or a folder of images), --preprocess, the split, the report."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from test_cli import assert_one_error_line, listing
from test_stream import recurrent, stream_file

import red_onnx
from red_onnx import cli
from red_onnx.io import images
from red_onnx.options import PREPROCESS_PRESETS, InputSpec
from red_onnx.verify.inputs import (
    SPLIT_SHARES,
    describe_inputs,
    image_input,
    load_samples,
    part_rows,
    rows_part,
    split_rows,
)
from red_onnx.verify.verifier import PARTS, Verifier

#: Builds the files of one error case in a folder and returns the command-line arguments.
Maker = Callable[[Path], list[str]]

#: Hand-written presets: (scale, mean, std) on the 0..255 pixel values, R, G, B.
HAND_PRESETS = {
    "imagenet": (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "0-1": (1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "-1-1": (1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # p / 127.5 - 1
    "0-255": (1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


# ----------------------------------------------------------------------------------------------
# models and images


def image_model(dims: Sequence[int | str] = ("N", 3, 8, 8), *, layout: str = "NCHW") -> onnx.ModelProto:
    """x → (Transpose to NCHW) → 1x1 Conv (4 channels) → Relu → 1x1 Conv (2 channels) → y."""
    declared = dims[1] if layout == "NCHW" else dims[3]
    channels = declared if isinstance(declared, int) else 3
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, channels, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = []
    source = "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw"))
        source = "xt"
    nodes += [
        helper.make_node("Conv", [source, "w1"], ["h"], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def plain_model(
    dims: Sequence[int | str], elem: int = TensorProto.FLOAT, second: bool = False
) -> onnx.ModelProto:
    """y = Relu(x) (+ a second input ``scale``): a model a folder of images cannot feed, for the errors."""
    inputs = [helper.make_tensor_value_info("x", elem, list(dims))]
    nodes = [helper.make_node("Relu", ["x"], ["y" if not second else "r"])]
    if second:
        inputs.append(helper.make_tensor_value_info("scale", elem, [1]))
        nodes.append(helper.make_node("Mul", ["r", "scale"], ["y"]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", elem, list(dims))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def pixels(count: int, height: int = 8, width: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 images ``[count, height, width, channels]``."""
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, channels), dtype=np.uint8)


def write_images(folder: Path, batch: np.ndarray, suffix: str = ".png") -> Path:
    """Save every image of ``batch`` ([N, H, W, C] uint8) as ``img_000.png``, ...; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(batch):
        mode = "L" if image.shape[-1] == 1 else "RGB"
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(folder / f"img_{k:03d}{suffix}")
    return folder


def hand_normalised(batch: np.ndarray, preset: str) -> np.ndarray:
    """``batch`` ([N, H, W, C] uint8) scaled by ``preset`` with plain float64 arithmetic."""
    scale, mean, std = HAND_PRESETS[preset]
    if batch.shape[-1] == 1:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return (batch.astype(np.float64) * scale - np.array(mean)) / np.array(std)


def save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save_model(model, path)
    return path


# ----------------------------------------------------------------------------------------------
# image folders: values, layout, size


@pytest.mark.parametrize("preset", PREPROCESS_PRESETS)
def test_each_preset_gives_the_hand_computed_values_nchw(tmp_path: Path, preset: str) -> None:
    batch = pixels(5)
    folder = write_images(tmp_path / "imgs", batch)
    got = load_samples(image_model(), InputSpec(calibration=folder, preprocess=preset))["x"]
    assert got.shape == (5, 3, 8, 8) and got.dtype == np.float32
    expected = hand_normalised(batch, preset).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    low, high = {"0-1": (0, 1), "-1-1": (-1, 1), "0-255": (0, 255), "imagenet": (-2.12, 2.64)}[preset]
    assert low - 1e-5 <= got.min() and got.max() <= high + 1e-5


@pytest.mark.parametrize("preset", ["imagenet", "-1-1"])
def test_an_nhwc_model_gets_channels_last(tmp_path: Path, preset: str) -> None:
    batch = pixels(4, height=6, width=10, seed=1)
    folder = write_images(tmp_path / "imgs", batch)
    model = image_model(("N", 6, 10, 3), layout="NHWC")
    got = load_samples(model, InputSpec(calibration=folder, preprocess=preset))["x"]
    assert got.shape == (4, 6, 10, 3)
    np.testing.assert_allclose(got, hand_normalised(batch, preset), rtol=1e-6, atol=1e-5)


def test_a_grayscale_model_reads_l_mode_images(tmp_path: Path) -> None:
    gray = pixels(3, channels=1, seed=2)
    folder = write_images(tmp_path / "gray", gray)
    model = image_model(("N", 1, 8, 8))
    got = load_samples(model, InputSpec(calibration=folder, preprocess="0-1"))["x"]
    np.testing.assert_allclose(got, gray.transpose(0, 3, 1, 2) / 255.0, rtol=1e-6, atol=1e-7)
    colour = pixels(2, seed=3)  # RGB files for a grayscale model: Pillow's L conversion
    folder = write_images(tmp_path / "colour", colour)
    got = load_samples(model, InputSpec(calibration=folder, preprocess="0-255"))["x"]
    luma = [np.asarray(Image.fromarray(image, "RGB").convert("L"), np.float32) for image in colour]
    np.testing.assert_array_equal(got[:, 0], np.stack(luma))


def test_images_are_read_in_file_name_order_and_other_files_are_left_out(tmp_path: Path) -> None:
    batch = pixels(3, seed=4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, image in zip(["b.png", "a.jpeg", "c.bmp"], batch, strict=True):
        Image.fromarray(image).save(folder / name)
    (folder / "labels.txt").write_text("not an image")
    (folder / "sub").mkdir()
    write_images(folder / "sub", pixels(2))  # not recursive
    assert [p.name for p in images.image_files(folder)] == ["a.jpeg", "b.png", "c.bmp"]
    got = load_samples(image_model(), InputSpec(calibration=folder, preprocess="0-255"))["x"]
    assert got.shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(got[1], batch[0].transpose(2, 0, 1))  # b.png: lossless
    np.testing.assert_array_equal(got[2], batch[2].transpose(2, 0, 1))  # c.bmp: lossless


def test_resizing_covers_the_target_then_crops_the_centre(tmp_path: Path) -> None:
    wide = np.zeros((8, 24, 3), np.uint8)  # three 8x8 squares side by side: red, green, blue
    wide[:, :8, 0], wide[:, 8:16, 1], wide[:, 16:, 2] = 255, 255, 255
    grey = np.full((16, 16, 3), 77, np.uint8)  # scaled down, bilinear: a flat image stays flat
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(wide).save(folder / "img_000.png")
    Image.fromarray(grey).save(folder / "img_001.png")
    got = load_samples(image_model(), InputSpec(calibration=folder, preprocess="0-255"))["x"]
    assert got.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(got[0, 1], np.full((8, 8), 255.0))  # the centre square: green only
    assert not got[0, 0].any() and not got[0, 2].any()
    np.testing.assert_array_equal(got[1], np.full((3, 8, 8), 77.0))


def test_dynamic_height_and_width_come_from_input_shape_or_the_preset(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", pixels(2, height=20, width=30))
    model = image_model(("N", 3, "H", "W"))
    spec = InputSpec(calibration=folder, preprocess="0-1", shapes={"x": (1, 3, 12, 16)})
    assert load_samples(model, spec)["x"].shape == (2, 3, 12, 16)  # the batch is the folder's
    imagenet = InputSpec(calibration=folder, preprocess="imagenet")
    assert load_samples(model, imagenet)["x"].shape == (2, 3, 224, 224)
    with pytest.raises(red_onnx.UsageError, match=r"dynamic height or width .* --input-shape x:1,3,H,W"):
        load_samples(model, InputSpec(calibration=folder, preprocess="0-1"))


def test_the_layout_is_read_from_the_declared_shape(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = InputSpec()
    assert image_input(image_model(("N", 3, 8, 8)), spec).layout == "NCHW"
    assert image_input(image_model(("N", 8, 8, 3), layout="NHWC"), spec).layout == "NHWC"
    assert image_input(image_model(("N", 8, 8, 1), layout="NHWC"), spec).channels == 1
    with caplog.at_level("INFO"):
        ambiguous = image_input(image_model(("N", 3, 5, 3)), InputSpec())
    assert ambiguous.layout == "NCHW" and "read as NCHW" in caplog.text
    with pytest.raises(red_onnx.InputError, match="no channel axis of 3 or 1"):
        image_input(image_model(("N", "C", 8, 8)), spec)
    shaped = InputSpec(shapes={"x": (1, 3, 8, 8)})  # a dynamic channel axis, given by --input-shape
    assert image_input(image_model(("N", "C", 8, 8)), shaped).channels == 3


def test_a_folder_is_decoded_once_for_every_feed(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", pixels(3, seed=5))
    model = image_model()
    spec = InputSpec(calibration=folder, preprocess="imagenet")
    first = load_samples(model, spec)["x"]
    second = load_samples(model, spec)["x"]
    assert first is second and not first.flags.writeable  # cached, and nobody can change it
    other = load_samples(model, InputSpec(calibration=folder, preprocess="0-1"))["x"]
    assert other is not first  # another preset: another batch
    changed = folder / "img_000.png"
    Image.fromarray(pixels(1, seed=9)[0]).save(changed)  # the folder changed (its time says so)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert not np.array_equal(load_samples(model, spec)["x"], first)


def test_verification_runs_on_the_images(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", pixels(6, seed=6))
    spec = InputSpec(calibration=folder, preprocess="-1-1")
    verifier = Verifier(image_model(), spec, levels=("disable_all",))
    expected = hand_normalised(pixels(6, seed=6), "-1-1").transpose(0, 3, 1, 2)
    np.testing.assert_allclose(verifier.inputs[0]["x"], expected, atol=1e-5)
    search = Verifier(image_model(), spec, part="search", levels=("disable_all",))
    np.testing.assert_allclose(search.inputs[0]["x"], expected[split_rows(6)["search"]], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the command line


def test_an_npz_through_calibration_is_the_npz_through_inputs(tmp_path: Path) -> None:
    source = save(image_model(), tmp_path)
    np.savez(
        tmp_path / "feed.npz", x=np.random.default_rng(3).standard_normal((6, 3, 8, 8)).astype(np.float32)
    )
    outputs = {}
    for option in ("--calibration", "--inputs"):
        out, report = tmp_path / f"out{option}.onnx", tmp_path / f"r{option}.json"
        args = [str(source), str(out), option, str(tmp_path / "feed.npz"), "--json", str(report), "-q"]
        assert cli.main([*args, "--no-latency-check"]) == 0
        data = json.loads(report.read_text())
        outputs[option] = (out.read_bytes(), data["verification"], data["inputs"])
    assert outputs["--calibration"] == outputs["--inputs"]
    assert outputs["--inputs"][2] == {
        "kind": "npz", "file": "feed.npz", "preset": None, "total": 6, "split": True,
        "samples": {"search": 3, "cv": 2, "heldout": 1},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("dims", "layout", "preset"),
    [(("N", 3, 8, 8), "NCHW", "imagenet"), (("N", 8, 8, 3), "NHWC", "0-1")],
)
def test_a_folder_of_images_through_the_command(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], dims: tuple[int | str, ...], layout: str, preset: str
) -> None:
    source = save(image_model(dims, layout=layout), tmp_path)
    folder = write_images(tmp_path / "calib", pixels(8, seed=7))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = [
        str(source),
        str(out),
        "--calibration",
        str(folder),
        "--preprocess",
        preset,
        "--json",
        str(report),
    ]
    assert cli.main([*args, "--no-latency-check"]) == 0
    printed = capfd.readouterr().out
    assert f"the 8 images in calib/ (--preprocess {preset})" in printed
    data = json.loads(report.read_text())
    assert data["inputs"] == {
        "kind": "images", "file": "calib", "preset": preset, "total": 8, "split": True,
        "samples": {"search": 4, "cv": 2, "heldout": 2},
    }  # fmt: skip
    assert data["input_shapes"]["x"] == [8, *dims[1:]]
    recorded = {p.key: p.value for p in onnx.load(str(out)).metadata_props}["red_onnx.options"]
    spec = json.loads(recorded)["input_spec"]
    assert spec["calibration"] == "calib" and spec["preprocess"] == preset and str(tmp_path) not in recorded


def test_dynamic_sizes_from_input_shape_through_the_command(tmp_path: Path) -> None:
    source = save(image_model(("N", 3, "H", "W")), tmp_path)
    folder = write_images(tmp_path / "calib", pixels(3, height=9, width=13))
    report = tmp_path / "r.json"
    args = [str(source), "--dry-run", "--calibration", str(folder), "--preprocess", "0-1"]
    assert cli.main([*args, "--input-shape", "x:1,3,6,10", "--json", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["input_shapes"]["x"] == [3, 3, 6, 10]


def _png_folder(folder: Path, count: int = 3) -> str:
    write_images(folder / "imgs", pixels(count))
    return "imgs"


def _corrupt(folder: Path) -> list[str]:
    save(image_model(), folder)
    write_images(folder / "imgs", pixels(3))
    (folder / "imgs" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return ["m.onnx", "out.onnx", "--calibration", "imgs", "--preprocess", "0-1"]


def _case(model: onnx.ModelProto | None, *args: str, count: int = 3, folder: bool = True) -> Maker:
    def make(root: Path) -> list[str]:
        save(model if model is not None else image_model(), root)
        if folder:
            _png_folder(root, count)
        np.savez(root / "feed.npz", x=np.zeros((2, 3, 8, 8), np.float32))
        return ["m.onnx", "out.onnx", *args]

    return make


ERROR_CASES = {
    # (how the folder is made, what the one line must say)
    "both_names": (_case(None, "--calibration", "feed.npz", "--inputs", "feed.npz"), "not both"),
    "folder_without_preprocess": (_case(None, "--calibration", "imgs"), "--preprocess (imagenet, 0-1"),
    "preprocess_without_folder": (_case(None, "--preprocess", "0-1"), "give the folder with --calibration"),
    "preprocess_with_npz": (_case(None, "--calibration", "feed.npz", "--preprocess", "0-1"), "is a file"),
    "unknown_preset": (_case(None, "--calibration", "imgs", "--preprocess", "0-2"), "invalid choice"),
    "unreadable_image": (_corrupt, "imgs/img_001.png cannot be read"),
    "empty_folder": (_case(None, "--calibration", "imgs", "--preprocess", "0-1", count=0), "holds no images"),
    "missing_path": (_case(None, "--calibration", "nothing", folder=False), "not found"),
    "two_inputs": (
        _case(plain_model(("N", 3, 8, 8), second=True), "--calibration", "imgs", "--preprocess", "0-1"),
        "this model has 2 inputs (x, scale); save the samples to an .npz",
    ),
    "int_input": (
        _case(plain_model(("N", 3, 8, 8), TensorProto.INT64), "--calibration", "imgs", "--preprocess", "0-1"),
        "input 'x' is INT64; save the samples to an .npz",
    ),
    "rank_3": (
        _case(plain_model(("N", 3, 8)), "--calibration", "imgs", "--preprocess", "0-1"),
        "has shape [?, 3, 8]; save the samples to an .npz",
    ),
    "dynamic_size_without_shape": (
        _case(image_model(("N", 3, "H", "W")), "--calibration", "imgs", "--preprocess", "-1-1"),
        "--preprocess -1-1 has no default size; give them with --input-shape x:1,3,H,W",
    ),
    "fixed_batch": (
        _case(image_model((1, 3, 8, 8)), "--calibration", "imgs", "--preprocess", "0-1"),
        "fixed batch of 1 and imgs holds 3 images",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_calibration_errors_are_one_line_and_write_nothing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    make, message = ERROR_CASES[case]
    args = make(tmp_path)
    before = listing(tmp_path)
    assert cli.main(args) == 2
    out, err = capfd.readouterr()
    line = assert_one_error_line(err)
    assert message in line, line
    assert out == "" and listing(tmp_path) == before and not (tmp_path / "out.onnx").exists()


def test_without_pillow_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    save(image_model(), tmp_path)
    _png_folder(tmp_path, count=2)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    assert cli.main(["m.onnx", "out.onnx", "--calibration", "imgs", "--preprocess", "0-255"]) == 2
    line = assert_one_error_line(capfd.readouterr().err)
    assert line.endswith("reading images needs Pillow: pip install 'red-onnx[images]'")
    assert not (tmp_path / "out.onnx").exists()


def test_every_preset_name_has_its_numbers() -> None:
    assert tuple(images.PRESETS) == PREPROCESS_PRESETS


def test_the_python_api_keeps_npz_as_the_name_of_calibration(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    assert InputSpec(npz=path).calibration == path == InputSpec(calibration=path).npz
    assert InputSpec(npz=path) == InputSpec(calibration=path)
    with pytest.raises(red_onnx.UsageError, match="npz is the former name of calibration"):
        InputSpec(npz=path, calibration=tmp_path / "y.npz")
    assert InputSpec(npz=path).samples_kind == "npz" and InputSpec().samples_kind is None
    assert InputSpec(calibration=_folder_of(tmp_path), preprocess="0-1").samples_kind == "images"


def _folder_of(tmp_path: Path) -> Path:
    return write_images(tmp_path / "imgs", pixels(1))


# ----------------------------------------------------------------------------------------------
# the split: search, cv, heldout


@settings(max_examples=300, deadline=None)
@given(count=st.integers(min_value=0, max_value=2000))
def test_the_parts_are_disjoint_and_cover_every_row(count: int) -> None:
    parts = split_rows(count)
    assert list(parts) == list(SPLIT_SHARES) == ["search", "cv", "heldout"]
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(count))  # disjoint, every row in exactly one part
    assert all(np.array_equal(rows, np.sort(rows)) for rows in parts.values())
    if count >= 3:
        assert all(len(rows) >= 1 for rows in parts.values())
        for part, share in SPLIT_SHARES.items():
            assert abs(len(parts[part]) - share * count) <= 1.5
    assert split_rows(count)["cv"].tolist() == parts["cv"].tolist()  # seeded: the same split again


def test_two_rows_give_search_and_heldout_one_each_and_cv_the_search_row() -> None:
    parts = split_rows(2)
    assert (len(parts["search"]), len(parts["cv"]), len(parts["heldout"])) == (1, 0, 1)
    assert part_rows(2, "cv").tolist() == parts["search"].tolist()
    assert part_rows(2, "all").tolist() == [0, 1]
    assert [len(split_rows(n)[p]) for n in (0, 1) for p in SPLIT_SHARES] == [0, 0, 0, 1, 0, 0]


def test_the_split_is_random_not_by_position() -> None:
    parts = split_rows(64)
    kinds = np.arange(64) % 4  # a file whose rows repeat a pattern
    assert parts["search"].tolist() != list(range(0, 64, 2))
    assert all(set(kinds[rows]) == {0, 1, 2, 3} for rows in parts.values())


def test_a_verifier_takes_the_cv_rows(tmp_path: Path) -> None:
    rows = np.random.default_rng(8).standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=rows)
    spec = InputSpec(calibration=tmp_path / "x.npz")
    assert "cv" in PARTS
    got = {
        part: Verifier(image_model(), spec, part=part, levels=("disable_all",)).inputs[0]["x"]
        for part in PARTS
    }
    parts = split_rows(12)
    for part in SPLIT_SHARES:
        np.testing.assert_array_equal(got[part], rows[parts[part]])
    np.testing.assert_array_equal(got["all"], rows)
    feeds = [{"x": rows}]
    np.testing.assert_array_equal(rows_part(feeds, image_model(), {"x"}, "cv")[0]["x"], rows[parts["cv"]])
    np.savez(tmp_path / "two.npz", x=rows[:2])
    two = InputSpec(calibration=tmp_path / "two.npz")
    cv = Verifier(image_model(), two, part="cv", levels=("disable_all",)).inputs[0]["x"]
    np.testing.assert_array_equal(cv, rows[:2][split_rows(2)["search"]])  # cv falls back to the search row
    with pytest.raises(red_onnx.UsageError, match="unknown inputs part 'test'"):
        Verifier(image_model(), spec, part="test")


def test_a_recurrent_stream_stays_whole_for_cv(tmp_path: Path) -> None:
    model = recurrent()
    path, _, _ = stream_file(tmp_path, 9)
    spec = InputSpec(calibration=path)
    assert Verifier(model, spec, part="cv", levels=("disable_all",)).steps == 9
    described = describe_inputs(model, spec)
    assert described["split"] is False and described["samples"] == {"search": 9, "cv": 9, "heldout": 9}


# ----------------------------------------------------------------------------------------------
# the report


def test_the_report_names_synthetic_inputs() -> None:
    result = red_onnx.compress(image_model(), latency_check=False)
    inputs = result.report.to_dict()["inputs"]
    notes = inputs.pop("range_notes")
    assert inputs == {
        "kind": "synthetic-normal", "file": None, "preset": None, "total": None, "split": False,
        "samples": None,
    }  # fmt: skip
    assert len(notes) == 1 and "nothing in the graph tells its range" in notes[0]
    pink = red_onnx.compress(image_model(), latency_check=False, input_spec=InputSpec(prior="pink"))
    assert pink.report.inputs is not None and pink.report.inputs["kind"] == "synthetic-pink"


def test_the_report_counts_each_part_and_names_the_folder_only(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "deep" / "calib", pixels(10, seed=11))
    spec = InputSpec(calibration=folder, preprocess="imagenet")
    result = red_onnx.compress(image_model(), latency_check=False, input_spec=spec)
    inputs = result.report.to_dict()["inputs"]
    assert inputs == {
        "kind": "images", "file": "calib", "preset": "imagenet", "total": 10, "split": True,
        "samples": {"search": 5, "cv": 3, "heldout": 2},
    }  # fmt: skip
    assert str(tmp_path) not in result.report.to_json()
    assert result.report.verification is not None
    assert result.report.verification["inputs"] == "the 10 images in calib/ (--preprocess imagenet)"
    doc = (Path(__file__).parents[1] / "docs" / "report.md").read_text()
    assert all(f"`{field}`" in doc for field in inputs)


def test_a_budget_line_says_on_how_many_samples_each_error_was_measured(tmp_path: Path) -> None:
    from red_onnx.report.report import Report, render_table

    report = Report(
        budget={"groups": [], "evaluations": 3, "seconds": 0.1, "error": 0.01, "heldout_error": 0.02,
                "macs_fraction": 0.8},
        inputs={"kind": "images", "file": "calib", "preset": "0-1", "total": 12, "split": True,
                "samples": {"search": 6, "cv": 3, "heldout": 3}},
    )  # fmt: skip
    assert "error 0.01 on search inputs (6 of 12 images), 0.02 held out (3)" in render_table(report)


def test_the_macs_line_says_when_it_counts_a_batch_of_rows() -> None:
    """MACs are counted at the input shapes: over a calibration file's 128 rows, the table says so."""
    from red_onnx.report.report import Report, render_table

    def macs_line(shapes: dict) -> str:
        table = render_table(Report(input_shapes=shapes, macs_before=128_000, macs_after=64_000))
        return next(line for line in table.splitlines() if line.startswith("MACs"))

    assert macs_line({"x": [128, 3, 8, 8]}).startswith("MACs (128 rows) ")
    assert macs_line({"ids": [16, 32], "mask": [16, 32]}).startswith("MACs (16 rows) ")
    assert macs_line({"x": [1, 3, 8, 8]}).split()[:2] == ["MACs", "128K"]
    assert macs_line({"x": [4, 3], "sr": []}).split()[:2] == ["MACs", "128K"]  # a scalar beside: no batch
    assert macs_line({"x": [4, 3], "state": [2, 4, 8]}).split()[:2] == ["MACs", "128K"]
