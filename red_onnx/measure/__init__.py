"""Figures of a model: parameters and MACs, latency, the benchmark and the kernel profile.

May import :mod:`red_onnx.verify` (for benchmark inputs), :mod:`red_onnx.runtime`,
:mod:`red_onnx.io` and :mod:`red_onnx.errors`.
"""
