"""What the user says about a model's verification inputs, and how it meets the declared inputs.

:class:`InputSpec` holds ``--input-shape``, ``--input-range``, ``--input-value``, ``--inputs`` and the
prior; ``parse_input_*`` read the options. :func:`input_dtype` and :func:`resolve_shape` apply a spec to
one declared graph input (its element type, its shape with the dynamic dims filled in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from red_onnx.errors import InputError, UsageError

#: Input element types that :func:`make_inputs` can generate.
GENERATED_TYPES = frozenset({
    TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
})  # fmt: skip
#: Ways of drawing float inputs (InputSpec.prior).
PRIORS = ("normal", "pink")


@dataclass(frozen=True)
class InputSpec:
    """How to build the verification inputs.

    Attributes:
        shapes: Full shape per input name (``--input-shape``); replaces the dynamic dims of the
            declared shape (its static dims must agree: onnxruntime rejects anything else).
        ranges: Uniform ``[lo, hi]`` per input (``--input-range``); integers are drawn inclusive.
        values: Constant fill per input (``--input-value``).
        npz: A ``.npz`` file of arrays by input name (``--inputs``), used as given; wins over all.
            Each array has the input's declared shape (a batch on a dynamic axis is welcome). For a
            recurrent model (``red_onnx.runtime.stream``) a data input may have one leading axis more: the
            **step** axis, one call per entry, in stream order (all such arrays the same length); a
            state input holds the stream's initial state at its declared shape. Without a step axis,
            the file's values are fed on every call of a ``STREAM_STEPS``-call stream. A state that
            neither the file nor ``ranges``/``values`` gives starts at zero, where deployed streams
            start (random values can be unreachable: an LSTM's h lies in (-1, 1); and measured on
            silero-vad, onnxruntime's own drift between its optimisation levels over 32 calls needs
            rtol 5.0e-5 from a standard-normal state, 5.9e-6 from zero).
        default_dim: Size given to dynamic dims not covered by ``shapes``.
        prior: How float inputs are drawn: ``"normal"`` (i.i.d. standard normal) or ``"pink"``
            (spatially correlated 1/f noise over the trailing axes of inputs of rank ≥ 3, scaled to unit
            variance — closer to images and signals than white noise; ``--input-prior``).
    """

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    values: Mapping[str, float] = field(default_factory=dict)
    npz: Path | None = None
    default_dim: int = 1
    prior: str = "normal"

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise UsageError(f"input prior {self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.default_dim < 1:
            raise UsageError(f"default dim {self.default_dim} is not a positive integer; use >= 1")
        both = sorted(set(self.ranges) & set(self.values))
        if both:
            raise UsageError(f"inputs {', '.join(both)} have both --input-range and --input-value; give one")


def _split_option(text: str, option: str, example: str) -> tuple[str, str]:
    """Split ``NAME:REST`` at the last colon (input names such as ``x:0`` keep theirs)."""
    name, sep, rest = text.rpartition(":")
    if not sep or not name.strip():
        raise UsageError(f"bad {option} {text!r}: expected {example}")
    return name.strip(), rest.strip()


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--input-shape NAME:D1,D2,...`` (``NAME:`` alone means a scalar).

    Args:
        text: The option value, e.g. ``"x:1,3,48,320"``.

    Returns:
        The input name and its shape.

    Raises:
        UsageError: The text is malformed or a dimension is not a positive integer.
    """
    example = "NAME:D1,D2,... with positive integers, e.g. images:1,3,224,224"
    name, rest = _split_option(text, "--input-shape", example)
    if not rest:
        return name, ()
    try:
        dims = tuple(int(part) for part in rest.split(","))
    except ValueError:
        raise UsageError(f"bad --input-shape {text!r}: expected {example}") from None
    if any(d < 1 for d in dims):
        raise UsageError(f"bad --input-shape {text!r}: dimensions must be positive integers")
    return name, dims


def _parse_floats(text: str, option: str, example: str, count: int) -> tuple[str, list[float]]:
    name, rest = _split_option(text, option, example)
    try:
        numbers = [float(part) for part in rest.split(",")]
    except ValueError:
        raise UsageError(f"bad {option} {text!r}: expected {example}") from None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise UsageError(f"bad {option} {text!r}: expected {example} with finite numbers")
    return name, numbers


def parse_input_range(text: str) -> tuple[str, tuple[float, float]]:
    """Parse ``--input-range NAME:LO,HI`` (uniform in ``[LO, HI]``).

    Raises:
        UsageError: The text is malformed, a bound is not finite, or ``LO > HI``.
    """
    name, (lo, hi) = _parse_floats(text, "--input-range", "NAME:LO,HI, e.g. x:-1,1", 2)
    if lo > hi:
        raise UsageError(f"bad --input-range {text!r}: LO {lo:g} is above HI {hi:g}; swap them")
    return name, (lo, hi)


def parse_input_value(text: str) -> tuple[str, float]:
    """Parse ``--input-value NAME:V`` (every element equals ``V``).

    Raises:
        UsageError: The text is malformed or the value is not finite.
    """
    name, (value,) = _parse_floats(text, "--input-value", "NAME:VALUE, e.g. sr:16000", 1)
    return name, value


def input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of tensor input ``vi``; InputError for other inputs and types it cannot generate."""
    if vi.type.WhichOneof("value") != "tensor_type":
        kind = vi.type.WhichOneof("value")
        raise InputError(f"input {vi.name!r} is a {kind}, not a tensor; red_onnx only feeds tensor inputs")
    elem = vi.type.tensor_type.elem_type
    if elem not in GENERATED_TYPES:
        type_name = TensorProto.DataType.Name(elem)
        raise InputError(
            f"input {vi.name!r} has element type {type_name}, which red_onnx cannot generate; "
            "pass its values in an --inputs file.npz"
        )
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Return the declared dims, None for dynamic ones (dim_param, no positive dim_value).

    Returns None when the input declares no shape at all (rank unknown).
    """
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.dim_value > 0 else None for d in tensor_type.shape.dim]


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
    shapes (``--input-shape``) or feeds (``--inputs``) are left out.
    """
    if spec.npz is not None:
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
