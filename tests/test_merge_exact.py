"""Behaviour of ``compress(exact=True)`` on the shared graphs with planted redundancy.

``test_builder_selfcheck`` needs only onnxruntime: it proves that each graph really holds the
redundancy its ``expected_removed`` counts rely on. The other tests run the engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from graphs import (
    BUILDERS,
    BuiltGraph,
    assert_outputs_close,
    assert_removed,
    check_planted,
    conv_chain_identical,
    flatten_gemm,
    random_feeds,
    removed_by_report,
    run,
)

CASES = sorted(BUILDERS)
SEEDS = (0, 1, 2)


def _outputs_unchanged(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    for seed in SEEDS:
        feeds = random_feeds(original, seed)
        assert_outputs_close(run(original, feeds), run(rewritten, feeds), rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_builder_selfcheck(name: str) -> None:
    check_planted(BUILDERS[name](), seeds=SEEDS)


def test_builders_are_deterministic() -> None:
    a, b = conv_chain_identical(seed=3), conv_chain_identical(seed=3)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.model.SerializeToString() != conv_chain_identical(seed=4).model.SerializeToString()


@pytest.mark.parametrize("name", CASES)
def test_exact_removes_planted_channels(name: str, compress: Callable[..., object]) -> None:
    built: BuiltGraph = BUILDERS[name]()
    result = compress(built.model, exact=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert_removed(built.model, built.expected_removed, result)
    _outputs_unchanged(built.model, result.model)


@pytest.mark.parametrize("name", CASES)
def test_frozen_groups_have_reasons(name: str, compress: Callable[..., object]) -> None:
    result = compress(BUILDERS[name]().model, exact=True)
    frozen = result.report.frozen
    assert frozen, "every graph has an output, so at least one group is frozen"
    for entry in frozen:
        assert isinstance(entry.group, str) and entry.group.strip(), entry
        assert isinstance(entry.reason, str) and entry.reason.strip(), entry


def test_freeze_name_protects_layer(compress: Callable[..., object]) -> None:
    built = conv_chain_identical()
    result = compress(built.model, exact=True, freeze=["conv1"])
    assert removed_by_report(result.report).get("conv1", 0) == 0
    assert_removed(built.model, {}, result)
    text = " ".join(f"{f.group} {f.reason}" for f in result.report.frozen)
    assert "conv1" in text, f"the frozen list does not mention conv1: {text!r}"
    _outputs_unchanged(built.model, result.model)


def test_freeze_glob_protects_only_matches(compress: Callable[..., object]) -> None:
    built = flatten_gemm()
    result = compress(built.model, exact=True, freeze=["fc*"])
    assert_removed(built.model, {"conv1": built.expected_removed["conv1"]}, result)
    _outputs_unchanged(built.model, result.model)


def test_input_model_not_mutated(compress: Callable[..., object]) -> None:
    built = conv_chain_identical()
    before = built.model.SerializeToString()
    compress(built.model, exact=True)
    assert built.model.SerializeToString() == before


def test_accepts_a_path(tmp_path: os.PathLike[str], compress: Callable[..., object]) -> None:
    built = conv_chain_identical()
    path = os.path.join(tmp_path, "chain.onnx")
    onnx.save(built.model, path)
    result = compress(path, exact=True)
    assert_removed(built.model, built.expected_removed, result)


def test_report_dict_is_json_and_counts_go_down(compress: Callable[..., object]) -> None:
    built = conv_chain_identical()
    result = compress(built.model, exact=True)
    report = result.report.to_dict()
    json.dumps(report)
    n_params = sum(int(np.prod(i.dims)) for i in built.model.graph.initializer)
    assert report["params_before"] <= n_params
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    # conv1 loses 3 of 8 rows (36 weights + 1 bias each) and conv2 3 of its 8 input slices.
    assert report["params_before"] - report["params_after"] == 3 * 37 + 3 * 6 * 9
