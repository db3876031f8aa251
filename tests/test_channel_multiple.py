"""Kept channel counts on hardware-friendly steps (``--channel-multiple``), per group and per segment.

Two rules (``red_onnx.search.channel_steps``): a group narrower than twice the multiple falls back to the
largest power of two it holds twice (``effective_multiple``: 24 channels at 16 keep multiples of 8); and
the rule holds per *segment* — the atoms present in the same tensors, e.g. one ``Split`` chunk — not only
for the tensor feeding the Split (YOLOv8n's C2f kept a 31-channel chunk of a 64-channel group at 8).
Compressed models are checked with our own onnxruntime runs on fresh seeded inputs.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from graphs import Net, random_feeds, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import red_onnx
from red_onnx.analysis.similarity import Candidates, resolve_merges
from red_onnx.options import make_options
from red_onnx.search.budget_options import Ordering, removal_levels
from red_onnx.search.channel_steps import ChannelSteps, effective_multiple

FRESH_SEEDS = (911, 912)


def _near(net: Net, node: str, j: int, i: int, rng: np.random.Generator) -> None:
    """Producer ``node``'s output row j = row i + 1e-3 noise, bias likewise (a near-duplicate channel)."""
    weight_name, _, bias_name, _ = net.layout[node]
    weight, bias = net.arrays[weight_name], net.arrays[bias_name]
    weight[j] = weight[i] + 1e-3 * rng.standard_normal(weight[i].shape) * float(np.std(weight[i]))
    bias[i] = max(abs(float(bias[i])), 0.2)
    bias[j] = bias[i]


def c2f_block(pairs: tuple[int, int, int], chunk: int = 16, seed: int = 0) -> onnx.ModelProto:
    """YOLOv8's C2f head block: cv1 → Split(chunk, chunk); chunk 1 → m1 → m2; Concat(y0, y1, m2) → cv2.

    One channel group with three segments (chunk 0, chunk 1, m2's output); ``pairs`` near-duplicate
    channel pairs planted in each (at most ``chunk / 2``).
    """
    net = Net(seed)
    x = net.input("x", [1, 8, 8, 8])
    h = net.act("Relu", net.conv("cv1", x, 8, 2 * chunk), "relu1")
    sizes = net.const("split.sizes", [chunk, chunk], np.int64)
    net.nodes.append(helper.make_node("Split", [h, sizes], ["split_y0", "split_y1"], name="split", axis=1))
    m = net.act("Relu", net.conv("m1", "split_y1", chunk, chunk), "relu_m1")
    m = net.act("Relu", net.conv("m2", m, chunk, chunk), "relu_m2")
    y = net.conv("cv2", net.op("Concat", ["split_y0", "split_y1", m], "cat", axis=1), 3 * chunk, 6, k=1)
    rng = np.random.default_rng(seed + 100)
    for (node, first), count in zip((("cv1", 0), ("cv1", chunk), ("m2", 0)), pairs, strict=True):
        for k in range(count):
            _near(net, node, first + chunk - 1 - k, first + k, rng)
    return net.build([y])


def narrow_net(width: int, seed: int = 0) -> onnx.ModelProto:
    """conv1 (4→width) → Relu → conv2 (width→6), conv1's channels in ``width / 2`` near-duplicate pairs."""
    net = Net(seed)
    x = net.input("x", [1, 4, 8, 8])
    h = net.act("Relu", net.conv("conv1", x, 4, width), "relu1")
    y = net.conv("conv2", h, width, 6)
    rng = np.random.default_rng(seed + 100)
    for k in range(width // 2):
        _near(net, "conv1", width - 1 - k, k, rng)
    return net.build([y])


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == name)
    return initializers(model)[node.input[1]]


def c2f_widths(model: onnx.ModelProto) -> list[int]:
    """Kept channels of chunk 0, chunk 1 and m2's output, checked against every conv that reads them."""
    split = next(n for n in model.graph.node if n.op_type == "Split")
    chunks = initializers(model)[split.input[1]].tolist()
    m_out = node_weight(model, "m2").shape[0]
    assert node_weight(model, "cv1").shape[0] == sum(chunks)
    assert node_weight(model, "m1").shape[1] == chunks[1]
    assert node_weight(model, "cv2").shape[1] == sum(chunks) + m_out
    return [*chunks, m_out]


