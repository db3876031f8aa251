"""The data-free pruning baseline: onnxsim 0.8.1 ``apply_structured_pruning`` (L2 filter magnitude).

Usage (from the repository root; needs ``pip install onnxsim==0.8.1`` and the bench models)::

    python bench/baseline.py                               # MobileNetV2 at sparsity 0.05, 0.1, 0.2
    python bench/baseline.py --model mnist1d --sparsity 0.1 0.3
    python bench/baseline.py --target-macs 0.9 0.8         # bisect sparsity to a MACs fraction

``apply_structured_pruning(model, sparsity=s)`` removes the ``s`` fraction of output channels with
the smallest L2 weight norm from every Conv/Gemm producer -> consumer chain it can match (residual
groups share one keep set; depthwise convs are crossed); it uses no data and does no fine-tuning.
MobileNetV2 fidelity is top-1 agreement with the original on natural-image views (no labels);
MNIST-1D and digits use test accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` and `red_onnx` from a checkout
from bench.data import (
    accuracy,
    cache_dir,
    load_digits_test,
    load_mnist1d_test,
    natural_image_views,
    top1_agreement,
)
from red_onnx.errors import InputError
from red_onnx.measure.metrics import measure

LOG = logging.getLogger("bench.baseline")

ONNXSIM_VERSION = "0.8.1"
ModelLike = onnx.ModelProto | str | Path


def _load(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def _prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError as error:
        hint = f"run `pip install onnxsim=={ONNXSIM_VERSION}`"
        raise InputError(f"the baseline needs onnxsim ({error}); {hint}") from error
    if not hasattr(onnxsim, "apply_structured_pruning"):
        found = getattr(onnxsim, "__version__", "?")
        raise InputError(
            f"onnxsim {found} has no apply_structured_pruning; install onnxsim=={ONNXSIM_VERSION}"
        )
    return onnxsim.apply_structured_pruning(model, sparsity=sparsity)


def input_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, list[int]]:
    """Shapes of the real inputs (not initializers); symbolic, unset and ``-1`` dims set to ``batch``."""
    weights = {init.name for init in model.graph.initializer}
    return {
        value.name: [d.dim_value if d.dim_value > 0 else batch for d in value.type.tensor_type.shape.dim]
        for value in model.graph.input
        if value.name not in weights
    }


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of one sample (batch 1), by ``red_onnx.measure.metrics.measure``."""
    return measure(model, input_shapes(model)).macs


def prune(model: ModelLike, sparsity: float) -> tuple[onnx.ModelProto, float]:
    """The baseline at one sparsity: the pruned model and its MACs as a fraction of the original's."""
    original = _load(model)
    pruned = _prune(original, sparsity)
    return pruned, macs(pruned) / macs(original)


def prune_to_macs(
    model: ModelLike,
    target_macs_fraction: float,
    tolerance: float = 0.01,
    max_steps: int = 30,
    pruner: Callable[[onnx.ModelProto, float], onnx.ModelProto] | None = None,
) -> tuple[onnx.ModelProto, float, float]:
    """Bisect the baseline's sparsity until the pruned MACs fraction is within ``tolerance`` of the target.

    Args:
        model: The original model (proto or path).
        target_macs_fraction: Wanted MACs of the pruned model over the original's, in (0, 1].
        tolerance: Largest accepted ``|fraction - target|`` (0.01 = one percentage point).
        max_steps: Bisection steps before giving up.
        pruner: ``pruner(model, sparsity)`` returning the pruned model; None: onnxsim's
            ``apply_structured_pruning`` (e.g. pass a calibrated ``apply_structured_wanda_pruning``).

    Returns:
        ``(pruned_model, sparsity, macs_fraction)``.

    Raises:
        InputError: If the target is out of (0, 1] or no sparsity lands within the tolerance
            (channel counts are integers, so the MACs fraction moves in steps).
    """
    if not 0.0 < target_macs_fraction <= 1.0:
        raise InputError(f"target_macs_fraction={target_macs_fraction} must be in (0, 1]")
    original = _load(model)
    pruner = pruner or _prune
    base = macs(original)
    low, high = 0.0, 0.99  # MACs fall as sparsity rises
    best: tuple[float, onnx.ModelProto, float, float] | None = None
    for _ in range(max_steps):
        sparsity = (low + high) / 2 if best is not None else 0.0
        pruned = pruner(original, sparsity)
        fraction = macs(pruned) / base
        error = abs(fraction - target_macs_fraction)
        if best is None or error < best[0]:
            best = (error, pruned, sparsity, fraction)
        if error <= tolerance:
            return pruned, sparsity, fraction
        if sparsity > 0.0:
            low, high = (sparsity, high) if fraction > target_macs_fraction else (low, sparsity)
    _, _, sparsity, fraction = best
    raise InputError(
        f"no sparsity gives MACs fraction {target_macs_fraction:.3f} +- {tolerance:.3f}; closest is "
        f"{fraction:.4f} at sparsity {sparsity:.4f}; widen the tolerance or pick another target"
    )


