"""The floors of docs/architecture.md: what each subpackage may import, and a light command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

#: Floor -> the floors it may import (besides itself and the leaves ``errors``, ``options``, ``_version``).
ALLOWED = {
    "io": set(),
    "runtime": {"io"},
    "analysis": {"io"},
    "rewrite": {"analysis", "io"},
    "verify": {"runtime", "io"},
    "measure": {"verify", "runtime", "io"},
    "passes": {"rewrite", "analysis", "io", "measure.latency"},
    "search": {"passes", "rewrite", "analysis", "verify", "measure", "runtime", "io"},
    "report": {"passes", "rewrite", "analysis", "measure"},
    "demo": set(),
    "pipeline": {"io", "runtime", "analysis", "rewrite", "verify", "measure", "passes", "search", "report"},
    "cli": {"pipeline", "report", "measure", "io", "demo"},
}
LEAVES = {"errors", "options", "_version"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / "red_onnx").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "passes").glob("*.py")):
        modules["red_onnx.passes" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return modules


def _floor(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "red_onnx"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("red_onnx"):
            names |= {
                f"{node.module}.{a.name}" if node.module == "red_onnx" else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("red_onnx")}
    return names


def _allowed(floor: str, imported: str) -> bool:
    target = _floor(imported)
    if target in LEAVES or target == floor:
        return True
    grants = ALLOWED[floor]
    return target in grants or ".".join(imported.split(".")[1:3]) in grants


def test_every_module_sits_on_a_known_floor() -> None:
    floors = {_floor(name) for name in _modules()} - {"red_onnx", "data"} - LEAVES
    assert floors == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if _floor(m) in ALLOWED))
def test_a_floor_imports_only_what_it_may(module: str) -> None:
    floor = _floor(module)
    wrong = sorted(name for name in _imports(_modules()[module]) if not _allowed(floor, name))
    assert not wrong, f"{module} ({floor}) imports {wrong}; allowed: {sorted(ALLOWED[floor])}"


def test_help_imports_neither_onnx_nor_onnxruntime() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import red_onnx, red_onnx.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    red_onnx.cli.main(['--help'])\n"
        "heavy = {'onnx', 'onnxruntime', 'numpy', 'scipy', 'sklearn', 'onnx_graphsurgeon'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert loaded.stdout.strip() == "[]"


def test_the_pipeline_is_still_reachable_from_the_package() -> None:
    import red_onnx
    from red_onnx.pipeline import compress

    assert red_onnx.compress is compress
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = red_onnx.nothing  # type: ignore[attr-defined]
