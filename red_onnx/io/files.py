"""Loading and saving ONNX models safely.

``load_model`` turns every unusable input (missing, empty, truncated, not ONNX, missing external
data, ops onnxruntime cannot run, checker failures) into an :class:`~red_onnx.errors.InputError`
with a one-line message, and never writes to the input. ``save_model`` writes atomically: temporary
files in the destination directory, then ``os.replace``; models above ``EXTERNAL_DATA_THRESHOLD``
bytes go to ``<name>`` plus one external data file ``<name>.data`` next to it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx.external_data_helper import (
    load_external_data_for_tensor,
    set_external_data,
    uses_external_data,
)

from red_onnx.errors import InputError, VerificationError, first_line
from red_onnx.io.wire import serialized_size, write_model

__all__ = [
    "EXTERNAL_DATA_TENSOR_MIN_BYTES",
    "EXTERNAL_DATA_THRESHOLD",
    "TWO_GB",
    "check_model",
    "load_model",
    "model_nbytes",
    "save_model",
]

logger = logging.getLogger(__name__)

TWO_GB: int = 2**31
"""Protobuf's hard limit on one serialized message; models above it need external data."""

EXTERNAL_DATA_THRESHOLD: int = 1_800_000_000
"""``save_model`` writes tensors to ``<name>.data`` above this ``model_nbytes`` (bytes)."""

EXTERNAL_DATA_TENSOR_MIN_BYTES: int = 1024
"""Tensors with fewer raw bytes stay inside the model file when saving with external data."""

STANDARD_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
"""Operator domains onnxruntime runs; any other domain must be a local function of the model."""

_ONNXRUNTIME_NOTE = (
    "red_onnx verifies every rewrite with onnxruntime, so the model must run there; "
    "re-export it with standard ONNX ops"
)


# --- graph walking


def _child_graphs(nodes: Iterable[onnx.NodeProto]) -> list[onnx.GraphProto]:
    """Return the subgraphs held directly by the attributes of ``nodes`` (If, Loop, Scan)."""
    graphs: list[onnx.GraphProto] = []
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)
    return graphs


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Yield the main graph, every nested subgraph and the subgraphs inside local functions."""
    pending = [model.graph]
    for function in model.functions:
        pending.extend(_child_graphs(function.node))
    while pending:
        graph = pending.pop()
        yield graph
        pending.extend(_child_graphs(graph.node))


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Yield every node of the model: graphs, subgraphs and local function bodies."""
    for function in model.functions:
        yield from function.node
    for graph in _all_graphs(model):
        yield from graph.node


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every tensor of the model: initializers (dense and sparse) and attribute tensors."""
    for graph in _all_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def _node_label(node: onnx.NodeProto) -> str:
    """Name a node for a message, falling back to its first output when it has no name."""
    if node.name:
        return repr(node.name)
    first_output = node.output[0] if node.output else "?"
    return f"(unnamed, output {first_output!r})"


# --- load


def _open_checked(path: Path) -> bytes:
    """Read the model file's bytes, turning every file-system problem into an InputError."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path to the ONNX model")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an ONNX model; pass the .onnx file in it")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file; pass an .onnx model file")
    try:
        with path.open("rb") as handle:
            return handle.read()
    except OSError as error:
        raise InputError(
            f"cannot read {path} ({error.strerror or error}); check the file's permissions"
        ) from error


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    """Parse ``data`` as a ModelProto without touching external data."""
    if not data:
        raise InputError(f"{path} is empty or not an ONNX model (0 bytes); re-export or re-download it")
    if data.lstrip()[:1] == b"{":  # no ModelProto starts so: '{' would be field 15, which it lacks
        raise InputError(
            f"{path} is JSON text, not a binary ONNX model; convert it with "
            "onnx.save(google.protobuf.json_format.Parse(text, onnx.ModelProto()), path) or re-export it"
        )
    try:
        return onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise InputError(
            f"{path} is truncated or not an ONNX model ({len(data)} bytes do not parse as an "
            f"ONNX ModelProto); re-export or re-download it"
        ) from error


