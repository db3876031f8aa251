"""Orchestration of the approximate path: how many channels each group loses.

The fidelity budget search, its per-group options and channel steps, the merge simulator, suffix
runs, activation captures, the refit systems of a group's consumers and the local sensitivity.

May import :mod:`red_onnx.analysis`, :mod:`red_onnx.rewrite`, :mod:`red_onnx.passes`,
:mod:`red_onnx.verify`, :mod:`red_onnx.measure`, :mod:`red_onnx.runtime` and :mod:`red_onnx.io`.
It decides how many channels each group loses; passes apply that.
"""
