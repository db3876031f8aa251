"""Attention heads as atoms: channel analysis and rewrite through exported attention blocks.

Graphs are built in code (``graphs.attention_model``) as transformer exports write them; onnxruntime is
the oracle. Deleting heads with the editor must compute exactly what the original model computes with
those heads' rows of the output projection zeroed (docs/method.md, "Attention heads").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import pytest
from graphs import (
    AttentionModel,
    AttentionSpec,
    assert_outputs_close,
    attention_feeds,
    attention_model,
    plant_identical_heads,
    run,
    without_heads,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from red_onnx.analysis.channels import ChannelAnalysis, ChannelGroup, analyse_model
from red_onnx.io.graph import (
    WorkingModel,
    clear_intermediate_shapes,
    export_model,
    import_model,
    normalise_constants,
)
from red_onnx.options import InputSpec
from red_onnx.report.report import render_table
from red_onnx.rewrite.editor import GroupPlan, apply_plan, attach_graph
from red_onnx.runtime.shapes import ShapeService
from red_onnx.search.simulate import MacsCounter

VARIANTS: dict[str, AttentionSpec] = {
    "static": AttentionSpec(),
    "static_mul_two_transposes": AttentionSpec(scale="mul", k_transpose="two"),
    "static_no_mask_minus_one": AttentionSpec(mask=False, merge_target="minus_one"),
    "static_opset14": AttentionSpec(opset=14),
    "dynamic_minus_one_heads": AttentionSpec(dynamic=True),
    "dynamic_explicit_heads_concat": AttentionSpec(dynamic=True, explicit_heads=True, merge_target="concat"),
    "dynamic_shape_start_end_opset15": AttentionSpec(dynamic=True, merge_target="shape_slice", opset=15),
    "dynamic_shape_slice_opset14": AttentionSpec(dynamic=True, merge_target="shape_slice", opset=14),
    "dynamic_minus_one_opset18": AttentionSpec(dynamic=True, merge_target="minus_one", opset=18),
    "dynamic_two_transposes_mul": AttentionSpec(dynamic=True, k_transpose="two", scale="mul"),
    "dynamic_scale_from_shape": AttentionSpec(dynamic=True, scale="shape"),
    "position_bias_two_layers": AttentionSpec(
        dynamic=True, layers=2, position_bias=True, merge_target="concat"
    ),
    "static_position_bias_two_layers": AttentionSpec(layers=2, position_bias=True),
    "fused_split_opset14": AttentionSpec(fused="split", opset=14),
    "fused_split_opset18_dynamic": AttentionSpec(fused="split", opset=18, dynamic=True),
    "fused_slice_dynamic_concat": AttentionSpec(fused="slice", dynamic=True, merge_target="concat"),
    "fused_slice_opset15_two_layers": AttentionSpec(fused="slice", opset=15, layers=2, position_bias=True),
}
#: Heads deleted per layer (H = 4).
DELETED = ([1, 3], [0])


def _analyse(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[WorkingModel, ChannelAnalysis]:
    working = import_model(model)
    normalise_constants(working)
    return working, analyse_model(working, ShapeService(feeds)(working))


def _head_group(analysis: ChannelAnalysis, built: AttentionModel, layer: int) -> ChannelGroup:
    wanted = set(built.producers[layer])
    found = [g for g in analysis.groups if wanted & {p.node.name for p in g.producers}]
    assert len(found) == 1, [g.name for g in found]
    return found[0]


def _delete_mask(group: ChannelGroup, heads: Sequence[int]) -> np.ndarray:
    """Atoms of ``heads`` (numbered as in the first producer's output)."""
    producer = group.tensors[group.producers[0].tensor]
    delete = np.zeros(group.n_atoms, bool)
    delete[producer.atoms[list(heads)]] = True
    return delete


def _remove_heads(
    built: AttentionModel, feeds: dict[str, np.ndarray], deleted: Sequence[Sequence[int]]
) -> onnx.ModelProto:
    working, analysis = _analyse(built.model, feeds)
    attach_graph(working.graph)
    for layer, heads in enumerate(deleted):
        group = _head_group(analysis, built, layer)
        apply_plan(GroupPlan(group, _delete_mask(group, heads)))
    working.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    clear_intermediate_shapes(working)
    model = export_model(working)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def _sizes(spec: AttentionSpec) -> list[tuple[int | None, int | None]]:
    return [(None, None), (3, 9)] if spec.dynamic else [(None, None)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_one_group_per_block_with_a_head_per_atom(name: str) -> None:
    spec = VARIANTS[name]
    built = attention_model(spec)
    _, analysis = _analyse(built.model, attention_feeds(spec, 0))
    for layer in range(spec.layers):
        group = _head_group(analysis, built, layer)
        assert group.frozen is None, group.frozen
        assert group.n_atoms == spec.heads
        assert sorted(p.node.name for p in group.producers) == sorted(built.producers[layer])
        assert [c.node.name for c in group.consumers] == [built.out_proj[layer]]
        assert not group.homogeneous  # softmax: identical heads only
        assert len(group.side_inputs) == (1 if spec.position_bias else 0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_deleting_heads_is_head_removal(name: str) -> None:
    spec = VARIANTS[name]
    built = attention_model(spec)
    deleted = DELETED[: spec.layers]
    rewritten = _remove_heads(built, attention_feeds(spec, 0), deleted)
    reference = without_heads(built, spec, deleted)
    for batch, seq in _sizes(spec):
        for seed in (1, 2):
            feeds = attention_feeds(spec, seed, batch, seq)
            assert_outputs_close(run(reference, feeds), run(rewritten, feeds), rtol=1e-5, atol_frac=1e-5)
    widths = {
        n.name: numpy_helper.to_array(i).shape
        for n in rewritten.graph.node
        for i in rewritten.graph.initializer
        if n.op_type == "MatMul" and i.name == n.input[1]
    }
    for layer, heads in enumerate(deleted):
        kept = (spec.heads - len(heads)) * spec.head_size * (3 if spec.fused else 1)
        assert {widths[p][1] for p in built.producers[layer]} == {kept}
        assert widths[built.out_proj[layer]][0] == (spec.heads - len(heads)) * spec.head_size


def test_side_input_is_sliced_once_per_reader_and_again_in_a_later_round() -> None:
    spec = VARIANTS["position_bias_two_layers"]
    built = attention_model(spec)
    feeds = attention_feeds(spec, 0)
    first = _remove_heads(built, feeds, ([1], [2]))
    gathers = [n for n in first.graph.node if n.op_type == "Gather" and n.name.endswith("_red_heads")]
    assert len(gathers) == 2
    # a second round on the rewritten model narrows the same Gathers
    second_built = AttentionModel(first, built.producers, built.out_proj, built.out_weight)
    second = _remove_heads(second_built, feeds, ([0], [0]))
    assert len([n for n in second.graph.node if n.name.endswith("_red_heads")]) == 2
    reference = without_heads(built, spec, ([0, 1], [0, 2]))
    for seed in (1, 2):
        fed = attention_feeds(spec, seed, 3, 7)
        assert_outputs_close(run(reference, fed), run(second, fed), rtol=1e-5, atol_frac=1e-5)


def test_shared_target_concat_gets_a_copy() -> None:
    """One target Concat read by the q, k and v reshapes of a layer: each keeps its own after a rewrite."""
    spec = AttentionSpec(dynamic=True, explicit_heads=True)
    built = attention_model(spec)
    model = built.model
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape" and n.name.startswith("split")]
    for node in reshapes[1:]:
        node.input[1] = reshapes[0].input[1]
    built = AttentionModel(model, built.producers, built.out_proj, built.out_weight)
    rewritten = _remove_heads(built, attention_feeds(spec, 0), ([2],))
    reference = without_heads(built, spec, ([2],))
    feeds = attention_feeds(spec, 3, 2, 5)
    assert_outputs_close(run(reference, feeds), run(rewritten, feeds), rtol=1e-5, atol_frac=1e-5)


def _reason(spec: AttentionSpec) -> str:
    """The freeze reason of the group of the first layer's first projection."""
    built = attention_model(spec)
    _, analysis = _analyse(built.model, attention_feeds(spec, 0))
    group = next(g for g in analysis.groups if built.producers[0][0] in {p.node.name for p in g.producers})
    assert group.frozen is not None
    return group.frozen


def test_head_size_read_with_shape_freezes() -> None:
    reason = _reason(AttentionSpec(dynamic=True, head_size_from_shape=True))
    assert "reads the size of axis 2, the channel axis" in reason


def test_fused_qkv_reshaped_to_five_axes_freezes() -> None:
    reason = _reason(AttentionSpec(fused="reshape5"))
    assert "splits the channel axis" in reason and "[3, 4, 8]" in reason


def test_heads_on_a_matrix_axis_freeze() -> None:
    """Heads [B, S, H, D] multiplied on their matrix axes (no transpose to a batch axis) mix."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    target = numpy_helper.from_array(np.array([2, 3, 2, 4]), "target")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="q_proj"),
        helper.make_node("Reshape", ["q", "target"], ["heads"], name="split"),
        helper.make_node("Transpose", ["heads"], ["heads_t"], name="swap", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["heads", "heads_t"], ["y"], name="mix"),
    ]
    graph = helper.make_graph(
        nodes,
        "mix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2, 2])],
        [weight, target],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _, analysis = _analyse(model, {"x": np.zeros((2, 3, 8), np.float32)})
    group = next(g for g in analysis.groups if g.origin == "q_proj")
    assert group.frozen is not None and "one of its two matrix axes" in group.frozen


def test_onnxruntime_fused_transformer_ops_freeze_with_their_own_reason() -> None:
    """A model run through onnxruntime's transformer optimizer: compress the export instead."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in "ab"]
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["h"], name="fc1"),
        helper.make_node("FastGelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "b"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    _, analysis = _analyse(model, {"x": np.zeros((2, 3, 8), np.float32)})
    group = next(g for g in analysis.groups if g.origin == "fc1")
    assert group.frozen is not None and "onnxruntime-fused transformer op" in group.frozen


def test_macs_counter_scales_attention_matmuls_with_heads() -> None:
    spec = AttentionSpec()
    built = attention_model(spec)
    _, analysis = _analyse(built.model, attention_feeds(spec, 0))
    group = _head_group(analysis, built, 0)
    matmuls = [n.name for n in group.path if n.op == "MatMul"]
    assert len(matmuls) == 2
    layer_macs = {name: 100 for name in [*built.producers[0], built.out_proj[0], *matmuls]}
    counter = MacsCounter(layer_macs, [group])
    from red_onnx.analysis.redundancy import Merge

    atoms = group.tensors[group.producers[0].tensor].atoms
    plan = {group.name: [Merge(int(atoms[1]), int(atoms[0]), 1.0)]}
    assert counter.fraction(plan) == pytest.approx(0.75)  # one head of four, in every layer listed


def _exact(compress: Callable[..., object], model: onnx.ModelProto, spec: AttentionSpec) -> object:
    shapes = {"x": (2, spec.seq, spec.width), "mask": (2, 1, 1, spec.seq)}
    if spec.position_bias:
        shapes["relative"] = (spec.seq, spec.seq)
    return compress(model, exact=True, input_spec=InputSpec(shapes=shapes), separation=False)


def _width(model: onnx.ModelProto, node: str) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    matmul = next(n for n in model.graph.node if n.name == node)
    return int(inits[matmul.input[1]].dims[1])


@pytest.mark.parametrize("fused", ["", "split"])
def test_exact_mode_keeps_random_heads_and_merges_planted_identical_ones(
    fused: str, compress: Callable[..., object]
) -> None:
    spec = AttentionSpec(dynamic=True, fused=fused, layers=2)
    built = attention_model(spec)
    result = _exact(compress, built.model, spec)
    for producer in (p for layer in built.producers for p in layer):
        assert _width(result.model, producer) == _width(built.model, producer)  # type: ignore[attr-defined]
    planted = plant_identical_heads(built, spec, 0, 2)
    result = _exact(compress, planted, spec)
    model = result.model  # type: ignore[attr-defined]
    for producer in (p for layer in built.producers for p in layer):
        assert _width(model, producer) == _width(planted, producer) - spec.head_size * (3 if fused else 1)
    for seed in (1, 2):
        feeds = attention_feeds(spec, seed, 3, 9)
        assert_outputs_close(run(planted, feeds), run(model, feeds), rtol=1e-5, atol_frac=1e-5)


def test_exact_mode_never_merges_heads_with_a_side_input(compress: Callable[..., object]) -> None:
    """Identical projections but a position bias per head: the heads differ, nothing merges."""
    spec = AttentionSpec(dynamic=True, position_bias=True)
    built = attention_model(spec)
    planted = plant_identical_heads(built, spec, 0, 2)
    result = _exact(compress, planted, spec)
    for producer in built.producers[0]:
        assert _width(result.model, producer) == _width(planted, producer)  # type: ignore[attr-defined]


def test_target_macs_removes_whole_heads(compress: Callable[..., object]) -> None:
    spec = AttentionSpec(heads=8, head_size=4, width=32, dynamic=True, layers=2, position_bias=True, seq=8)
    built = attention_model(spec)
    shapes = {"x": (2, spec.seq, spec.width), "mask": (2, 1, 1, spec.seq), "relative": (spec.seq, spec.seq)}
    result = compress(
        built.model,
        target_macs=0.8,
        input_spec=InputSpec(shapes=shapes),
        separation=False,
        latency_check=False,
    )
    model = result.model  # type: ignore[attr-defined]
    removed = 0
    for layer, producers in enumerate(built.producers):
        widths = {_width(model, p) for p in producers}
        assert len(widths) == 1
        width = widths.pop()
        assert width % spec.head_size == 0
        removed += spec.heads * spec.head_size - width
        inits = {i.name: i for i in model.graph.initializer}
        out = next(n for n in model.graph.node if n.name == built.out_proj[layer])
        assert inits[out.input[1]].dims[0] == width
    assert removed > 0
    budget = result.report.budget  # type: ignore[attr-defined]
    heads = {g["group"]: g["removed"] for g in budget["groups"] if "q0" in g["group"] or "q1" in g["group"]}
    assert sum(heads.values()) * spec.head_size == removed
    assert {g["unit"] for g in budget["groups"] if g["group"] in heads} == {"heads"}
    assert any(line.split()[4:5] == ["heads"] for line in render_table(result.report).splitlines())  # type: ignore[attr-defined]
    for seed in (1, 2):
        feeds = attention_feeds(spec, seed, 2, 5)
        assert run(model, feeds)["y"].shape == (2, 5, spec.width)


@settings(max_examples=12, deadline=None)
@given(
    heads=st.integers(2, 6),
    head_size=st.sampled_from([1, 2, 3, 5]),
    data=st.data(),
)
def test_random_head_deletions(heads: int, head_size: int, data: st.DataObject) -> None:
    spec = AttentionSpec(heads=heads, head_size=head_size, width=8, dynamic=True, seq=5)
    deleted = data.draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads - 1, unique=True))
    built = attention_model(spec)
    rewritten = _remove_heads(built, attention_feeds(spec, 0), (deleted,))
    reference = without_heads(built, spec, (deleted,))
    feeds = attention_feeds(spec, 1, 2, 4)
    assert_outputs_close(run(reference, feeds), run(rewritten, feeds), rtol=1e-5, atol_frac=1e-5)
