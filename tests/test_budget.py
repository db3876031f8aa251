"""Approximate merging through ``compress(tolerance=T)`` / ``compress(target_macs=F)``, and the budget search.

The graphs carry planted *near*-duplicate channels (row j = λ·row i + ε·noise, bias likewise) among
random ones. Errors are measured here with our own onnxruntime runs on fresh seeded inputs (not the
seeds the search or the verification used); "deleting without compensation" is computed by zeroing
the consumers' slices of the deleted channels in the original weights.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Net, random_feeds, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import red_onnx
from red_onnx import cli
from red_onnx.measure import metrics
from red_onnx.report.report import Report
from red_onnx.search.budget import removal_levels
from red_onnx.search.channel_steps import effective_multiple

#: Seeds of our own error measurements (the pipeline uses 0, 1, 7 and 100..103).
FRESH_SEEDS = (901, 902, 903)
TOLERANCE = 0.05

# ----------------------------------------------------------------------------------------------
# helpers


def _rows(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def _near(
    net: Net, nodes: Sequence[str], j: int, i: int, lam: float, eps: float, rng: np.random.Generator
) -> None:
    """In every producer of ``nodes``: row j = λ·row i + ε·(noise of row i's scale), bias likewise."""
    for node in nodes:
        w_name, axis, b_name, b_axis = net.layout[node]
        rows = _rows(net.arrays[w_name], axis)
        noise = rng.standard_normal(rows[i].shape) * float(np.std(rows[i]))
        rows[j] = lam * rows[i] + eps * noise
        if b_name:
            bias = _rows(net.arrays[b_name], b_axis)
            bias[i] = max(abs(float(bias[i])), 0.2)
            bias[j] = lam * bias[i] + eps * 0.2 * rng.standard_normal()


#: (j, i, λ) planted in a 16-channel producer.
PAIRS16 = ((12, 1, 2.0), (13, 3, 0.5), (14, 5, 1.0), (15, 7, 1.5))


def conv_net(eps: float, seed: int = 0, pairs: Sequence[tuple[int, int, float]] = PAIRS16) -> onnx.ModelProto:
    """conv1 (4→16) → Relu → conv2 (16→6); ``pairs`` planted in conv1."""
    net = Net(seed)
    x = net.input("x", [2, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 16), "relu1")
    y = net.conv("conv2", h, 16, 6)
    rng = np.random.default_rng(seed + 100)
    for j, i, lam in pairs:
        _near(net, ["conv1"], j, i, lam, eps, rng)
    return net.build([y])


def gemm_mlp(eps: float, seed: int = 0) -> onnx.ModelProto:
    """fc1 (16→32, transB) → Relu → fc2 (32→10); four pairs planted in fc1 (a removal level of 32)."""
    net = Net(seed)
    x = net.input("x", [16, 16])
    h = net.act("Relu", net.gemm("fc1", x, 16, 32), "relu1")
    y = net.gemm("fc2", h, 32, 10)
    rng = np.random.default_rng(seed + 100)
    for j, i, lam in ((28, 0, 2.0), (29, 4, 0.5), (30, 8, 1.0), (31, 12, 0.75)):
        _near(net, ["fc1"], j, i, lam, eps, rng)
    return net.build([y])


def residual_net(eps: float, seed: int = 0) -> onnx.ModelProto:
    """relu(conv0) + convB(relu(convA(·))) → Relu → conv_out; pairs planted in conv0 *and* convB."""
    net = Net(seed)
    x = net.input("x", [2, 4, 8, 8])
    r0 = net.act("Relu", net.conv("conv0", x, 4, 8), "relu0")
    a = net.act("Relu", net.conv("convA", r0, 8, 8), "reluA")
    s = net.op("Add", [r0, net.conv("convB", a, 8, 8)], "add")
    y = net.conv("conv_out", net.act("Relu", s, "relu_add"), 8, 5)
    rng = np.random.default_rng(seed + 100)
    for j, i, lam in ((6, 1, 2.0), (7, 3, 0.5)):
        _near(net, ["conv0", "convB"], j, i, lam, eps, rng)
    return net.build([y])


#: model builder, producers of the planted group, its consumers (weight name → input axis), pairs planted.
CASES: dict[str, tuple[Callable[[float], onnx.ModelProto], tuple[str, ...], dict[str, int], int]] = {
    "conv": (conv_net, ("conv1",), {"conv2.W": 1}, 4),
    "gemm": (gemm_mlp, ("fc1",), {"fc2.W": 1}, 4),
    "residual": (residual_net, ("conv0", "convB"), {"convA.W": 1, "conv_out.W": 1}, 2),
}


def rel_l2(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, float]:
    """Relative L2 error of every output over the fresh seeds (our own onnxruntime runs)."""
    refs, gots = [], []
    for seed in FRESH_SEEDS:
        feeds = random_feeds(reference, seed)
        refs.append(run(reference, feeds))
        gots.append(run(candidate, feeds))
    errors = {}
    for name in refs[0]:
        y = np.concatenate([r[name].ravel() for r in refs]).astype(np.float64)
        z = np.concatenate([g[name].ravel() for g in gots]).astype(np.float64)
        errors[name] = float(np.linalg.norm(z - y) / np.linalg.norm(y))
    return errors


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by name, and each node's weight/bias by ``<node>.W`` / ``<node>.B`` (renames happen)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = dict(inits)
    for node in model.graph.node:
        for role, index in (("W", 1), ("B", 2)):
            if len(node.input) > index and node.input[index] in inits:
                out[f"{node.name}.{role}"] = inits[node.input[index]]
    return out


def producer_vectors(model: onnx.ModelProto, producers: Sequence[str]) -> np.ndarray:
    """Per output channel: every producer's row and bias, concatenated (Gemm transB=1, Conv)."""
    w = weights(model)
    parts = []
    for name in producers:
        weight = w[f"{name}.W"]
        parts += [weight.reshape(weight.shape[0], -1), w.get(f"{name}.B", w.get(f"{name}.C"))[:, None]]
    return np.hstack(parts).astype(np.float64)


def kept_channels(original: onnx.ModelProto, result: onnx.ModelProto, producers: Sequence[str]) -> np.ndarray:
    """Indices of the original channels still present (producer rows are kept verbatim)."""
    before, after = producer_vectors(original, producers), producer_vectors(result, producers)
    found = [int(np.flatnonzero((before == row).all(axis=1))[0]) for row in after]
    assert found == sorted(set(found)), "kept rows must be distinct original rows, in order"
    return np.array(found)


def edited(model: onnx.ModelProto, changes: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``model`` with some initializers replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in changes:
            init.CopyFrom(numpy_helper.from_array(changes[init.name].astype(np.float32), init.name))
    return out


def deleted_without_compensation(
    model: onnx.ModelProto, consumers: dict[str, int], gone: np.ndarray
) -> onnx.ModelProto:
    """The original model with the consumers' slices of ``gone`` zeroed (= deleting the channels)."""
    w = weights(model)
    changes = {}
    for name, axis in consumers.items():
        weight = w[name].copy()
        _rows(weight, axis)[gone] = 0.0
        changes[name] = weight
    return edited(model, changes)


def merged_by_hand(model: onnx.ModelProto, producers: Sequence[str], consumers: dict[str, int],
                   merges: dict[int, int]) -> onnx.ModelProto:  # fmt: skip
    """docs/method.md, "Approximate merging", with numpy: λ = <v_j, v_i>/‖v_i‖², V_i += λ·V_j, V_j = 0."""
    vectors = producer_vectors(model, producers)
    w = weights(model)
    changes = {}
    for name, axis in consumers.items():
        weight = w[name].astype(np.float64)
        rows = _rows(weight, axis)
        for j, i in merges.items():
            lam = vectors[j] @ vectors[i] / (vectors[i] @ vectors[i])
            rows[i] += lam * rows[j]
            rows[j] = 0.0
        changes[name] = weight
    return edited(model, changes)


def channels(report: Report) -> dict[str, tuple[int, int]]:
    return {layer.name: (layer.channels_before, layer.channels_after) for layer in report.layers}


# ----------------------------------------------------------------------------------------------
# removal_levels


@settings(max_examples=400, deadline=None)
@given(st.integers(3, 600), st.data())
def test_removal_levels_contract(n_atoms: int, data: st.DataObject) -> None:
    available = data.draw(st.integers(0, n_atoms))
    multiple = data.draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
    levels = removal_levels(n_atoms, available, multiple)
    assert levels[0] == 0
    assert all(a < b for a, b in itertools.pairwise(levels))
    assert levels[-1] <= available and levels[-1] < n_atoms
    step = effective_multiple(n_atoms, multiple)
    assert all((n_atoms - r) % step == 0 for r in levels[1:])
    if available >= n_atoms // 2 and n_atoms >= 4 * multiple:
        assert len(levels) >= 3  # a big group with candidates gets several levels to try


def test_removal_levels_examples() -> None:
    assert removal_levels(16, 16, 1) == [0, 1, 2, 4, 6, 8, 10, 12]
    assert removal_levels(16, 16, 4) == [0, 4, 8, 12]
    assert removal_levels(16, 5, 4) == [0, 4]
    assert removal_levels(64, 64, 8) == [0, 8, 16, 24, 32, 40, 48]
    assert removal_levels(16, 0, 1) == [0]
    assert removal_levels(6, 6, 4) == [0, 2, 4]  # too small for 4: kept counts on 2 (effective_multiple)
    assert removal_levels(3, 3, 4) == [0, 1, 2]  # too small for 2: free


@pytest.mark.parametrize("multiple", [1, 8])
def test_removal_levels_never_remove_a_two_channel_group(multiple: int) -> None:
    assert max(removal_levels(2, 2, multiple)) < 2


# ----------------------------------------------------------------------------------------------
# merging correctness


@pytest.mark.parametrize("case", sorted(CASES))
def test_near_duplicates_merge_with_small_error_decreasing_with_noise(case: str) -> None:
    build, producers, consumers, planted = CASES[case]
    errors = {}
    for eps in (1e-2, 1e-4):
        original = build(eps)
        result = red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=1)
        onnx.checker.check_model(result.model, full_check=True)
        n = producer_vectors(original, producers).shape[0]
        kept = kept_channels(original, result.model, producers)
        gone = np.setdiff1d(np.arange(n), kept)
        assert len(gone) == planted, f"{case}: expected the {planted} planted pairs to merge, got {gone}"
        for name in producers:
            assert channels(result.report)[name] == (n, len(kept))
        error = max(rel_l2(original, result.model).values())
        deleted = max(rel_l2(original, deleted_without_compensation(original, consumers, gone)).values())
        assert error < TOLERANCE
        assert deleted > 5 * error, f"{case} eps={eps}: deleting ({deleted:.3g}) vs merging ({error:.3g})"
        errors[eps] = error
    assert errors[1e-4] < errors[1e-2] / 10, errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_compensates_like_the_method_rule(case: str) -> None:
    """The consumers get V_i += λ·V_j with λ = <v_j, v_i>/‖v_i‖² over all coupled producers."""
    build, producers, consumers, _ = CASES[case]
    original = build(1e-2)
    result = red_onnx.compress(
        original, tolerance=TOLERANCE, channel_multiple=1, hashing=False, activations=False
    )
    vectors = producer_vectors(original, producers)
    kept = kept_channels(original, result.model, producers)
    gone = np.setdiff1d(np.arange(len(vectors)), kept)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit[gone] @ unit[kept].T  # each deleted channel's planted partner is its kept twin
    merges = {int(j): int(kept[k]) for j, k in zip(gone, similarity.argmax(axis=1), strict=True)}
    assert similarity.max(axis=1).min() > 0.99
    by_hand = merged_by_hand(original, producers, consumers, merges)
    assert max(rel_l2(by_hand, result.model).values()) < 1e-5


# ----------------------------------------------------------------------------------------------
# the budget contract through compress


def two_heads(eps: float = 1e-3, seed: int = 0) -> onnx.ModelProto:
    """conv1 (4→16) → Relu → {conv2 (16→6), GlobalAveragePool → Flatten → fc (16→3)}: two outputs."""
    net = Net(seed)
    x = net.input("x", [2, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 16), "relu1")
    y1 = net.conv("conv2", h, 16, 6)
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [h], "gap")], "flatten")
    y2 = net.gemm("fc", flat, 16, 3)
    rng = np.random.default_rng(seed + 100)
    for j, i, lam in PAIRS16:
        _near(net, ["conv1"], j, i, lam, eps, rng)
    return net.build([y1, y2])


