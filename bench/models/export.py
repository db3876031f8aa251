"""Shared torch → ONNX export for the benchmark models (dev only: imports torch)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 17
LOG = logging.getLogger(__name__)


def export_classifier(
    model: nn.Module,
    example: torch.Tensor,
    input_name: str,
    path: Path,
    doc: str,
    metadata: Mapping[str, str],
    *,
    preserve_batchnorm: bool = False,
) -> onnx.ModelProto:
    """Export ``model`` (eval, dynamic batch) to ``path`` atomically, with doc and metadata.

    BatchNormalization is folded into the convs unless ``preserve_batchnorm`` (no constant folding,
    ``TrainingMode.PRESERVE``: BN nodes kept, as in the bundled demo). Per-node doc strings
    (run-dependent text) are stripped so reruns give identical bytes.
    """
    keep = {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    torch.onnx.export(
        model,
        (example,),
        str(temp),
        input_names=[input_name],
        output_names=["logits"],
        dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
        **(keep if preserve_batchnorm else {}),
    )
    proto = onnx.load(str(temp))
    for node in proto.graph.node:
        node.doc_string = ""
    proto.doc_string = doc
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(temp))
    temp.replace(path)
    return proto


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
    """Train ``model`` in place: ``epochs`` passes over ``data`` in ``seed`` order, cross-entropy, one
    scheduler step per batch; the mean training loss logged every ``log_every`` epochs. Ends in eval."""
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
