"""Sequential correction of the merged model's Conv and Gemm consumers (orchestration).

The budget search refits every consumer on activations captured once on the original model
(one-shot). After its plan is applied, the later layers read inputs that the earlier merges changed.
This step walks the merged model in graph order and corrects each ungrouped Conv (1×1 or k×k: its
rows are then the input patches) and each Gemm that lost input channels: its input is captured on
the model corrected so far (the fit rows), its target is the same node's output in the
exact-rewritten model (the channels it kept, where its own outputs were merged too), and its weight
and bias are refit by ridge regression towards their current values
(``red_onnx.analysis.correction``), the ridge strength chosen per node by cross-validation over
folds of the fit samples, none where no strength lowers the held-back error. Grouped Convs and
MatMuls are left as they are.

Measured (``bench/sequential_refit.py --cnn``, α per node on a quarter of the calibration images):
test output error falls on 5 of 5 CNN runs (MobileNetV2 at 0.9 of the MACs 0.239 → 0.219, at 0.85
0.324 → 0.295); on a sentence encoder's MatMuls every layer's held-back error fell while the output
cosine fell too (0.976 → 0.925): a node's own error cannot decide, so the caller keeps the corrected
model only where its *output* error on the cv rows, which the fit never saw, is lower
(:func:`correct_plan`), and it fits two node sets and keeps the better one there
(``CORRECTION_SCOPES``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from red_onnx.analysis.channels import ChannelGroup
from red_onnx.analysis.correction import CORRECTION_ALPHAS, LinearStats, cross_validated_change
from red_onnx.analysis.merge_sets import removed_atoms
from red_onnx.passes.merge_near import mergeable_groups
from red_onnx.runtime.tensor_values import tensor_fetch
from red_onnx.search.activations import ConvTaps, conv_windows, patch_rows

if TYPE_CHECKING:
    from red_onnx.search.budget import BudgetSearch

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

#: Input positions (rows) a node is fitted and validated on at most, over all samples: a seeded
#: subset of the spatial positions, the same in every sample.
CORRECTION_ROWS = 200_000
#: Target elements kept per node at most (float32, 64 MB): a wide node gets fewer rows, never fewer
#: than ``MIN_ROWS_PER_INPUT`` per input feature.
TARGET_ELEMENTS = 2**24
MIN_ROWS_PER_INPUT = 8
#: The most input features (channels × kernel taps, and the constant) a node is corrected with: its
#: Grams then take 134 MB each in float64.
MAX_FEATURES = 4096
#: Input elements turned into rows at once (float64: 64 MB), a block of samples at a time.
ROW_BLOCK_ELEMENTS = 2**23
#: Folds of the fit samples each node's ridge strength is cross-validated on.
CORRECTION_FOLDS = 4
#: The node sets the correction is fitted on, narrowest first: 1×1 Convs and Gemms that kept their
#: outputs; then also k×k ungrouped Convs and nodes whose own outputs were merged (towards the
#: channels they kept). PP-OCR cls at 0.7 of the MACs: the pointwise correction lowered the cv
#: output error 0.069 → 0.049 (test crops alike 0.9675 → 0.9775), every node 0.069 → 0.060; digits
#: at 0.6: test relative L2 0.067 one-shot, 0.050 pointwise, 0.046 every node.
CORRECTION_SCOPES = ("pointwise", "every")
#: The correction is kept where it lowers the output error on the cv rows by at least this fraction
#: (a smaller gain is within what another draw of rows would change).
MIN_GAIN = 0.01


@dataclass(frozen=True, eq=False)
class LinearNode:
    """An ungrouped Conv or a Gemm of the merged model the correction may refit.

    Attributes:
        name: The node's name (may be empty).
        output: Its output tensor (how the node is found in the exact-rewritten and working models).
        input: Its input tensor.
        weight: Its weight initializer.
        bias: Its bias initializer (None: it has none; one is added if the intercept changes).
        rows_first: Whether the weight holds a row per output (Conv, Gemm with ``transB``).
        taps: How a Conv reads its input (its rows are input patches; None: a Gemm).
        kept: Where the node's own outputs lost channels too: the exact-rewritten model's output
            channels it kept (its targets), in order; None where it kept them all.
    """

    name: str
    output: str
    input: str
    weight: str
    bias: str | None
    rows_first: bool
    taps: ConvTaps | None = None
    kept: np.ndarray | None = None


@dataclass
class Correction:
    """The corrected model and what changed.

    Attributes:
        model: The corrected copy of the merged model.
        weights: Per node output: its new weight and bias (the bias None where it has none and none
            was added).
        layers: Per node considered, in graph order: the rows sampled, the chosen ridge strength
            (0: unchanged), its relative output error on the fit rows before and after, and after as
            the folds held back measured it.
        skipped: Nodes that lost input channels and were left as they are, with the reason.
    """

    model: onnx.ModelProto
    weights: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _conv_taps(node: onnx.NodeProto, dims: Sequence[int]) -> ConvTaps | str:
    """How an ungrouped Conv reads its input (kernel, strides, dilations, pads), or why it is left."""
    if _attribute(node, "group", 1) != 1:
        return "a grouped Conv"
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return "a Conv with auto_pad SAME (its pads are not written)"
    kernel = tuple(int(d) for d in dims[2:])
    if dims[1] * math.prod(kernel) + 1 > MAX_FEATURES:
        return f"its input patches have {dims[1] * math.prod(kernel)} features (at most {MAX_FEATURES - 1})"
    rank = len(kernel)
    pads = tuple(int(p) for p in _attribute(node, "pads", [0] * 2 * rank))
    return ConvTaps(
        kernel,
        tuple(int(v) for v in _attribute(node, "strides", [1] * rank)),
        tuple(int(v) for v in _attribute(node, "dilations", [1] * rank)),
        pads if auto_pad == "NOTSET" else (0,) * 2 * rank,
    )


def _not_plain_gemm(node: onnx.NodeProto) -> str | None:
    if (
        _attribute(node, "transA", 0)
        or _attribute(node, "alpha", 1.0) != 1.0
        or _attribute(node, "beta", 1.0) != 1.0
    ):
        return "a Gemm with transA, alpha or beta"
    return None


def correctable_nodes(
    base: onnx.ModelProto,
    merged: onnx.ModelProto,
    kept_outputs: Mapping[str, np.ndarray] | None = None,
    *,
    scope: str = "every",
) -> tuple[list[LinearNode], list[dict[str, str]]]:
    """The Convs and Gemms of ``merged`` whose weight lost inputs against ``base``, in graph order.

    Args:
        base: The model the merges were applied to.
        merged: The model with the merges applied.
        kept_outputs: Per output tensor whose channels were merged: the channels of ``base``'s
            tensor it kept (a node writing it is refit towards them; without, it is left).
        scope: ``"every"`` (ungrouped Convs of any kernel and Gemms) or ``"pointwise"`` (1×1 Convs
            and Gemms that kept their outputs).

    Returns:
        The nodes the correction refits, and the others that lost inputs with the reason they are
        left as they are (k×k or grouped Convs, their own outputs merged too, shared weights).
    """
    before = {node.output[0]: node for node in base.graph.node if node.output}
    base_dims = {i.name: list(i.dims) for i in base.graph.initializer}
    now = {i.name: i for i in merged.graph.initializer}
    readers: dict[str, int] = {}
    for node in merged.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    found, skipped = [], []
    for node in merged.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in now:
            continue
        original = before.get(node.output[0])
        if original is None or original.op_type != node.op_type or original.input[1] not in base_dims:
            continue
        old, new = base_dims[original.input[1]], list(now[node.input[1]].dims)
        rows_first = node.op_type == "Conv" or bool(_attribute(node, "transB", 0))
        inputs, outputs = (1, 0) if rows_first else (0, 1)
        if len(old) != len(new) or old[inputs] == new[inputs]:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        taps = _conv_taps(node, new) if node.op_type == "Conv" else None
        reason = taps if isinstance(taps, str) else None if node.op_type == "Conv" else _not_plain_gemm(node)
        if reason is None and scope == "pointwise" and isinstance(taps, ConvTaps) and taps.taps > 1:
            reason = "a k×k Conv (left in the pointwise scope)"
        kept = None
        if reason is None and old[outputs] != new[outputs]:
            kept = (kept_outputs or {}).get(node.output[0]) if scope == "every" else None
            if kept is None or len(kept) != new[outputs]:
                reason = "its own outputs were merged too, and which ones it kept is not known"
        if reason is None and (readers[node.input[1]] > 1 or (bias is not None and readers[bias] > 1)):
            reason = "its weight or bias is shared with another node"
        if (
            reason is None
            and bias is not None
            and (bias not in now or math.prod(now[bias].dims) != new[outputs])
        ):
            reason = "its bias is not a constant with one value per output"
        if reason is None and now[node.input[1]].data_type not in _FLOATS:
            reason = "its weight is not a float tensor"
        if reason is not None:
            skipped.append({"node": node.name or node.output[0], "reason": reason})
            continue
        conv = taps if isinstance(taps, ConvTaps) else None
        found.append(
            LinearNode(node.name, node.output[0], node.input[0], node.input[1], bias, rows_first, conv, kept)
        )
    return found, skipped


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _input_rows(
    node: LinearNode, value: np.ndarray, picked: np.ndarray | None, samples: np.ndarray
) -> np.ndarray:
    """The rows ``node`` multiplies with its weight, for the ``samples`` of ``value`` (first axis).

    A Gemm's input, or a 1×1 or k×k Conv's input patches at the output positions ``picked`` (per
    sample; None: all): ``[len(samples)·P, C·taps]`` in the weight's order.
    """
    if node.taps is None:
        return _rows(value[samples], picked)
    windows = conv_windows(value, node.taps)
    rank = len(node.taps.kernel)
    size = math.prod(windows.shape[2 : 2 + rank])
    spots = np.arange(size) if picked is None else picked
    flat = (samples[:, None] * size + spots[None, :]).reshape(-1)
    return patch_rows(windows, rank, flat).T


def _rows(value: np.ndarray, picked: np.ndarray | None) -> np.ndarray:
    """``[N, C, *spatial]`` (or ``[N, C]``) as rows ``[N·P, C]`` at the picked flat spatial positions."""
    if value.ndim == 2:
        return value
    flat = value.reshape(value.shape[0], value.shape[1], -1)
    flat = flat if picked is None else flat[:, :, picked]
    return flat.transpose(0, 2, 1).reshape(-1, value.shape[1])


class _Positions:
    """The spatial positions each node is sampled at (seeded; the same in every sample)."""

    def __init__(self, samples: int, limits: Sequence[int]) -> None:
        self.samples, self.limits = max(samples, 1), limits
        self.picked: dict[tuple[int, int], np.ndarray | None] = {}

    def of(self, index: int, value: np.ndarray) -> np.ndarray | None:
        size = math.prod(value.shape[2:]) if value.ndim > 2 else 1
        key = (index, size)
        if key not in self.picked:
            per_sample = max(self.limits[index] // self.samples, 1)
            rng = np.random.default_rng(index)
            self.picked[key] = (
                None if size <= per_sample else np.sort(rng.choice(size, per_sample, replace=False))
            )
        return self.picked[key]


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _features(node: LinearNode, weights: Mapping[str, onnx.TensorProto]) -> tuple[int, int]:
    """The node's input features (channels × kernel taps) and outputs, from its weight's dims."""
    dims = list(weights[node.weight].dims)
    if node.rows_first:
        return math.prod(dims[1:]), dims[0]
    return dims[0], dims[1]


def _matrix(
    node: LinearNode, weights: Mapping[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The node's weight as stored, its bias (zeros where none) and ``M = [W; b]`` (``[C + 1, O]``)."""
    weight = numpy_helper.to_array(weights[node.weight])
    matrix = weight.reshape(weight.shape[0], -1).T if node.rows_first else weight
    outputs = matrix.shape[1]
    bias = numpy_helper.to_array(weights[node.bias]).reshape(-1) if node.bias else np.zeros(outputs)
    return weight, bias, np.vstack([matrix.astype(np.float64), bias.astype(np.float64)[None, :]])


