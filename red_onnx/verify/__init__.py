"""Verification: inputs (synthetic, calibration samples), comparisons, noise allowances, the verdict.

May import :mod:`red_onnx.runtime`, :mod:`red_onnx.io` and :mod:`red_onnx.errors`. The
``Verifier`` runs the reference and the candidate in onnxruntime and says which bound held, on which
inputs.
"""