def _validate_structure(path: Path, model: onnx.ModelProto) -> None:
    """Reject protos that parse but are not models: no graph, nodes, outputs, IR or opset."""
    problems = []
    if not model.HasField("graph"):
        problems.append("no graph")
    else:
        if not model.graph.node:
            problems.append("graph has no nodes")
        if not model.graph.output:
            problems.append("graph has no outputs")
    if model.ir_version <= 0:
        problems.append(f"ir_version is {model.ir_version}")
    if not model.opset_import:
        problems.append("no opset_import")
    if problems:
        raise InputError(
            f"{path} is empty or not an ONNX model ({', '.join(problems)}); "
            "re-export it or check that this is the .onnx file"
        )


def _validate_ops(path: Path, model: onnx.ModelProto) -> None:
    """Reject nodes whose op onnxruntime cannot run: custom domains and unknown standard ops."""
    local_functions = {(function.domain, function.name) for function in model.functions}
    for node in _all_nodes(model):
        if (node.domain, node.op_type) in local_functions:
            continue
        label = _node_label(node)
        if node.domain not in STANDARD_DOMAINS:
            raise InputError(
                f"{path}: node {label} uses op {node.op_type!r} from custom domain "
                f"{node.domain!r}, which onnxruntime cannot run; {_ONNXRUNTIME_NOTE}"
            )
        if node.domain == "com.microsoft":
            continue  # onnxruntime contrib ops: onnx.defs does not know them
        domain = "" if node.domain == "ai.onnx" else node.domain
        if not onnx.defs.has(node.op_type, domain):
            raise InputError(
                f"{path}: node {label} uses op {node.op_type!r}, unknown to ONNX domain "
                f"{node.domain or 'ai.onnx'!r}; {_ONNXRUNTIME_NOTE}"
            )


def _validate_external_data(path: Path, model: onnx.ModelProto) -> bool:
    """Check that every external data file exists next to the model; return whether any is used."""
    base_dir = path.parent.resolve()
    used = False
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        used = True
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        parts = Path(location).parts
        if not location or Path(location).is_absolute() or ".." in parts:
            raise InputError(
                f"{path}: tensor {tensor.name!r} points to external data {location!r} outside "
                f"the model's directory {base_dir}; keep the .data file next to the model"
            )
        if not (base_dir / location).is_file():
            raise InputError(
                f"{path}: external data file {location!r} (tensor {tensor.name!r}) is missing "
                f"from {base_dir}; keep the .data file next to the model"
            )
    return used


def _run_checker(path: Path, model: onnx.ModelProto | bytes, by_path: bool) -> None:
    """Run the (non-full) ONNX checker on the model or its bytes; by path when weights are external."""
    try:
        onnx.checker.check_model(str(path) if by_path else model)
    except (onnx.checker.ValidationError, ValueError, EncodeError) as error:
        raise InputError(
            f"{path} fails the ONNX checker: {first_line(error)}; fix or re-export the model"
        ) from error


