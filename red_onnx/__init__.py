"""red_onnx: structured compression of exported ONNX models (RED / RED++), verified with onnxruntime.

Typical use::

    import red_onnx
    from red_onnx.io import save_model

    result = red_onnx.compress("model.onnx", exact=True)
    save_model(result.model, "model.red.onnx")
    print(result.report.to_json())

``compress`` and ``Result`` are imported on first use (the pipeline pulls in onnx and onnxruntime),
so ``import red_onnx`` and ``red-onnx --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from red_onnx._version import __version__
from red_onnx.errors import InputError, RedOnnxError, UsageError, VerificationError
from red_onnx.options import InputSpec, Options, make_options

if TYPE_CHECKING:
    from red_onnx.pipeline import Result, compress

__all__ = [
    "InputError",
    "InputSpec",
    "Options",
    "RedOnnxError",
    "Result",
    "UsageError",
    "VerificationError",
    "__version__",
    "compress",
    "make_options",
]

_FROM_PIPELINE = frozenset({"Result", "compress"})


def __getattr__(name: str) -> Any:
    """The pipeline's names, imported on first use."""
    if name in _FROM_PIPELINE:
        from red_onnx import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'red_onnx' has no attribute {name!r}")