@pytest.mark.parametrize("tolerance", [0.005, 0.05])
def test_tolerance_budget_and_verdict(tolerance: float) -> None:
    original = two_heads()
    result = red_onnx.compress(original, tolerance=tolerance, channel_multiple=1, raise_on_failure=False)
    budget, verification = result.report.budget, result.report.verification
    assert budget is not None and {"error", "heldout_error", "macs_fraction", "curve"} <= set(budget)
    assert 0 <= budget["error"] <= tolerance and 0 <= budget["heldout_error"] <= tolerance
    outputs = verification["outputs"]
    assert len(outputs) == 2
    assert verification["passed"] == all(o["rel_l2_err"] <= tolerance for o in outputs)
    assert verification["passed"] and result.verified
    assert result.report.macs_after < result.report.macs_before  # the planted pairs went
    assert max(rel_l2(original, result.model).values()) <= 2 * tolerance  # fresh inputs agree


def test_target_macs_reachable() -> None:
    original = conv_net(1e-3)
    shapes = {"x": [2, 4, 8, 8]}
    for fraction in (0.8, 0.6):
        result = red_onnx.compress(original, target_macs=fraction, channel_multiple=1)
        measured = metrics.measure(result.model, shapes).macs / metrics.measure(original, shapes).macs
        assert measured <= fraction
        assert result.report.macs_after / result.report.macs_before == pytest.approx(measured)
        assert result.report.budget["macs_fraction"] == pytest.approx(measured)
        assert result.verified
    # 0.8 needs only the planted pairs: their merge is nearly free
    result = red_onnx.compress(original, target_macs=0.8, channel_multiple=1)
    assert max(rel_l2(original, result.model).values()) < 0.01


