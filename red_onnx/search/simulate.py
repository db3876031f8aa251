"""Measure merge plans without rebuilding the model: one onnxruntime session, consumer weights as inputs.

Merging atom j into atom i (``V_i += λ·V_j`` in every consumer, then channel j deleted from producers,
path and consumers) computes exactly what the same model computes when ``V_j`` is only **zeroed**:
channel j's values then reach nothing. So the budget search can measure a plan by feeding new consumer
weights to one session built once — no graph import, rewrite, export, serialisation or session per
measurement, which is what dominated the search on large models. (The rebuilt model differs only in
float summation order; the final verification always runs the real rewrite.)

A merge with an offset (the refit's intercept, a fitted ``y_j ≈ s·y_i + c``) also changes the consumer's
bias by ``V_j·c`` (``red_onnx.rewrite.editor.bias_contribution``, the editor's own rule): where every
consumer of the group has a bias of its own to override (Conv's or Gemm's, or the constant of the
one Add after a MatMul), that bias is fed too; elsewhere such plans are measured by rebuilding.

The MACs a plan keeps are counted the same way, without rebuilding: every weighted layer's MACs scale
with the fraction of its output channels kept (as a producer), of its input channels kept (as a
consumer), or of its channels kept once (a depthwise conv on a group's path).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from red_onnx.analysis.channels import ChannelGroup
from red_onnx.analysis.merge_sets import (
    ConsumerPlan,
    MergeList,
    has_offsets,
    local_offsets,
    of_consumer,
    removed_atoms,
)
from red_onnx.analysis.weights import consumer_axis
from red_onnx.io.graph import WorkingModel, expect_constant, export_light
from red_onnx.rewrite.editor import add_merged_rows, bias_contribution
from red_onnx.runtime.rows import RowChunks, dynamic_leading
from red_onnx.runtime.sessions import session_options

logger = logging.getLogger(__name__)

Plan = Mapping[str, MergeList]
Feed = dict[str, np.ndarray]


@dataclass
class BiasSlot:
    """The bias a consumer's offsets go into: its own (Conv's B, Gemm's C) or a following Add's constant."""

    name: str
    values: np.ndarray
    divisor: float  # Gemm's beta (the contribution is divided by it), 1 elsewhere


@dataclass
class ConsumerSlot:
    """One consumer weight the simulation may replace (and the bias its merges' offsets change)."""

    weight: str
    values: np.ndarray
    axis: int
    block: int
    local: np.ndarray  # atom of each channel of the tensor the consumer reads
    node: gs.Node | None = None
    bias: BiasSlot | None = None


def consumer_slots(group: ChannelGroup) -> list[ConsumerSlot]:
    """The consumer weights of ``group`` as replaceable slots (one per consumer, in order)."""
    slots = []
    for consumer in group.consumers:
        member = group.tensors[consumer.tensor]
        weight = consumer.node.inputs[1]
        values = expect_constant(weight)
        slots.append(ConsumerSlot(weight.name, values, consumer_axis(consumer.node), member.block,
                                  group.atom_index(consumer.tensor), consumer.node,
                                  bias_slot(consumer.node)))  # fmt: skip
    return slots


def _own_constant(tensor: gs.Tensor, size: int) -> np.ndarray | None:
    """The float values of a constant read by one node only, ``size`` of them on its last axis (else None)."""
    if not isinstance(tensor, gs.Constant) or len(tensor.outputs) != 1:
        return None
    values = np.asarray(tensor.values)
    usable = values.dtype.kind == "f" and values.size == size and values.shape[-1:] == (size,)
    return values if usable else None


def _outputs(node: gs.Node) -> int:
    """Output channels of a consumer from its weight."""
    shape = expect_constant(node.inputs[1]).shape
    if node.op == "Conv":
        return int(shape[0])
    if node.op == "ConvTranspose":
        return int(shape[1]) * int(node.attrs.get("group", 1))
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return int(shape[0])
    return int(shape[-1])


def bias_slot(node: gs.Node) -> BiasSlot | None:
    """The bias that takes ``node``'s offset contributions, if it has one of its own to override.

    Conv and ConvTranspose: input 2; Gemm: ``C`` with one value per output (the contribution divided
    by beta); MatMul: the constant of the one Add that reads its output. None where the bias is absent,
    shared with another node, broadcast from fewer values, or the MatMul's output has other readers
    (:class:`MergeSimulator` also drops it where that output is a graph output).
    """
    outputs = _outputs(node)
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        values = _own_constant(node.inputs[2], outputs) if len(node.inputs) > 2 and beta else None
        return None if values is None else BiasSlot(node.inputs[2].name, values, beta)
    result = node.outputs[0]
    if node.op != "MatMul" or len(result.outputs) != 1:
        return None
    add = result.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is result else add.inputs[0]
    values = _own_constant(other, outputs)
    return None if values is None else BiasSlot(other.name, values, 1.0)


def weight_rows(slot: ConsumerSlot, channels: np.ndarray) -> np.ndarray:
    """Rows ``channels`` of the slot's weight as ``[channels, block·rest]``, gathered alone (one copy)."""
    entries = (channels[:, None] * slot.block + np.arange(slot.block)[None, :]).ravel()
    return np.moveaxis(slot.values, slot.axis, 0)[entries].reshape(len(channels), -1)


def tap_rows(slot: ConsumerSlot, channels: np.ndarray, taps: int) -> np.ndarray:
    """A k×k Conv consumer's ``W[:, c, t]`` as rows ``c·taps + t``: ``[channels·taps, outputs]``, float64."""
    picked = np.moveaxis(slot.values, slot.axis, 0)[channels]  # [channels, outputs, *kernel]
    rows = picked.reshape(len(channels), picked.shape[1], taps).transpose(0, 2, 1)
    return rows.reshape(len(channels) * taps, -1).astype(np.float64)


def merged_weight(slot: ConsumerSlot, merges: ConsumerPlan) -> np.ndarray:
    """The consumer weight with ``V_target += scale·V_source`` and ``V_source = 0`` for each merge."""
    moved = np.moveaxis(slot.values, slot.axis, 0)
    flat = np.array(moved, order="C").reshape(moved.shape[0] // slot.block, -1)  # a copy to edit
    flat[add_merged_rows(flat, slot.local, merges)] = 0.0  # summed in float64, rounded once
    return np.moveaxis(flat.reshape(moved.shape), 0, slot.axis)


def offset_bias(slot: ConsumerSlot, merges: ConsumerPlan) -> np.ndarray | None:
    """The slot's bias with the merges' offsets added, as the editor adds them (None: no offset here)."""
    channels, values = local_offsets(merges, slot.local)
    if not channels.size or slot.bias is None or slot.node is None:
        return None
    rest = np.moveaxis(slot.values, slot.axis, 0).shape[1:]  # a view: only the sources' rows are copied
    rows = weight_rows(slot, channels).reshape(len(channels), slot.block, *rest)
    contribution = bias_contribution(slot.node, rows, values)
    bias = slot.bias
    changed = bias.values.astype(np.float64) + (contribution / bias.divisor).reshape(bias.values.shape)
    return changed.astype(bias.values.dtype)


def simulation_session(serialized: bytes, providers: Sequence[str]) -> ort.InferenceSession:
    """A session of the simulated model or a part of it: unoptimised as the reference, no CPU arena."""
    return ort.InferenceSession(serialized, session_options(arena=False), providers=list(providers))


def serialized_with(base: onnx.ModelProto, weights: set[str], outputs: Sequence[str]) -> bytes:
    """``base`` serialized with ``weights`` as overridable inputs and ``outputs`` added (no graph copy).

    The entries are appended to ``base`` for the serialization only and removed again.
    """
    listed = {value.name for value in base.graph.input}
    pending = [init for init in base.graph.initializer if init.name in weights and init.name not in listed]
    added = [onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims) for init in pending]
    known = {value.name for value in base.graph.output}
    fresh = [name for name in dict.fromkeys(outputs) if name not in known]
    extra = [onnx.helper.make_empty_tensor_value_info(name) for name in fresh]
    ir_version = base.ir_version
    base.graph.input.extend(added)
    base.graph.output.extend(extra)
    base.ir_version = max(ir_version, 4)
    try:
        return base.SerializeToString()
    finally:
        del base.graph.input[len(base.graph.input) - len(added) :]
        del base.graph.output[len(base.graph.output) - len(extra) :]
        base.ir_version = ir_version


def _initializers_as_inputs(model: onnx.ModelProto, names: set[str]) -> None:
    """Turn the (dims-only) initializers ``names`` of ``model`` into graph inputs of the same type."""
    graph = model.graph
    moved = [(index, init) for index, init in enumerate(graph.initializer) if init.name in names]
    declared = {value.name for value in graph.input}  # an overridable initializer is an input already
    graph.input.extend(
        onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
        for _, init in moved
        if init.name not in declared
    )
    for index, _ in reversed(moved):
        del graph.initializer[index]


class MergeSimulator:
    """One session over the base model whose consumer weights are overridable inputs.

    Args:
        base: The model merges start from (weights as initializers, IR >= 4 once exported).
        groups: The analysed groups of ``base`` (from the same import as the plans' atoms).
        providers: onnxruntime execution providers.
        extra_outputs: Intermediate tensors :meth:`tensors` may fetch (never fetched by :meth:`run`).
        fixed: Values fed to every run for inputs of ``base`` that stand for its weights (the weights
            of :meth:`of_working`: the session holds no copy of them).
    """

    def __init__(
        self,
        base: onnx.ModelProto,
        groups: Sequence[ChannelGroup],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        extra_outputs: Sequence[str] = (),
        fixed: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.fixed = dict(fixed or {})
        self.slots = {group.name: consumer_slots(group) for group in groups}
        stored = {init.name for init in base.graph.initializer} | set(self.fixed)
        names = {slot.weight for slots in self.slots.values() for slot in slots}
        missing = names - stored
        if missing:  # e.g. float16-stored weights: the working graph's tensor is a Cast output there
            raise ValueError(f"consumer weights {sorted(missing)[:3]} are not initializers of the base model")
        graph_outputs = {value.name for value in base.graph.output}
        for slot in (slot for slots in self.slots.values() for slot in slots):
            if slot.bias is None or slot.node is None:
                continue
            seen = slot.node.op == "MatMul" and slot.node.outputs[0].name in graph_outputs
            if slot.bias.name not in stored or seen:
                slot.bias = None  # a Constant node's output, or a MatMul output the user sees: rebuild
        names |= {slot.bias.name for slots in self.slots.values() for slot in slots if slot.bias}
        self.overridable = names - set(self.fixed)  # consumer weights stored in ``base`` (small ones)
        serialized = serialized_with(base, self.overridable, extra_outputs)
        self.session = simulation_session(serialized, providers)
        del serialized
        self.structure, self.providers = base, list(providers)  # for sessions over parts of it
        self.outputs = [out.name for out in base.graph.output]
        initializers = {init.name for init in base.graph.initializer} | set(self.fixed)
        self.real_inputs = [value.name for value in base.graph.input if value.name not in initializers]
        self.runs = 0
        self.batched: bool | None = None  # decided on the first run
        declared = {value.name: value.shape for value in self.session.get_inputs()}
        self.batch_inputs = [name for name in dynamic_leading(declared) if name in self.real_inputs]
        self.chunkers: dict[tuple[str, ...], RowChunks] = {}  # per list of tensors fetched

    @classmethod
    def of_working(
        cls,
        working: WorkingModel,
        groups: Sequence[ChannelGroup],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        extra_outputs: Sequence[str] = (),
    ) -> MergeSimulator:
        """A simulator of ``working`` that copies none of its large float32 weights.

        They become graph inputs of a dims-only export (:func:`red_onnx.io.graph.export_light`), fed at every
        run with the working model's own arrays (onnxruntime reads contiguous numpy inputs in place): no
        full export, serialization or session copy of the weights (conv25m: -0.3 s, -180 MB at the peak).
        """
        light, names = export_light(working)
        _initializers_as_inputs(light, set(names))
        constants = working.graph.tensors()  # float32 and contiguous: the same arrays, no copy
        stored = {name: getattr(constants[name], "red_default", constants[name]) for name in names}
        fixed = {name: np.ascontiguousarray(stored[name].values, dtype=np.float32) for name in names}
        return cls(light, groups, providers, extra_outputs, fixed=fixed)

    def tensors(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Values of ``extra_outputs`` (or outputs) of the base model on one feed (weights unchanged)."""
        values = self._chunked(names, self.base_inputs(feed))
        return [np.asarray(value) for value in values]

    def _chunked(self, names: Sequence[str], inputs: Feed) -> list[np.ndarray]:
        """``names`` computed on ``inputs``, a batch of many rows in chunks of rows (``runtime.rows``)."""
        key = tuple(names)
        chunks = self.chunkers.get(key) or self.chunkers.setdefault(key, RowChunks(self.batch_inputs))
        return chunks.run(lambda part: self.session.run(list(names), part), inputs)

    def supports(self, plan: Plan) -> bool:
        """Whether the plan is on groups this simulator knows, with offsets only where a bias takes them."""
        return all(
            name in self.slots
            and all(
                slot.bias or not has_offsets(of_consumer(merges, index))
                for index, slot in enumerate(self.slots[name])
            )
            for name, merges in plan.items()
        )

    def weights(self, plan: Plan) -> dict[str, np.ndarray]:
        """The replaced consumer weights (and biases, where offsets change them) of ``plan``, by name."""
        replaced = {}
        for name, merges in plan.items():
            for index, slot in enumerate(self.slots[name] if merges else ()):
                given = of_consumer(merges, index)
                replaced[slot.weight] = merged_weight(slot, given)
                bias = offset_bias(slot, given)
                if bias is not None and slot.bias is not None:
                    replaced[slot.bias.name] = bias
        return replaced

    def run(self, plan: Plan, feeds: Sequence[Feed]) -> list[Feed]:
        """Outputs of the base model with ``plan`` applied, per feed (as one batch where that is safe)."""
        weights = self.weights(plan)
        self.runs += 1
        if self.batched is None and len(feeds) > 1:  # decided on the first run with several feeds
            self.batched = self._batching_is_safe(feeds)
        if self.batched and len(feeds) > 1:
            return self._run_batched(weights, feeds)
        return [self._run_one(weights, feed) for feed in feeds]

    def _run_one(self, weights: Mapping[str, np.ndarray], feed: Feed) -> Feed:
        values = self._chunked(self.outputs, {**self.base_inputs(feed), **weights})
        return dict(zip(self.outputs, (np.asarray(v) for v in values), strict=True))

    def base_inputs(self, feed: Mapping[str, np.ndarray]) -> Feed:
        """The session's inputs for one feed with the base weights: the real inputs and ``fixed``."""
        return {**{n: feed[n] for n in self.real_inputs}, **self.fixed}

    def _run_batched(self, weights: Mapping[str, np.ndarray], feeds: Sequence[Feed]) -> list[Feed]:
        """All feeds concatenated on axis 0, one run, outputs split back (shapes checked)."""
        joined = {n: np.concatenate([feed[n] for feed in feeds], axis=0) for n in self.real_inputs}
        values = self._chunked(self.outputs, {**joined, **self.fixed, **weights})
        sizes = [feeds[0][n].shape[0] for n in self.real_inputs[:1]] * len(feeds)
        cuts = np.cumsum(sizes)[:-1]
        parts = [np.split(np.asarray(v), cuts, axis=0) for v in values]
        return [dict(zip(self.outputs, (part[k] for part in parts), strict=True)) for k in range(len(feeds))]

    def _batching_is_safe(self, feeds: Sequence[Feed]) -> bool:
        """Whether batching the feeds gives the per-feed outputs (checked once, on the base model).

        Needs every real input of rank >= 1 with the same axis-0 size, and every output split back with
        the per-feed shape and values (a model that mixes samples, or hard-codes its batch, fails).
        """
        if len(feeds) < 2 or not self.real_inputs:
            return False
        if any(np.ndim(feed[n]) == 0 for feed in feeds for n in self.real_inputs):
            return False
        if len({feed[n].shape[0] for feed in feeds for n in self.real_inputs}) != 1:
            return False
        single = [self._run_one({}, feed) for feed in feeds[:2]]
        try:
            joined = self._run_batched({}, feeds[:2])
        except Exception as error:  # onnxruntime's errors share no base class
            logger.info("search runs samples one by one (batching them failed: %s)", error)
            return False
        for want, have in zip(single, joined, strict=True):
            for name, values in want.items():
                if have[name].shape != values.shape or not np.allclose(
                    have[name], values, rtol=1e-4, atol=1e-5
                ):
                    logger.info("search runs samples one by one (output %s changes when batched)", name)
                    return False
        return True


class MacsCounter:
    """MACs kept by a plan, counted from per-layer MACs and kept-channel fractions (no rebuild).

    Args:
        layer_macs: MACs of each weighted layer of the base model, by node name.
        groups: The analysed groups of the base model.
    """

    def __init__(self, layer_macs: Mapping[str, int], groups: Sequence[ChannelGroup]) -> None:
        self.layer_macs = dict(layer_macs)
        self.total = max(sum(self.layer_macs.values()), 1)
        self.members: dict[str, list[tuple[str, np.ndarray]]] = {}  # group -> (layer, atom per channel)
        for group in groups:
            entries = [(p.node.name, group.tensors[p.tensor].atoms) for p in group.producers]
            entries += [(c.node.name, group.tensors[c.tensor].atoms) for c in group.consumers]
            entries += [(n.name, group.tensors[n.outputs[0].name].atoms) for n in group.path
                        if n.op == "Conv" and n.outputs[0].name in group.tensors]  # fmt: skip
            # attention's Q·Kᵀ and P·V: MatMuls of two computed tensors scale with the heads they keep
            entries += [(n.name, group.tensors[n.outputs[0].name].atoms) for n in group.path
                        if n.op == "MatMul" and n.outputs[0].name in group.tensors
                        and not any(isinstance(t, gs.Constant) for t in n.inputs[:2])]  # fmt: skip
            self.members[group.name] = [
                (layer, atoms) for layer, atoms in entries if layer in self.layer_macs
            ]

    def fraction(self, plan: Plan) -> float:
        """The fraction of the base model's MACs kept with ``plan`` applied."""
        factor = {layer: 1.0 for layer in self.layer_macs}
        for name, merges in plan.items():
            if not merges:
                continue
            deleted = removed_atoms(merges)
            for layer, atoms in self.members.get(name, []):
                valid = atoms[atoms >= 0]
                if valid.size:
                    factor[layer] *= 1.0 - np.isin(valid, deleted).sum() / valid.size
        return sum(self.layer_macs[layer] * f for layer, f in factor.items()) / self.total
