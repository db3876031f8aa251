"""Train and export the MNIST-1D benchmark model: a small 1-D CNN on locally generated MNIST-1D.

Run from the repository root (torch and ``mnist1d`` are bench-only dependencies)::

    pip install mnist1d
    python bench/models/train_mnist1d.py
    python bench/models/train_mnist1d.py --seed 1 --channels 24 48 64 96 --kernel 3 --name mnist1d_b

The options build models of the same family the method was not tuned on (``bench/compare.py``'s
unseen models); the defaults build the benchmark model below, byte for byte.

The data set is generated locally with ``mnist1d.data.make_dataset(get_dataset_args())`` (seed 42,
4000 train / 1000 test signals of length 40); ``get_dataset()`` is never called (it downloads).
Writes into the bench cache (``RED_ONNX_BENCH``, default ``~/.cache/red-onnx/bench``):

- ``mnist1d_cnn.onnx`` (``--name``: ``NAME_cnn.onnx``): input ``signal`` float32 [batch, 1, 40], output
  ``logits`` float32 [batch, 10]; three Conv1d (``--channels``: one per width; BatchNormalization folded
  by the exporter) + ReLU, GlobalAveragePool, Flatten, Gemm. Opset 17, exported with ``dynamo=False``.
- ``mnist1d_test.npz``: the test split, ``signal`` float32 [1000, 1, 40], ``label`` int64 [1000].

Training is seeded, deterministic and CPU-only with a fixed thread count, so two runs write
byte-identical files (checked by ``--check-determinism``, which trains twice).
"""

from __future__ import annotations

import argparse
import hashlib
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
from bench.data import cache_dir
from models.train_digits import run_epochs

LOG = logging.getLogger("train_mnist1d")

SEED = 0
THREADS = 1  # 2 OpenMP threads crawl (x10-20) when other processes share the 2 cores
CHANNELS = (32, 64, 64)
EPOCHS = 120
BATCH_SIZE = 100
LEARNING_RATE = 9e-3
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.05
MIN_TEST_ACCURACY = 0.97
METADATA = {"source": "bench/models/train_mnist1d.py", "dataset": "mnist1d make_dataset(get_dataset_args())"}


class Mnist1dCNN(nn.Module):
    """Conv1d(``kernel``)+BN+ReLU per width in ``channels`` (strides 1, 2, 2, ...), average pool, Linear."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS, kernel: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip((1, *channels[:-1]), channels, strict=True)):
            stride = 1 if index == 0 else 2
            conv = nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
            layers += [conv, nn.BatchNorm1d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(channels[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map signals [N, 1, 40] to logits [N, 10]."""
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def seed_everything(seed: int) -> None:
    """Seed torch and numpy, force deterministic kernels and a fixed thread count."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D locally (the package's default arguments, seed 42).

    Returns:
        ``(x_train, y_train, x_test, y_test)``; signals float32 [N, 1, 40], labels int64 [N].
    """
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x_train = data["x"].astype(np.float32)[:, None, :]
    x_test = data["x_test"].astype(np.float32)[:, None, :]
    return x_train, data["y"].astype(np.int64), x_test, data["y_test"].astype(np.int64)


def train(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, seed: int = SEED) -> None:
    """Train ``model`` in place: AdamW, one-cycle learning rate, light label smoothing."""
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE / 3, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps)
    run_epochs(model, optimizer, scheduler, (x, y), epochs=EPOCHS, batch_size=BATCH_SIZE, seed=seed,
               label_smoothing=LABEL_SMOOTHING, log_every=20)  # fmt: skip


def export_onnx(model: nn.Module, path: Path, variant: str = "") -> onnx.ModelProto:
    """Export the model with its metadata (see ``export.export_classifier``); ``variant`` joins the doc."""
    doc = f"MNIST-1D 1-D CNN for red_onnx benchmarks{variant}; test split: mnist1d_test.npz"
    return export_classifier(model, torch.zeros(1, 1, 40), "signal", path, doc, METADATA)


def onnxruntime_logits(path: Path, signals: np.ndarray) -> np.ndarray:
    """Logits of the ONNX file at ``path`` for ``signals``, single-threaded CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"signal": signals})[0]


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(target: Path, options: argparse.Namespace | None = None) -> dict[str, str]:
    """Train, export, check and write both files into ``target``; return their sha256 by name.

    ``options`` (``parse_args``) picks the seed, widths, kernel and file name; None: the defaults.
    """
    options = options or parse_args([])
    seed_everything(options.seed)
    x_train, y_train, x_test, y_test = load_split()
    model = build_model(options)
    start = time.perf_counter()
    train(model, x_train, y_train, options.seed)
    LOG.info("trained in %.1f s on %d threads", time.perf_counter() - start, THREADS)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    onnx_path, npz_path = target / f"{options.name}_cnn.onnx", target / "mnist1d_test.npz"
    export_onnx(model, onnx_path, variant_label(options))
    logits = onnxruntime_logits(onnx_path, x_test)
    diff = float(np.max(np.abs(logits - expected)))
    accuracy = float(np.mean(logits.argmax(axis=1) == y_test))
    LOG.info("test accuracy %.4f (onnxruntime); torch vs onnxruntime max |diff| %.2g", accuracy, diff)
    if diff > 1e-4 or accuracy < MIN_TEST_ACCURACY:
        raise RuntimeError(f"export check failed: |diff| {diff:.3g} (max 1e-4), accuracy {accuracy:.4f}")
    np.savez(npz_path, signal=x_test, label=y_test)
    return {path.name: sha256(path) for path in (onnx_path, npz_path)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults build the benchmark model ``mnist1d_cnn.onnx``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=cache_dir(), help="output folder (default: bench cache)")
    parser.add_argument("--check-determinism", action="store_true", help="train twice, compare sha256")
    parser.add_argument("--seed", type=int, default=SEED, help="init and batch-order seed")
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="conv widths")
    parser.add_argument("--kernel", type=int, default=5, help="odd conv kernel size")
    parser.add_argument("--name", default="mnist1d", help="writes NAME_cnn.onnx")
    args = parser.parse_args(argv)
    if args.kernel < 1 or args.kernel % 2 == 0 or min(args.channels) < 1:
        parser.error(f"--kernel {args.kernel} must be odd and positive, --channels positive")
    return args


def build_model(options: argparse.Namespace) -> Mnist1dCNN:
    """The untrained network the options describe."""
    return Mnist1dCNN(tuple(options.channels), options.kernel)


def variant_label(options: argparse.Namespace) -> str:
    """What sets a variant apart in the doc string; empty for the default model (unchanged bytes)."""
    default = parse_args([])
    if all(getattr(options, key) == getattr(default, key) for key in ("seed", "channels", "kernel")):
        return ""
    return f" (variant: seed {options.seed}, channels {options.channels}, kernel {options.kernel})"


def main() -> int:
    """Command-line entry point."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    digests = build(args.dir, args)
    for name, digest in digests.items():
        LOG.info("%s: sha256 %s", args.dir / name, digest)
    if args.check_determinism and build(args.dir, args) != digests:
        raise RuntimeError("a second run wrote different bytes: training is not deterministic")
    LOG.info("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