def test_target_macs_unreachable_names_the_lowest_fraction() -> None:
    with pytest.raises(red_onnx.VerificationError) as caught:
        red_onnx.compress(conv_net(1e-3), target_macs=0.01, channel_multiple=1)
    message = str(caught.value)
    assert "\n" not in message and "0.01" in message
    lowest = re.search(r"lowest fraction[^0-9]*([0-9.]+)", message)
    assert lowest, message
    assert 0.01 < float(lowest.group(1)) < 1.0


def test_an_unreachable_target_is_refused_before_any_error_is_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from red_onnx.search.budget import BudgetSearch

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("no group error may be measured for a target under the MACs floor")

    monkeypatch.setattr(BudgetSearch, "_sensitivity", measured)
    with pytest.raises(red_onnx.VerificationError, match=r"--target-macs 0.01 cannot be reached") as caught:
        red_onnx.compress(conv_net(1e-3), target_macs=0.01, channel_multiple=1)
    floor = float(re.search(r"lowest fraction[^0-9]*([0-9.]+)", str(caught.value)).group(1))
    assert 0.01 + 0.02 < floor < 1.0


@pytest.mark.parametrize("knob", [{"tolerance": 0.05}, {"target_macs": 0.5}])
def test_exact_refuses_approximate_knobs(knob: dict[str, float]) -> None:
    with pytest.raises(red_onnx.UsageError):
        red_onnx.compress(conv_net(1e-3), exact=True, **knob)


