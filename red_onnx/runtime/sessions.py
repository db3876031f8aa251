"""onnxruntime sessions of the verification: what to load, at which level, and its errors as ours.

A model is handed to onnxruntime as bytes (a snapshot: later edits of the proto do not leak) or, from a
file, by path; above ``MAX_PROTO_BYTES`` only by path. An error of the input model is an
``InputError`` (the input's fault); one of a rewritten model a ``VerificationError`` (a rewrite bug).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from red_onnx.errors import InputError, UsageError, VerificationError, first_line
from red_onnx.io.files import model_nbytes
from red_onnx.runtime.rows import RowChunks, dynamic_leading
from red_onnx.runtime.stream import Feed, Runner

#: A model: in memory, serialized (``SerializeToString()`` bytes, handed over as they are), or a path.
ModelLike = onnx.ModelProto | bytes | str | Path

#: Element types numpy lacks, fed to onnxruntime from their raw bits: the unsigned integer type of
#: the same width that carries them. (4-bit types are packed two to a byte in onnxruntime, which its
#: Python API cannot express: inputs of those types are refused.)
RAW_BIT_CARRIERS: dict[int, np.dtype] = {
    getattr(onnx.TensorProto, name): np.dtype(carrier)
    for name, carrier in (
        ("BFLOAT16", np.uint16), ("FLOAT8E4M3FN", np.uint8), ("FLOAT8E4M3FNUZ", np.uint8),
        ("FLOAT8E5M2", np.uint8), ("FLOAT8E5M2FNUZ", np.uint8), ("FLOAT8E8M0", np.uint8),
    )
    if hasattr(onnx.TensorProto, name)
}  # fmt: skip
#: onnxruntime's names of those types (``NodeArg.type``), and their element types.
_RAW_BIT_NAMES = {
    f"tensor({onnx.TensorProto.DataType.Name(elem).lower()})": elem for elem in RAW_BIT_CARRIERS
}

#: ModelProtos larger than this (serialized) cannot be handed to onnxruntime as bytes.
MAX_PROTO_BYTES = 1_800_000_000

#: Names accepted for ``levels``, mapped to onnxruntime graph-optimisation levels.
LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def check_level(level: str) -> None:
    """UsageError unless ``level`` is one of ``LEVELS``."""
    if level not in LEVELS:
        raise UsageError(f"unknown optimisation level {level!r}; use one of {', '.join(LEVELS)}")


def model_source(model: ModelLike) -> bytes | str:
    """Return what onnxruntime loads: a ModelProto's serialized bytes, or a file's path string."""
    if isinstance(model, bytes):
        return model
    if isinstance(model, onnx.ModelProto):
        size = model_nbytes(model)  # ByteSize() itself raises EncodeError above 2 GB
        if size > MAX_PROTO_BYTES:
            raise InputError(
                f"model is {size / 1e9:.2f} GB serialized, over the {MAX_PROTO_BYTES / 1e9:.1f} GB "
                "protobuf limit; save it with external data and verify it by path (approximate "
                "merging cannot measure models this large yet: use --exact)"
            )
        return model.SerializeToString()
    path = Path(model)
    if not path.is_file():
        raise InputError(f"model file {path} not found; pass the path of an existing .onnx file")
    return str(path)


def load_structure(model: ModelLike) -> onnx.ModelProto:
    """Return the model's graph without external weights (enough to read its inputs)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise InputError(f"cannot read {model} as an ONNX model: {exc}") from exc


def as_array(value: Any) -> np.ndarray:
    """Return an onnxruntime output as an array (ragged sequence outputs become object arrays)."""
    try:
        return np.asarray(value)
    except ValueError:
        array = np.empty(len(value), dtype=object)
        array[:] = [np.asarray(v) for v in value]
        return array


def feeder(session: ort.InferenceSession) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """``feed -> what session.run takes``: the session's inputs only, raw-bit arrays as typed values.

    An input of a type numpy lacks (:data:`RAW_BIT_CARRIERS`) arrives as its raw bits in an unsigned
    integer array and is handed to onnxruntime as a value of the declared type; every other array is
    passed as it is. Arrays for names the session does not take are left out.
    """
    wanted = [value.name for value in session.get_inputs()]
    raw = {
        value.name: _RAW_BIT_NAMES[value.type]
        for value in session.get_inputs()
        if value.type in _RAW_BIT_NAMES
    }

    def feed_of(feed: Mapping[str, Any]) -> dict[str, Any]:
        fed = {name: feed[name] for name in wanted if name in feed}
        for name, elem in raw.items():
            if name in fed and isinstance(fed[name], np.ndarray):
                array = np.ascontiguousarray(fed[name])
                fed[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, elem)
        return fed

    return feed_of