def _load_external(path: Path, model: onnx.ModelProto) -> None:
    """Read the external data into ``model``, wrapping onnx's errors (bounds, locations).

    The loaded tensors get ``data_location`` cleared, so the proto is the one an all-inline file
    would give (same bytes when saved again).
    """
    base_dir = str(path.parent.resolve())
    try:
        for tensor in [t for t in _all_tensors(model) if uses_external_data(t)]:
            load_external_data_for_tensor(tensor, base_dir)
            tensor.ClearField("data_location")
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise InputError(
            f"{path}: cannot load its external data ({first_line(error)}); keep the complete, "
            "unmodified .data file next to the model"
        ) from error


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and validate an ONNX model, with its external data, without modifying the file.

    Args:
        path: The ``.onnx`` file. External data files are looked up in its directory.

    Returns:
        The model, with every external tensor's data read into memory.

    Raises:
        InputError: The file is missing, unreadable, empty, truncated or not ONNX; an external data
            file is missing or short; a node uses an op onnxruntime cannot run; or the ONNX checker
            rejects the model.
    """
    model_path = Path(os.fspath(path))
    data = _open_checked(model_path)
    model = _parse(model_path, data)
    _validate_structure(model_path, model)
    _validate_ops(model_path, model)
    has_external = _validate_external_data(model_path, model)
    _run_checker(model_path, data, by_path=has_external)  # the bytes read: no re-serialisation
    del data
    if has_external:
        _load_external(model_path, model)
    logger.debug("loaded %s (%d nodes, external data: %s)", model_path, len(model.graph.node), has_external)
    return model


# --- size


def model_nbytes(model: onnx.ModelProto) -> int:
    """Return the model's serialized size, counting tensors' external data by their length.

    Exact below 2 GB; above, protobuf cannot size the message and the sum of the tensors' raw and
    external bytes is returned as an estimate (the rest of a large model is negligible).

    Args:
        model: The model.

    Returns:
        Size in bytes.
    """
    raw = 0
    external = 0
    for tensor in _all_tensors(model):
        raw += len(tensor.raw_data)
        if uses_external_data(tensor) and not tensor.HasField("raw_data"):
            lengths = [entry.value for entry in tensor.external_data if entry.key == "length"]
            external += int(lengths[0]) if lengths else 0
    if raw < TWO_GB:
        try:
            return serialized_size(model) + external
        except EncodeError:  # upb cannot size a message over 2 GB
            pass
    return raw + external


# --- save


def _destination(path: str | os.PathLike) -> Path:
    """Validate the destination path: its directory must exist and it must not be a directory."""
    destination = Path(os.fspath(path))
    if not destination.parent.is_dir():
        raise InputError(
            f"cannot write {destination}: directory {destination.parent} does not exist; create it first"
        )
    if destination.is_dir():
        raise InputError(f"cannot write {destination}: it is a directory; give a file name")
    return destination


def _refuse_unloaded_external(model: onnx.ModelProto) -> None:
    """Refuse protos whose tensors still point at external files (their data is not in memory)."""
    for tensor in _all_tensors(model):
        if uses_external_data(tensor):
            raise InputError(
                f"tensor {tensor.name!r} still refers to external data; load the model with "
                "red_onnx.io.files.load_model (which reads external data) before saving it"
            )


def _finish_file(path: Path) -> int:
    """Give a written file the mode plain ``open`` gives (temporaries are 0600); flush it; return its size."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o666 & ~mask)
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _save_inline(model: onnx.ModelProto, destination: Path) -> int:
    """Write a model under 2 GB as one file: temporary file, fsync, ``os.replace``."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        with open(temp, "wb") as stream:  # a weight at a time: no whole serialized copy (conv25m: -300 MB)
            write_model(model, stream)
        nbytes = _finish_file(temp)
        os.replace(temp, destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return nbytes


def _externalized_copy(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """Copy ``model`` and mark its large initializers to be written to ``location``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in _all_graphs(copy):
        for tensor in graph.initializer:
            if len(tensor.raw_data) >= EXTERNAL_DATA_TENSOR_MIN_BYTES:
                set_external_data(tensor, location)
    return copy


def _replace_pair(temp_model: Path, temp_data: Path, destination: Path, backup: Path) -> None:
    """Move the data file, then the model file into place; restore the old data file on failure."""
    final_data = destination.with_name(temp_data.name)
    had_old_data = final_data.exists()
    if had_old_data:
        os.replace(final_data, backup)
    try:
        os.replace(temp_data, final_data)
        os.replace(temp_model, destination)
    except BaseException:
        if had_old_data:
            os.replace(backup, final_data)
        raise


