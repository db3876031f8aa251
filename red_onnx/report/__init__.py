"""The run's report (figures, layers, passes, frozen groups, verification), its table, and plots.

May import :mod:`red_onnx.measure`, :mod:`red_onnx.passes` (pass results), :mod:`red_onnx.rewrite`
and :mod:`red_onnx.analysis` (KDE plots); never the pipeline.
"""
