"""The speed benchmark's re-derivation (``bench/speed.py --from-json``; nothing is run or timed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import speed

STORED = speed.RESULTS / "speed.json"


def test_from_json_rewrites_the_file_it_read_and_leaves_the_results_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = json.loads(STORED.read_text())
    copy = tmp_path / "old_run.json"
    stored["runs"] = stored["runs"][:2]  # a smaller run than the committed one
    copy.write_text(json.dumps(stored))
    committed = STORED.read_bytes()

    assert speed.main(["--from-json", str(copy)]) == 0

    assert STORED.read_bytes() == committed
    rederived = json.loads(copy.read_text())
    assert len(rederived["runs"]) == 2
    assert all("main_excl_probes_s" in run for run in rederived["runs"])
    assert "| model |" in capsys.readouterr().out


def test_from_json_writes_to_out_when_given(tmp_path: Path) -> None:
    copy, out = tmp_path / "old_run.json", tmp_path / "elsewhere" / "rederived.json"
    copy.write_text(STORED.read_text())
    before = copy.read_bytes()

    assert speed.main(["--from-json", str(copy), "--out", str(out)]) == 0

    assert copy.read_bytes() == before
    assert json.loads(out.read_text())["runs"]
