"""Seeded synthetic values for one graph input: what the verification feeds where no file gives them.

Floats are standard normal (or pink noise, ``InputSpec.prior``), integers uniform in
``DEFAULT_INT_RANGE``, bools fair coins, unless the spec gives a range or a constant. Integer inputs
of text models get values of their role (:func:`integer_roles`): token ids below the size of the
embedding table they index, attention masks of ones, token types of zeros, positions ``0..S−1``. Each
(seed, input name[, step]) has its own random stream, so an input's values do not depend on the others.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from red_onnx.errors import UsageError
from red_onnx.options import InputSpec
from red_onnx.verify.input_spec import input_dtype, resolve_shape

DEFAULT_INT_RANGE = (0.0, 10.0)
_INT_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
})  # fmt: skip


def _int_bounds(dtype: np.dtype) -> tuple[int, int]:
    if dtype.kind == "b":
        return 0, 1
    info = np.iinfo(dtype)
    return max(int(info.min), -(2**63)), min(int(info.max), 2**63 - 1)


def _random_ints(
    name: str, rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype,
    bounds: tuple[float, float],
) -> np.ndarray:  # fmt: skip
    lo, hi = math.ceil(bounds[0]), math.floor(bounds[1])
    type_lo, type_hi = _int_bounds(dtype)
    if lo > hi or lo < type_lo or hi > type_hi:
        raise UsageError(
            f"--input-range {name}:{bounds[0]:g},{bounds[1]:g} holds no {dtype} integer within "
            f"[{type_lo}, {type_hi}]; give a range inside it"
        )
    return rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64).astype(dtype)


def _filled(name: str, value: float, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "biu":
        type_lo, type_hi = _int_bounds(dtype)
        if value != int(value) or not type_lo <= value <= type_hi:
            raise UsageError(
                f"--input-value {name}:{value:g} is not a {dtype} value "
                f"(integers in [{type_lo}, {type_hi}]); give one"
            )
        return np.full(shape, int(value), dtype=dtype)
    array = np.full(shape, value, dtype=dtype)
    if not np.isfinite(array).all():
        raise UsageError(f"--input-value {name}:{value:g} overflows {dtype}; give a smaller value")
    return array


def _rng(seed: int, name: str, step: int = 0) -> np.random.Generator:
    """One stream per (seed, input name[, step]): an input's values do not depend on the other inputs.

    Step 0 (every non-recurrent feed) draws what it always drew; later steps of a recurrent model's
    stream draw their own values.
    """
    key = [seed, zlib.crc32(name.encode("utf-8"))]
    return np.random.default_rng([*key, step] if step else key)


@dataclass(frozen=True)
class IntegerRole:
    """What an integer input of a text model holds, and so what its synthetic values are.

    ``kind``: ``"ids"`` (indices of an embedding table of ``size`` rows: uniform below ``size``),
    ``"mask"`` (ones), ``"zeros"`` (token types) or ``"positions"`` (``0..S−1`` along the last axis).
    """

    kind: str
    size: int = 0

    def describe(self, name: str) -> str:
        """The role in words, for the report."""
        what = {
            "ids": f"ids drawn below {self.size} (the rows of the embedding table it indexes)",
            "mask": "ones (an attention mask)", "zeros": "zeros (token types)",
            "positions": "0..S-1 along its last axis (positions)",
        }[self.kind]  # fmt: skip
        return f"input {name!r}: {what}; --input-range, --input-value or --calibration override it"


#: Input names (lower case) whose role is known by convention (Hugging Face exports).
_NAMED_ROLES = {"attention_mask": "mask", "token_type_ids": "zeros", "position_ids": "positions"}


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's constants by name: initializers and ``Constant`` nodes' ``value`` tensors."""
    found = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        valued = node.op_type == "Constant" and node.output and node.attribute
        if valued and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


def integer_roles(model: onnx.ModelProto) -> dict[str, IntegerRole]:
    """The text-model roles of the integer graph inputs that have one.

    By name: ``attention_mask``, ``token_type_ids``, ``position_ids``. By structure: an input that
    (directly or through one ``Cast``) is the indices of a ``Gather`` on axis 0 of a constant table
    ``[V, H]`` holds ids below ``V``.
    """
    tables = {name: tuple(tensor.dims) for name, tensor in constant_tensors(model).items()}
    nodes = model.graph.node
    casts = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Cast" and n.input[:1] and n.output}
    roles: dict[str, IntegerRole] = {}
    for vi in model.graph.input:
        if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type not in _INT_TYPES:
            continue
        named = _NAMED_ROLES.get(vi.name.lower())
        if named:
            roles[vi.name] = IntegerRole(named)
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) != 2 or node.input[0] not in tables:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        source = casts.get(node.input[1], node.input[1])
        shape = tables[node.input[0]]
        if axis == 0 and len(shape) == 2 and shape[0] > 0 and source not in roles:
            roles[source] = IntegerRole("ids", int(shape[0]))
    inputs = {vi.name for vi in model.graph.input if vi.type.tensor_type.elem_type in _INT_TYPES}
    return {name: role for name, role in roles.items() if name in inputs}


