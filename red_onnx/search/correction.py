"""Sequential correction of the merged model's 1×1 consumers (orchestration).

The budget search refits every consumer on activations captured once on the original model
(one-shot). After its plan is applied, the later layers read inputs that the earlier merges changed.
This step walks the merged model in graph order and corrects each 1×1 ungrouped Conv and each Gemm
that lost input channels and kept its outputs: its input is captured on the model corrected so far
(the fit rows), its target is the same node's output in the exact-rewritten model, and its weight
and bias are refit by ridge regression towards their current values
(``red_onnx.analysis.correction``), the ridge strength chosen per node on the validation rows, none
where no strength lowers their error there. k×k and grouped Convs and MatMuls are left as they are.

Measured (``bench/sequential_refit.py --cnn``, α per node on a quarter of the calibration images):
test output error falls on 5 of 5 CNN runs (MobileNetV2 at 0.9 of the MACs 0.239 → 0.219, at 0.85
0.324 → 0.295); on a sentence encoder's MatMuls every layer's held-back error fell while the output
cosine fell too (0.976 → 0.925): a node's own validation error cannot decide, so the caller keeps the
corrected model only where its *output* error on the validation rows is lower
(:func:`correct_plan`).
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

from red_onnx.analysis.correction import CORRECTION_ALPHAS, LinearStats, chosen_change
from red_onnx.runtime.tensor_values import tensor_fetch

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
#: The correction is kept where it lowers the output error on the cv rows by at least this fraction
#: (a smaller gain is within what another draw of rows would change).
MIN_GAIN = 0.01


@dataclass(frozen=True)
class LinearNode:
    """A 1×1 Conv or Gemm of the merged model the correction may refit.

    Attributes:
        name: The node's name (may be empty).
        output: Its output tensor (how the node is found in the exact-rewritten and working models).
        input: Its input tensor.
        weight: Its weight initializer.
        bias: Its bias initializer (None: it has none; one is added if the intercept changes).
        rows_first: Whether the weight holds a row per output (Conv, Gemm with ``transB``).
    """

    name: str
    output: str
    input: str
    weight: str
    bias: str | None
    rows_first: bool


@dataclass
class Correction:
    """The corrected model and what changed.

    Attributes:
        model: The corrected copy of the merged model.
        weights: Per node output: its new weight and bias (the bias None where it has none and none
            was added).
        layers: Per node considered, in graph order: the chosen ridge strength (0: unchanged) and
            its relative output error on the fit and validation rows before and after.
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


def _not_one_by_one(node: onnx.NodeProto, dims: Sequence[int]) -> str | None:
    """Why a Conv is not a plain 1×1 (ungrouped, unit strides, no padding), or None."""
    if any(d != 1 for d in dims[2:]):
        return "a k×k Conv (only 1×1 consumers are corrected)"
    if _attribute(node, "group", 1) != 1:
        return "a grouped Conv"
    if any(s != 1 for s in _attribute(node, "strides", [])) or any(p for p in _attribute(node, "pads", [])):
        return "a strided or padded 1×1 Conv"
    if _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return "a 1×1 Conv with auto_pad"
    return None


def _not_plain_gemm(node: onnx.NodeProto) -> str | None:
    if (
        _attribute(node, "transA", 0)
        or _attribute(node, "alpha", 1.0) != 1.0
        or _attribute(node, "beta", 1.0) != 1.0
    ):
        return "a Gemm with transA, alpha or beta"
    return None


