"""The feeds a model is verified on: seeded synthetic inputs, or the user's ``--calibration`` samples.

:func:`make_inputs` builds one feed per seed (and per step of a recurrent model's stream,
``runtime.stream``). :func:`load_samples` reads the samples, an ``.npz`` file's arrays or a folder of
images (``red_onnx.io.images``) as the batch of the model's one image input; they are used as given,
checked against the declared inputs. A recurrent model's file may carry a leading **step** axis
(:func:`stepped_names`, :func:`file_steps`). :func:`rows_part` gives the rows of one part of the
samples' batch: :func:`split_rows` deals them at random (seeded) into the disjoint parts of
:data:`SPLIT_SHARES`, ``"search"``, ``"cv"`` and ``"heldout"``; :func:`describe_inputs` says which
inputs a run used, for its report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from red_onnx.errors import InputError, UsageError, first_line
from red_onnx.io import images
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
from red_onnx.verify.synthetic import constant_tensors, generate, integer_roles

logger = logging.getLogger(__name__)


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not also initializers: the ones a caller must feed."""
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def load_samples(model: onnx.ModelProto, spec: InputSpec) -> dict[str, np.ndarray]:
    """The user's samples by input name (empty without ``spec.calibration``), as the feeds use them.

    A ``.npz`` file gives its arrays (:func:`load_npz`); a folder of images gives the model's one image
    input its batch, one row per image (:func:`image_samples`; decoded once per folder, preset and size).

    Args:
        model: The model fed (its graph inputs; external data need not be loaded).
        spec: The input spec; its ``calibration`` and ``preprocess``.

    Raises:
        UsageError: A folder without ``preprocess``, or ``preprocess`` without a folder.
        InputError: The samples cannot be read, or a folder cannot feed this model (the message says why
            and suggests an ``.npz``).
    """
    spec.check_calibration()
    if spec.calibration is None:
        return {}
    if spec.samples_kind == "images":
        return image_samples(model, spec)
    return load_npz(spec.calibration)


