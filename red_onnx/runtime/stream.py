"""Recurrent models (analysis, pure): which inputs carry state, and how a stream of calls runs.

A streaming model (silero-vad: ``state -> stateN``; an exported LSTM step: ``h -> hn``, ``c -> cn``)
is called once per chunk with the state its previous call returned. A per-call error bound does not
bound what the state accumulates over a stream, so the verification runs such models as streams
(``red_onnx.verify.verifier``): every step's state inputs are the outputs of the *same* model's previous step,
the candidate carrying its own state and the reference its own, and every step's outputs are compared.

**State pairs** are found conservatively — every rule must hold:

1. a real (non-initializer) input of a float type and an output whose name is the input's name plus one
   of ``STATE_SUFFIXES`` (``state -> stateN``, ``h -> hn``, ``c -> c_out``, ``x -> x_next``);
2. the same element type, and declared shapes that agree (same rank; dims that are fixed in both are
   equal — exporters name an output's dynamic dims differently from the input's);
3. the output depends on the state input *and* on another real input (a recurrence mixes new data
   with the old state; an output computed from its namesake input alone, such as ``x -> xn`` as
   "x normalised", is a plain function and is not streamed);
4. at run time the output has the state input's shape and dtype (:func:`confirm_pairs`, which the
   verifier applies to one reference call before streaming).

Each input and each output belongs to at most one pair. Everything else is an ordinary input, fed
the step's own values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

Feed = dict[str, np.ndarray]
#: Runs one model call per feed (parallel streams at one step) and returns each call's outputs.
Runner = Callable[[Sequence[Feed]], list[Feed]]

#: Output name = state input name + one of these (exact, case-sensitive).
STATE_SUFFIXES = ("N", "n", "_n", "_out", "_next", "_new", "new")
FLOAT_TYPES = frozenset({TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BFLOAT16})


@dataclass(frozen=True)
class StatePair:
    """A recurrent state: the model reads ``input`` and returns its next value as ``output``."""

    input: str
    output: str


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dims (None for dynamic ones), or None when the rank is not declared."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tensor.shape.dim]


def _shapes_agree(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    dims_a, dims_b = _dims(a), _dims(b)
    if dims_a is None or dims_b is None or len(dims_a) != len(dims_b):
        return False
    return all(x is None or y is None or x == y for x, y in zip(dims_a, dims_b, strict=True))


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope (used but not defined inside it)."""
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(name for name in _node_reads(node) if name)
        defined.update(node.output)
    read.update(value.name for value in graph.output)
    return read - defined


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """A node's explicit inputs plus what its subgraphs (If, Loop, Scan bodies) read from outside."""
    reads = set(node.input)
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else attr.graphs:
            reads |= _subgraph_reads(graph)
    return reads


def _ancestors(model: onnx.ModelProto, output: str) -> set[str]:
    """Every tensor name ``output`` depends on in the main graph (subgraph reads included)."""
    producer = {name: node for node in model.graph.node for name in node.output}
    seen: set[str] = set()
    pending = [output]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producer:
            pending.extend(_node_reads(producer[name]))
    return seen


