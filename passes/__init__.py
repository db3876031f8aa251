"""Passes: each a small class with one job, ``call(model) -> PassResult`` (as ``red_onnx.passes``)."""
