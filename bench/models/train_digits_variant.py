"""Train and export a digits CNN the method was not tuned on: another seed, width and depth than the demo.

Run from the repository root (torch is a dev-only dependency)::

    python bench/models/train_digits_variant.py                     # digits_b: the checked variant
    python bench/models/train_digits_variant.py --seed 2 --width 40 --blocks 1 --plain --name digits_c

Same data as the bundled demo (``models/train_digits.py``): scikit-learn's digits, pixels / 16, the
same stratified 80/20 split (``random_state=0``), so the bundled ``digits_test.npz`` is its test split
(checked). Same family: Conv3x3+BN+ReLU stem, ``--blocks`` blocks (residual unless ``--plain``), a
stride-2 Conv+BN+ReLU, Flatten, Gemm+ReLU, Gemm; BatchNormalization kept un-folded like the demo's.
The default variant, ``digits_b``: seed 1, stem width 48 (demo 32), two residual blocks (demo one),
downsampling width 96 (demo 64), hidden 96 (demo 64). Writes ``<name>_cnn.onnx`` into the bench cache
(``RED_ONNX_BENCH``, default ``~/.cache/red-onnx/bench``): input ``image`` float32 [batch, 1, 8, 8],
output ``logits`` float32 [batch, 10], opset 17. Seeded, single-threaded, deterministic.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from export import export_classifier
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench`, `models`, `red_onnx` from a checkout
from bench.data import cache_dir, load_digits_test
from models.train_digits import (
    ResidualBlock,
    check_onnxruntime,
    load_split,
    run_epochs,
    seed_everything,
    sha256,
)

LOG = logging.getLogger("train_digits_variant")

EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
MIN_TEST_ACCURACY = 0.95


class PlainBlock(nn.Module):
    """Conv3x3 + BN + ReLU, twice, without the skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to an NCHW tensor."""
        return self.body(x)


class DigitsVariantCNN(nn.Module):
    """Stem, ``blocks`` residual (or plain) blocks, stride-2 conv, two-layer Gemm head."""

    def __init__(self, width: int = 48, blocks: int = 2, residual: bool = True, hidden: int = 96) -> None:
        super().__init__()
        block = ResidualBlock if residual else PlainBlock
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(block(width) for _ in range(blocks)))
        down = 2 * width
        conv = nn.Conv2d(width, down, 3, stride=2, padding=1)
        self.down = nn.Sequential(conv, nn.BatchNorm2d(down), nn.ReLU())
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(down * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, 1, 8, 8] to logits [N, 10]."""
        return self.head(self.down(self.blocks(self.stem(x))))


def train(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, seed: int) -> None:
    """Train in place as the demo is (Adam, weight decay, cosine schedule), batches in ``seed`` order."""
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    run_epochs(model, optimizer, scheduler, (x, y), epochs=EPOCHS, batch_size=BATCH_SIZE, seed=seed)


def export_onnx(model: nn.Module, path: Path, description: str) -> onnx.ModelProto:
    """Export with BatchNormalization preserved (as the demo), run-dependent text stripped, atomically."""
    metadata = {"source": "bench/models/train_digits_variant.py", "dataset": "sklearn load_digits"}
    example = torch.zeros(1, 1, 8, 8)
    return export_classifier(model, example, "image", path, description, metadata, preserve_batchnorm=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (defaults: the ``digits_b`` variant)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="init and batch-order seed (the demo: 0)")
    parser.add_argument("--width", type=int, default=48, help="stem and block channels (the demo: 32)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks after the stem (the demo: 1)")
    parser.add_argument("--plain", action="store_true", help="blocks without the residual Add")
    parser.add_argument("--hidden", type=int, default=96, help="hidden Gemm width (the demo: 64)")
    parser.add_argument("--name", default="digits_b", help="writes NAME_cnn.onnx")
    parser.add_argument("--dir", type=Path, default=None, help="output folder (default: bench cache)")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> DigitsVariantCNN:
    """The untrained network the options describe."""
    return DigitsVariantCNN(args.width, args.blocks, not args.plain, args.hidden)


def main(argv: list[str] | None = None) -> int:
    """Train, export, check against torch and the bundled split, write ``NAME_cnn.onnx``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_split()
    bundled_x, bundled_y = load_digits_test()
    if not (np.array_equal(x_test, bundled_x) and np.array_equal(y_test, bundled_y)):
        raise RuntimeError("the split differs from the bundled digits_test.npz")
    seed_everything(args.seed)
    model = build_model(args)
    train(model, x_train, y_train, args.seed)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    path = (args.dir or cache_dir()) / f"{args.name}_cnn.onnx"
    kind = "plain" if args.plain else "residual"
    description = (f"digits CNN variant for red_onnx benchmarks (seed {args.seed}): stem {args.width}, "
                   f"{args.blocks} {kind} blocks, down {2 * args.width}, hidden {args.hidden}; test split: "
                   "the bundled digits_test.npz")  # fmt: skip
    export_onnx(model, path, description)
    accuracy = float(np.mean(check_onnxruntime(path, x_test, expected).argmax(axis=1) == y_test))
    LOG.info("test accuracy %.4f (onnxruntime, %d images)", accuracy, len(y_test))
    if accuracy < MIN_TEST_ACCURACY:
        raise RuntimeError(f"test accuracy {accuracy:.4f} < {MIN_TEST_ACCURACY}")
    LOG.info("%s: sha256 %s; done in %.1f s", path, sha256(path), time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
