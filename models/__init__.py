"""The bundled demo model and its test split (installed as ``red_onnx.models``)."""
