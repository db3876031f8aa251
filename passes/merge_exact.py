"""Exact merging: delete channels that provably duplicate, scale or add nothing to others.

Rules (docs/method.md, "Exact rewrites"): identical channels; positively scaled channels through positively
homogeneous groups; constant channels folded into consumers that see no padding; unused channels.
Every rule holds across a whole coupled group, so outputs are unchanged up to float rounding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from red_onnx.analysis.channels import ChannelAnalysis, ChannelGroup, analyse_model
from red_onnx.analysis.constants import (
    ChannelConstants,
    analyse_constants,
    consumer_absorb_problem,
    consumer_slices_zero,
)
from red_onnx.analysis.redundancy import atom_params, exact_merges
from red_onnx.analysis.weights import producer_rows
from red_onnx.io.graph import (
    WorkingModel,
    clear_intermediate_shapes,
    expect_constant,
)
from red_onnx.passes.infra import Pass, PassResult, Skip, require_constant_weights
from red_onnx.rewrite.editor import GroupPlan, apply_plan, attach_graph


def _seen_constant(group: ChannelGroup, consts: ChannelConstants) -> np.ndarray:
    """Per atom: whether some consumer sees it as a finite constant (else it is merely unused)."""
    seen = np.zeros(group.n_atoms, bool)
    for consumer in group.consumers:
        member = group.tensors[consumer.tensor]
        seen[member.atoms] |= np.isfinite(consts.values[consumer.tensor])
    return seen


def removable_constants(group: ChannelGroup, consts: ChannelConstants) -> tuple[np.ndarray, dict[int, str]]:
    """Atoms every consumer can do without, and why each kept all-zero-row atom stays."""
    removable = np.ones(group.n_atoms, bool)
    why: dict[int, str] = {}
    for consumer in group.consumers:
        local = group.atom_index(consumer.tensor)
        present = np.flatnonzero(local >= 0)
        values = consts.values[consumer.tensor][local[present]]
        zero = consumer_slices_zero(group, consumer.node, consumer.tensor)[local[present]]
        problem = consumer_absorb_problem(consumer.node)
        ok = zero | (values == 0.0) | (np.isfinite(values) & (problem is None))
        removable[present[~ok]] = False
        for atom in present[~ok]:
            reason = consts.reasons[consumer.tensor][local[atom]]
            if reason is None and np.isfinite(consts.values[consumer.tensor][local[atom]]):
                reason = problem
            why.setdefault(int(atom), reason or "channel is not constant at the consumers")
    if not group.consumers:
        removable[:] = False
    return removable, why


def keep_one_per_tensor(group: ChannelGroup, delete: np.ndarray) -> None:
    """Un-delete one channel of any tensor that would lose them all."""
    for member in group.tensors.values():
        if delete[member.atoms].all():
            delete[member.atoms[0]] = False


class MergeExact(Pass):
    """Delete exactly redundant channels of every unfrozen group, to a fixed point."""

    name = "merge_exact"

    def __init__(
        self,
        *,
        shapes: Callable[[WorkingModel], Mapping[str, tuple[int, ...] | None]],
        freeze: Sequence[str] = (),
        max_rounds: int = 4,
        channel_multiple: int = 1,
    ) -> None:
        """Configure the pass.

        Args:
            shapes: The shape service: static shapes of every tensor of a working model.
            freeze: Node-name glob patterns of layers to protect.
            max_rounds: Analysis/rewrite rounds at most (a deletion can expose another).
            channel_multiple: In a segment of at least twice this many channels, a kept count above it
                is rounded up to a multiple of it (``align_to_multiple``); 1: no rounding.
        """
        self.shapes = shapes
        self.freeze = tuple(freeze)
        self.max_rounds = max_rounds
        self.channel_multiple = channel_multiple

    def requires(self, model: WorkingModel) -> None:
        """Weights are constants (normalised at import)."""
        require_constant_weights(model, self.name)

    def call(self, model: WorkingModel) -> PassResult:
        """Merge and delete; report counts per rule, frozen groups and kept zero rows."""
        counts: Counter[str] = Counter()
        first: ChannelAnalysis | None = None
        kept: dict[tuple[str, int], str] = {}
        for _ in range(self.max_rounds):
            analysis = analyse_model(model, self.shapes(model), self.freeze)
            first = first or analysis
            plans, kept = self._plans(model, analysis, counts)
            if not plans:
                break
            attach_graph(model.graph)
            for plan in plans:
                apply_plan(plan)
            clear_intermediate_shapes(model)
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        skips = [Skip(g.name, g.frozen) for g in first.frozen if g.frozen] if first else []
        skips += [Skip(f"{layer}[{channel}]", reason) for (layer, channel), reason in sorted(kept.items())]
        stats = {
            "removed": sum(counts.values()),
            **{f"removed_{k}": v for k, v in sorted(counts.items())},
        }
        stats["groups"] = len(first.groups) if first else 0
        stats["frozen_groups"] = len(first.frozen) if first else 0
        return PassResult(model, stats["removed"] > 0, stats, skips)

    def _plans(
        self, model: WorkingModel, analysis: ChannelAnalysis, counts: Counter[str]
    ) -> tuple[list[GroupPlan], dict[tuple[str, int], str]]:
        order = {id(node): k for k, node in enumerate(model.graph.nodes)}
        plans, kept = [], {}
        for group in analysis.groups:
            if group.frozen or not group.producers:
                continue
            plan, why = plan_group(group, order, counts, self.channel_multiple)
            kept.update(why)
            if plan.removed:
                plans.append(plan)
        return plans, kept


def align_to_multiple(segment: np.ndarray, delete: np.ndarray, multiple: int) -> np.ndarray:
    """Un-delete surplus deletions so each wide segment keeps a count on ``multiple`` (in place).

    A segment (atoms present in the same tensors: a Split chunk, a Concat part, or the whole group) of
    at least ``2·multiple`` atoms that would keep more than ``multiple`` of them, off the multiple, keeps
    the next multiple up instead: onnxruntime ran a 3×3 conv stack 1.20× slower at 63 of 64 channels
    than at 64, but faster at every width from 1 to 8 (``bench/channel_multiple.py``), so only wide
    segments with more than one step left are rounded.

    Returns:
        The atoms kept back.
    """
    restored = [np.zeros(0, np.int64)]
    for value in np.unique(segment) if multiple > 1 else []:
        atoms = np.flatnonzero(segment == value)
        deleted = atoms[delete[atoms]]
        kept = len(atoms) - len(deleted)
        if len(atoms) < 2 * multiple or kept <= multiple or kept % multiple == 0:
            continue
        restored.append(deleted[len(deleted) - min(-kept % multiple, len(deleted)) :])
        delete[restored[-1]] = False
    return np.concatenate(restored)


def plan_group(
    group: ChannelGroup, order: dict[int, int], counts: Counter[str], channel_multiple: int = 1
) -> tuple[GroupPlan, dict[tuple[str, int], str]]:
    """Decide the exact deletions of one group (kept counts aligned: ``align_to_multiple``); count them."""
    consts = analyse_constants(group, order)
    removable, why = removable_constants(group, consts)
    params = atom_params(group, {name: m.rank for name, m in group.tensors.items()})
    merges = exact_merges(params, group.homogeneous, excluded=removable)
    delete = removable.copy()
    delete[[m.source for m in merges]] = True
    keep_one_per_tensor(group, delete)
    for atom in align_to_multiple(params.signature, delete, channel_multiple).tolist():
        why[atom] = f"kept so that its segment keeps a multiple of {channel_multiple} channels"
    merges = [m for m in merges if delete[m.source]]
    removable &= delete
    counts["identical"] += sum(1 for m in merges if m.scale == 1.0)
    counts["scaled"] += sum(1 for m in merges if m.scale != 1.0)
    constant = _seen_constant(group, consts)
    counts["constant"] += int((removable & constant).sum())
    counts["unused"] += int((removable & ~constant).sum())
    constants = {c.tensor: consts.values[c.tensor] for c in group.consumers}
    plan = GroupPlan(group, delete, merges, constants)
    return plan, _kept_zero_rows(group, delete, why)


def zero_row_nodes(group: ChannelGroup) -> list[tuple[str, str, np.ndarray]]:
    """(node name, output tensor, per-channel zero mask) of producers and depthwise path convs."""
    found = []
    for producer in group.producers:
        rows = producer_rows(producer.node)
        found.append((producer.node.name, producer.tensor, ~rows.any(axis=1)))
    for node in group.path:
        if node.op == "Conv" and node.outputs[0].name in group.tensors:
            kernel = expect_constant(node.inputs[1])
            found.append((node.name, node.outputs[0].name, ~kernel.reshape(kernel.shape[0], -1).any(axis=1)))
    # numpy's stubs allow a scalar for any() with an axis; a 2-D array gives a 1-D one
    return found  # type: ignore[return-value]


def _kept_zero_rows(
    group: ChannelGroup, delete: np.ndarray, why: dict[int, str]
) -> dict[tuple[str, int], str]:
    """Why each kept channel whose weights are all zero (producer row or depthwise kernel) stays."""
    kept = {}
    for name, tensor, zero in zero_row_nodes(group):
        atoms = group.tensors[tensor].atoms
        for channel in np.flatnonzero(zero & ~delete[atoms]):
            atom = int(atoms[channel])
            kept[(name, int(channel))] = why.get(atom, "kept as the group's last channel")
    return kept
