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
    Net,
    assert_outputs_close,
    assert_removed,
    check_planted,
    conv_chain_identical,
    flatten_gemm,
    random_feeds,
    removed_by_report,
    run,
)

import red_onnx
from red_onnx.passes.merge_exact import align_to_multiple

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


@pytest.mark.parametrize(
    "sizes,deleted,multiple,restored",
    [
        ((32,), 3, 8, 3),  # 29 kept -> 32: nothing removed
        ((32,), 10, 8, 2),  # 22 kept -> 24
        ((32,), 26, 8, 0),  # 6 kept: at most one step left, any count
        ((32,), 8, 8, 0),  # 24 kept: on the multiple
        ((12,), 3, 8, 0),  # narrower than twice the multiple: left alone
        ((32, 16), 5, 8, 5),  # per segment: 27 -> 32 in the first, the second untouched
        ((32,), 3, 1, 0),  # multiple 1: no rounding
    ],
)
def test_align_to_multiple(sizes: tuple[int, ...], deleted: int, multiple: int, restored: int) -> None:
    segment = np.repeat(np.arange(len(sizes)), sizes)
    delete = np.zeros(len(segment), bool)
    delete[:deleted] = True  # all in the first segment
    before = delete.copy()
    back = align_to_multiple(segment, delete, multiple)
    assert len(back) == restored and before[back].all() and not delete[back].any()
    assert np.array_equal(delete | np.isin(np.arange(len(segment)), back), before)


@pytest.mark.parametrize("multiple,removed", [(1, 3), (8, 0), (4, 0)])
def test_exact_keeps_wide_layers_on_the_channel_multiple(multiple: int, removed: int) -> None:
    """A 32-channel conv with 3 duplicate channels: removing them leaves 29 (odd counts ran up to 1.2×
    slower here), so at multiples 4 and 8 exact mode keeps all 32; outputs unchanged either way."""
    net = Net(0)
    h = net.act("Relu", net.conv("c1", net.input("x", [1, 8, 10, 10]), 8, 32), "r1")
    weight, bias = net.arrays[net.layout["c1"][0]], net.arrays[net.layout["c1"][2]]
    for j in range(3):
        weight[29 + j], bias[29 + j] = weight[j], bias[j]
    model = net.build([net.conv("c2", h, 32, 6)])
    result = red_onnx.compress(model, exact=True, channel_multiple=multiple)
    layer = next(layer for layer in result.report.layers if layer.name == "c1")
    assert layer.channels_before - layer.channels_after == removed
    assert result.verified
    _outputs_unchanged(model, result.model)
