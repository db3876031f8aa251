"""The feeds a model is verified on: seeded synthetic inputs, or the user's ``--inputs`` file.

:func:`make_inputs` builds one feed per seed (and per step of a recurrent model's stream,
``runtime.stream``); an ``.npz`` file's arrays are used as given, checked against the declared inputs.
A recurrent model's file may carry a leading **step** axis (:func:`stepped_names`, :func:`file_steps`);
:func:`rows_part` splits a file's batch into a search and a held-out half, at random (seeded).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from red_onnx.errors import InputError, UsageError, first_line
from red_onnx.options import InputSpec
from red_onnx.runtime.sessions import RAW_BIT_CARRIERS
from red_onnx.runtime.stream import Feed, StatePair, find_state_pairs
from red_onnx.verify.input_spec import (
    declared_dims,
    encoding,
    feed_dtype,
    fits_declared,
    format_dims,
    input_dtype,
    resolve_shape,
)
from red_onnx.verify.synthetic import generate

logger = logging.getLogger(__name__)


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not also initializers: the ones a caller must feed."""
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def load_npz(path: Path | None) -> dict[str, np.ndarray]:
    """The arrays of an ``--inputs`` file by name (empty without one); InputError if it cannot be read."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"inputs file {path} not found; pass an existing .npz file to --inputs")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several unrelated types for a bad file
        raise InputError(f"inputs file {path} cannot be read as .npz: {first_line(exc)}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"inputs file {path} is not a .npz archive; save it with np.savez")
    arrays = {}
    with data:
        for key in data.files:
            try:
                arrays[key] = data[key]
            except Exception as exc:  # object arrays (pickles), dtypes numpy cannot read, corrupt members
                raise InputError(
                    f"array {key!r} of inputs file {path} cannot be read: {first_line(exc)}; save plain "
                    "numeric arrays (types numpy lacks as their raw bits in unsigned integers, strings as "
                    "unicode arrays) with np.savez"
                ) from exc
    return arrays


def _checked_array(vi: onnx.ValueInfoProto, array: np.ndarray, source: Path) -> np.ndarray:
    dtype, name, elem = feed_dtype(vi), vi.name, vi.type.tensor_type.elem_type
    if dtype is None or elem in RAW_BIT_CARRIERS:  # strings, raw bits: stored as they are fed
        if (array.dtype.kind != "U") if dtype is None else (array.dtype != dtype):
            raise InputError(
                f"input {name!r} in {source} has dtype {array.dtype}; the model's "
                f"{onnx.TensorProto.DataType.Name(elem)} is given {encoding(elem)}"
            )
        return _checked_shape(vi, array, source)
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise InputError(
            f"input {name!r} in {source} has dtype {array.dtype}, which cannot be cast to the "
            f"model's {dtype}; save it as {dtype}"
        )
    _checked_shape(vi, array, source)
    cast = array.astype(dtype, copy=False)
    if dtype.kind in "biu" and not np.array_equal(cast, array):
        raise InputError(
            f"input {name!r} in {source} has values outside {dtype}; save values that fit {dtype}"
        )
    return cast


def _checked_shape(vi: onnx.ValueInfoProto, array: np.ndarray, source: Path) -> np.ndarray:
    declared = declared_dims(vi)
    if declared is not None and not fits_declared(array.shape, declared):
        raise InputError(
            f"input {vi.name!r} in {source} has shape {list(array.shape)}, but the model expects "
            f"{format_dims(declared)} (? = any size); save an array of that shape"
        )
    return array


def _check_names(spec: InputSpec, npz_names: Sequence[str], real: Sequence[str]) -> None:
    sources = {
        "--input-shape": spec.shapes, "--input-range": spec.ranges,
        "--input-value": spec.values, "--inputs file": npz_names,
    }  # fmt: skip
    unknown = [
        f"{option} {name!r}" for option, names in sources.items() for name in names if name not in real
    ]
    if unknown:
        raise UsageError(
            f"{', '.join(unknown)} not an input of the model; its inputs are: {', '.join(real) or '(none)'}"
        )


def make_inputs(model: onnx.ModelProto, spec: InputSpec, seed: int, step: int = 0) -> dict[str, np.ndarray]:
    """Build one seeded feed for every real input of ``model``.

    Floats are standard normal, integers uniform in [0, 10], bools fair coins, unless ``spec``
    gives a range or a value; arrays from ``spec.npz`` are used as given (cast to the input type).
    For a recurrent model (``red_onnx.runtime.stream``) the file may hold a step axis (:func:`file_steps`);
    ``step`` picks that step's values (and seeds that step's synthetic values).

    Args:
        model: The model whose graph inputs (initializers excluded) are fed. External data need
            not be loaded.
        spec: Shapes, ranges, values and the inputs file.
        seed: Non-negative seed; the same seed gives the same arrays.
        step: Step of a recurrent model's stream (0: the first call, and every non-recurrent feed).

    Returns:
        Arrays by input name, in graph-input order.

    Raises:
        UsageError: ``spec`` names something that is not a real input, or a range/value does
            not fit the input type.
        InputError: An input cannot be built (unknown rank, unsupported type) or an inputs-file
            array has the wrong dtype or shape.
    """
    if seed < 0:
        raise UsageError(f"seed {seed} is negative; seeds must be integers >= 0")
    arrays = load_npz(spec.npz)
    stepped = stepped_names(model, arrays, find_state_pairs(model) if arrays else [])
    if step and stepped and step >= step_count(arrays, stepped, spec.npz):
        raise UsageError(
            f"step {step} is past the {step_count(arrays, stepped, spec.npz)} steps of {spec.npz}"
        )
    return build_feed(model, spec, arrays, stepped, seed, step)


def build_feed(
    model: onnx.ModelProto, spec: InputSpec, arrays: Mapping[str, np.ndarray], stepped: set[str],
    seed: int, step: int, states: Sequence[str] = (),
) -> dict[str, np.ndarray]:  # fmt: skip
    """One feed; ``states`` that neither the file nor a range or value gives start at zero."""
    inputs = real_inputs(model)
    _check_names(spec, list(arrays), [vi.name for vi in inputs])
    feed: dict[str, np.ndarray] = {}
    for vi in inputs:
        if vi.name in arrays:
            array = arrays[vi.name][step] if vi.name in stepped else arrays[vi.name]
            feed[vi.name] = _checked_array(vi, array, Path(spec.npz or ""))
        elif vi.name in states and vi.name not in spec.ranges and vi.name not in spec.values:
            feed[vi.name] = np.zeros(resolve_shape(vi, spec), input_dtype(vi))
        else:
            feed[vi.name] = generate(vi, spec, seed, step)
    return feed


def stepped_names(
    model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], pairs: Sequence[StatePair]
) -> set[str]:
    """The inputs-file arrays that hold one value per step (their leading axis is the step).

    Those are a recurrent model's data inputs saved with one axis more than the model declares; state
    inputs never are (the file gives their initial value).
    """
    if not pairs:
        return set()
    states = {pair.input for pair in pairs}
    return {
        vi.name for vi in real_inputs(model)
        if vi.name in arrays and vi.name not in states
        and (dims := declared_dims(vi)) is not None and np.ndim(arrays[vi.name]) == len(dims) + 1
    }  # fmt: skip


def step_count(arrays: Mapping[str, np.ndarray], stepped: set[str], source: Path | None) -> int:
    """The common length of the per-step arrays ``stepped`` (0: none); InputError if they differ or are 0."""
    lengths = {name: len(arrays[name]) for name in sorted(stepped)}
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        found = ", ".join(f"{name}: {count}" for name, count in lengths.items())
        raise InputError(
            f"the step axes in {source} differ or are empty ({found}); save every per-step input with "
            "the same number of steps first"
        )
    return next(iter(lengths.values()), 0)


def file_steps(model: onnx.ModelProto, spec: InputSpec, pairs: Sequence[StatePair]) -> int:
    """How many steps ``spec.npz`` gives a recurrent model with ``pairs`` (0: no step axis, or no file).

    Raises:
        InputError: The per-step arrays disagree on the number of steps, or hold none.
    """
    arrays = load_npz(spec.npz)
    return step_count(arrays, stepped_names(model, arrays, pairs), spec.npz)


def rows_part(feeds: list[Feed], model: onnx.ModelProto, names: set[str], part: str) -> list[Feed]:
    """The ``part`` rows of an ``--inputs`` batch: a seeded random half searches, the other is held out.

    The rule of ``verify.verifier.Verifier`` (its ``part``): every array in the file shares one leading
    size >= 2 on a dynamic axis; otherwise the whole file, and the log says so. The halves are drawn at
    random (seed ``SPLIT_SEED``), never by position: a file whose rows come in a pattern (rotations
    0/90/180/270 repeating) dealt even/odd showed the search two of its four classes.
    """
    declared = {vi.name: declared_dims(vi) for vi in real_inputs(model)}
    batched = [name for name in names if np.ndim(feeds[0][name]) >= 1]
    sizes = {feeds[0][name].shape[0] for name in batched}
    dynamic = all((dims := declared[name]) and dims[0] is None for name in batched)
    if not batched or len(sizes) != 1 or min(sizes) < 2 or not dynamic:
        logger.info("the --inputs file holds no batch to split: the %s part uses all of it", part)
        return feeds
    rows = split_rows(sizes.pop())[part]
    return [{**feed, **{name: feed[name][rows] for name in batched}} for feed in feeds]


#: Seed of the random split of an ``--inputs`` batch (fixed: the same file splits the same way).
SPLIT_SEED = 20211
#: The parts of an ``--inputs`` batch that a budget search uses, by their share of the rows.
SPLIT_SHARES = {"search": 0.5, "heldout": 0.5}


def split_rows(count: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Disjoint, sorted row indices per part of a batch of ``count`` rows (each part at least one row).

    A seeded permutation is cut by :data:`SPLIT_SHARES`; every row lands in exactly one part.
    """
    order = np.random.default_rng(seed).permutation(count)
    cuts = np.cumsum([round(share * count) for share in SPLIT_SHARES.values()])[:-1]
    cuts = np.clip(cuts, np.arange(1, len(cuts) + 1), count - np.arange(len(cuts), 0, -1))
    return {part: np.sort(rows) for part, rows in zip(SPLIT_SHARES, np.split(order, cuts), strict=True)}
