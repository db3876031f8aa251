"""The capture-based estimate of a merge plan's disturbance, and the search modes that use it.

Where the estimate is exact (1×1 convs and Gemm consumers: every weight column reads the same
channels at the same positions) it must equal the relative change of the consumer's output computed
from onnxruntime's activations; elsewhere it must vanish for exact duplicates. The search modes that
order merges by it still keep only what they measured on the model's outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Net, flatten_gemm, gemm_mlp, nhwc_matmul
from test_budget import conv_net, residual_net

from red_onnx import compress
from red_onnx.analysis.redundancy import Merge
from red_onnx.errors import UsageError
from red_onnx.io import graph
from red_onnx.options import InputSpec
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.runtime.shapes import ShapeService
from red_onnx.runtime.tensor_values import run_tensors, tensor_fetch
from red_onnx.search.budget import BudgetSearch
from red_onnx.search.sensitivity import (
    ConsumerGrams,
    ConsumerRows,
    LocalSensitivity,
    _product_norm,
    capture_grams,
    consumer_inputs,
)
from red_onnx.verify.inputs import make_inputs


def wide_gemm_net(seed: int = 0) -> onnx.ModelProto:
    """fc1 (6→64) → Tanh → fc2 (64→3) on 7 rows: a tensor with many channels and few positions."""
    net = Net(seed)
    x = net.input("x", [7, 6])
    h = net.act("Tanh", net.gemm("fc1", x, 6, 64), "tanh1")
    return net.build([net.gemm("fc2", h, 64, 3)])


def pointwise_net(seed: int = 0) -> tuple[onnx.ModelProto, str]:
    """conv1 (4→8, 1×1) → Relu → conv2 (8→5, 1×1): one group, conv2 its consumer; and the Relu output."""
    net = Net(seed)
    x = net.input("x", [2, 4, 6, 6])
    h = net.act("Relu", net.conv("conv1", x, 4, 8, k=1), "relu1")
    return net.build([net.conv("conv2", h, 8, 5, k=1)]), h


def gemm_net(seed: int = 0) -> tuple[onnx.ModelProto, str]:
    """fc1 (6→10) → Tanh → fc2 (10→3): one group (not homogeneous), fc2 its consumer; the Tanh output."""
    net = Net(seed)
    x = net.input("x", [7, 6])
    h = net.act("Tanh", net.gemm("fc1", x, 6, 10), "tanh1")
    return net.build([net.gemm("fc2", h, 10, 3)]), h


def sensitivity_of(
    model: onnx.ModelProto, seeds: tuple[int, ...] = (0, 1), form: str = "auto"
) -> tuple[LocalSensitivity, list]:
    feeds = [make_inputs(model, InputSpec(), seed) for seed in seeds]
    working = graph.import_model(model)
    shapes = ShapeService(feeds[0])(working)
    groups = mergeable_groups(working, shapes, ())
    fetch = tensor_fetch(model, list(consumer_inputs(groups)))
    return LocalSensitivity(fetch, groups, feeds, form=form), groups


def weight_of(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def changed_output(x: np.ndarray, weight: np.ndarray, merges: list[Merge]) -> tuple[np.ndarray, np.ndarray]:
    """(Δy, y) of a linear consumer reading channels on axis 1 of ``x``, by hand (bias left out)."""
    merged = weight.astype(np.float64).copy()
    for m in merges:  # a source may be merged into several targets (the refit's plans)
        merged[:, m.target] += m.scale * weight[:, m.source]
    merged[:, [m.source for m in merges]] = 0.0
    x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]).astype(np.float64)  # [positions, channels]
    offsets = np.zeros(weight.shape[1])
    for m in merges:
        offsets[m.source] += m.offset
    delta = x @ (merged - weight).T + (weight.astype(np.float64) @ offsets)[None, :]
    return delta, x @ weight.T.astype(np.float64)


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_estimate_equals_the_consumer_change_for_pointwise_convs(offset: float) -> None:
    model, hidden = pointwise_net()
    local, groups = sensitivity_of(model)
    (group,) = groups
    merges = [Merge(1, 0, 0.8, offset), Merge(5, 0, 1.3), Merge(6, 2, 0.5, -offset)]
    feeds = [make_inputs(model, InputSpec(), seed) for seed in (0, 1)]
    captured = np.concatenate([run[0] for run in run_tensors(model, [hidden], feeds)])
    weight = weight_of(model, "conv2.W")[:, :, 0, 0]
    delta, full = changed_output(captured, weight, merges)
    expected = np.linalg.norm(delta) / np.linalg.norm(full)
    assert local.error(group.name, merges) == pytest.approx(expected, rel=1e-6)  # H = V·Vᵀ in float32


#: Refit-style plans: each removed channel merged into several kept ones, one offset per source.
SPREAD = [Merge(1, 0, 0.8, 0.2), Merge(1, 2, -0.4), Merge(1, 3, 0.1), Merge(6, 0, 0.5, -0.3),
          Merge(6, 3, 1.1), Merge(5, 4, 0.7)]  # fmt: skip


@pytest.mark.parametrize("form", ["gram", "rows"])
def test_estimate_of_a_source_merged_into_many_targets_counts_its_removal_once(form: str) -> None:
    model, hidden = pointwise_net()
    local, groups = sensitivity_of(model, form=form)
    (group,) = groups
    feeds = [make_inputs(model, InputSpec(), seed) for seed in (0, 1)]
    captured = np.concatenate([run[0] for run in run_tensors(model, [hidden], feeds)])
    weight = weight_of(model, "conv2.W")[:, :, 0, 0]
    delta, full = changed_output(captured, weight, SPREAD)
    expected = np.linalg.norm(delta) / np.linalg.norm(full)
    assert local.error(group.name, SPREAD) == pytest.approx(expected, rel=1e-6)


def test_estimate_equals_the_consumer_change_for_gemm() -> None:
    model, hidden = gemm_net()
    local, groups = sensitivity_of(model, seeds=(3,))
    (group,) = groups
    merges = [Merge(9, 4, 1.0), Merge(2, 4, 1.0), Merge(7, 1, 1.0)]
    captured = run_tensors(model, [hidden], [make_inputs(model, InputSpec(), 3)])[0][0]
    weight = weight_of(model, "fc2.W")  # Gemm transB=1: [out, in]
    delta, full = changed_output(captured, weight, merges)
    expected = np.linalg.norm(delta) / np.linalg.norm(full)
    assert local.error(group.name, merges) == pytest.approx(expected, rel=1e-6)  # H = V·Vᵀ in float32


def test_estimate_vanishes_for_exact_duplicates_and_not_otherwise() -> None:
    model = conv_net(0.0)  # 3×3 convs; conv1 channels planted as exact positive multiples
    local, groups = sensitivity_of(model)
    (group,) = groups
    shapes = ShapeService(make_inputs(model, InputSpec(), 0))
    search = BudgetSearch(model, model, InputSpec(), shapes, channel_multiple=1, hashing=False)
    planted = search.orderings[group.name][0].merges(4)
    assert local.error(group.name, planted) < 1e-6
    assert local.error(group.name, [Merge(0, 1, 1.0)]) > 1e-2
    assert local.error(group.name, []) == 0.0


@pytest.mark.parametrize("mode", ["local", "calibrated"])
@pytest.mark.parametrize("builder", [lambda: conv_net(0.05), lambda: residual_net(0.05)])
def test_estimated_search_keeps_only_what_it_measured(mode: str, builder) -> None:
    model = builder()
    spec = InputSpec()
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False, activations=False, sensitivity=mode)  # fmt: skip
    assert search.sensitivity == mode
    result = search.within_tolerance(0.04)
    assert result.sensitivity == mode and result.macs_fraction < 1.0
    rebuilt = search.apply_plan(search._plan(result.counts))
    assert max(search.verifier.rel_l2_errors(rebuilt, "disable_all").values()) <= 0.04 + 1e-6
    assert result.heldout_error <= 0.04  # and the reported curve holds measured points only:
    assert all(any(abs(e - v) < 1e-12 for v in search.cache.values()) for _, e in result.curve)


def test_estimated_search_needs_fewer_measurements_and_reaches_the_target() -> None:
    model = residual_net(0.05)
    spec = InputSpec()
    shapes = ShapeService(make_inputs(model, spec, 0))
    counts = {}
    for mode in ("measured", "local"):
        search = BudgetSearch(model, model, spec, shapes, channel_multiple=1, hashing=False,
                              activations=False, sensitivity=mode)  # fmt: skip
        result, reachable = search.to_target(0.8)
        assert reachable <= 0.8 and result.macs_fraction <= 0.8
        counts[mode] = result.evaluations
    assert counts["local"] < counts["measured"]


def test_the_estimate_is_released_before_the_joint_measurements_and_measured_after() -> None:
    model = residual_net(0.05)
    spec = InputSpec()
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1,
                          hashing=False, activations=False, sensitivity="calibrated")  # fmt: skip
    local = search.local
    result, _ = search.to_target(0.8)
    assert local.released and result.macs_fraction <= 0.8
    with pytest.raises(RuntimeError, match="released"):
        local.error(search.options[0].name, [])
    option = next(o for o in search.options if o.levels[-1] > 1)
    measured_before = len(search.cache)
    assert search._alone(option.name, option.levels[1]) == search.error({option.name: option.levels[1]})
    assert len(search.cache) >= measured_before  # the error alone of a later step is measured, not estimated


def test_auto_measures_small_models_and_rejects_unknown_modes(tmp_path) -> None:
    model = conv_net(0.05)
    spec = InputSpec()
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)))
    assert search.sensitivity == "measured"  # below LARGE_MODEL_MACS
    with pytest.raises(ValueError, match="sensitivity"):
        BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), sensitivity="guess")
    with pytest.raises(UsageError, match="--sensitivity"):
        compress(model, tolerance=0.02, sensitivity="guess")
    result = compress(model, tolerance=0.04, sensitivity="calibrated", separation=False)
    assert result.report.budget["sensitivity"] == "calibrated"


def random_merges(rng: np.random.Generator, n_atoms: int, offsets: bool) -> list[Merge]:
    """Between one and half of the atoms merged, each into an atom that stays; scales and offsets drawn."""
    atoms = rng.permutation(n_atoms)
    count = int(rng.integers(1, n_atoms // 2 + 1))
    targets = rng.choice(atoms[count:], count)
    return [Merge(int(source), int(target), float(rng.uniform(-2.0, 2.0)), float(rng.normal()) * offsets)
            for source, target in zip(atoms[:count], targets, strict=True)]  # fmt: skip


FORM_CASES = {
    "conv 3×3": lambda: conv_net(0.05),
    "gemm": lambda: gemm_net()[0],
    "flatten-gemm (blocks of 9)": lambda: flatten_gemm().model,
    "gemm transB=0": lambda: gemm_mlp(0, "N").model,
    "transpose-matmul": lambda: nhwc_matmul().model,
    "wide gemm": wide_gemm_net,
}


@pytest.mark.parametrize("builder", FORM_CASES.values(), ids=FORM_CASES.keys())
def test_the_gram_and_rows_forms_give_the_same_estimate(builder) -> None:
    model = builder()
    gram, groups = sensitivity_of(model, form="gram")
    rows, _ = sensitivity_of(model, form="rows")
    assert all(isinstance(c, ConsumerGrams) for consumers in gram.consumers.values() for c in consumers)
    assert all(isinstance(c, ConsumerRows) for consumers in rows.consumers.values() for c in consumers)
    rng = np.random.default_rng(0)
    for group in groups:
        for trial in range(25):
            merges = random_merges(rng, group.n_atoms, offsets=trial % 2 == 1)
            expected = gram.error(group.name, merges)
            assert expected > 0.0 and rows.error(group.name, merges) == pytest.approx(expected, rel=1e-6)


def test_few_positions_and_many_channels_keep_the_rows_in_less_memory() -> None:
    local, groups = sensitivity_of(wide_gemm_net())  # 64 channels, 7 positions per feed, two feeds
    (consumer,) = local.consumers[groups[0].name]
    assert isinstance(consumer, ConsumerRows) and consumer.inputs.shape == (64, 14)
    assert consumer.inputs.dtype == np.float32
    assert local.nbytes == consumer.inputs.nbytes < 65 * 65 * 8  # its Gram matrix alone, without H
    many, groups = sensitivity_of(pointwise_net()[0])  # 8 channels, 72 positions per feed: the Gram
    assert all(isinstance(c, ConsumerGrams) for c in many.consumers[groups[0].name])
    local.release()
    assert local.nbytes == 0


def test_rows_folded_into_the_gram_mid_capture_give_the_same_sums() -> None:
    model, hidden = pointwise_net()  # 8 channels, 72 positions per feed: rows for one feed, then the Gram
    feeds = [make_inputs(model, InputSpec(), seed) for seed in (0, 1, 2)]
    fetch = tensor_fetch(model, [hidden])
    direct, none = capture_grams(fetch, feeds, {hidden: (1, 1)}, rows_below=0.0)
    folded, _ = capture_grams(fetch, feeds, {hidden: (1, 1)}, rows_below=100 / 9)
    kept, rows = capture_grams(fetch, feeds, {hidden: (1, 1)}, rows_below=np.inf)
    assert not none and not kept and rows[hidden].shape == (8, 216)
    assert np.array_equal(folded[hidden], direct[hidden])  # bit for bit: the same sums in the same order
    augmented = np.vstack([rows[hidden], np.ones((1, 216))])
    assert np.allclose(augmented @ augmented.T, direct[hidden], rtol=1e-12)


@pytest.mark.parametrize("n", [3, 10, 40])  # the product of the two Grams (3, 10), or the product itself
def test_product_norm_by_either_route_matches_float64(n: int, monkeypatch) -> None:
    monkeypatch.setattr("red_onnx.search.sensitivity.PRODUCT_ELEMENTS", 1000)  # several column blocks
    rng = np.random.default_rng(n)
    weights = rng.standard_normal((n, 50)).astype(np.float32)
    rows = rng.standard_normal((n, 30)) + 5.0  # a common mean: the products cancel
    expected = np.linalg.norm(weights.T.astype(np.float64) @ rows) ** 2
    assert _product_norm(weights, rows) == pytest.approx(expected, rel=1e-5)
