"""A model's protobuf wire format, a weight at a time: its size, its bytes to a file, its dims-only copy.

upb serializes a message into one buffer that grows by doubling inside an arena, then copies it into a
Python ``bytes``: serializing a 97 MB model (conv25m) took ~300 MB beside it (the arena's blocks and
the copy), the largest single cost of saving and verifying it. Here the model and its graph are
written as shells without their initializers, and each initializer is encoded and written on its own,
with the same tags and length prefixes upb writes, in the same field order, so the bytes are the ones
``SerializeToString()`` gives (``tests/test_wire.py`` checks it): a write holds one weight's encoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO, TypeVar

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import EncodeError, Message

try:
    from google.protobuf import unknown_fields
except ImportError:  # protobuf < 4.22: every model is written whole
    unknown_fields = None  # type: ignore[assignment]  # the stubs describe only protobufs that have it

_M = TypeVar("_M", bound=Message)

#: Wire type of length-delimited fields (messages, bytes, strings).
_LENGTH_DELIMITED = 2
#: The largest message protobuf serializes (2 GB - 1).
_MAX_MESSAGE_BYTES = 2**31 - 1


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, in a tenth of the time on a weight-heavy model.

    upb sizes a message by encoding it; its initializers are sized one by one and the rest of the
    graph and model as shells without them, adding each field's tag and length prefix.
    """
    if not model.HasField("graph"):
        return model.ByteSize()
    graph = model.graph
    graph_size = _size_without(graph, "initializer", [tensor.ByteSize() for tensor in graph.initializer])
    return _size_without(model, "graph", [graph_size])


def write_model(model: onnx.ModelProto, stream: BinaryIO) -> int:
    """Write ``model.SerializeToString()`` to ``stream`` without holding it whole; return the bytes written.

    Raises:
        EncodeError: over protobuf's 2 GB limit (as ``SerializeToString``), before anything is written.
    """
    whole = not model.HasField("graph") or not model.graph.initializer
    if whole or _has_unknown_fields(model) or _has_unknown_fields(model.graph):  # upb writes unknowns last
        data = model.SerializeToString()
        stream.write(data)
        return len(data)
    graph = model.graph
    sizes = [tensor.ByteSize() for tensor in graph.initializer]
    graph_size = _size_without(graph, "initializer", sizes)
    total = _size_without(model, "graph", [graph_size])
    if max(graph_size, total) > _MAX_MESSAGE_BYTES:
        raise EncodeError(f"the model is {total} bytes serialized, over protobuf's 2 GB message limit")
    model_head, model_tail = _split(model, "graph")
    graph_head, graph_tail = _split(graph, "initializer")
    written = _write(stream, model_head)
    written += _write(stream, _prefix(model, "graph", graph_size))
    written += _write(stream, graph_head)
    for tensor, size in zip(graph.initializer, sizes, strict=True):
        written += _write(stream, _prefix(graph, "initializer", size))
        written += _write(stream, tensor.SerializeToString())
    written += _write(stream, graph_tail)
    return written + _write(stream, model_tail)


def structure_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose graph's initializers keep name, type and dims but no values.

    What the verification inputs and the input/output lists are built from, without a second copy of
    the weights (``sessions.load_structure`` reads the same from a file). Subgraphs are copied as they are.
    """
    structure = _shell(model, "graph", before=None)
    if model.HasField("graph"):
        graph = _shell(model.graph, "initializer", before=None)
        for tensor in model.graph.initializer:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        structure.graph.CopyFrom(graph)
    return structure


def _write(stream: BinaryIO, data: bytes) -> int:
    stream.write(data)
    return len(data)


def _split(message: Message, field_name: str) -> tuple[bytes, bytes]:
    """The encodings of the fields numbered below and above ``field_name``'s (upb writes in number order)."""
    number = message.DESCRIPTOR.fields_by_name[field_name].number
    head = _shell(message, field_name, before=number)
    tail = _shell(message, field_name, before=None, after=number)
    return head.SerializeToString(), tail.SerializeToString()


def _shell(message: _M, field_name: str, *, before: int | None, after: int | None = None) -> _M:
    """A new message with the fields of ``message`` but ``field_name`` (only those numbered in range)."""
    shell = type(message)()
    for field, value in message.ListFields():
        if field.name == field_name:
            continue
        if (before is not None and field.number > before) or (after is not None and field.number < after):
            continue
        if _is_repeated(field):
            getattr(shell, field.name).extend(value)
        elif field.message_type is not None:
            getattr(shell, field.name).CopyFrom(value)
        else:
            setattr(shell, field.name, value)
    return shell


def _has_unknown_fields(message: Message) -> bool:
    """Whether ``message`` carries fields this protobuf schema does not know (True when it cannot tell)."""
    if unknown_fields is None:
        return True
    return len(unknown_fields.UnknownFieldSet(message)) > 0


def _prefix(message: Message, field_name: str, size: int) -> bytes:
    """Tag and length prefix of a length-delimited field of ``size`` bytes."""
    number = message.DESCRIPTOR.fields_by_name[field_name].number
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(size)


def _size_without(message: Message, field_name: str, part_sizes: Iterable[int]) -> int:
    """Serialized size of ``message`` whose field ``field_name`` holds messages of ``part_sizes``."""
    shell = _shell(message, field_name, before=None)
    tag = _varint_size(message.DESCRIPTOR.fields_by_name[field_name].number << 3 | _LENGTH_DELIMITED)
    return shell.ByteSize() + sum(tag + _varint_size(size) + size for size in part_sizes)


def _is_repeated(field: FieldDescriptor) -> bool:
    """Whether a field is repeated (``is_repeated`` since protobuf 5.29, ``label`` before)."""
    repeated = getattr(field, "is_repeated", None)
    # ``label`` is gone from the stubs, which describe protobuf >= 5.29 only
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED  # type: ignore[attr-defined]


def _varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_size(value: int) -> int:
    """Bytes of ``value`` as a protobuf varint."""
    return max(1, (value.bit_length() + 6) // 7)