def _save_external(model: onnx.ModelProto, destination: Path) -> int:
    """Write ``<name>`` and ``<name>.data`` in a temporary directory, then move both into place."""
    data_name = f"{destination.name}.data"
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        temp_model, temp_data = temp_dir / destination.name, temp_dir / data_name
        onnx.save_model(_externalized_copy(model, data_name), temp_model)
        if not temp_data.exists():  # no tensor was large enough: write an empty data file
            temp_data.touch()
        nbytes = _finish_file(temp_model) + _finish_file(temp_data)
        _replace_pair(temp_model, temp_data, destination, temp_dir / "previous.data")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return nbytes


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Save ``model`` to ``path`` atomically; above ``EXTERNAL_DATA_THRESHOLD`` with external data.

    Large models are written as ``path`` plus ``<path name>.data`` next to it (all initializers of
    at least ``EXTERNAL_DATA_TENSOR_MIN_BYTES`` bytes, one file). The caller's proto is never
    modified, and the same proto always gives the same bytes. On failure the temporary files are
    removed and an existing destination is left as it was.

    Args:
        model: The model; its tensors' data must be in memory (as ``load_model`` returns it).
        path: Destination ``.onnx`` file; its directory must exist.

    Returns:
        Bytes written: model file plus external data file.

    Raises:
        InputError: The destination directory is missing, the path is a directory, the model still
            refers to unloaded external data, or the file system refused the write.
    """
    destination = _destination(path)
    _refuse_unloaded_external(model)
    external = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    save = _save_external if external else _save_inline
    try:
        nbytes = save(model, destination)
    except OSError as error:
        raise InputError(
            f"cannot write {destination} ({error.strerror or error}); check free space and permissions"
        ) from error
    logger.debug("saved %s (%d bytes, external data: %s)", destination, nbytes, external)
    return nbytes


# --- full check


def check_model(model_or_path: onnx.ModelProto | bytes | str | os.PathLike, label: str | None = None) -> None:
    """Run the full ONNX check (checker plus strict shape inference).

    Paths are checked by path (works above 2 GB, external data included); serialized bytes as they
    are. A ModelProto over 2 GB is first saved to a temporary directory with external data and checked
    by path: prefer passing the path for large models.

    Args:
        model_or_path: The model, its serialized bytes (under 2 GB), or the path of a saved model.
        label: How the error names the model (default: its path, or "the model").

    Raises:
        VerificationError: The model fails the full check.
    """
    if isinstance(model_or_path, bytes):
        _full_check(model_or_path, label or "the model")
    elif not isinstance(model_or_path, onnx.ModelProto):
        path = Path(os.fspath(model_or_path))
        if not path.is_file():
            raise InputError(f"{path}: no such file; check the path to the ONNX model")
        _full_check(str(path), label or str(path))
    elif model_nbytes(model_or_path) < TWO_GB:
        _full_check(model_or_path, label or "the model")
    else:
        with tempfile.TemporaryDirectory(prefix="red_onnx_check.") as temp_dir:
            temp = Path(temp_dir) / "model.onnx"
            _save_external(model_or_path, temp)
            _full_check(str(temp), label or "the model")


def _full_check(target: onnx.ModelProto | bytes | str, label: str) -> None:
    """Run ``onnx.checker.check_model(full_check=True)``, raising VerificationError on failure."""
    try:
        onnx.checker.check_model(target, full_check=True)
    except (
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
        ValueError,
        EncodeError,
    ) as error:
        raise VerificationError(
            f"{label} fails the full ONNX check: {first_line(error)}; the model is not valid ONNX "
            "as written: report it with the model"
        ) from error


def validate_model(model: onnx.ModelProto, label: str = "the model") -> None:
    """Run the checks :func:`load_model` runs on a model given in memory (structure, ops, checker).

    Raises:
        InputError: As for :func:`load_model`.
    """
    path = Path(label)
    _validate_structure(path, model)
    _validate_ops(path, model)
    if model.ByteSize() < TWO_GB:
        _run_checker(path, model, by_path=False)
