"""Shared torch → ONNX export for the benchmark models (dev only: imports torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 17


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
