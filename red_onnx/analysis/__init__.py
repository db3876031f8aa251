"""Pure analysis of a working model: which channels go together, and which are redundant.

Channel groups and atoms, redundancy, constants, similarity, KDE hashing, depthwise-separation
factoring.

May import :mod:`red_onnx.io` and :mod:`red_onnx.errors`; never edits a graph and never runs a
model. Whatever it does not understand freezes a channel group with a reason from ``reasons``.
"""