@pytest.mark.parametrize(
    "flags",
    [["--tolerance", "0"], ["--target-macs", "1.5"], ["--channel-multiple", "0"], ["--tolerance", "1"]],
)
def test_cli_rejects_bad_budget_flags(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_net(1e-3), str(source))
    assert cli.main([str(source), str(output), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert flags[0] in err and flags[1] in err
    assert not output.exists()


def deep_net(seed: int = 0) -> onnx.ModelProto:
    """conv1 (4→16) → conv2 (16→16) → conv3 (16→6); six pairs in conv1, four in conv2."""
    net = Net(seed)
    x = net.input("x", [2, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 16), "relu1")
    h = net.act("Relu", net.conv("conv2", h, 16, 16), "relu2")
    y = net.conv("conv3", h, 16, 6)
    rng = np.random.default_rng(seed + 100)
    for j, i, lam in (*PAIRS16, (10, 0, 2.0), (11, 2, 1.0)):
        _near(net, ["conv1"], j, i, lam, 1e-3, rng)
    for j, i, lam in PAIRS16:
        _near(net, ["conv2"], j, i, lam, 1e-3, rng)
    return net.build([y])


def test_channel_multiple_rounds_kept_counts() -> None:
    original = deep_net()
    free = channels(red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=1).report)
    assert free["conv1"][1] == 10  # all six pairs go without rounding
    result = red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=4)
    changed = {k: v for k, v in channels(result.report).items() if v[0] != v[1]}
    assert changed, "something must change for the test to mean anything"
    for name, (before, after) in changed.items():
        if before >= 8:
            assert after % 4 == 0, f"{name}: {before} -> {after}"
    assert changed["conv1"] == (16, 12) and changed["conv2"] == (16, 12)
    assert result.verified