def load_npz(path: Path | None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` inputs file by name (empty without one); InputError if it cannot be read."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"inputs file {path} not found; pass an existing .npz file or a folder of images to --calibration"
        )
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


#: Element types an image input may have (the batch is cast to it).
_IMAGE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
#: Channel counts that mark an image input's channel axis.
_IMAGE_CHANNELS = (1, 3)


@dataclass(frozen=True)
class ImageInput:
    """How a folder of images feeds a model: its one image input, laid out and sized.

    Attributes:
        name: The input's name.
        layout: ``"NCHW"`` or ``"NHWC"``.
        channels: 3 (RGB) or 1 (grayscale).
        height: Height every image is brought to.
        width: Width every image is brought to.
        batch: The input's fixed batch size (None: dynamic, any number of images).
    """

    name: str
    layout: images.Layout
    channels: int
    height: int
    width: int
    batch: int | None


def image_input(model: onnx.ModelProto, spec: InputSpec) -> ImageInput:
    """The one float image input of rank 4 a folder of images feeds, its layout and size.

    The channel axis is axis 1 (NCHW) when it holds 3 or 1, else the last axis (NHWC) when that does;
    when both do, NCHW (a logged warning). Its dims come from the declared shape, the dynamic ones from
    ``--input-shape`` (``spec.shapes``; its batch is not used: the folder's images are the batch), and a
    dynamic height or width from the preset's default size (``imagenet``: 224).

    Raises:
        InputError: The model has not exactly one input, or it is not a float tensor of rank 4 with a
            channel axis of 3 or 1 (the message suggests an ``.npz``).
        UsageError: The height or width is dynamic, not given by ``--input-shape``, and the preset has
            no default size.
    """
    inputs = real_inputs(model)
    npz = "; save the samples to an .npz file (arrays by input name) and pass that to --calibration"
    if len(inputs) != 1:
        names = ", ".join(vi.name for vi in inputs) or "none"
        raise InputError(
            f"a folder of images feeds a model with one float image input of rank 4; this model has "
            f"{len(inputs)} inputs ({names}){npz}"
        )
    vi = inputs[0]
    elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
    if elem not in _IMAGE_TYPES:
        kind = onnx.TensorProto.DataType.Name(elem) if elem else "not a tensor"
        raise InputError(f"a folder of images feeds a float image input; input {vi.name!r} is {kind}{npz}")
    declared = declared_dims(vi)
    if declared is None or len(declared) != 4:
        rank = "no declared shape" if declared is None else f"shape {format_dims(declared)}"
        raise InputError(
            f"a folder of images feeds an image input of rank 4 (NCHW or NHWC); input {vi.name!r} has "
            f"{rank}{npz}"
        )
    known: list[int | None] = list(resolve_shape(vi, spec)) if vi.name in spec.shapes else list(declared)
    first, last = known[1] in _IMAGE_CHANNELS, known[3] in _IMAGE_CHANNELS
    if not first and not last:
        raise InputError(
            f"input {vi.name!r} has shape {format_dims(known)}: no channel axis of 3 or 1 at axis 1 "
            f"(NCHW) or last (NHWC); give its shape with --input-shape {vi.name}:1,3,H,W{npz}"
        )
    if first and last:
        logger.warning("input %r %s: axis 1 and the last axis both could hold the channels; read as NCHW",
                       vi.name, format_dims(known))  # fmt: skip
    layout: images.Layout = "NCHW" if first else "NHWC"
    channels = 1 if known[1 if first else 3] == 1 else 3
    preset = spec.preprocess or ""
    default = images.PRESETS[preset].size if preset in images.PRESETS else None
    sizes: list[int] = []
    for dim in (known[2], known[3]) if first else (known[1], known[2]):
        size = default if dim is None else dim
        if size is None:
            example = f"1,{channels},H,W" if first else f"1,H,W,{channels}"
            raise UsageError(
                f"input {vi.name!r} has a dynamic height or width ({format_dims(declared)}) and "
                f"--preprocess {preset} has no default size; give them with --input-shape {vi.name}:{example}"
            )
        sizes.append(size)
    return ImageInput(vi.name, layout, channels, sizes[0], sizes[1], declared[0])


def image_samples(model: onnx.ModelProto, spec: InputSpec) -> dict[str, np.ndarray]:
    """A folder of images as the batch of the model's image input (:func:`image_input`), by its name.

    Raises:
        InputError: The folder is empty, an image cannot be read, Pillow is missing, the model has no
            single float image input of rank 4, or its batch is fixed to another number of images.
        UsageError: See :func:`image_input`.
    """
    folder, preset = spec.calibration, spec.preprocess
    if folder is None or preset is None:
        raise UsageError("a folder of images needs both --calibration DIR and --preprocess PRESET")
    target = image_input(model, spec)
    count = len(images.image_files(folder))
    if target.batch is not None and target.batch != count:
        raise InputError(
            f"input {target.name!r} has a fixed batch of {target.batch} and {folder} holds {count} "
            f"images; keep {target.batch} image(s) there, or export the model with a dynamic batch"
        )
    batch = images.read_images(
        folder, height=target.height, width=target.width, channels=target.channels, preset=preset,
        layout=target.layout,
    )  # fmt: skip
    return {target.name: batch}


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
        "--input-value": spec.values, "--calibration file": npz_names,
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
    gives a range or a value; the samples of ``spec.calibration`` (:func:`load_samples`) are used as
    given (cast to the input type).
    For a recurrent model (``red_onnx.runtime.stream``) the file may hold a step axis (:func:`file_steps`);
    ``step`` picks that step's values (and seeds that step's synthetic values).

    Args:
        model: The model whose graph inputs (initializers excluded) are fed. External data need
            not be loaded.
        spec: Shapes, ranges, values and the calibration samples.
        seed: Non-negative seed; the same seed gives the same arrays.
        step: Step of a recurrent model's stream (0: the first call, and every non-recurrent feed).

    Returns:
        Arrays by input name, in graph-input order.

    Raises:
        UsageError: ``spec`` names something that is not a real input, a range/value does not fit
            the input type, or a folder of images comes without ``spec.preprocess``.
        InputError: An input cannot be built (unknown rank, unsupported type), the samples cannot be
            read, or an inputs-file array has the wrong dtype or shape.
    """
    if seed < 0:
        raise UsageError(f"seed {seed} is negative; seeds must be integers >= 0")
    arrays = load_samples(model, spec)
    stepped = stepped_names(model, arrays, find_state_pairs(model) if arrays else [])
    if step and stepped and step >= (count := step_count(arrays, stepped, spec.calibration)):
        raise UsageError(f"step {step} is past the {count} steps of {spec.calibration}")
    return build_feed(model, spec, arrays, stepped, seed, step)


def build_feed(
    model: onnx.ModelProto, spec: InputSpec, arrays: Mapping[str, np.ndarray], stepped: set[str],
    seed: int, step: int, states: Sequence[str] = (),
) -> dict[str, np.ndarray]:  # fmt: skip
    """One feed; ``states`` that neither the file nor a range or value gives start at zero."""
    inputs = real_inputs(model)
    _check_names(spec, list(arrays), [vi.name for vi in inputs])
    roles = integer_roles(model)
    feed: dict[str, np.ndarray] = {}
    for vi in inputs:
        if vi.name in arrays:
            array = arrays[vi.name][step] if vi.name in stepped else arrays[vi.name]
            feed[vi.name] = _checked_array(vi, array, Path(spec.calibration or ""))
        elif vi.name in states and vi.name not in spec.ranges and vi.name not in spec.values:
            feed[vi.name] = np.zeros(resolve_shape(vi, spec), input_dtype(vi))
        else:
            feed[vi.name] = generate(vi, spec, seed, step, roles.get(vi.name))
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
    """How many steps ``spec.calibration`` gives a recurrent model with ``pairs`` (0: no step axis or file).

    Raises:
        InputError: The per-step arrays disagree on the number of steps, or hold none.
    """
    arrays = load_samples(model, spec)
    return step_count(arrays, stepped_names(model, arrays, pairs), spec.calibration)


#: Seed of the random split of a samples batch (fixed: the same file splits the same way).
SPLIT_SEED = 20211
#: The disjoint parts of a samples batch, by their share of the rows: the budget search measures on
#: "search", chooses its settings (the refit's ridge strength) on "cv", and re-checks its result on
#: "heldout". The final verification uses every row (part "all").
SPLIT_SHARES = {"search": 0.5, "cv": 0.25, "heldout": 0.25}
#: Which parts get a row first when a batch has fewer rows than parts (2 rows: search and heldout).
_SPLIT_PRIORITY = ("search", "heldout", "cv")


def split_rows(count: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Disjoint, sorted row indices per part of :data:`SPLIT_SHARES` for a batch of ``count`` rows.

    A seeded permutation is cut by the shares (rounded half up), never by position: a file whose rows
    come in a pattern (rotations 0/90/180/270 repeating) dealt even/odd showed the search two of its four
    classes. Every row lands in exactly one part; with at least as many rows as parts, every part has
    one. With fewer, the rows go to "search", then "heldout", then "cv": with 2 rows "cv" is empty
    (:func:`part_rows` then gives it the search rows).
    """
    order = np.random.default_rng(seed).permutation(count)
    pieces = np.split(order, _cuts(count))
    return {part: np.sort(rows) for part, rows in zip(SPLIT_SHARES, pieces, strict=True)}


def _cuts(count: int) -> list[int]:
    """Where the permutation is cut between the parts of :data:`SPLIT_SHARES` (one cut fewer than parts)."""
    parts = list(SPLIT_SHARES)
    if count < len(parts):
        sizes = [int(part in _SPLIT_PRIORITY[:count]) for part in parts]
        return [sum(sizes[: k + 1]) for k in range(len(parts) - 1)]
    cuts, total, previous = [], 0.0, 0
    for k, share in enumerate(list(SPLIT_SHARES.values())[:-1]):
        total += share
        cut = math.floor(total * count + 0.5)
        previous = min(max(cut, previous + 1), count - (len(parts) - 1 - k))
        cuts.append(previous)
    return cuts


def part_rows(count: int, part: str) -> np.ndarray:
    """The row indices ``part`` uses of a batch of ``count`` rows (sorted).

    ``"all"``: every row; ``"search"``, ``"cv"``, ``"heldout"``: :func:`split_rows`. An empty ``"cv"``
    (2 rows) falls back to the search rows, so the search's choices still see one row; the log says so.

    Raises:
        UsageError: ``part`` is none of these.
    """
    if part == "all":
        return np.arange(count)
    parts = split_rows(count)
    if part not in parts:
        raise UsageError(f"unknown inputs part {part!r}; use all or one of {', '.join(parts)}")
    if part == "cv" and not len(parts["cv"]):
        logger.info("%d rows leave the cv part empty: it uses the search rows", count)
        return parts["search"]
    return parts[part]


def batch_rows(
    feed: Mapping[str, np.ndarray], model: onnx.ModelProto, names: set[str]
) -> tuple[list[str], int] | None:
    """The arrays ``names`` of ``feed`` that form a batch to split, and its row count (None: no batch).

    That is when every such array has one leading size >= 2, on a dynamic axis of its input.
    """
    declared = {vi.name: declared_dims(vi) for vi in real_inputs(model)}
    batched = sorted(name for name in names if np.ndim(feed[name]) >= 1)
    sizes = {feed[name].shape[0] for name in batched}
    dynamic = all((dims := declared.get(name)) and dims[0] is None for name in batched)
    if not batched or len(sizes) != 1 or min(sizes) < 2 or not dynamic:
        return None
    return batched, sizes.pop()


def rows_part(feeds: list[Feed], model: onnx.ModelProto, names: set[str], part: str) -> list[Feed]:
    """The ``part`` rows of a samples batch (:func:`part_rows`): "search", "cv", "heldout" or "all".

    The rule of ``verify.verifier.Verifier`` (its ``part``): the arrays ``names`` (the samples') are
    split when they share one leading size >= 2 on a dynamic axis (:func:`batch_rows`); otherwise every
    part uses the whole file, and the log says so.
    """
    plan = batch_rows(feeds[0], model, names)
    if plan is None:
        logger.info("the calibration samples hold no batch to split: the %s part uses all of them", part)
        return feeds
    batched, count = plan
    rows = part_rows(count, part)
    return [{**feed, **{name: feed[name][rows] for name in batched}} for feed in feeds]


def describe_inputs(model: onnx.ModelProto, spec: InputSpec) -> dict[str, Any]:
    """What a run's verification and search inputs were, for the report (``docs/report.md``).

    Args:
        model: The model fed (its graph inputs).
        spec: The run's input spec.

    Returns:
        ``kind`` (``"synthetic-normal"``, ``"synthetic-pink"``, ``"npz"`` or ``"images"``), ``file`` (the
        samples' file or folder name, never a path), ``preset`` (``--preprocess``), ``total`` (the
        samples: rows of the batch, a stream's steps, else 1; None for synthetic inputs), ``split``
        (whether the parts got disjoint rows) and ``samples``: the rows each part uses, ``{"search",
        "cv", "heldout"}`` (None for synthetic inputs: every part draws its own seeds). A file with no
        batch to split, and a recurrent model's samples, are used whole by every part. Synthetic
        inputs also get ``range_notes`` (:func:`range_notes`).
    """
    kind = spec.samples_kind
    if kind is None or spec.calibration is None:
        return {"kind": f"synthetic-{spec.prior}", "file": None, "preset": None, "total": None,
                "split": False, "samples": None, "range_notes": range_notes(model, spec)}  # fmt: skip
    arrays = load_samples(model, spec)
    pairs = find_state_pairs(model)
    stepped = stepped_names(model, arrays, pairs)
    plan = None if pairs else batch_rows(arrays, model, set(arrays))
    if plan is not None:
        total = plan[1]
        samples = {part: len(part_rows(total, part)) for part in SPLIT_SHARES}
    else:
        total = step_count(arrays, stepped, spec.calibration) if stepped else _leading_size(arrays)
        samples = dict.fromkeys(SPLIT_SHARES, total)
    return {"kind": kind, "file": spec.calibration.name, "preset": spec.preprocess, "total": total,
            "split": plan is not None, "samples": samples}  # fmt: skip


#: A first ``Div`` by at least this (or ``Mul`` by at most its inverse) marks an input in pixel units.
PIXEL_SCALE = 2.0
#: Float element types whose synthetic values come from the prior.
_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


def _first_scale(model: onnx.ModelProto, name: str) -> float | None:
    """The constant the graph divides input ``name`` by first (a ``Mul`` by ``1/c`` counts), if any."""
    constants = constant_tensors(model)
    for node in model.graph.node:
        if name not in node.input:
            continue
        if node.op_type not in ("Div", "Mul") or len(node.input) != 2 or node.input[0] != name:
            return None
        if node.input[1] not in constants:
            return None
        try:
            values = onnx.numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
        except (ValueError, OSError):  # a dims-only or external tensor: its values are not here
            return None
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values == 0):
            return None
        divisor = values if node.op_type == "Div" else 1.0 / values
        return float(np.min(np.abs(divisor)))
    return None


def range_notes(model: onnx.ModelProto, spec: InputSpec) -> list[str]:
    """What synthetic inputs assume where nothing gives their range, one note per input.

    Integer inputs with a text-model role (``red_onnx.verify.synthetic.integer_roles``) say it.

    An input that the graph first divides by a constant of at least ``PIXEL_SCALE`` (or multiplies
    by its inverse) is read as pixel units (0..255 for a divisor near 255); any other float input
    without ``--input-range`` or ``--input-value`` is drawn from the prior, and the note says so. The
    inputs themselves are not changed: the note suggests the option that would.
    """
    roles = integer_roles(model)
    notes = [
        role.describe(name)
        for name, role in roles.items()
        if name not in spec.ranges and name not in spec.values
    ]
    prior = "N(0, 1)" if spec.prior == "normal" else "pink noise of unit variance"
    for vi in real_inputs(model):
        if (
            vi.name in spec.ranges
            or vi.name in spec.values
            or vi.type.tensor_type.elem_type not in _FLOAT_TYPES
        ):
            continue
        scale = _first_scale(model, vi.name)
        if scale is not None and scale >= PIXEL_SCALE:
            top = 255 if abs(scale - 255.0) < 1.0 else round(scale, 3)
            notes.append(
                f"input {vi.name!r}: the graph divides it by {scale:g} first, as for 0..{top} pixels, but "
                f"the synthetic values are {prior}; pass --input-range {vi.name}=0,{top} or --calibration"
            )
        else:
            notes.append(
                f"input {vi.name!r}: nothing in the graph tells its range; the synthetic values are "
                f"{prior}; pass --input-range or --calibration if real inputs differ"
            )
    return notes


def _leading_size(arrays: Mapping[str, np.ndarray]) -> int:
    """The rows of a file that is not split: its arrays' common leading size, else 1 (one sample)."""
    sizes = {array.shape[0] for array in arrays.values() if np.ndim(array) >= 1}
    return sizes.pop() if len(sizes) == 1 else 1
