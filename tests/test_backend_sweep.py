"""The whole onnx backend test suite through ``compress(exact=True)``: no internal error, no wrong output.

Every model of the five folders (``node``, ``pytorch-converted``, ``pytorch-operator``, ``simple``,
``light``) is run twice — with its reference inputs' shapes and with the reference inputs in an
``.npz`` — on two worker processes with a per-run time limit; each run must verify (and match the
reference outputs wherever the original does) or be refused with a one-line error. See
``tests/backend_sweep.py``, which also runs by hand.
"""

from __future__ import annotations

import pytest
from backend_sweep import FOLDERS, MODES, cases, folder_path, sweep

#: Seconds one run may take (the slowest, light VGG-19, takes ~30 s here on a loaded machine).
TIMEOUT = 180.0


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_every_model_verifies_or_is_refused_in_one_line(folder: str) -> None:
    if folder_path(folder) is None:
        where = "the zoo's backend/node (python bench/zoo.py)" if folder == "node" else "the installed onnx"
        pytest.skip(f"the suite's {folder}/ folder is not on this machine: it comes from {where}")
    tasks = [(case, mode) for case in cases(folder) for mode in MODES]
    assert tasks, f"{folder}/ holds no case"
    results = sweep(tasks, workers=2, timeout=TIMEOUT)
    assert len(results) == len(tasks)
    bad = [
        f"{r.kind} {r.mode} {r.case}: {r.message}" for r in results if r.kind not in ("verified", "refused")
    ]
    assert not bad, "\n".join(bad)
    refusals = [r.message for r in results if r.kind == "refused"]
    assert all("\n" not in message for message in refusals)
    assert sum(r.kind == "verified" for r in results) > len(results) // 2  # most of the suite runs through