def test_channel_multiple_holds_at_deep_targets() -> None:
    for seed in (1, 2, 9):
        net = Net(seed)
        x = net.input("x", [1, 4, 8, 8])
        h = net.act("Relu", net.conv("conv1", x, 4, 16), "relu1")
        model = net.build([net.conv("conv2", h, 16, 6)])
        result = red_onnx.compress(model, target_macs=0.45, channel_multiple=4)
        before, after = channels(result.report)["conv1"]
        removed = {g["group"]: g["removed"] for g in result.report.budget["groups"]}["conv1"]
        assert after % 4 == 0 and before - after == removed, f"seed {seed}: 16 -> {after}, report {removed}"


def test_budget_report_counts_what_was_removed() -> None:
    net = Net(0)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, 2), "relu1")
    y = net.conv("conv2", h, 2, 6)
    _near(net, ["conv1"], 1, 0, 2.0, 1e-3, np.random.default_rng(0))
    result = red_onnx.compress(net.build([y]), tolerance=TOLERANCE, channel_multiple=1)
    before, after = channels(result.report)["conv1"]
    assert (before, after) == (2, 1)
    removed = {g["group"]: g["removed"] for g in result.report.budget["groups"]}
    assert removed["conv1"] == before - after


def test_budget_report_counts_match_the_model() -> None:
    result = red_onnx.compress(deep_net(), tolerance=TOLERANCE, channel_multiple=1)
    removed = {g["group"]: g["removed"] for g in result.report.budget["groups"]}
    for name, (before, after) in channels(result.report).items():
        assert removed.get(name, 0) == before - after, name


def test_freeze_protects_a_layer_under_approximate_merging() -> None:
    original = deep_net()
    control = channels(red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=1).report)
    assert control["conv1"][1] < 16 and control["conv2"][1] < 16
    result = red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=1, freeze=["conv1"])
    frozen = channels(result.report)
    assert frozen["conv1"] == (16, 16)
    assert frozen["conv2"][1] < 16  # the other layer still merges
    before, after = weights(original), weights(result.model)
    np.testing.assert_array_equal(after["conv1.W"], before["conv1.W"])
    np.testing.assert_array_equal(after["conv1.B"], before["conv1.B"])
    assert all("conv1" not in g["group"] for g in result.report.budget["groups"])


def test_same_call_gives_the_same_bytes() -> None:
    original = deep_net()
    first = red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=4)
    second = red_onnx.compress(original, tolerance=TOLERANCE, channel_multiple=4)
    assert first.report.macs_after < first.report.macs_before
    assert first.model.SerializeToString() == second.model.SerializeToString()
    target_a = red_onnx.compress(original, target_macs=0.7, channel_multiple=1)
    target_b = red_onnx.compress(original, target_macs=0.7, channel_multiple=1)
    assert target_a.model.SerializeToString() == target_b.model.SerializeToString()


def test_an_inputs_batch_is_split_between_the_search_and_the_heldout_check(tmp_path: Path) -> None:
    from red_onnx.options import InputSpec
    from red_onnx.runtime.shapes import ShapeService
    from red_onnx.search.budget import BudgetSearch
    from red_onnx.verify.inputs import make_inputs, split_rows

    model = conv_net(0.05)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"  # a dynamic batch
    rows = np.random.default_rng(7).standard_normal((6, 4, 8, 8)).astype(np.float32)
    spec = InputSpec(npz=tmp_path / "x.npz")
    np.savez(spec.npz, x=rows)
    search = BudgetSearch(model, model, spec, ShapeService(make_inputs(model, spec, 0)), channel_multiple=1)
    searched = np.concatenate([feed["x"] for feed in search.verifier.inputs])
    held_out = np.concatenate([feed["x"] for feed in search.heldout.inputs])
    halves = split_rows(len(rows))
    # the search measures on the cv rows, which the activation rankings and the refit never fitted
    assert search.measured_part == "cv"
    assert {row.tobytes() for row in searched} == {row.tobytes() for row in rows[halves["cv"]]}
    assert {row.tobytes() for row in held_out} == {row.tobytes() for row in rows[halves["heldout"]]}
    result = search.within_tolerance(0.04)
    assert result.heldout_error <= 0.04 and result.macs_fraction < 1.0


