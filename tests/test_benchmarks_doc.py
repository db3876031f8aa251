"""docs/benchmarks.md is what bench/benchmarks_doc.py renders from the committed bench/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path

from bench import benchmarks_doc

ROOT = Path(__file__).resolve().parents[1]


def test_committed_doc_is_the_rendered_results(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    assert benchmarks_doc.main(["--out", str(out)]) == 0
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert out.read_text() == committed, "docs/benchmarks.md is stale: run python bench/benchmarks_doc.py"


def test_doc_shows_figures_of_the_results_files() -> None:
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    latency = json.loads((ROOT / "bench" / "results" / "latency.json").read_text())
    assert f"wall {latency['wall_seconds']} s" in doc
    compare = json.loads((ROOT / "bench" / "results" / "compare.json").read_text())
    red = compare[0]["cells"]["red"]
    assert f"{red['fidelity']:.3f} @ {red['macs']:.2f}" in doc
    speed = json.loads((ROOT / "bench" / "results" / "speed.json").read_text())
    run = next(r for r in speed["runs"] if r["model"] == "conv25m" and r["mode"] == "target")
    assert f"| {run['wall_s']:.1f} |" in doc


def test_every_results_file_has_a_section() -> None:
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        assert f"Results file: `bench/results/{path.name}`" in doc
