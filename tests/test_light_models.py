"""The onnx package's nine light model-zoo graphs through ``compress(exact=True)``.

The originals (opset 9, IR 3, weights as ConstantOfShape fills whose shape inputs are initializers
listed as graph inputs) must come through unchanged in behaviour. The duplicated variants
(``graphs.light_duplicated_variant``: random weights, channel 2k+1 = channel 2k in every
per-output-channel tensor) must keep their outputs and lose at least 20% of their parameters,
unless an operator that the rules cannot see through froze the rest (then a reason names it).
The big fully connected models are marked slow (run them with --runslow).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from graphs import (
    LIGHT_MODELS,
    assert_outputs_close,
    light_duplicated_variant,
    light_model_path,
    random_feeds,
    run,
    with_outputs,
)

SLOW = {"vgg19", "zfnet512", "bvlc_alexnet"}  # 61-144 M parameters
#: Operators that legitimately freeze parts of a model (docs/method.md, "Traps that break
#: exactness"): LRN mixes channels; AlexNet has grouped convs; ShuffleNet is grouped 1x1 convs
#: around a Reshape-Transpose-Reshape shuffle.
BLOCKERS = {
    "bvlc_alexnet": ("LRN", "group"),
    "zfnet512": ("LRN",),
    "inception_v1": ("LRN",),
    "shufflenet": ("group", "Reshape", "Transpose"),
}
RTOL, ATOL_FRAC = 1e-3, 1e-5  # ORT's own kernel choices move these nets by ~1e-6 of max|y|


def _params(names: tuple[str, ...]) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Also expose the input of a final Softmax, so saturated probabilities hide nothing."""
    outputs = {o.name for o in model.graph.output}
    logits = [n.input[0] for n in model.graph.node if n.op_type == "Softmax" and n.output[0] in outputs]
    return with_outputs(model, logits)


def _assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    feeds = random_feeds(a, 0)
    ref, got = run(a, feeds), run(b, feeds)
    for name, y in ref.items():
        assert np.isfinite(y).all(), f"{name}: non-finite reference output"
    assert_outputs_close(ref, got, rtol=RTOL, atol_frac=ATOL_FRAC)


@pytest.mark.parametrize("name", _params(LIGHT_MODELS))
def test_light_variant_selfcheck(name: str) -> None:
    """The variant is valid, finite, and every ungrouped Conv/Gemm output is pairwise equal."""
    variant = light_duplicated_variant(onnx.load(light_model_path(name)), seed=0)
    onnx.checker.check_model(variant, full_check=True)
    layers = [
        n
        for n in variant.graph.node
        if n.op_type in ("Conv", "Gemm") and all(a.name != "group" or a.i == 1 for a in n.attribute)
    ]
    out = run(with_outputs(variant, [n.output[0] for n in layers]), random_feeds(variant, 0))
    for node in layers:
        y = out[node.output[0]]
        assert np.isfinite(y).all(), node.name
        n = y.shape[1] - y.shape[1] % 2
        np.testing.assert_allclose(
            y[:, 0:n:2], y[:, 1:n:2], rtol=1e-5, atol=1e-5 * float(np.abs(y).max()), err_msg=node.name
        )


@pytest.mark.parametrize("name", _params(LIGHT_MODELS))
def test_light_original_unchanged(name: str, compress: Callable[..., object]) -> None:
    model = onnx.load(light_model_path(name))
    result = compress(model, exact=True)
    onnx.checker.check_model(result.model, full_check=True)
    _assert_same_outputs(model, result.model)


@pytest.mark.parametrize("name", _params(LIGHT_MODELS))
def test_light_variant_compresses(name: str, compress: Callable[..., object]) -> None:
    variant = _with_logits(light_duplicated_variant(onnx.load(light_model_path(name)), seed=0))
    result = compress(variant, exact=True)
    onnx.checker.check_model(result.model, full_check=True)
    _assert_same_outputs(variant, result.model)
    report = result.report.to_dict()
    if report["params_after"] <= 0.8 * report["params_before"]:
        return
    reasons = " ".join(f.reason for f in result.report.frozen).lower()
    blockers = BLOCKERS.get(name, ())
    assert any(op.lower() in reasons for op in blockers), (
        f"{name}: only {1 - report['params_after'] / report['params_before']:.1%} of the "
        f"parameters removed and no frozen reason names {blockers or 'a known blocker'}"
    )
