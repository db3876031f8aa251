"""The graph edits: channel deletion and merging, and depthwise separation.

``editor`` is the one place that deletes and merges channels and rewires their consumers;
``separation`` rewrites a conv as Gather → grouped conv → 1×1 conv.

May import :mod:`red_onnx.analysis` and :mod:`red_onnx.io`. It applies plans; it never decides them.
"""