def worst_rel_l2(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> float:
    """Worst relative L2 error over outputs and fresh seeds (our own onnxruntime runs)."""
    errors = []
    for seed in FRESH_SEEDS:
        feeds = random_feeds(reference, seed)
        want, got = run(reference, feeds), run(candidate, feeds)
        errors += [float(np.linalg.norm(got[k] - y) / np.linalg.norm(y)) for k, y in want.items()]
    return max(errors)


# ----------------------------------------------------------------------------------------------
# the fallback rule of narrow groups


@pytest.mark.parametrize(
    ("n_atoms", "multiple", "step"),
    [(24, 16, 8), (16, 16, 8), (12, 8, 4), (6, 4, 2), (20, 12, 8), (3, 8, 1), (2, 8, 1),
     (32, 16, 16), (40, 16, 16), (100, 1, 1)],
)  # fmt: skip
def test_effective_multiple_examples(n_atoms: int, multiple: int, step: int) -> None:
    assert effective_multiple(n_atoms, multiple) == step


def test_effective_multiple_is_the_largest_power_of_two_held_twice() -> None:
    for n_atoms, multiple in itertools.product(range(1, 80), (1, 2, 3, 4, 8, 12, 16, 32)):
        step = effective_multiple(n_atoms, multiple)
        if n_atoms >= 2 * multiple:
            assert step == multiple
            continue
        powers = [p for p in (1, 2, 4, 8, 16, 32) if p < multiple and n_atoms >= 2 * p] or [1]
        assert step == max(powers), (n_atoms, multiple)


@pytest.mark.parametrize(
    ("n_atoms", "multiple", "levels"),
    [(24, 16, [0, 8, 16]), (12, 8, [0, 4, 8]), (16, 16, [0, 8]), (3, 8, [0, 1, 2])],
)
def test_narrow_groups_keep_counts_on_the_fallback_step(
    n_atoms: int, multiple: int, levels: list[int]
) -> None:
    assert removal_levels(n_atoms, n_atoms, multiple) == levels


def test_a_narrow_layer_keeps_a_multiple_of_the_fallback_step() -> None:
    original = narrow_net(24)
    free = red_onnx.compress(original, target_macs=0.9, channel_multiple=1)
    assert node_weight(free.model, "conv1").shape[0] % 8  # without a step the target keeps 21
    result = red_onnx.compress(original, target_macs=0.9, channel_multiple=16)
    kept = node_weight(result.model, "conv1").shape[0]
    assert kept < 24 and kept % 8 == 0  # 24 < 2 x 16: multiples of 8 (MobileNetV2's 24-channel layers)
    assert result.verified
    assert worst_rel_l2(original, result.model) < 0.01  # only near-duplicates went


# ----------------------------------------------------------------------------------------------
# per segment: Split chunks


def test_split_chunks_each_keep_a_multiple_under_a_tolerance() -> None:
    original = c2f_block((8, 5, 2))  # 15 near-duplicates; chunk 0's 8 are a whole step
    free = c2f_widths(red_onnx.compress(original, tolerance=0.02, channel_multiple=1).model)
    assert any(width % 8 for width in free), free  # without steps the chunks land anywhere
    # the rule on the whole group alone (before: 48 atoms kept on 8) gave [9, 16, 15] here
    result = red_onnx.compress(original, tolerance=0.02, channel_multiple=8)
    widths = c2f_widths(result.model)
    assert sum(widths) < 48 and all(width % 8 == 0 for width in widths), widths
    assert result.verified and worst_rel_l2(original, result.model) <= 0.04


@pytest.mark.parametrize(("pairs", "target"), [((8, 5, 2), 0.9), ((8, 8, 8), 0.6)])
def test_split_chunks_each_keep_a_multiple_at_a_target(pairs: tuple[int, int, int], target: float) -> None:
    original = c2f_block(pairs)
    result = red_onnx.compress(original, target_macs=target, channel_multiple=8)
    widths = c2f_widths(result.model)  # (8, 5, 2) at 0.9 kept [8, 11, 13] before
    assert sum(widths) < 48 and all(width % 8 == 0 for width in widths), widths
    assert result.report.macs_after / result.report.macs_before <= target
    assert result.verified
    reported = max(output["rel_l2_err"] for output in result.report.verification["outputs"])
    assert worst_rel_l2(original, result.model) <= 2 * reported + 0.01  # fresh inputs agree
    if pairs == (8, 8, 8):
        assert widths == [8, 8, 8] and reported < 0.01  # exactly the near-duplicate halves went


def _segment_candidates(sizes: list[int], rng: np.random.Generator, cross: bool) -> Candidates:
    """Up to three neighbours per atom in its own segment (and one in another with ``cross``), by cost."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    source, target = [], []
    for begin, end in itertools.pairwise(starts.tolist()):
        for atom in range(begin, end):
            others = [a for a in range(begin, end) if a != atom]
            for other in rng.permutation(others)[:3]:
                source.append(atom)
                target.append(int(other))
            if cross and len(sizes) > 1:
                outside = [a for a in range(starts[-1]) if not begin <= a < end]
                source.append(atom)
                target.append(int(rng.choice(outside)))
    cost = np.sort(rng.random(len(source)))
    order = rng.permutation(len(source))  # the ranking: cost order, atoms shuffled
    pairs = np.array(source, np.int64)[order], np.array(target, np.int64)[order]
    return Candidates(pairs[0], pairs[1], np.ones(len(cost)), cost, cost)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=4), st.sampled_from([2, 4, 8, 16]),
       st.integers(0, 2**16), st.booleans())  # fmt: skip
def test_select_keeps_every_segment_on_its_step(
    sizes: list[int], multiple: int, seed: int, cross: bool
) -> None:
    steps = ChannelSteps.of(np.repeat(np.arange(len(sizes)), sizes), multiple)
    candidates = _segment_candidates(sizes, np.random.default_rng(seed), cross)
    allowed = [set(steps.removals(s).tolist()) for s in range(len(sizes))]
    for count in steps.totals(steps.available(candidates)).tolist():
        merges = steps.select(candidates, count)
        assert len(merges) == count
        removed = np.bincount(steps.segment[[m.source for m in merges]], minlength=len(sizes))
        assert all(int(r) in allowed[s] for s, r in enumerate(removed)), (count, removed)
        gone = {m.source for m in merges}
        assert len(gone) == count and not gone & {m.target for m in merges}  # merged into kept atoms


def test_select_takes_the_cheaper_segment() -> None:
    sizes = [16, 16]
    steps = ChannelSteps.of(np.repeat([0, 1], sizes), 8)
    source = np.array([*range(8, 16), *range(24, 32)])  # segment 0's merges rank first
    candidates = Candidates(source, source - 8, np.ones(16), np.zeros(16), np.arange(16.0))
    first = steps.select(candidates, 8)
    assert sorted(m.source for m in first) == list(range(8, 16))
    both = steps.select(candidates, 16)
    assert sorted(m.source for m in both) == source.tolist()
    assert len(steps.select(candidates, 12)) == 8  # no split of 12 on steps of 8: the largest below


def test_unconstrained_steps_resolve_the_ranking_as_before() -> None:
    candidates = _segment_candidates([5, 7, 4], np.random.default_rng(3), cross=True)
    free = ChannelSteps.of(np.repeat([0, 1, 2], [5, 7, 4]), 1)  # multiple 1: every segment free
    whole = ChannelSteps.whole(16, 4)  # one segment: its levels are on the step already
    assert not free.constrained and not whole.constrained
    assert ChannelSteps.of(np.repeat([0, 1, 2], [5, 7, 4]), 2).constrained
    for steps in (None, free, whole):
        ordering = Ordering("weights", 0.0, 0, candidates, steps)
        for count in range(14):
            assert ordering.merges(count) == resolve_merges(candidates, count)


def test_default_multiple_is_16_for_a_macs_target_and_8_otherwise() -> None:
    common = {"freeze": (), "input_spec": None, "verify": True, "latency_check": False}
    targeted = make_options(exact=False, tolerance=None, target_macs=0.8, channel_multiple=None, **common)
    assert targeted.channel_multiple == 16
    others = [
        make_options(exact=False, tolerance=0.02, target_macs=None, channel_multiple=None, **common),
        make_options(exact=True, tolerance=None, target_macs=None, channel_multiple=None, **common),
        make_options(exact=False, tolerance=None, target_macs=None, channel_multiple=None, **common),
    ]
    assert [o.channel_multiple for o in others] == [8, 8, 8]
    given = make_options(exact=False, tolerance=None, target_macs=0.8, channel_multiple=8, **common)
    assert given.channel_multiple == 8


def test_a_macs_target_keeps_wide_layers_on_16_by_default() -> None:
    original = narrow_net(48)  # 48 >= 2 x 16: steps of 16
    result = red_onnx.compress(original, target_macs=0.8)
    assert result.report.options["channel_multiple"] == 16
    kept = node_weight(result.model, "conv1").shape[0]
    assert kept < 48 and kept % 16 == 0
    assert result.verified
