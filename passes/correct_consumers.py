"""Sequential correction: give the merged model's consumers the weights the correction refit.

The pass decides nothing: ``red_onnx.search.correction`` computes, per node output, the new weight and
bias of each Conv and Gemm it corrected (fitted on the merged model's own inputs towards the
exact-rewritten model's outputs), and the pass writes them through ``red_onnx.rewrite.editor``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from red_onnx.errors import RewriteError
from red_onnx.io.graph import WorkingModel
from red_onnx.passes.infra import Pass, PassResult, require_constant_weights
from red_onnx.rewrite.editor import replace_linear_weights


class CorrectConsumers(Pass):
    """Set the corrected weight and bias of the nodes named by their output tensor."""

    name = "correct_consumers"

    def __init__(self, *, weights: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Configure the pass.

        Args:
            weights: Per node output tensor: the node's new weight and bias (None: bias unchanged).
        """
        self.weights = dict(weights)

    def requires(self, model: WorkingModel) -> None:
        """Weights are constants (normalised at import)."""
        require_constant_weights(model, self.name)

    def call(self, model: WorkingModel) -> PassResult:
        """Write the weights; every named node must be found with weights of the same shapes.

        Raises:
            RewriteError: A node named by its output is not in the model as a Conv or Gemm.
        """
        nodes = {
            node.outputs[0].name: node
            for node in model.graph.nodes
            if node.op in ("Conv", "Gemm") and node.outputs
        }
        for output, (weight, bias) in self.weights.items():
            node = nodes.get(output)
            if node is None:
                raise RewriteError(
                    f"no Conv or Gemm writes {output!r}: the correction was made for another model"
                )
            replace_linear_weights(node, weight, bias)
        return PassResult(model, bool(self.weights), {"corrected": len(self.weights)})