def ort_error(exc: BaseException, level: str, *, reference: bool) -> Exception:
    """The one-line error for onnxruntime's ``exc``: InputError for the reference, else VerificationError."""
    if reference:
        return InputError(
            f"onnxruntime cannot run the input model: {first_line(exc)}; "
            "red_onnx verifies every rewrite with onnxruntime"
        )
    return VerificationError(
        f"onnxruntime cannot run the rewritten model (level {level}): {first_line(exc)}; "
        "the rewrite produced an invalid graph, please report it with the input model"
    )


def session_options(level: str = "disable_all", *, arena: bool = True) -> ort.SessionOptions:
    """Options of every session that checks or measures (not the latency probes): silent, no spinning.

    Args:
        level: The graph optimisation level (a key of ``LEVELS``).
        arena: Keep onnxruntime's CPU memory arena (its blocks outlive the runs; the simulator's
            sessions go without: conv25m peak -38 MB at the same speed).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 4  # errors reach the user as one line, not ORT's log
    options.enable_cpu_mem_arena = arena
    # idle workers sleep: with several sessions alive a spinning pool steals the cores from the running
    # one (conv25m --target-macs 0.8 in process: 7.6-7.9 s without spinning, 8.4-9.1 s with)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(
    source: bytes | str, level: str, providers: Sequence[str], *, reference: bool
) -> ort.InferenceSession:
    """A session of ``source`` (:func:`model_source`) at ``level``; its errors as :func:`ort_error`."""
    options = session_options(level)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors share no base class but Exception
        raise ort_error(exc, level, reference=reference) from exc


def batch_chunks(session: ort.InferenceSession) -> RowChunks:
    """The row chunking of feeds to ``session`` (``runtime.rows``): its inputs with a dynamic axis 0."""
    return RowChunks(dynamic_leading({value.name: value.shape for value in session.get_inputs()}))


def session_runner(session: ort.InferenceSession, level: str, *, reference: bool) -> Runner:
    """One ``session.run`` per feed; onnxruntime's errors: InputError (reference), VerificationError.

    A feed holding a batch of many rows runs in chunks of rows (``runtime.rows``), outputs joined.
    """
    names = [out.name for out in session.get_outputs()]
    wanted = [inp.name for inp in session.get_inputs()]
    feed_of = feeder(session)
    chunks = batch_chunks(session)

    def run(feeds: Sequence[Feed]) -> list[Feed]:
        missing = [name for name in wanted if feeds and name not in feeds[0]]
        if missing:
            raise ort_error(
                ValueError(f"it needs inputs {', '.join(missing)} that the original lacks"),
                level, reference=reference,
            )  # fmt: skip
        results: list[Feed] = []
        for feed in feeds:
            try:
                values = chunks.run(lambda part: session.run(names, feed_of(part)), feed)
            except Exception as exc:  # see open_session
                raise ort_error(exc, level, reference=reference) from exc
            results.append({n: as_array(v) for n, v in zip(names, values, strict=True)})
        return results

    return run


class HeldSessions:
    """Sessions of one reference model kept open across verifiers until :meth:`release`.

    The pipeline's verification and the budget search's verifiers run the same input model at the
    same level on different feeds. Each opening parses the file and copies its weights (conv25m: a
    ~170 MB transient, ~0.3 s); held, the search's reference runs reuse the session opened at load
    instead of opening it again beside the working model (its peak). Only ``levels`` are held; other
    levels are opened per call as before.

    Args:
        source: The reference as :func:`open_session` takes it (bytes or a path string).
        levels: The optimisation levels whose session is kept open.
        providers: onnxruntime execution providers.
    """

    def __init__(
        self,
        source: bytes | str,
        levels: Sequence[str] = ("disable_all",),
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        for level in levels:
            check_level(level)
        self.source, self.levels, self.providers = source, tuple(levels), tuple(providers)
        self._open: dict[str, ort.InferenceSession] = {}
        self.released = False

    def session(self, level: str) -> tuple[ort.InferenceSession, bool]:
        """The reference's session at ``level``, and whether it was opened by this call."""
        held = self._open.get(level)
        if held is not None:
            return held, False
        session = open_session(self.source, level, self.providers, reference=True)
        if level in self.levels and not self.released:
            self._open[level] = session
        return session, True

    def release(self) -> None:
        """Close the held sessions; later calls open (and drop) a session each."""
        self._open.clear()
        self.released = True
