"""Why ``--channel-multiple`` defaults to 8: onnxruntime CPU latency against channel count.

Six 3x3 convs at 56x56 (64 channels in and out, inner width n), batch 1, ORT_ENABLE_ALL, the CPU
provider; median of ``--runs`` timed runs after warm-up, as a ratio to n = 64 measured in the same run,
next to the MACs ratio. Usage: ``python bench/channel_multiple.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

WIDTHS = (64, 63, 61, 60, 57, 56, 52, 48, 40, 32)


def conv_stack(width: int, size: int = 56, seed: int = 0) -> onnx.ModelProto:
    """64 -> width -> ... -> width -> 64 channels through six padded 3x3 convs with Relu."""
    rng = np.random.default_rng(seed)
    channels = [64, width, width, width, width, width, 64]
    nodes, inits, source = [], [], "x"
    for k in range(6):
        weight = rng.standard_normal((channels[k + 1], channels[k], 3, 3)).astype(np.float32) * 0.05
        inits.append(numpy_helper.from_array(weight, f"w{k}"))
        nodes.append(helper.make_node("Conv", [source, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"]))
        source = f"r{k}"
    graph = helper.make_graph(
        nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, size, size])],
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, [1, 64, size, size])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def latency(model: onnx.ModelProto, runs: int) -> float:
    """Median seconds per run (after 5 warm-up runs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, 64, 56, 56)).astype(np.float32)}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def macs(width: int) -> int:
    """Multiply-accumulates of the stack."""
    channels = [64, width, width, width, width, width, 64]
    return sum(channels[k] * channels[k + 1] * 9 * 56 * 56 for k in range(6))


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    timings = {width: latency(conv_stack(width), args.runs) for width in WIDTHS}
    print("| inner width n | MACs ratio | latency ratio (vs 64) | median ms |")
    print("|---|---|---|---|")
    for width, seconds in timings.items():
        print(
            f"| {width} | {macs(width) / macs(64):.3f} | {seconds / timings[64]:.3f} | {seconds * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()
