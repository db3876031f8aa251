"""Run a plan's simulation from the first layer it changes: sessions over suffixes of the base model.

A merge plan changes only its groups' consumer weights (``red_onnx.search.simulate``), so every tensor that
the base model computes before the first node reading one of those weights is the base model's own.
The calibration runs of the budget search (one one-sample run per group: on a ResNet-50-size net the
largest share of its onnxruntime time) all use the same feed: the base model's tensors at a few cut
points are computed once for it, and a plan then runs only the nodes after the latest cut before its
first changed weight, in a session over that suffix (weights fed as in the simulator: no copy).
The suffix computes the same nodes on the same values as the full session.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from red_onnx.search.simulate import Feed, MergeSimulator, Plan, serialized_with, simulation_session

logger = logging.getLogger(__name__)

#: Suffix sessions at most (cut before the first changed weight of evenly ranked groups).
CUTS = 6


def first_reads(model: onnx.ModelProto) -> dict[str, int]:
    """Index of the first node (in graph order) reading each tensor name."""
    found: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            found.setdefault(name, index)
    return found


def boundary(model: onnx.ModelProto, cut: int) -> list[str] | None:
    """Tensors computed before node ``cut`` and read from it on (None: an output is computed before)."""
    nodes = model.graph.node
    produced = {name for node in nodes[:cut] for name in node.output if name}
    if any(output.name in produced for output in model.graph.output):
        return None
    return sorted({name for node in nodes[cut:] for name in node.input if name in produced})


def suffix_model(model: onnx.ModelProto, cut: int, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The nodes of ``model`` from ``cut`` on, with the boundary tensors ``values`` as graph inputs."""
    suffix = onnx.ModelProto(ir_version=model.ir_version, domain=model.domain)
    suffix.opset_import.extend(model.opset_import)
    suffix.functions.extend(model.functions)
    graph = suffix.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node[cut:])
    read = {name for node in graph.node for name in node.input}
    graph.input.extend(value for value in model.graph.input if value.name in read)
    graph.input.extend(
        onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
        )
        for name, array in values.items()
    )
    graph.initializer.extend(init for init in model.graph.initializer if init.name in read)
    graph.output.extend(model.graph.output)
    return suffix


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(attr.type in kinds for node in model.graph.node for attr in node.attribute)


class SuffixSimulator:
    """The simulator's runs on one fixed feed, from the latest cut before the plan's first change.

    Args:
        simulator: The full-model simulator (its weights, slots and structure are shared).
        feed: The one feed these runs are for (any other feed goes to ``simulator``).
        cuts: Suffix sessions at most.
    """

    def __init__(self, simulator: MergeSimulator, feed: Feed, cuts: int = CUTS) -> None:
        self.simulator, self.feed = simulator, feed
        model = simulator.structure
        if _has_subgraphs(model):
            raise ValueError("the model has If/Loop/Scan bodies (their outer reads are not tracked)")
        self.first_read, self.nodes = first_reads(model), len(model.graph.node)
        starts = sorted({self._start(slots) for slots in simulator.slots.values() if slots} - {0})
        picked = sorted({starts[len(starts) * k // cuts] for k in range(cuts)}) if starts else []
        self.boundaries = {cut: names for cut in picked if (names := boundary(model, cut)) is not None}
        self.cuts = sorted(self.boundaries)
        wanted = sorted({name for names in self.boundaries.values() for name in names})
        values = self._base_values(wanted) if wanted else {}
        self.values = {cut: {n: values[n] for n in names} for cut, names in self.boundaries.items()}
        self.sessions: dict[int, tuple[ort.InferenceSession, set[str]]] = {}
        self.runs = 0

    def _start(self, slots: Sequence) -> int:
        return min(self.first_read.get(slot.weight, 0) for slot in slots)

    def _base_values(self, names: list[str]) -> dict[str, np.ndarray]:
        """The base model's values of ``names`` on the feed (one run of the whole model)."""
        simulator = self.simulator
        serialized = serialized_with(simulator.structure, simulator.overridable, names)
        session = simulation_session(serialized, simulator.providers)
        values = session.run(names, simulator.base_inputs(self.feed))
        return dict(zip(names, (np.asarray(value) for value in values), strict=True))

    def _session(self, cut: int) -> tuple[ort.InferenceSession, set[str]]:
        if cut not in self.sessions:
            simulator = self.simulator
            model = suffix_model(simulator.structure, cut, self.values[cut])
            serialized = serialized_with(model, simulator.overridable, ())
            session = simulation_session(serialized, simulator.providers)
            inputs = [*session.get_inputs(), *session.get_overridable_initializers()]
            self.sessions[cut] = session, {value.name for value in inputs}
        return self.sessions[cut]

    def run(self, plan: Plan, feeds: Sequence[Feed]) -> list[Feed]:
        """The plan's outputs on ``feeds`` (from a suffix when ``feeds`` is this simulator's one feed)."""
        simulator = self.simulator
        weights = simulator.weights(plan)
        start = min((self.first_read.get(name, 0) for name in weights), default=self.nodes)  # none: the last
        position = bisect.bisect_right(self.cuts, start) - 1
        if len(feeds) != 1 or feeds[0] is not self.feed or position < 0:
            return simulator.run(plan, feeds)
        cut = self.cuts[position]
        session, names = self._session(cut)
        given = {**simulator.base_inputs(self.feed), **weights}
        inputs = {**{name: value for name, value in given.items() if name in names}, **self.values[cut]}
        values = session.run(simulator.outputs, inputs)
        simulator.runs += 1
        self.runs += 1
        return [dict(zip(simulator.outputs, (np.asarray(v) for v in values), strict=True))]
