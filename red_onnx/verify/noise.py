"""The model's own numerical noise, allowed on top of the pass rule (``red_onnx.verify.compare``).

Not the rewrite's: a model that stores or computes in float16 gets ``ROUNDING_UNITS·u·(max|y| + |y|)``,
u = 2^-11 its unit roundoff (see ``ROUNDING_UNITS``); and a candidate at an optimisation level compared
with the *unoptimised* reference may differ from it by what the reference itself moves between the two
levels (QDQ models run integer kernels once optimised), while it must match the reference at its own
level; on top of that, ``DRIFT_FACTOR`` times the largest such move.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

#: Unit roundoff u (half an ulp at 1) of the float types below float32 that a model may store or compute in
#: (bfloat16 is left out: onnxruntime's CPU kernels do not compute in it, and no floor was measured for it).
UNIT_ROUNDOFF: dict[int, float] = {TensorProto.FLOAT16: 2.0**-11}
#: Rounding floor of a float16 model, in units of u: each rewritten weight is rounded once when stored
#: (<= u relative, so a layer's output moves by <= u·sum|w·x|, a few u of its largest magnitude), the output
#: itself is rounded (<= u·|y|), and onnxruntime's levels keep intermediates in float16 or float32 (the
#: unchanged digits CNN in float16 moved 0.9u·max|y| between levels). Measured over 56 exact float16
#: rewrites (the tests/graphs builders, 12 random planted nets 3-6 stages deep, the digits CNN with its
#: BatchNorm folded; all-float16, keep_io_types and float16-stored weights): at most 1.03u. 8u = 3.9e-3
#: leaves a margin of 8 for deeper nets; a wrong merge moves outputs by 1e-1 or more.
ROUNDING_UNITS = 8
#: A candidate may differ from the reference by this many times the largest distance the reference
#: itself moves between onnxruntime's two levels (its own fusions are reassociations too), on top of
#: the element-wise drift allowed across levels. The fuzzer found exact BatchNorm folds before a
#: cancelling output refused by the bare rule (2.3e-5 against 1e-6·max|y|, with onnxruntime's own
#: drift 1.1e-5-1.5e-5); a wrong merge moves outputs by 1e-1 or more.
DRIFT_FACTOR = 4


def rounding_unit(model: onnx.ModelProto) -> float:
    """Unit roundoff of the narrowest float type the model stores or computes in below float32, else 0.

    Looks at every graph's inputs, outputs, value infos and initializers, tensor attributes (Constant,
    ConstantOfShape) and Cast targets, subgraphs included.
    """
    types: set[int] = set()
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        for value in [*graph.input, *graph.output, *graph.value_info]:
            types.add(value.type.tensor_type.elem_type)
        types.update(t.data_type for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    types.add(attr.t.data_type)
                elif node.op_type == "Cast" and attr.name == "to":
                    types.add(int(attr.i))
                pending.extend([attr.g] if attr.HasField("g") else attr.graphs)
    return max((UNIT_ROUNDOFF[t] for t in types if t in UNIT_ROUNDOFF), default=0.0)


def noise_allowance(reference: np.ndarray, other: np.ndarray | None, floor: float) -> np.ndarray | float:
    """Allowed difference per element: ``floor·(max|y| + |y|)`` plus |other - y| (float outputs only)."""
    if reference.dtype.kind != "f" or other is None or other.shape != reference.shape:
        return 0.0
    ref = np.where(np.isfinite(reference), reference.astype(np.float64), 0.0)
    allowed = floor * (np.abs(ref).max(initial=0.0) + np.abs(ref)) if floor else 0.0
    if other is not reference:
        drift = np.abs(other.astype(np.float64) - ref)
        allowed = allowed + np.where(np.isfinite(drift), drift, 0.0)
    return allowed


def max_drift(reference: np.ndarray, other: np.ndarray | None) -> float:
    """Largest finite |other - reference| (0 when absent, not float, or of another shape)."""
    if other is None or other.shape != reference.shape or not np.issubdtype(reference.dtype, np.floating):
        return 0.0
    with np.errstate(invalid="ignore"):  # inf - inf where both overflow: not a drift
        drift = np.abs(other.astype(np.float64) - reference.astype(np.float64))
    return float(np.max(np.where(np.isfinite(drift), drift, 0.0), initial=0.0))