def generate(
    vi: onnx.ValueInfoProto, spec: InputSpec, seed: int, step: int = 0, role: IntegerRole | None = None
) -> np.ndarray:
    """Seeded values of input ``vi`` at ``step`` (see the module docstring); ``role`` for integer inputs."""
    given = vi.name in spec.values or vi.name in spec.ranges
    if role is None or given or input_dtype(vi).kind not in "iu":
        return np.asarray(_draw(vi, spec, seed, step))
    dtype, shape = input_dtype(vi), resolve_shape(vi, spec)
    if role.kind == "ids":
        return _rng(seed, vi.name, step).integers(0, role.size, size=shape, dtype=np.int64).astype(dtype)
    if role.kind == "positions":
        return np.broadcast_to(np.arange(shape[-1] if shape else 1, dtype=dtype), shape).copy()
    return np.full(shape, 1 if role.kind == "mask" else 0, dtype=dtype)


def pink_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian noise with a 1/f amplitude spectrum over the axes after the first two, unit variance.

    For an image batch [N, C, H, W] each channel is a smooth random field (like natural images'
    spectra); for [N, C, L] a 1/f signal. Each (n, c) slice is normalised to zero mean, unit variance.
    """
    white = rng.standard_normal(shape)
    axes = tuple(range(2, len(shape)))
    spectrum = np.fft.rfftn(white, axes=axes)
    grids = np.meshgrid(*[np.fft.fftfreq(n) for n in shape[2:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    radius.flat[0] = np.inf  # no DC: the mean is removed anyway
    field_ = np.fft.irfftn(spectrum / np.maximum(radius, 1.0 / max(shape[2:])), s=shape[2:], axes=axes)
    field_ -= field_.mean(axis=axes, keepdims=True)
    return field_ / np.maximum(field_.std(axis=axes, keepdims=True), 1e-12)


def _draw(vi: onnx.ValueInfoProto, spec: InputSpec, seed: int, step: int = 0) -> np.ndarray:
    dtype, shape, name = input_dtype(vi), resolve_shape(vi, spec), vi.name
    if name in spec.values:
        return _filled(name, float(spec.values[name]), shape, dtype)
    rng = _rng(seed, name, step)
    bounds = spec.ranges.get(name)
    if dtype.kind == "f":
        pink = spec.prior == "pink" and len(shape) >= 3
        if bounds is None:
            return (pink_noise(rng, shape) if pink else rng.standard_normal(shape)).astype(dtype)
        if pink:  # the same field squashed into the range
            field_ = 0.5 * (1.0 + np.tanh(pink_noise(rng, shape)))
            return (bounds[0] + (bounds[1] - bounds[0]) * field_).astype(dtype)
        return rng.uniform(bounds[0], bounds[1], size=shape).astype(dtype)
    if dtype.kind == "b" and bounds is None:
        return rng.random(shape) < 0.5
    return _random_ints(name, rng, shape, dtype, bounds or DEFAULT_INT_RANGE)


def drawn_ints_hint(
    inputs: Sequence[onnx.ValueInfoProto], spec: InputSpec, roles: Mapping[str, IntegerRole] | None = None
) -> str | None:
    """What to do when the model failed on integer inputs drawn at random (None: none was).

    Integer inputs are often indices, sizes or token ids that the model needs in a narrow range; an
    input the spec fills (``--input-value``), bounds (``--input-range``) or feeds (``--calibration``) is left
    out, and so is one whose values came from its text-model role (``roles``).
    """
    if spec.calibration is not None:
        return None
    drawn = [
        vi.name
        for vi in inputs
        if vi.name not in spec.values and vi.name not in spec.ranges and vi.name not in (roles or {})
        and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _INT_TYPES
    ]  # fmt: skip
    if not drawn:
        return None
    low, high = DEFAULT_INT_RANGE
    return (
        f"integer inputs {', '.join(drawn)} were drawn at random in [{low:g}, {high:g}]; give the values "
        f"it runs on with --input-value, --input-range or --calibration, e.g. --input-value {drawn[0]}:1"
    )
