"""Export the speed-benchmark models (``bench/speed.py``) to ONNX: ResNet-50-style conv nets and
BERT-like MatMul encoders at several parameter counts.

Run from the repository root (torch is a bench-only dependency; torchvision is not used)::

    python bench/models/export_speed.py                      # conv1m conv5m conv25m transformer25m
    python bench/models/export_speed.py --models conv100m transformer85m

Models (written to ``<bench cache>/speed/NAME.onnx``; bench cache: ``RED_ONNX_BENCH``, default
``~/.cache/red-onnx/bench``; an existing file is kept unless ``--force``):

- ``conv1m``, ``conv5m``, ``conv25m``, ``conv100m``: the ResNet-50 v1.5 layout (7×7 stem, max-pool,
  bottleneck stages [3, 4, 6, 3], expansion 4, stride on the 3×3 conv, 1×1 projection shortcuts,
  global average pool, 1000-way linear head) with every width scaled by ``base / 64``; ``conv25m`` is
  ResNet-50 itself (base 64, 25,557,032 parameters). Input ``image`` float32 [batch, 3, 224, 224],
  output ``logits`` [batch, 1000].
- ``transformer25m`` (4 layers), ``transformer85m`` (12 layers, BERT-base's encoder): post-LayerNorm
  encoder layers, hidden 768, 12 heads, FFN 3072 with GELU (erf), written with Linear (MatMul + Add),
  Softmax and LayerNorm. Input ``hidden`` float32 [batch, 128, 768] (no embedding table), output
  ``output`` [batch, 128, 768].

No trained ResNet-50 or BERT weights exist offline, so the weights are *trained-like*: conv weights
kaiming-normal (fan-out, ReLU), BatchNorm affine randomised (γ log-normal around 0.5, β normal) and
its running statistics **calibrated** on standard-normal images (a train-mode pass with cumulative
averages after the affine is set), so that BN folding yields realistic, uneven per-channel scales and
the eval-mode activations stay well scaled through all 16 blocks. Transformer weights: normal(0, 0.02)
as BERT's initialiser, LayerNorm γ normal around 1, β normal(0, 0.02). Everything is seeded; opset 17,
``dynamo=False``, dynamic batch axis. onnxruntime is checked against torch before the file is kept.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` from a checkout
from bench.data import cache_dir

LOG = logging.getLogger("export_speed")

OPSET = 17
SEED = 0
#: ResNet-50: bottleneck blocks per stage, and the base width (stem channels) of the real network.
STAGES = (3, 4, 6, 3)
RESNET50_BASE = 64
EXPANSION = 4
IMAGE_SIZE = 224
SEQUENCE = 128
HIDDEN = 768
HEADS = 12
FFN = 3072
#: |onnxruntime - torch| allowed, relative to max |torch output|.
RELATIVE_TOLERANCE = 1e-4


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1×1 → 3×3 (stride) → 1×1 (×4), projection when needed."""

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        c_out = planes * EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """ResNet-50's layout with every width scaled by ``base / 64`` (base 64: ResNet-50 itself)."""

    def __init__(self, base: int, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        blocks: list[nn.Module] = []
        c_in = base
        for index, repeats in enumerate(STAGES):
            planes = base * 2**index
            for repeat in range(repeats):
                blocks.append(Bottleneck(c_in, planes, 2 if index and not repeat else 1))
                c_in = planes * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, 224, 224] → logits [N, 1000]."""
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class EncoderLayer(nn.Module):
    """BERT's post-LayerNorm encoder layer with explicit MatMul attention (no fused SDPA)."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attention_out, self.norm1 = nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN)
        self.ffn_in, self.ffn_out = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
        self.norm2 = nn.LayerNorm(HIDDEN)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], HEADS, HIDDEN // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, S, H] → [N, S, H]."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS)
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(x.shape)
        x = self.norm1(x + self.attention_out(context))
        return self.norm2(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))


class Encoder(nn.Module):
    """A stack of encoder layers over float hidden states (no embeddings)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(EncoderLayer() for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 128, 768] → [N, 128, 768]."""
        return self.layers(x)


@dataclass(frozen=True)
class SpeedModel:
    """One benchmark model: how to build it and its ONNX interface."""

    name: str
    build: Callable[[], nn.Module]
    init: Callable[[nn.Module], None]
    example_shape: tuple[int, ...]
    input_name: str
    output_name: str
    description: str


