"""Train and export the bundled demo model: a small residual CNN on scikit-learn's digits.

Run from the repository root (torch is a dev-only dependency)::

    python models/train_digits.py

Writes, next to this file:

- ``digits_cnn.onnx``: input ``image`` float32 [batch, 1, 8, 8] (pixels scaled to [0, 1]),
  output ``logits`` float32 [batch, 10]. The BatchNormalization nodes are kept un-folded on
  purpose (the demo exercises the BN-folding pass); the residual Add and the Flatten -> Gemm head
  are plain ONNX ops.
- ``digits_test.npz``: the held-out split, arrays ``image`` float32 [N, 1, 8, 8] and ``label``
  int64 [N].

Training is seeded, single-threaded and CPU-only, so two runs write byte-identical files.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LOG = logging.getLogger("train_digits")

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "red_onnx" / "data"
ONNX_PATH = DATA / "digits_cnn.onnx"
NPZ_PATH = DATA / "digits_test.npz"

SEED = 0
TEST_SIZE = 0.2
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
MIN_TEST_ACCURACY = 0.95
OPSET = 17
METADATA = {"source": "models/train_digits.py", "dataset": "sklearn load_digits"}
DOC_STRING = (
    "Demo model for red_onnx: residual CNN (Conv+BN+ReLU stem, one residual block, "
    "stride-2 Conv+BN+ReLU, Flatten, Gemm+ReLU, Gemm) trained on sklearn load_digits "
    "8x8 images scaled to [0, 1]. "
    "BatchNormalization is kept un-folded on purpose. Held-out split: digits_test.npz beside the model."
)


class ResidualBlock(nn.Module):
    """Conv3x3 + BN + ReLU + Conv3x3 + BN, added to the block input, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to an NCHW tensor."""
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + x)


class DigitsCNN(nn.Module):
    """Stem, one residual block, a stride-2 downsampling conv, and a two-layer Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = ResidualBlock(32)
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, 1, 8, 8] to logits [N, 10]."""
        return self.head(self.down(self.block(self.stem(x))))


def seed_everything(seed: int) -> None:
    """Make torch deterministic, single-threaded and seeded.

    Args:
        seed: The torch and numpy seed.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load sklearn digits, scale pixels to [0, 1] and split 80/20, stratified, seed 0.

    Returns:
        ``(x_train, x_test, y_train, y_test)``; images float32 [N, 1, 8, 8], labels int64 [N].
    """
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, random_state=SEED, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def train(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray) -> None:
    """Train ``model`` in place: Adam, a little weight decay, cosine learning-rate schedule.

    Args:
        model: The network to train.
        x_train: Training images, float32 [N, 1, 8, 8].
        y_train: Training labels, int64 [N].
    """
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(x) + BATCH_SIZE - 1) // BATCH_SIZE
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS * steps_per_epoch)
    run_epochs(model, optimizer, scheduler, (x, y), epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    label_smoothing: float = 0.0,
    log_every: int = 10,
) -> None:
    """Train ``model`` in place, then switch it to eval mode.

    ``epochs`` passes over ``data`` in ``seed`` order, cross-entropy, one scheduler step per batch; the
    mean training loss is logged every ``log_every`` epochs. Shared by the demo and the bench models.
    """
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        if epoch % log_every == log_every - 1:
            LOG.info("epoch %d/%d: train loss %.4f", epoch + 1, epochs, total / len(x))
    model.eval()


def torch_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Run ``model`` (in eval mode) on ``images`` and return its logits as numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def export_onnx(model: nn.Module, path: Path) -> onnx.ModelProto:
    """Export ``model`` with BatchNormalization preserved, strip run-dependent text, add metadata.

    Args:
        model: The trained network, in eval mode.
        path: Where to write the ONNX file.

    Returns:
        The exported and post-processed model, as written.
    """
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.doc_string = ""  # may hold source paths / line numbers of this machine
    proto.doc_string = DOC_STRING
    proto.graph.doc_string = ""
    del proto.metadata_props[:]
    for key, value in METADATA.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def check_graph(proto: onnx.ModelProto) -> dict[str, int]:
    """Check the exported graph keeps BN (inference form), the residual Add and the Gemm head.

    Args:
        proto: The exported model.

    Returns:
        Count of nodes per op type.

    Raises:
        RuntimeError: If an expected op is missing or a BatchNormalization has training outputs.
    """
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    training = [a.i for n in bns for a in n.attribute if a.name == "training_mode"]
    if len(bns) != 4 or any(len(n.output) != 1 for n in bns) or any(training):
        raise RuntimeError(f"expected 4 single-output BatchNormalization nodes, got {counts}")
    has_flatten = counts.get("Flatten", 0) + counts.get("Reshape", 0) > 0
    if not (counts.get("Add", 0) >= 1 and counts.get("Gemm", 0) == 2 and has_flatten):
        raise RuntimeError(f"expected Add, Flatten/Reshape and 2 Gemm nodes, got {counts}")
    return counts


def check_onnxruntime(path: Path, images: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Run the ONNX file with onnxruntime and compare its logits with torch's to 1e-5.

    Args:
        path: The ONNX file.
        images: Input images, float32 [N, 1, 8, 8].
        expected: Torch logits for ``images``.

    Returns:
        The onnxruntime logits.

    Raises:
        RuntimeError: If the largest absolute difference exceeds 1e-5.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images})[0]
    diff = float(np.max(np.abs(logits - expected)))
    if diff > 1e-5:
        raise RuntimeError(f"onnxruntime differs from torch by {diff:.3g} > 1e-5")
    LOG.info("onnxruntime vs torch: max |diff| = %.3g", diff)
    return logits


def sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    """Train, export, verify and write the demo model and its test split."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    seed_everything(SEED)
    x_train, x_test, y_train, y_test = load_split()
    model = DigitsCNN()
    train(model, x_train, y_train)
    expected = torch_logits(model, x_test)
    torch_acc = float(np.mean(expected.argmax(axis=1) == y_test))
    proto = export_onnx(model, ONNX_PATH)
    counts = check_graph(proto)
    logits = check_onnxruntime(ONNX_PATH, x_test, expected)
    accuracy = float(np.mean(logits.argmax(axis=1) == y_test))
    if accuracy < MIN_TEST_ACCURACY:
        raise RuntimeError(f"test accuracy {accuracy:.4f} < {MIN_TEST_ACCURACY}: train longer")
    np.savez_compressed(NPZ_PATH, image=x_test, label=y_test)
    LOG.info(
        "train %d, test %d; test accuracy torch %.4f, onnxruntime %.4f",
        len(y_train),
        len(y_test),
        torch_acc,
        accuracy,
    )
    LOG.info("ops: %s", dict(sorted(counts.items())))
    for path in (ONNX_PATH, NPZ_PATH):
        LOG.info("%s: %d bytes, sha256 %s", path.name, path.stat().st_size, sha256(path))
    LOG.info("done in %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