def correctable_nodes(
    base: onnx.ModelProto, merged: onnx.ModelProto
) -> tuple[list[LinearNode], list[dict[str, str]]]:
    """The Convs and Gemms of ``merged`` whose weight lost inputs against ``base``, in graph order.

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
        reason = _not_one_by_one(node, new) if node.op_type == "Conv" else _not_plain_gemm(node)
        if reason is None and old[outputs] != new[outputs]:
            reason = "its own outputs were merged too (no target to refit to)"
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
        found.append(LinearNode(node.name, node.output[0], node.input[0], node.input[1], bias, rows_first))
    return found, skipped


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


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
    validation_feeds: Sequence[Feed],
    *,
    alphas: Sequence[float] = CORRECTION_ALPHAS,
) -> Correction:
    """Correct ``merged``'s 1×1 consumers in graph order towards ``base``'s outputs of the same nodes.

    Args:
        base: The model the merges were applied to (exact rewrites only): its node outputs are the
            targets.
        merged: The model with the merges applied (not modified: the correction works on a copy).
        fit_feeds: The feeds the corrections are fitted on.
        validation_feeds: The feeds each node's ridge strength is chosen on.
        alphas: The ridge strengths tried per node (``analysis.correction``).

    Returns:
        The corrected copy and what changed.
    """
    model = onnx.ModelProto()
    model.CopyFrom(merged)
    nodes, skipped = correctable_nodes(base, model)
    result = Correction(model, skipped=skipped)
    if not nodes:
        return result
    feeds = [*fit_feeds, *validation_feeds]
    fitted = len(fit_feeds)
    samples = _samples(model, feeds)
    weights = _weights(model)
    limits = []
    for node in nodes:
        _, _, matrix = _matrix(node, weights)
        inputs, outputs = matrix.shape[0] - 1, matrix.shape[1]
        limits.append(
            min(CORRECTION_ROWS, max(TARGET_ELEMENTS // outputs, MIN_ROWS_PER_INPUT * (inputs + 1)))
        )
    positions = _Positions(samples, limits)
    fetch = tensor_fetch(base, [node.output for node in nodes])
    targets: list[list[np.ndarray]] = [[] for _ in nodes]
    for feed in feeds:  # the exact-rewritten model's outputs of every node, at the sampled positions
        for index, value in enumerate(fetch([node.output for node in nodes], feed)):
            targets[index].append(_rows(value, positions.of(index, value)).astype(np.float32))
    del fetch
    for index, node in enumerate(nodes):
        weight, bias, matrix = _matrix(node, _weights(model))
        fit = LinearStats.empty(matrix.shape[0] - 1, matrix.shape[1])
        validation = LinearStats.empty(matrix.shape[0] - 1, matrix.shape[1])
        current = tensor_fetch(model, [node.input])
        for position, feed in enumerate(feeds):
            (value,) = current([node.input], feed)
            rows = _rows(value, positions.of(index, value))
            (fit if position < fitted else validation).add(rows, targets[index][position])
        del current
        targets[index] = []
        chosen = chosen_change(fit, validation, matrix, alphas)
        result.layers.append({
            "node": node.name or node.output, "rows": fit.rows + validation.rows, "alpha": chosen.alpha,
            "fit_before": round(chosen.fit_before, 6), "fit_after": round(chosen.fit_after, 6),
            "validation_before": round(chosen.validation_before, 6),
            "validation_after": round(chosen.validation_after, 6),
        })  # fmt: skip
        if chosen.alpha:
            result.weights[node.output] = _updated(model, node, weight, bias, matrix + chosen.change)
    logger.info("corrected %d of %d 1×1 consumers", len(result.weights), len(nodes))
    return result


def correct_plan(search: BudgetSearch, plan: Mapping[str, Any]) -> tuple[Correction | None, dict[str, Any]]:
    """Correct the model ``plan`` gives, and keep the correction only where it lowers the output error.

    The correction is fitted on the search's fit rows and its ridge strengths chosen on the cv rows;
    it is kept when the model's output error on the cv rows falls by at least ``MIN_GAIN`` of it
    (every node may improve on its own rows while the output gets worse). The held-out rows then
    measure the model that will be written.

    Returns:
        The correction (None where it is not kept) and its summary for the report: nodes corrected
        and skipped, the output error on the cv and held-out rows with and without it.
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
    correction = correct_sequentially(base, merged, fit.inputs, validation.inputs)
    changed = bool(correction.weights)
    summary |= {
        "corrected": len(correction.weights),
        "layers": correction.layers,
        "skipped": correction.skipped,
    }
    if not changed:
        summary["kept"] = False
        return None, summary
    before = max(validation.rel_l2_errors(merged, "disable_all").values(), default=0.0)
    after = max(validation.rel_l2_errors(correction.model, "disable_all").values(), default=0.0)
    kept = after < (1.0 - MIN_GAIN) * before
    summary |= {"cv_error_before": before, "cv_error_after": after, "kept": kept}
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