def find_state_pairs(model: onnx.ModelProto) -> list[StatePair]:
    """The model's recurrent state pairs by rules 1-3 of the module docstring (in graph-input order)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    outputs = {value.name: value for value in model.graph.output}
    input_names = {value.name for value in inputs}
    named: list[StatePair] = []  # rules 1 and 2
    for state in inputs:
        elem = state.type.tensor_type.elem_type
        if state.type.WhichOneof("value") != "tensor_type" or elem not in FLOAT_TYPES:
            continue
        matches = [
            name for name in (state.name + suffix for suffix in STATE_SUFFIXES)
            if name in outputs and name not in input_names
            and outputs[name].type.tensor_type.elem_type == elem and _shapes_agree(state, outputs[name])
        ]  # fmt: skip
        if len(matches) == 1 and all(pair.output != matches[0] for pair in named):
            named.append(StatePair(state.name, matches[0]))
    data = input_names - {pair.input for pair in named}  # the inputs that bring new data each call
    return [
        pair for pair in named
        if pair.input in (reads := _ancestors(model, pair.output) & input_names) and reads & data
    ]  # fmt: skip


def confirm_pairs(
    pairs: Sequence[StatePair], feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> list[StatePair]:
    """Rule 4: the pairs whose output came back with the shape and dtype of the state fed in."""
    return [
        pair for pair in pairs
        if pair.output in outputs and np.shape(outputs[pair.output]) == np.shape(feed[pair.input])
        and np.asarray(outputs[pair.output]).dtype == np.asarray(feed[pair.input]).dtype
    ]  # fmt: skip


def carried(feeds: Sequence[Feed], previous: Sequence[Feed] | None, pairs: Sequence[StatePair]) -> list[Feed]:
    """One step's feeds with each state input replaced by the previous step's state output."""
    if previous is None:
        return [dict(feed) for feed in feeds]
    steps = []
    for feed, prev in zip(feeds, previous, strict=True):
        state = {
            p.input: np.asarray(prev[p.output]).astype(feed[p.input].dtype, copy=False)
            for p in pairs
            if p.output in prev  # a candidate without it fails on that output; its stream goes on
        }
        steps.append({**feed, **state})
    return steps


def run_stream(
    runner: Runner, steps: Sequence[Sequence[Feed]], pairs: Sequence[StatePair]
) -> tuple[list[list[Feed]], list[list[Feed]]]:
    """Run parallel streams step by step, carrying each stream's state.

    Args:
        runner: One call of the model per feed (e.g. an onnxruntime session, or the budget search's
            simulator); each stream's state comes from the same runner's previous step.
        steps: ``steps[t][k]`` is stream ``k``'s feed at step ``t``; the state inputs of steps after the
            first are ignored (replaced by what the previous step returned).
        pairs: The state pairs.

    Returns:
        The feeds actually given (``[t][k]``, state carried) and the outputs of every step (``[t][k]``).
    """
    fed: list[list[Feed]] = []
    outputs: list[list[Feed]] = []
    for feeds in steps:
        fed.append(carried(feeds, outputs[-1] if outputs else None, pairs))
        outputs.append(runner(fed[-1]))
    return fed, outputs


def join_steps(values: Sequence[np.ndarray]) -> np.ndarray:
    """One output's values over the steps of a stream, as one array.

    Concatenated on axis 0 when every step has the same shape past axis 0 (so axis 1 keeps its meaning
    for the per-part measurement of packed outputs), else stacked when the steps are scalars, else the
    flattened steps one after the other (a candidate whose per-step shapes differ then fails on shape).
    """
    arrays = [np.asarray(v) for v in values]
    if arrays and all(a.ndim >= 1 and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    if arrays and all(a.ndim == 0 for a in arrays):
        return np.stack(arrays)
    return np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)


def per_stream(outputs: Sequence[Sequence[Feed]]) -> list[Feed]:
    """``outputs[t][k]`` regrouped per stream ``k``: each output joined over the steps (:func:`join_steps`).

    An output missing from some step of a stream is left out of that stream (the comparison then fails).
    """
    if not outputs:
        return []
    streams = []
    for k in range(len(outputs[0])):
        names = set.intersection(*(set(step[k]) for step in outputs))
        ordered = [name for name in outputs[0][k] if name in names]
        streams.append({name: join_steps([step[k][name] for step in outputs]) for name in ordered})
    return streams


def worst_step_error(candidate: np.ndarray, reference: np.ndarray, steps: int) -> float:
    """The largest change of one step's output, relative to the RMS size of a step's output.

    ``max_t ‖Δy_t‖ / sqrt(mean_t ‖y_t‖²)`` over the ``steps`` steps of a joined stream output: the relative
    L2 of a whole stream lets one step move far when the others barely move (silero-vad half: 0.016
    over a stream, 0.069 in one chunk's speech probability), and relative to each step's own size it
    would explode wherever the output is near zero (silence).
    """
    if steps < 1 or reference.size == 0 or reference.size % steps:
        return 0.0
    ref = np.asarray(reference, np.float64).reshape(steps, -1)
    moved = np.linalg.norm(np.asarray(candidate, np.float64).reshape(steps, -1) - ref, axis=1)
    scale = float(np.sqrt(np.mean(np.sum(ref**2, axis=1))))
    if not np.isfinite(moved).all():
        return float("inf")
    return float(moved.max() / scale) if scale > 0 else (0.0 if not moved.any() else float("inf"))
