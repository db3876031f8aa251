"""red_onnx: data-free structured compression of ONNX models (RED / RED++), verified with onnxruntime.

Typical use::

    import red_onnx
    result = red_onnx.compress("model.onnx", exact=True)
    red_onnx.io.files.save_model(result.model, "model.red.onnx")
    print(result.report.to_json())
"""

from red_onnx._version import __version__
from red_onnx.errors import InputError, RedOnnxError, UsageError, VerificationError
from red_onnx.pipeline import Result, compress
from red_onnx.verify.input_spec import InputSpec

__all__ = [
    "InputError",
    "InputSpec",
    "RedOnnxError",
    "Result",
    "UsageError",
    "VerificationError",
    "__version__",
    "compress",
]
