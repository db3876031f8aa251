"""Approximate merging: apply chosen near-duplicate merges, group by group (RED's merging step).

The pass decides nothing: it receives, per group name, the merges to apply (the budget search in
``red_onnx.search.budget`` chooses them from the candidates ``candidates_of`` ranks for each of the
``mergeable_groups``) and hands them to
``red_onnx.rewrite.editor``. It reports how much each changed consumer's weight range widened (λ-merges add
scaled rows, which matters for a later int8 quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import ChannelGroup, analyse_model
from red_onnx.analysis.merge_sets import ConsumerMerges, DenseMerges, MergeList, removed_atoms
from red_onnx.analysis.redundancy import AtomParams, atom_params
from red_onnx.analysis.similarity import Candidates, near_candidates
from red_onnx.io.graph import WorkingModel, clear_intermediate_shapes, constant_values
from red_onnx.passes.infra import Pass, PassResult, require_constant_weights
from red_onnx.rewrite.editor import GroupPlan, apply_plan, attach_graph

Shapes = Mapping[str, "tuple[int, ...] | None"]


@dataclass
class GroupCandidates:
    """A group of the analysed model and its merge candidates."""

    group: ChannelGroup
    candidates: Candidates
    params: AtomParams


def mergeable_groups(model: WorkingModel, shapes: Shapes, freeze: Sequence[str]) -> list[ChannelGroup]:
    """The unfrozen groups of ``model`` with producers and at least two channels."""
    groups = analyse_model(model, shapes, freeze).groups
    return [group for group in groups if not group.frozen and group.producers and group.n_atoms >= 2]


def candidates_of(group: ChannelGroup) -> GroupCandidates:
    """The group's atom vectors (a copy of its weights) and its merge candidates ranked on them."""
    params = atom_params(group, {name: m.rank for name, m in group.tensors.items()})
    eligible = np.ones(group.n_atoms, bool)
    return GroupCandidates(group, near_candidates(params, group.homogeneous, eligible), params)


class MergeNear(Pass):
    """Apply the given merges to the named groups (others untouched)."""

    name = "merge_near"

    def __init__(
        self,
        *,
        shapes: Callable[[WorkingModel], Shapes],
        merges: Mapping[str, MergeList],
        freeze: Sequence[str] = (),
    ) -> None:
        """Configure the pass.

        Args:
            shapes: The shape service.
            merges: Per group name, the merges to apply (from ``similarity.resolve_merges`` on the
                candidates of ``candidates_of`` for the same model's groups).
            freeze: Node-name glob patterns of layers to protect (their groups are never touched).
        """
        self.shapes = shapes
        self.merges = {
            name: items if isinstance(items, (DenseMerges, ConsumerMerges)) else list(items)
            for name, items in merges.items()
            if items
        }
        self.freeze = tuple(freeze)

    def requires(self, model: WorkingModel) -> None:
        """Weights are constants (normalised at import)."""
        require_constant_weights(model, self.name)

    def call(self, model: WorkingModel) -> PassResult:
        """Apply the merges; report how many channels went and how much the weight ranges widened."""
        plans = []
        for group in analyse_model(model, self.shapes(model), self.freeze).groups:
            merges = self.merges.get(group.name)
            if not merges or group.frozen:
                continue
            delete = np.zeros(group.n_atoms, bool)
            delete[removed_atoms(merges)] = True
            plans.append(GroupPlan(group, delete, merges))
        before = _consumer_ranges(plans)
        attach_graph(model.graph)
        for plan in plans:
            apply_plan(plan)
        widening = {
            name: round(_weight_range(node) / span, 4) for name, (node, span) in before.items() if span
        }
        clear_intermediate_shapes(model)
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = sum(plan.removed for plan in plans)
        stats = {"removed": removed, "groups_changed": len(plans), "weight_range_ratio": widening}
        return PassResult(model, removed > 0, stats)


def _weight_range(node: gs.Node) -> float:
    values = constant_values(node.inputs[1])
    return float(values.max() - values.min()) if values is not None and values.size else 0.0


def _consumer_ranges(plans: list[GroupPlan]) -> dict[str, tuple[gs.Node, float]]:
    """Weight range of every consumer a merge will change (λ-merges widen it; int8 cares)."""
    return {c.node.name: (c.node, _weight_range(c.node)) for plan in plans for c in plan.group.consumers}
