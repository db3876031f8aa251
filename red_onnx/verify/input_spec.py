"""How an :class:`~red_onnx.options.InputSpec` meets a model's declared inputs.

:func:`input_dtype` and :func:`resolve_shape` apply a spec to one declared graph input (its element
type, its shape with the dynamic dims filled in); :func:`defaulted_dims_hint` names the dims a run
set to the default when onnxruntime cannot run the model there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from red_onnx.errors import InputError
from red_onnx.options import InputSpec
from red_onnx.runtime.sessions import RAW_BIT_CARRIERS

#: Input element types that :func:`make_inputs` can generate.
GENERATED_TYPES = frozenset({
    TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
})  # fmt: skip


def _tensor_elem(vi: onnx.ValueInfoProto) -> int:
    """The element type of tensor input ``vi``; InputError for inputs that are not tensors."""
    if vi.type.WhichOneof("value") != "tensor_type":
        kind = vi.type.WhichOneof("value")
        raise InputError(f"input {vi.name!r} is a {kind}, not a tensor; red_onnx only feeds tensor inputs")
    return int(vi.type.tensor_type.elem_type)


def input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of tensor input ``vi``; InputError for other inputs and types it cannot generate."""
    elem = _tensor_elem(vi)
    if elem not in GENERATED_TYPES:
        feed_dtype(vi)  # refuses the types that cannot be fed either
        type_name = TensorProto.DataType.Name(elem)
        raise InputError(
            f"input {vi.name!r} has element type {type_name}, which red_onnx cannot generate; "
            f"pass its values in a --calibration file.npz, {encoding(elem)}"
        )
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def feed_dtype(vi: onnx.ValueInfoProto) -> np.dtype | None:
    """The dtype a ``.npz`` array of ``vi`` is stored in; None for STRING (any numpy unicode array).

    The generated types' own dtype; for types numpy lacks, the unsigned carrier of their raw bits
    (:data:`~red_onnx.runtime.sessions.RAW_BIT_CARRIERS`). InputError for inputs that are not tensors,
    or of a type that cannot be fed at all (4-bit and 2-bit types).
    """
    elem = _tensor_elem(vi)
    if elem == TensorProto.STRING:
        return None
    if elem in RAW_BIT_CARRIERS:
        return RAW_BIT_CARRIERS[elem]
    if elem not in GENERATED_TYPES:
        raise InputError(
            f"input {vi.name!r} has element type {TensorProto.DataType.Name(elem)}, which red_onnx can "
            "neither generate nor feed to onnxruntime (its Python API has no arrays of that type); models "
            "with such inputs are not supported: cast to it inside the model from a wider input instead"
        )
    return input_dtype(vi)


def encoding(elem: int) -> str:
    """How a ``--calibration`` .npz file holds values of element type ``elem`` (a phrase for messages)."""
    if elem == TensorProto.STRING:
        return "as a numpy unicode array (dtype str)"
    if elem in RAW_BIT_CARRIERS:
        return f"as their raw bits in {RAW_BIT_CARRIERS[elem]} arrays"
    return "in a numpy array of that type"


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Return the declared dims, None for dynamic ones (dim_param, no dim_value, or a negative one).

    A declared 0 is a size (an empty tensor), not a dynamic dim. Returns None when the input declares
    no shape at all (rank unknown).
    """
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims]


def format_dims(dims: Sequence[int | None]) -> str:
    """``[1, ?, 128]``: declared dims, the dynamic ones as ``?``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def fits_declared(shape: Sequence[int], declared: Sequence[int | None]) -> bool:
    """Whether ``shape`` has the declared rank and every fixed dim of it."""
    return len(shape) == len(declared) and all(
        d is None or d == s for s, d in zip(shape, declared, strict=True)
    )


def resolve_shape(vi: onnx.ValueInfoProto, spec: InputSpec) -> tuple[int, ...]:
    """The shape fed to ``vi``: its ``spec.shapes`` entry, else the declared shape at ``spec.default_dim``.

    A given shape must fit the declared one (only its dynamic dims may differ); an input without a
    declared shape needs one.
    """
    declared = declared_dims(vi)
    if vi.name in spec.shapes:
        shape = tuple(spec.shapes[vi.name])
        if declared is not None and not fits_declared(shape, declared):
            raise InputError(
                f"--input-shape {vi.name}:{','.join(map(str, shape))} does not fit the model's "
                f"declared shape {format_dims(declared)}; only the dims shown as ? may change"
            )
        return shape
    if declared is None:
        raise InputError(
            f"input {vi.name!r} has no declared shape (rank unknown); pass --input-shape {vi.name}:D1,D2,..."
        )
    return tuple(spec.default_dim if d is None else d for d in declared)


def defaulted_dims_hint(inputs: Sequence[onnx.ValueInfoProto], spec: InputSpec) -> str | None:
    """What to do when the model failed at the sizes given to dynamic dims by default (None: none was).

    Only dims after the first count (a batch of 1 is rarely what a model cannot run); inputs the spec
    shapes (``--input-shape``) or feeds (``--calibration``) are left out.
    """
    if spec.calibration is not None:
        return None
    defaulted = [
        (vi.name, dims)
        for vi in inputs
        if vi.name not in spec.shapes and (dims := declared_dims(vi)) is not None and None in dims[1:]
    ]
    if not defaulted:
        return None
    shown = ", ".join(f"{name} {format_dims(dims)}" for name, dims in defaulted)
    first = next(vi for vi in inputs if vi.name == defaulted[0][0])
    return (
        f"its dynamic dims were set to {spec.default_dim} ({shown}); "
        f"give the sizes it runs at with --input-shape, e.g. {first.name}:{_shape_example(first)}"
    )


def _shape_example(vi: onnx.ValueInfoProto) -> str:
    """``1,3,<height>,<width>``: fixed dims as declared, a dynamic axis 0 as 1, others by their name."""
    dims = vi.type.tensor_type.shape.dim
    return ",".join(
        str(d.dim_value) if d.dim_value > 0 else "1" if k == 0 else f"<{d.dim_param or 'size'}>"
        for k, d in enumerate(dims)
    )
