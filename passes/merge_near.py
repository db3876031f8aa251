"""Approximate merging: apply chosen near-duplicate merges, group by group (RED's merging step).

The pass decides nothing about the budget: it receives, per group name, how many of the group's best
merge candidates to apply (the budget search in ``red_onnx.budget`` chooses), computes the candidates
from the analysis and hands the merges to ``red_onnx.rewrite``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from red_onnx.channels import ChannelAnalysis, ChannelGroup, analyse
from red_onnx.graph import WorkingModel, clear_intermediate_shapes, subgraph_outer_references
from red_onnx.pass_infra import Pass, PassResult
from red_onnx.redundancy import atom_params
from red_onnx.rewrite import GroupPlan, apply_plan, attach_graph
from red_onnx.similarity import Candidates, near_candidates, resolve_merges

Shapes = Mapping[str, "tuple[int, ...] | None"]


@dataclass
class GroupCandidates:
    """A group of the analysed model and its merge candidates."""

    group: ChannelGroup
    candidates: Candidates


def group_candidates(model: WorkingModel, shapes: Shapes, freeze: Sequence[str]) -> list[GroupCandidates]:
    """Analyse ``model`` and rank the merge candidates of every unfrozen group."""
    analysis = analyse_model(model, shapes, freeze)
    found = []
    for group in analysis.groups:
        if group.frozen or not group.producers or group.n_atoms < 2:
            continue
        params = atom_params(group, {name: m.rank for name, m in group.tensors.items()})
        eligible = np.ones(group.n_atoms, bool)
        found.append(GroupCandidates(group, near_candidates(params, group.homogeneous, eligible)))
    return found


def analyse_model(model: WorkingModel, shapes: Shapes, freeze: Sequence[str]) -> ChannelAnalysis:
    """Channel analysis of ``model`` with known shapes."""
    return analyse(model.graph, shapes, outer_refs=subgraph_outer_references(model.graph), freeze=freeze)


class MergeNear(Pass):
    """Merge the first ``counts[group]`` candidates of each named group (others untouched)."""

    name = "merge_near"

    def __init__(
        self,
        *,
        shapes: Callable[[WorkingModel], Shapes],
        counts: Mapping[str, int],
        freeze: Sequence[str] = (),
    ) -> None:
        """Configure the pass.

        Args:
            shapes: The shape service.
            counts: Number of merges to apply per group name.
            freeze: Node-name glob patterns of layers to protect.
        """
        self.shapes = shapes
        self.counts = dict(counts)
        self.freeze = tuple(freeze)

    def call(self, model: WorkingModel) -> PassResult:
        """Apply the merges; report how many channels went per group."""
        removed: dict[str, int] = {}
        plans = []
        for item in group_candidates(model, self.shapes(model), self.freeze):
            count = self.counts.get(item.group.name, 0)
            if count <= 0:
                continue
            merges = resolve_merges(item.candidates, count)
            delete = np.zeros(item.group.n_atoms, bool)
            delete[[m.source for m in merges]] = True
            plans.append(GroupPlan(item.group, delete, merges))
            removed[item.group.name] = len(merges)
        attach_graph(model.graph)
        for plan in plans:
            apply_plan(plan)
        clear_intermediate_shapes(model)
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"removed": sum(removed.values()), "groups_changed": len(removed)}
        return PassResult(model, bool(removed), stats)
