"""Shared pytest setup: import paths, the ``slow`` marker, and the engine entry point."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, ROOT):  # `import graphs` and `import red_onnx` without installing
    if _path not in sys.path:
        sys.path.insert(0, _path)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run tests marked slow (or set RED_ONNX_SLOW=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes more than ~10 s on 2 cores; skipped unless --runslow or RED_ONNX_SLOW=1"
    )
    config.addinivalue_line(
        "markers",
        "huge: needs ~20 GB of memory and minutes (the 3 GB model); only with RED_ONNX_HUGE=1, not in CI",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RED_ONNX_HUGE") != "1":
        huge = pytest.mark.skip(reason="huge (3 GB model, ~20 GB RAM, ~12 min): run with RED_ONNX_HUGE=1")
        for item in items:
            if "huge" in item.keywords:
                item.add_marker(huge)
    if config.getoption("--runslow") or os.environ.get("RED_ONNX_SLOW") == "1" or os.environ.get("CI"):
        return  # CI (CI=true, as .ci/run is run) always runs them
    skip = pytest.mark.skip(reason="slow: run with --runslow or RED_ONNX_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def compress() -> Callable[..., object]:
    """``red_onnx.compress``; a test using it errors (not skips) while the engine is missing."""
    from red_onnx import compress as _compress

    return _compress