def count_params(module: nn.Module) -> int:
    """Parameters of ``module`` (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


def resnet_base(target: float) -> int:
    """The base width (a multiple of 4) whose ResNet has the parameter count closest to ``target``."""
    with torch.device("meta"):
        counts = {base: count_params(ResNet(base)) for base in range(4, 257, 4)}
    return min(counts, key=lambda base: abs(math.log(counts[base] / target)))


def init_resnet(model: nn.Module) -> None:
    """Kaiming conv weights, randomised BN affine, BN running stats calibrated on normal images."""
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            shape = module.weight.shape
            module.weight.data = torch.exp(torch.randn(shape, generator=generator) * 0.5) * 0.5
            module.bias.data = torch.randn(shape, generator=generator) * 0.2
            module.momentum = None  # cumulative average over the calibration batches
            module.reset_running_stats()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01, generator=generator)
            nn.init.zeros_(module.bias)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    model.eval()


def init_transformer(model: nn.Module) -> None:
    """BERT's initialiser (normal(0, 0.02)), LayerNorm γ ~ normal(1, 0.1), β ~ normal(0, 0.02)."""
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02, generator=generator)
            nn.init.normal_(module.bias, std=0.02, generator=generator)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data = 1.0 + torch.randn(module.weight.shape, generator=generator) * 0.1
            module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.02
    model.eval()


def _conv(name: str, target: float) -> SpeedModel:
    base = RESNET50_BASE if name == "conv25m" else resnet_base(target)
    return SpeedModel(
        name, lambda: ResNet(base), init_resnet, (1, 3, IMAGE_SIZE, IMAGE_SIZE), "image", "logits",
        f"ResNet-50 layout, base width {base} (trained-like random weights) for red_onnx speed benchmarks",
    )  # fmt: skip


def _transformer(name: str, layers: int) -> SpeedModel:
    return SpeedModel(
        name, lambda: Encoder(layers), init_transformer, (1, SEQUENCE, HIDDEN), "hidden", "output",
        f"BERT-like encoder, {layers} layers, hidden {HIDDEN} (random weights) for red_onnx speed benchmarks",
    )  # fmt: skip


MODELS: dict[str, Callable[[], SpeedModel]] = {
    "conv1m": lambda: _conv("conv1m", 1e6),
    "conv5m": lambda: _conv("conv5m", 5e6),
    "conv25m": lambda: _conv("conv25m", 25e6),
    "conv100m": lambda: _conv("conv100m", 100e6),
    "transformer25m": lambda: _transformer("transformer25m", 4),
    "transformer85m": lambda: _transformer("transformer85m", 12),
}
DEFAULT_MODELS = ("conv1m", "conv5m", "conv25m", "transformer25m")


def speed_dir(root: Path | None = None) -> Path:
    """Where the speed models live: ``<bench cache>/speed``."""
    return (root or cache_dir()) / "speed"


def model_path(name: str, root: Path | None = None) -> Path:
    """The cached ``.onnx`` of model ``name``."""
    return speed_dir(root) / f"{name}.onnx"


def export(spec: SpeedModel, module: nn.Module, path: Path) -> onnx.ModelProto:
    """Export ``module`` atomically to ``path`` (opset 17, dynamo=False, dynamic batch, metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    torch.onnx.export(
        module, (torch.zeros(spec.example_shape),), str(temp),
        input_names=[spec.input_name], output_names=[spec.output_name],
        dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    proto = onnx.load(str(temp))
    for node in proto.graph.node:
        node.doc_string = ""  # run-dependent text: reruns give identical bytes
    proto.doc_string = spec.description
    del proto.metadata_props[:]
    for key, value in {"source": "bench/models/export_speed.py", "params": str(count_params(module))}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(temp))
    temp.replace(path)
    return proto


def check(spec: SpeedModel, module: nn.Module, path: Path) -> float:
    """Max |torch - onnxruntime| / max |torch| at batch 2; raise if above the tolerance."""
    inputs = torch.randn((2, *spec.example_shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run([spec.output_name], {spec.input_name: inputs.numpy()})[0]
    relative = float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))
    if not np.all(np.isfinite(actual)) or relative > RELATIVE_TOLERANCE:
        raise RuntimeError(f"{spec.name}: onnxruntime differs from torch by {relative:.3g} (relative)")
    LOG.info(
        "%s: output std %.3g, max |output| %.3g", spec.name, float(expected.std()), np.abs(expected).max()
    )
    return relative


def build(name: str, root: Path | None = None, force: bool = False) -> Path:
    """Export model ``name`` into the cache unless it is there; its path."""
    path = model_path(name, root)
    if path.exists() and not force:
        LOG.info("%s: kept %s", name, path)
        return path
    started = time.perf_counter()
    spec = MODELS[name]()
    torch.manual_seed(SEED)
    module = spec.build()
    spec.init(module)
    export(spec, module, path)
    relative = check(spec, module, path)
    LOG.info(
        "%s: %d params, %.1f MB, torch vs onnxruntime %.2g (relative), %.1f s -> %s",
        name, count_params(module), path.stat().st_size / 1e6, relative, time.perf_counter() - started, path,
    )  # fmt: skip
    return path


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument(
        "--dir", type=Path, default=None, help="bench cache (default: RED_ONNX_BENCH or ~/.cache)"
    )
    parser.add_argument("--force", action="store_true", help="re-export models already in the cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    for name in args.models:
        build(name, args.dir, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
