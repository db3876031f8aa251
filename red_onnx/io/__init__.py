"""Model files and the in-memory working model: load, save, protobuf wire, graph, memory; images.

The bottom floor: it imports nothing of red_onnx but :mod:`red_onnx.errors` and :mod:`red_onnx.options`.
``load_model`` refuses unusable input with a one-line error; ``save_model`` writes atomically; ``graph``
is the onnx-graphsurgeon working model every later stage edits or reads; ``wire`` writes and sizes a
model's protobuf bytes a weight at a time; ``memory`` hands freed heap pages back to the system;
``images`` reads a folder of calibration images as one normalised batch.
"""

from red_onnx.io.files import check_model, load_model, model_nbytes, save_model, validate_model

__all__ = ["check_model", "load_model", "model_nbytes", "save_model", "validate_model"]
