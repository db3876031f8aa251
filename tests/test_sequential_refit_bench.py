"""bench/sequential_refit.py's correction of built nets (no compression run)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_sequential_correction import _outputs, _pair

from bench import sequential_refit


@pytest.mark.parametrize("kernel", [1, 3])
def test_correct_linear_refits_a_consumer_that_lost_a_channel(kernel: int) -> None:
    original, dropped, rng = _pair(kernel=kernel, seed=1)  # hidden channel 4 removed
    images = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    corrected, about = sequential_refit.correct_linear(original, dropped, images, "x", None)
    assert (about["corrected"], about["skipped"]) == (1, 0)
    (layer,) = about["layers"]
    assert layer["fit_after"] < layer["fit_before"] and layer["held_back_after"] < layer["fit_before"]
    assert layer["alpha"] > 0
    reference = _outputs(original, images)
    before = np.linalg.norm(_outputs(dropped, images) - reference)
    after = np.linalg.norm(_outputs(corrected, images) - reference)
    assert after < 0.9 * before


def test_changed_matmuls_finds_a_weight_stored_input_rows_first() -> None:
    """A MatMul's weight is [inputs, outputs]: a lost input row counts, a lost output column does not."""

    def model(first: int, second: int) -> onnx.ModelProto:
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ]
        weights = [numpy_helper.from_array(np.ones((4, first), np.float32), "w1"),
                   numpy_helper.from_array(np.ones((first, second), np.float32), "w2")]  # fmt: skip
        graph = helper.make_graph(
            nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights,
        )  # fmt: skip
        return helper.make_model(graph)

    found = sequential_refit._changed_matmuls(model(6, 3), model(5, 3))
    assert [node.output[0] for node, _ in found] == ["y"]
    assert sequential_refit._changed_matmuls(model(6, 3), model(5, 2)) == []