def evaluate(
    model_path: ModelLike, dataset: np.ndarray | Mapping[str, np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Run a model over a dataset with onnxruntime (CPU) and return its first output, batched.

    Args:
        model_path: ONNX file path or proto.
        dataset: One array fed to the model's single input, or ``{input name: array}``; the first axis
            is the sample axis.
        batch_size: Samples per run.

    Returns:
        The first output (e.g. logits [N, classes]) for all samples, concatenated.
    """
    source = model_path.SerializeToString() if isinstance(model_path, onnx.ModelProto) else str(model_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    if not isinstance(dataset, Mapping):
        names = [value.name for value in session.get_inputs()]
        if len(names) != 1:
            raise InputError(f"the model has {len(names)} inputs {names}; pass the dataset as a dict")
        dataset = {names[0]: dataset}
    count = len(next(iter(dataset.values())))
    outputs = [
        session.run(None, {name: array[start : start + batch_size] for name, array in dataset.items()})[0]
        for start in range(0, count, batch_size)
    ]
    return np.concatenate(outputs)


def _fidelity(name: str, model: onnx.ModelProto, reference: np.ndarray, data: tuple) -> tuple[str, float]:
    """Top-1 agreement with the original for MobileNetV2, test accuracy for labelled sets."""
    logits = evaluate(model, data[0])
    if name == "mobilenetv2":
        return "top-1 agreement", top1_agreement(logits, reference)
    return "accuracy", accuracy(logits, data[1])


def run(name: str, sparsities: Sequence[float], targets: Sequence[float], views: int) -> None:
    """Log MACs, parameters and fidelity of the baseline on one model at each sparsity / MACs target."""
    paths = {"mobilenetv2": cache_dir() / "mobilenetv2.onnx", "mnist1d": cache_dir() / "mnist1d_cnn.onnx"}
    if name == "digits":
        from red_onnx.demo import demo_path

        paths["digits"] = demo_path()
    original = _load(paths[name])
    loaders = {"mnist1d": load_mnist1d_test, "digits": load_digits_test}
    data = (natural_image_views(n_min=views), None) if name == "mobilenetv2" else loaders[name]()
    reference = evaluate(original, data[0])
    kind, value = _fidelity(name, original, reference, data)
    base = measure(original, input_shapes(original))
    summary = f"{name}: {len(data[0])} samples, {base.macs} MACs, {base.params} params"
    LOG.info("%s, original %s %.4f", summary, kind, value)
    jobs = [(s, None) for s in sparsities] + [(None, t) for t in targets]
    for sparsity, target in jobs:
        start = time.perf_counter()
        if target is None:
            pruned, fraction = prune(original, sparsity)
        else:
            pruned, sparsity, fraction = prune_to_macs(original, target)
        elapsed = time.perf_counter() - start
        params = measure(pruned, input_shapes(pruned)).params / base.params
        kind, value = _fidelity(name, pruned, reference, data)
        figures = f"sparsity {sparsity:.4f}: MACs {fraction:.4f}, params {params:.4f}"
        LOG.info("%s, %s %.4f (pruned in %.2f s)", figures, kind, value, elapsed)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mobilenetv2", "mnist1d", "digits"), default="mobilenetv2")
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument(
        "--target-macs", type=float, nargs="*", default=[], help="MACs fractions to bisect to"
    )
    parser.add_argument("--views", type=int, default=100, help="least natural-image views (MobileNetV2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(args.model, args.sparsity, args.target_macs, args.views)
    return 0


if __name__ == "__main__":
    sys.exit(main())
