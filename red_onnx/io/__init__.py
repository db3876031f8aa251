"""Model files and the in-memory working model: load, save, protobuf wire, graph, memory.

The bottom floor: it imports nothing of red_onnx but :mod:`red_onnx.errors`. ``load_model`` refuses
unusable input with a one-line error; ``save_model`` writes atomically; ``graph`` is the
onnx-graphsurgeon working model every later stage edits or reads; ``wire`` writes and sizes a
model's protobuf bytes a weight at a time; ``memory`` hands freed heap pages back to the system.
"""

from red_onnx.io.files import check_model, load_model, model_nbytes, save_model, validate_model

__all__ = ["check_model", "load_model", "model_nbytes", "save_model", "validate_model"]
