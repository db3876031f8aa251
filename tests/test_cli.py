"""The ``red-onnx`` command: outputs, report, provenance, exit codes and error lines."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_pipeline import (
    assert_same_function,
    channels,
    gather_by_index,
    list_initializers_as_inputs,
    planted_conv,
    x_feed,
)

from red_onnx import cli, pipeline
from red_onnx.verify.verifier import VerificationResult, Verifier

ERROR_PREFIX = "red-onnx: error: "

#: Builds the files of one bad-input case in a folder and returns the command-line arguments.
Maker = Callable[[Path], list[str]]


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """The planted model (c1: 8 → 7 channels under --exact) with metadata of its own."""
    model = planted_conv()
    onnx.helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    return path


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def assert_one_error_line(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
    return lines[0]


def script() -> list[str]:
    found = shutil.which("red-onnx")
    return [found] if found else [sys.executable, "-m", "red_onnx.cli"]


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*script(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# ----------------------------------------------------------------------------------------------
# the demo


def test_no_arguments_runs_the_bundled_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    for row in ("parameters", "MACs", "file size (bytes)", "passes:", "verification PASSED"):
        assert row in out
    accuracy = re.search(
        r"accuracy on the bundled test split \((\d+) samples\): ([\d.]+) before, ([\d.]+) after", out
    )
    assert accuracy, out
    samples, before, after = int(accuracy[1]), float(accuracy[2]), float(accuracy[3])
    assert samples > 0
    assert before > 0.9
    assert after == before  # exact mode: the same function
    assert listing(tmp_path) == {}


def test_console_script_demo(tmp_path: Path) -> None:
    done = run_script(["-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert listing(tmp_path) == {}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("red-onnx ")


# ----------------------------------------------------------------------------------------------
# a normal run


def test_exact_writes_a_valid_equivalent_model(model_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out_path = model_path.with_name("out.onnx")
    assert cli.main([str(model_path), str(out_path), "--exact"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    assert f"wrote {out_path}" in out
    assert "verification PASSED" in out
    onnx.checker.check_model(str(out_path), full_check=True)
    written = onnx.load(str(out_path))
    assert channels(written, "c1") == 7
    assert_same_function(onnx.load(str(model_path)), written, x_feed(batch=2))
    assert set(listing(model_path.parent)) == {"model.onnx", "out.onnx"}  # no temporaries left


def test_quiet_prints_nothing(model_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(model_path), str(model_path.with_name("out.onnx")), "-q"]) == 0
    assert capfd.readouterr() == ("", "")
    assert model_path.with_name("out.onnx").is_file()


def test_json_report_has_the_documented_keys(model_path: Path) -> None:
    report_path = model_path.with_name("r.json")
    assert (
        cli.main([str(model_path), str(model_path.with_name("out.onnx")), "--json", str(report_path), "-q"])
        == 0
    )
    report = json.loads(report_path.read_text())
    for key in (
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "size_before",
        "size_after",
        "layers",
        "kept_zero_channels",
        "overridable_initializers",
    ):
        assert key in report, key
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["size_before"] == model_path.stat().st_size
    verification = report["verification"]
    assert verification["passed"] is True
    assert isinstance(verification["max_abs_err"], float)
    assert isinstance(verification["max_rel_err"], float)
    (output,) = verification["outputs"]
    assert output["name"] == "y"
    for key in ("max_abs_err", "max_rel_err", "rel_l2_err", "cosine", "top1_agreement", "needed_rtol"):
        assert key in output, key
    assert output["cosine"] > 0.999999
    assert [p["name"] for p in report["passes"]] == [
        "fold_batchnorm",
        "fold_affine",
        "merge_exact",
        "separate_depthwise",
    ]
    for item in report["passes"]:
        assert {"name", "seconds", "stats", "skips"} <= set(item)
        assert item["seconds"] >= 0
    assert report["frozen"], "c2 feeds the graph output and is reported frozen"
    for item in report["frozen"]:
        assert set(item) == {"group", "reason"}
        assert item["reason"]
    assert {"group": "c2"}.items() <= report["frozen"][0].items()


@pytest.mark.parametrize("with_output", [False, True])
def test_dry_run_writes_nothing_but_the_json(model_path: Path, with_output: bool) -> None:
    folder = model_path.parent
    before = listing(folder)
    args = [str(model_path), *([str(folder / "out.onnx")] if with_output else []), "--dry-run", "-q"]
    assert cli.main(args) == 0
    assert listing(folder) == before
    assert cli.main([*args, "--json", str(folder / "r.json")]) == 0
    assert set(listing(folder)) == {*before, "r.json"}
    assert json.loads((folder / "r.json").read_text())["verification"]["passed"] is True


def test_two_runs_give_identical_bytes(model_path: Path) -> None:
    first, second = model_path.with_name("a.onnx"), model_path.with_name("b.onnx")
    assert cli.main([str(model_path), str(first), "-q"]) == 0
    assert cli.main([str(model_path), str(second), "-q"]) == 0
    assert first.read_bytes() == second.read_bytes()


def test_input_file_is_never_modified(model_path: Path) -> None:
    data, mtime = model_path.read_bytes(), model_path.stat().st_mtime_ns
    assert cli.main([str(model_path), str(model_path.with_name("out.onnx")), "-q"]) == 0
    assert model_path.read_bytes() == data
    assert model_path.stat().st_mtime_ns == mtime


def test_provenance_and_metadata(model_path: Path) -> None:
    out_path = model_path.with_name("out.onnx")
    assert cli.main([str(model_path), str(out_path), "--exact", "--freeze", "nothing*", "-q"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out_path)).metadata_props}
    assert props["author"] == "tests"
    assert props["license"] == "MIT"
    from red_onnx import __version__

    assert props["red_onnx.version"] == __version__
    options = json.loads(props["red_onnx.options"])
    assert options["exact"] is True
    assert options["freeze"] == ["nothing*"]
    summary = json.loads(props["red_onnx.summary"])
    assert summary["verified"] is True
    assert summary["params_after"] < summary["params_before"]
    assert str(model_path.parent) not in props["red_onnx.options"]  # no machine-specific paths


# ----------------------------------------------------------------------------------------------
# --freeze


@pytest.mark.parametrize("pattern", ["c1", "c?", "*"])
def test_freeze_protects_matching_layers(model_path: Path, pattern: str) -> None:
    unfrozen, frozen = model_path.with_name("a.onnx"), model_path.with_name("b.onnx")
    assert cli.main([str(model_path), str(unfrozen), "-q"]) == 0
    assert cli.main([str(model_path), str(frozen), "--freeze", pattern, "-q"]) == 0
    assert channels(onnx.load(str(unfrozen)), "c1") == 7
    assert channels(onnx.load(str(frozen)), "c1") == 8


def test_freeze_of_another_layer_changes_nothing(model_path: Path) -> None:
    out_path = model_path.with_name("out.onnx")
    assert cli.main([str(model_path), str(out_path), "--freeze", "c2", "--freeze", "relu", "-q"]) == 0
    assert channels(onnx.load(str(out_path)), "c1") == 7


# ----------------------------------------------------------------------------------------------
# verification failure


@pytest.fixture
def failing_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Verifier.check

    def check(self: Verifier, candidate: object, **kwargs: float) -> VerificationResult:
        result = original(self, candidate, **kwargs)
        outputs = [dataclasses.replace(o, passed=False, needed_rtol=1.0) for o in result.outputs]
        return dataclasses.replace(result, passed=False, outputs=outputs)

    monkeypatch.setattr("red_onnx.pipeline.Verifier.check", check)


@pytest.mark.usefixtures("failing_verifier")
def test_verification_failure_exits_1_and_writes_nothing(
    model_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = model_path.parent
    before = listing(folder)
    code = cli.main([str(model_path), str(folder / "out.onnx"), "--json", str(folder / "r.json")])
    assert code == 1
    out, err = capfd.readouterr()
    line = assert_one_error_line(err)
    assert "verification failed" in line
    assert "verification FAILED" in out  # the table of the failed run, for the bug report
    assert not (folder / "out.onnx").exists()
    assert {k: v for k, v in listing(folder).items() if k != "r.json"} == before
    report = json.loads((folder / "r.json").read_text())  # the failed run's figures, for the bug report
    assert report["verification"]["passed"] is False


# ----------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def _custom_domain(folder: Path) -> list[str]:
    model = planted_conv()
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], name="custom", domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save_model(model, folder / "custom.onnx")
    return ["custom.onnx", "out.onnx"]


def _missing_external_data(folder: Path) -> list[str]:
    onnx.save_model(
        planted_conv(),
        folder / "ext.onnx",
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    (folder / "ext.onnx.data").unlink()
    return ["ext.onnx", "out.onnx"]


def _write(name: str, data: bytes) -> Maker:
    def make(folder: Path) -> list[str]:
        (folder / name).write_bytes(data)
        return [name, "out.onnx"]

    return make


def _truncated(folder: Path) -> list[str]:
    data = planted_conv().SerializeToString()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    return ["cut.onnx", "out.onnx"]


def _directory(folder: Path) -> list[str]:
    (folder / "adir").mkdir()
    return ["adir", "out.onnx"]


def _with_model(*args: str) -> Maker:
    def make(folder: Path) -> list[str]:
        onnx.save_model(planted_conv(), folder / "m.onnx")
        return [arg.replace("OUT", "out.onnx") for arg in args]

    return make


BAD_INPUTS: dict[str, Maker] = {
    "empty": _write("empty.onnx", b""),
    "truncated": _truncated,
    "text": _write("notes.onnx", b"this is not a model\n"),
    "missing": lambda folder: ["nope.onnx", "out.onnx"],
    "directory": _directory,
    "custom_domain": _custom_domain,
    "missing_external_data": _missing_external_data,
    "output_is_input": _with_model("m.onnx", "m.onnx"),
    "output_is_input_spelled_differently": _with_model("m.onnx", "./m.onnx"),
    "output_is_a_directory": _with_model("m.onnx", "."),
    "output_directory_missing": _with_model("m.onnx", "nodir/out.onnx"),
    "no_output_without_dry_run": _with_model("m.onnx"),
    "input_shape_without_name": _with_model("m.onnx", "OUT", "--input-shape", "x1,3,8,8"),
    "input_shape_not_integers": _with_model("m.onnx", "OUT", "--input-shape", "x:1,3,a,8"),
    "input_shape_wrong_rank": _with_model("m.onnx", "OUT", "--input-shape", "x:1,3"),
    "input_shape_static_dim_changed": _with_model("m.onnx", "OUT", "--input-shape", "x:1,4,8,8"),
    "input_shape_unknown_name": _with_model("m.onnx", "OUT", "--input-shape", "z:1,3,8,8"),
    "input_value_unknown_name": _with_model("m.onnx", "OUT", "--input-value", "idx:3"),
    "input_range_reversed": _with_model("m.onnx", "OUT", "--input-range", "x:1,-1"),
    "input_range_one_number": _with_model("m.onnx", "OUT", "--input-range", "x:1"),
    "inputs_npz_missing": _with_model("m.onnx", "OUT", "--inputs", "none.npz"),
    "json_directory_missing": _with_model("m.onnx", "OUT", "--json", "nodir/r.json"),
    "unknown_option": _with_model("m.onnx", "OUT", "--frobnicate"),
    "sequential_refit_alone": _with_model("m.onnx", "OUT", "--sequential-refit", "on"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = BAD_INPUTS[case](tmp_path)
    before = listing(tmp_path)
    assert cli.main(args) == 2
    out, err = capfd.readouterr()
    assert_one_error_line(err)
    assert out == ""
    assert listing(tmp_path) == before
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("case", ["truncated", "custom_domain"])
def test_console_script_bad_input(case: str, tmp_path: Path) -> None:
    args = BAD_INPUTS[case](tmp_path)
    before = listing(tmp_path)
    done = run_script(args, tmp_path)
    assert done.returncode == 2
    assert_one_error_line(done.stderr)
    assert listing(tmp_path) == before


def test_console_script_input_model_that_cannot_run(tmp_path: Path) -> None:
    onnx.save_model(gather_by_index(), tmp_path / "g.onnx")
    done = run_script(["g.onnx", "out.onnx"], tmp_path)  # default ints [0, 10] index past 8 rows
    assert done.returncode == 2
    assert_one_error_line(done.stderr)
    assert not (tmp_path / "out.onnx").exists()


# ----------------------------------------------------------------------------------------------
# verification inputs


@pytest.fixture
def gather_path(tmp_path: Path) -> Path:
    path = tmp_path / "g.onnx"
    onnx.save_model(gather_by_index(), path)
    return path


@pytest.mark.parametrize(
    ("option", "ok"),
    [
        (["--input-range", "idx:0,7"], True),
        (["--input-range", "idx:-8,7"], True),
        (["--input-value", "idx:7"], True),
        (["--input-value", "idx:8"], False),
        (["--input-range", "idx:0,30"], False),
        ([], False),
    ],
)
def test_input_options_reach_verification(
    gather_path: Path, option: list[str], ok: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    out_path = gather_path.with_name("out.onnx")
    code = cli.main([str(gather_path), str(out_path), "-q", *option])
    _, err = capfd.readouterr()
    if ok:
        assert code == 0, err
        assert channels(onnx.load(str(out_path)), "c1") == 7
    else:
        assert code == 2, err
        assert "Traceback" not in err
        assert not out_path.exists()


@pytest.mark.parametrize(("index", "ok"), [([0, 7], True), ([3, 8], False)])
def test_inputs_npz_reaches_verification(gather_path: Path, index: list[int], ok: bool) -> None:
    npz = gather_path.with_name("feed.npz")
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.standard_normal((2, 3, 8, 8)).astype(np.float32), idx=np.array(index, np.int64))
    out_path = gather_path.with_name("out.onnx")
    report_path = gather_path.with_name("r.json")
    code = cli.main([str(gather_path), str(out_path), "-q", "--inputs", str(npz), "--json", str(report_path)])
    assert code == (0 if ok else 2)
    assert out_path.exists() == ok
    if ok:
        report = json.loads(report_path.read_text())
        assert report["input_shapes"]["x"] == [2, 3, 8, 8]  # the npz batch of 2, not the default 1
        props = {p.key: p.value for p in onnx.load(str(out_path)).metadata_props}
        assert json.loads(props["red_onnx.options"])["input_spec"]["npz"] == "feed.npz"


def test_input_shape_sets_the_verification_batch(model_path: Path) -> None:
    report_path = model_path.with_name("r.json")
    args = [str(model_path), "--dry-run", "-q", "--input-shape", "x:3,3,8,8", "--json", str(report_path)]
    assert cli.main(args) == 0
    report = json.loads(report_path.read_text())
    assert report["input_shapes"] == {"x": [3, 3, 8, 8]}
    assert report["macs_before"] == 3 * 64 * (8 * 27 + 4 * 8 * 9)


# ----------------------------------------------------------------------------------------------
# the input is never modified, whatever the paths


def _external_model(folder: Path) -> Path:
    onnx.save_model(
        planted_conv(),
        folder / "ext.onnx",
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    return folder / "ext.onnx"


def test_output_that_is_the_inputs_external_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _external_model(tmp_path)
    before = listing(tmp_path)
    assert cli.main(["ext.onnx", "ext.onnx.data", "-q"]) == 2
    assert_one_error_line(capfd.readouterr().err)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("target", ["model.onnx", "out.onnx"])
def test_json_path_that_is_a_model_path_is_refused(
    model_path: Path, target: str, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = model_path.parent
    before = listing(folder)
    code = cli.main([str(model_path), str(folder / "out.onnx"), "--json", str(folder / target), "-q"])
    assert code == 2
    assert_one_error_line(capfd.readouterr().err)
    assert listing(folder) == before


def test_input_with_external_data_is_left_as_it_was(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    before = listing(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert cli.main([str(path), str(tmp_path / "out.onnx"), "-q"]) == 0
    after = listing(tmp_path)
    assert {k: v for k, v in after.items() if k != "out.onnx"} == before
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "out.onnx"} == mtimes
    assert channels(onnx.load(str(tmp_path / "out.onnx")), "c1") == 7


def test_initializers_listed_as_inputs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    onnx.save_model(list_initializers_as_inputs(planted_conv()), tmp_path / "keep.onnx")
    code = cli.main([str(tmp_path / "keep.onnx"), str(tmp_path / "out.onnx"), "-q"])
    assert "Traceback" not in capfd.readouterr().err
    assert code == 0
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in written.graph.input] == [
        i.name for i in onnx.load(str(tmp_path / "keep.onnx")).graph.input
    ]


def test_missing_output_directory_writes_no_report(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(model_path.parent)
    before = listing(model_path.parent)
    assert cli.main(["model.onnx", "nodir/out.onnx", "--json", "r.json", "-q"]) == 2
    assert_one_error_line(capfd.readouterr().err)
    assert listing(model_path.parent) == before


def test_options_may_come_between_the_paths(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "between.onnx"
    assert cli.main([str(model_path), "--exact", "--input-shape", "x:2,3,8,8", str(out), "-q"]) == 0
    onnx.checker.check_model(str(out), full_check=True)


def test_an_internal_error_is_one_line_exit_3_and_writes_nothing(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(pipeline, "compress", broken)
    out = model_path.parent / "out.onnx"
    code = cli.main([str(model_path), str(out)])
    err = capfd.readouterr().err.strip()
    assert code == cli.INTERNAL_ERROR == 3
    assert err == (
        "red-onnx: internal error: RuntimeError: simulated bug; nothing was written — please report it "
        "(run with -v for the traceback)"
    )
    assert not out.exists()


def test_an_internal_error_with_v_prints_its_traceback_then_the_line(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipeline, "compress", broken)
    code = cli.main([str(model_path), str(model_path.parent / "out.onnx"), "-v"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[0] == "Traceback (most recent call last):"
    assert any("def broken" in line or "raise RuntimeError" in line for line in err)
    assert err[-1].startswith("red-onnx: internal error: RuntimeError: simulated bug; nothing was written")


def test_a_broken_pass_contract_is_an_internal_error(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from red_onnx.errors import PassContractError

    def broken(*args: object, **kwargs: object) -> None:
        raise PassContractError("pass merge_exact changed the model's interface")

    monkeypatch.setattr(pipeline, "compress", broken)
    code = cli.main([str(model_path), str(model_path.parent / "out.onnx")])
    err = capfd.readouterr().err.strip()
    assert code == 3
    assert err.startswith("red-onnx: internal error: PassContractError: pass merge_exact changed")


# ----------------------------------------------------------------------------------------------
# the README's calibration example


def test_the_readme_calibration_example_is_what_the_command_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The README shows real output of ``--calibration digits/``: its figures lines are printed as shown."""
    datasets = pytest.importorskip("sklearn.datasets")
    image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "digits"
    folder.mkdir()
    for index, pixels in enumerate(datasets.load_digits().images[:64]):
        image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L").save(folder / f"{index:03d}.png")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--calibration", "digits/", "--preprocess", "0-1", "--target-macs", "0.8"]) == 0
    printed = [line.strip() for line in capfd.readouterr().out.splitlines()]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = readme[readme.index("    $ red-onnx --calibration digits/") :].splitlines()[1:]
    block = itertools.takewhile(lambda line: not line or line.startswith("    "), lines)
    shown = [line.strip() for line in block if line.strip() and line.strip() != "..."]
    assert len(shown) >= 10 and any(line.startswith("sequential refit:") for line in shown)
    for line in shown:  # a trimmed line ("...; ...") matches the printed line's parts around the trim
        parts = [part.strip() for part in line.split("...") if part.strip()]
        assert any(all(part in out for part in parts) for out in printed), f"not printed: {line}"