def _set(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    for initializer in model.graph.initializer:
        if initializer.name == name:
            initializer.CopyFrom(numpy_helper.from_array(values, name))
            return
    model.graph.initializer.append(numpy_helper.from_array(values, name))


def _updated(
    model: onnx.ModelProto, node: LinearNode, weight: np.ndarray, bias: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Write ``matrix`` (``[C + 1, O]``) into the node's weight and bias in ``model``; the stored arrays."""
    body = matrix[:-1]
    stored = (body.T.reshape(weight.shape) if node.rows_first else body).astype(weight.dtype)
    _set(model, node.weight, stored)
    intercept = matrix[-1]
    if node.bias is None and not intercept.any():
        return stored, None
    dtype = bias.dtype if node.bias else weight.dtype
    shape = numpy_helper.to_array(_weights(model)[node.bias]).shape if node.bias else (len(intercept),)
    new_bias = intercept.reshape(shape).astype(dtype)
    if node.bias is None:  # a bias input is added under a name of its own
        target = next(n for n in model.graph.node if n.output and n.output[0] == node.output)
        name = f"{node.output}_corrected_bias"
        target.input.extend([""] * (2 - len(target.input)) + [name])
        _set(model, name, new_bias)
    else:
        _set(model, node.bias, new_bias)
    return stored, new_bias


def correct_sequentially(
    base: onnx.ModelProto,
    merged: onnx.ModelProto,
    fit_feeds: Sequence[Feed],
    *,
    alphas: Sequence[float] = CORRECTION_ALPHAS,
    folds: int = CORRECTION_FOLDS,
    kept_outputs: Mapping[str, np.ndarray] | None = None,
    scope: str = "every",
) -> Correction:
    """Correct ``merged``'s Conv and Gemm consumers in graph order towards ``base``'s same outputs.

    Args:
        base: The model the merges were applied to (exact rewrites only): its node outputs are the
            targets.
        merged: The model with the merges applied (not modified: the correction works on a copy).
        fit_feeds: The feeds the corrections are fitted on; their samples fall into ``folds`` folds
            (sample ``i`` into fold ``i mod folds``) that choose each node's ridge strength.
        alphas: The ridge strengths tried per node (``analysis.correction``).
        folds: How many folds the ridge strength is cross-validated on.
        kept_outputs: Per output tensor of a producer whose channels were merged: the channels of
            ``base``'s tensor it kept (:func:`kept_outputs`); such a node is corrected towards them.
        scope: Which nodes are corrected (:func:`correctable_nodes`).

    Returns:
        The corrected copy and what changed.
    """
    model = onnx.ModelProto()
    model.CopyFrom(merged)
    nodes, skipped = correctable_nodes(base, model, kept_outputs, scope=scope)
    result = Correction(model, skipped=skipped)
    if not nodes:
        return result
    feeds = list(fit_feeds)
    starts = np.cumsum([0] + [_samples(model, [feed]) for feed in feeds])
    weights = _weights(model)
    limits = []
    for node in nodes:
        inputs, outputs = _features(node, weights)
        rows = max(TARGET_ELEMENTS // outputs, MIN_ROWS_PER_INPUT * (inputs + 1))
        limits.append(min(CORRECTION_ROWS, rows))
    positions = _Positions(int(starts[-1]), limits)
    fetch = tensor_fetch(base, [node.output for node in nodes])
    targets: list[list[np.ndarray]] = [[] for _ in nodes]
    sampled: list[list[np.ndarray | None]] = [[] for _ in nodes]  # the output positions, per feed
    for feed in feeds:  # the exact-rewritten model's outputs of every node, at the sampled positions
        for index, value in enumerate(fetch([node.output for node in nodes], feed)):
            kept = value if nodes[index].kept is None else value[:, nodes[index].kept]
            sampled[index].append(positions.of(index, value))
            targets[index].append(_rows(kept, sampled[index][-1]).astype(np.float32))
    del fetch
    for index, node in enumerate(nodes):
        weight, bias, matrix = _matrix(node, _weights(model))
        stats = [LinearStats.empty(matrix.shape[0] - 1, matrix.shape[1]) for _ in range(folds)]
        current = tensor_fetch(model, [node.input])
        for position, feed in enumerate(feeds):
            (value,) = current([node.input], feed)
            target = targets[index][position]
            per_sample = len(target) // max(len(value), 1)
            fold_of = (starts[position] + np.arange(len(value))) % folds
            block = max(1, ROW_BLOCK_ELEMENTS // max(per_sample * (matrix.shape[0] - 1), 1))
            for fold, found in enumerate(stats):
                members = np.flatnonzero(fold_of == fold)
                for begin in range(0, members.size, block):  # the rows in blocks of about 64 MB
                    picked_samples = members[begin : begin + block]
                    patches = _input_rows(node, value, sampled[index][position], picked_samples)
                    wanted = target.reshape(len(value), per_sample, -1)[picked_samples]
                    found.add(patches, wanted.reshape(len(patches), -1))
        del current
        targets[index] = []
        change = cross_validated_change(stats, matrix, alphas)
        result.layers.append({
            "node": node.name or node.output, "rows": sum(found.rows for found in stats),
            "alpha": change.alpha, "fit_before": round(change.fit_before, 6),
            "fit_after": round(change.fit_after, 6), "held_back_after": round(change.held_back_after, 6),
        })  # fmt: skip
        if change.alpha:
            result.weights[node.output] = _updated(model, node, weight, bias, matrix + change.change)
    logger.info("corrected %d of %d Conv and Gemm consumers", len(result.weights), len(nodes))
    return result


def kept_outputs(groups: Sequence[ChannelGroup], plan: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per producer output tensor of a group ``plan`` merges: the channels it keeps, in order.

    Only where the tensor's channels are its atoms one to one along axis 1 (Conv and Gemm outputs).
    """
    found = {}
    for group in groups:
        merges = plan.get(group.name)
        if not merges:
            continue
        removed = removed_atoms(merges)
        for producer in group.producers:
            member = group.tensors.get(producer.tensor)
            if member is not None and member.block == 1 and member.axis == 1:
                found[producer.tensor] = np.flatnonzero(~np.isin(member.atoms, removed))
    return found


def correct_plan(search: BudgetSearch, plan: Mapping[str, Any]) -> tuple[Correction | None, dict[str, Any]]:
    """Correct the model ``plan`` gives, and keep the correction only where it lowers the output error.

    The correction is fitted on the search's fit rows (its ridge strengths cross-validated over
    folds of them), in each of ``CORRECTION_SCOPES`` that finds other nodes; the one with the lower
    output error on the cv rows, which played no part in the fits, is kept when that error falls by
    at least ``MIN_GAIN`` of the uncorrected model's (every node may improve on its own rows while
    the output gets worse). The held-out rows then measure the model that will be written.

    Returns:
        The correction (None where it is not kept) and its summary for the report: the scope chosen,
        nodes corrected and skipped, the output error on the cv and held-out rows with and without it.
    """
    verifiers = search.correction_verifiers()
    if verifiers is None:
        return None, {"kept": False, "reason": "a recurrent stream is used whole: no rows to validate on"}
    fit, validation, heldout = verifiers
    base = search.base_model()
    merged = search.apply_plan(dict(plan), base)  # not a second export of the base model
    summary: dict[str, Any] = {
        "rows": {"fit": _samples(merged, fit.inputs), "cv": _samples(merged, validation.inputs)}
    }
    groups = mergeable_groups(search.working, search.shapes, search.freeze)
    kept_channels = kept_outputs(groups, plan)
    tried: list[tuple[float, str, Correction]] = []
    seen: list[list[str]] = []
    for scope in CORRECTION_SCOPES:
        nodes = [node.output for node in correctable_nodes(base, merged, kept_channels, scope=scope)[0]]
        if nodes in seen:  # the same nodes as a narrower scope: the same correction
            continue
        seen.append(nodes)
        correction = correct_sequentially(base, merged, fit.inputs, kept_outputs=kept_channels, scope=scope)
        if correction.weights or not tried:
            error = max(validation.rel_l2_errors(correction.model, "disable_all").values(), default=0.0)
            tried.append((error if correction.weights else math.inf, scope, correction))
    after, scope, correction = min(tried, key=lambda item: item[0])
    summary |= {
        "scope": scope,
        "corrected": len(correction.weights),
        "layers": correction.layers,
        "skipped": correction.skipped,
    }
    if not correction.weights:
        summary["kept"] = False
        return None, summary
    before = max(validation.rel_l2_errors(merged, "disable_all").values(), default=0.0)
    kept = after < (1.0 - MIN_GAIN) * before
    summary |= {"cv_error_before": before, "cv_error_after": after, "kept": kept}
    summary["cv_error_per_scope"] = {name: error for error, name, _ in tried if error < math.inf}
    if kept:
        summary["heldout_error_before"] = search.plan_error(dict(plan), heldout=True)  # measured already
        summary["heldout_error_after"] = max(
            heldout.rel_l2_errors(correction.model, "disable_all").values(), default=0.0
        )
    return (correction if kept else None), summary


def _samples(model: onnx.ModelProto, feeds: Sequence[Feed]) -> int:
    """Samples in ``feeds``: the leading size of the model's first input each feed gives (1 if scalar)."""
    constants = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in constants]
    count = 0
    for feed in feeds:
        value = next((np.asarray(feed[name]) for name in names if name in feed), None)
        count += value.shape[0] if value is not None and value.ndim else 1
    return count
