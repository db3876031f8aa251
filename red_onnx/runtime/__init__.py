"""Running a model in onnxruntime: sessions, tensor values, the shape service, recurrent streams.

May import :mod:`red_onnx.io` and :mod:`red_onnx.errors`. Sessions are built here and only here
(graph optimisation levels, the protobuf size limit, held sessions); ``stream`` finds a recurrent
model's state pairs and runs it on streams of calls; ``rows`` runs a feed holding a batch of many
samples a few rows at a time.
"""
