"""Property tests: random small nets with planted redundancy; exact mode removes exactly it.

The generator (``graphs.random_planted_net``) plants identical, scaled, zero/constant and unused
channels and counts what the exact rules can prove; see its docstring for the rules.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from graphs import (
    PLANT_KINDS,
    RANDOM_ACTS,
    NetSpec,
    StageSpec,
    assert_outputs_close,
    assert_removed,
    check_planted,
    random_feeds,
    random_planted_net,
    run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
PLANTS = st.lists(st.sampled_from(PLANT_KINDS), max_size=3).map(tuple)


@st.composite
def stage_specs(draw: st.DrawFn) -> StageSpec:
    return StageSpec(
        width=draw(st.integers(3, 8)),
        act=draw(st.sampled_from(RANDOM_ACTS)),
        residual=draw(st.booleans()),
        flavour=draw(st.integers(0, 2)),
        plants=draw(PLANTS),
    )


@st.composite
def net_specs(draw: st.DrawFn, kind: str) -> NetSpec:
    """1-3 stages plus the output layer: depth 2-4 (residual blocks add one layer each)."""
    stages = tuple(draw(st.lists(stage_specs(), min_size=1, max_size=3)))
    return NetSpec(
        kind=kind,
        in_width=draw(st.integers(2, 4)),
        stages=stages,
        out_width=draw(st.integers(3, 6)),
        seed=draw(st.integers(0, 2**16)),
        out_plants=draw(PLANTS),
    )


def _check_compress(spec: NetSpec, compress: Callable[..., object]) -> None:
    built = random_planted_net(spec)
    result = compress(built.model, exact=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert_removed(built.model, built.expected_removed, result)
    for seed in (0, 1):
        feeds = random_feeds(built.model, seed)
        assert_outputs_close(run(built.model, feeds), run(result.model, feeds), rtol=1e-5, atol_frac=1e-6)


@SETTINGS
@given(spec=st.one_of(net_specs("conv"), net_specs("gemm")))
def test_random_nets_selfcheck(spec: NetSpec) -> None:
    check_planted(random_planted_net(spec), require_live=False)


@SETTINGS
@given(spec=net_specs("conv"))
def test_conv_nets_exact(spec: NetSpec, compress: Callable[..., object]) -> None:
    _check_compress(spec, compress)


@SETTINGS
@given(spec=net_specs("gemm"))
def test_gemm_nets_exact(spec: NetSpec, compress: Callable[..., object]) -> None:
    _check_compress(spec, compress)