@pytest.mark.parametrize("mode", ["measured", "calibrated"])
def test_a_search_over_the_callers_working_model_reads_it_only_and_finds_what_the_proto_search_finds(
    mode: str,
) -> None:
    from red_onnx.io import graph
    from red_onnx.options import InputSpec
    from red_onnx.runtime.shapes import ShapeService
    from red_onnx.search.budget import BudgetSearch
    from red_onnx.verify.inputs import make_inputs

    model = residual_net(0.05)
    spec = InputSpec()
    shapes = ShapeService(make_inputs(model, spec, 0))
    working = graph.import_model(model)
    before = graph.export_model(working).SerializeToString()
    kwargs = {"channel_multiple": 1, "hashing": True, "activations": False, "sensitivity": mode}
    by_proto = BudgetSearch(graph.export_model(working), model, spec, shapes, **kwargs)
    by_working = BudgetSearch(working, model, spec, shapes, **kwargs)
    assert by_working.base is None  # its exported copy is released once the simulator holds the weights
    expected, got = by_proto.to_target(0.8)[0], by_working.to_target(0.8)[0]
    assert got.counts == expected.counts and got.error == expected.error and got.macs_fraction < 1.0
    plan = by_working._plan(got.counts)
    rebuilt = by_working.apply_plan(plan).SerializeToString()  # the rebuild path exports the working model
    assert rebuilt == by_proto.apply_plan(plan).SerializeToString()
    assert graph.export_model(working).SerializeToString() == before


def test_a_search_that_rebuilds_keeps_its_exported_proto(monkeypatch: pytest.MonkeyPatch) -> None:
    from red_onnx.io import graph
    from red_onnx.options import InputSpec
    from red_onnx.runtime.shapes import ShapeService
    from red_onnx.search import budget
    from red_onnx.verify.inputs import make_inputs

    monkeypatch.setattr(budget, "_simulator", lambda *args: None)  # as when the one-session simulator fails
    model = conv_net(0.05)
    spec = InputSpec()
    working = graph.import_model(model)
    search = budget.BudgetSearch(working, model, spec, ShapeService(make_inputs(model, spec, 0)),
                                 channel_multiple=1, hashing=False, activations=False)  # fmt: skip
    assert search.base is not None and search.simulator is None
    result = search.within_tolerance(0.04)
    assert result.macs_fraction < 1.0 and result.heldout_error <= 0.04


def test_a_coarse_crossing_step_gives_way_to_a_landing_of_less_error(monkeypatch) -> None:
    """The demo at --target-macs 0.6 (channel steps of 16): the greedy order crosses 0.6 by halving the
    stem's 32 channels (0.332 kept); another group's first level lands at 0.564 with less error."""
    from red_onnx.demo import demo_path
    from red_onnx.search.budget import BudgetSearch

    seen: list[tuple[float, float]] = []
    landing = BudgetSearch._landing

    def recorded(self, before, crossing, fraction):  # type: ignore[no-untyped-def]
        chosen = landing(self, before, crossing, fraction)
        greedy = self._refine(before, crossing, fraction)
        seen.append((self.error(chosen), self.error(greedy)))
        assert self.measured_fraction(chosen) <= fraction
        return chosen

    monkeypatch.setattr(BudgetSearch, "_landing", recorded)
    result = red_onnx.compress(
        demo_path(), target_macs=0.6, activations=False, latency_check=False, force_target=True
    )
    kept = result.report.macs_after / result.report.macs_before
    assert 0.5 < kept <= 0.6
    ((chosen, greedy),) = seen
    assert chosen < greedy


def test_a_landing_may_take_back_an_earlier_step(monkeypatch) -> None:
    """The demo at --target-macs 0.5 (channel steps of 16, pixels in [0, 1]): the greedy order halves the
    block's conv (0.62 kept), then crosses 0.5 by halving the stem (0.33). Taking the block's step back
    and adding the downsampling conv's first level lands at 0.49 with less measured error."""
    from red_onnx.demo import demo_path
    from red_onnx.options import InputSpec
    from red_onnx.search.budget import BudgetSearch

    seen: list[tuple[dict, dict, float, float]] = []
    landing = BudgetSearch._landing

    def recorded(self, before, crossing, fraction):  # type: ignore[no-untyped-def]
        chosen = landing(self, before, crossing, fraction)
        greedy = self._refine(before, crossing, fraction)
        seen.append((before, chosen, self.error(chosen), self.error(greedy)))
        assert self.measured_fraction(chosen) <= fraction
        return chosen

    monkeypatch.setattr(BudgetSearch, "_landing", recorded)
    result = red_onnx.compress(
        demo_path(), target_macs=0.5, input_spec=InputSpec(ranges={"image": (0.0, 1.0)}),
        latency_check=False, force_target=True,
    )  # fmt: skip
    kept = result.report.macs_after / result.report.macs_before
    assert 0.45 < kept <= 0.5
    ((before, chosen, chosen_error, greedy_error),) = seen
    assert chosen_error < greedy_error
    assert any(chosen.get(name, 0) < level for name, level in before.items())  # a step taken back
