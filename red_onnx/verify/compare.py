"""How far a candidate's output is from the reference's: the metrics and the element-wise pass rule.

Per output (``y`` the reference, ``y'`` the candidate, both taken in float64):

* ``max_abs_err`` = max |y' - y|.
* ``max_rel_err`` = max |y' - y| / max |y| — relative to the output's largest magnitude, not
  element-wise, so it is robust to zeros in ``y`` (the denominator is floored at 1e-30).
* ``rel_l2_err`` = ||y' - y||_2 / max(||y||_2, 1e-30), the quantity the fidelity budget bounds. For a
  text model's float ``[B, S, H]`` outputs with an attention mask, over the tokens the mask keeps
  (``token_rows``): padded tokens' outputs are masked out by every user of the embeddings, and in a
  batch of short sentences they are most of the tensor (59% of the positions of a 32-token batch).
* ``cosine`` of the flattened outputs (1.0 when both are zero, 0.0 when only one is).
* ``top1_agreement`` for 2-D ``[N, C]`` outputs with ``C > 1``: the fraction of rows whose argmax
  agrees.
* ``pooled_cosine`` for float 3-D ``[B, S, H]`` outputs with ``S > 1`` of text models (the caller
  gives the token weights: the attention mask, or ones): the least over rows of the cosine of the
  weighted mean over ``S``, the sentence embedding a user compares.
* Pass rule (float outputs): |y' - y| <= atol * scale + rtol * |y| element-wise, with
  ``scale = max(1, max |y|)`` — atol is relative to the output's magnitude — plus an allowance per element
  (the model's own noise, ``red_onnx.verify.noise``). ``needed_rtol`` is the smallest rtol that passes at the
  given atol (``inf`` when none does).
* Integer, bool and other non-float outputs must be equal. NaN or inf in the candidate where the
  reference is finite, a missing output or a shape mismatch fail with infinite errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

logger = logging.getLogger(__name__)

_REL_FLOOR = 1e-30
_TINY = float(np.finfo(np.float64).tiny)


@dataclass
class OutputCheck:
    """How far one output moved (worst over seeds, levels and references)."""

    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    rel_l2_err: float
    cosine: float
    top1_agreement: float | None
    needed_rtol: float
    passed: bool
    pooled_cosine: float | None = None


def _failed(name: str, shape: tuple[int, ...]) -> OutputCheck:
    inf = math.inf
    return OutputCheck(name, shape, inf, inf, inf, math.nan, None, inf, False)


def _norm(values: np.ndarray) -> float:
    """L2 norm without overflow for large magnitudes."""
    peak = float(np.abs(values).max(initial=0.0))
    if peak == 0.0:
        return 0.0
    return peak * float(np.sqrt(np.square(values / peak).sum()))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):
        return 1.0  # exact, free of rounding in the normalisation
    norm_a, norm_b = _norm(a), _norm(b)
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 if norm_a == norm_b else 0.0
    return float(np.clip(np.dot((a / norm_a).ravel(), (b / norm_b).ravel()), -1.0, 1.0))


def pooled_cosine(
    candidate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> float | None:
    """The least per-row cosine of the (mask-weighted) means over axis 1 of ``[B, S, H]`` outputs.

    None for other shapes, or a mask that is not ``[B, S]``. A row whose mask is all zero weighs
    every token alike.
    """
    if reference.ndim != 3 or reference.shape[1] < 2 or reference.dtype.kind != "f":
        return None
    weights = np.ones(reference.shape[:2]) if mask is None else np.asarray(mask, np.float64)
    if weights.shape != reference.shape[:2]:
        return None
    weights = np.where(weights.sum(axis=1, keepdims=True) > 0, weights, 1.0)
    weights = weights / weights.sum(axis=1, keepdims=True)
    pooled_c = np.einsum("bs,bsh->bh", weights, candidate.astype(np.float64))
    pooled_r = np.einsum("bs,bsh->bh", weights, reference.astype(np.float64))
    return min(_cosine(c, r) for c, r in zip(pooled_c, pooled_r, strict=True))


def token_rows(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """The ``[tokens, H]`` rows of a ``[B, S, H]`` output at the tokens a text model's mask keeps.

    None where the mask does not apply (no mask, another shape, a non-float output) or keeps every
    token (the whole output is then the same figure).
    """
    if mask is None or values.ndim != 3 or values.dtype.kind != "f" or np.shape(mask) != values.shape[:2]:
        return None
    kept = np.asarray(mask) > 0
    return None if kept.all() or not kept.any() else values[kept]


def _top1(candidate: np.ndarray, reference: np.ndarray) -> float | None:
    if reference.ndim != 2 or reference.shape[1] < 2 or reference.shape[0] == 0:
        return None
    if reference.dtype.kind not in "fiub":
        return None
    agree = np.argmax(candidate, axis=1) == np.argmax(reference, axis=1)
    return float(agree.mean())


def _errors(cand: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, float]:
    """Return max abs, max rel, rel L2 and cosine of two float64 arrays of equal shape."""
    diff = np.abs(cand - ref)
    max_abs = float(diff.max(initial=0.0))
    max_ref = float(np.abs(ref).max(initial=0.0))
    with np.errstate(over="ignore"):
        max_rel = max_abs / max(max_ref, _REL_FLOOR)
        rel_l2 = _norm(diff) / max(_norm(ref), _REL_FLOOR)
    return max_abs, max_rel, rel_l2, _cosine(cand, ref)


def _needed_rtol(cand: np.ndarray, ref: np.ndarray, atol: float) -> float:
    """Smallest rtol with |y' - y| <= atol * scale + rtol * |y| everywhere (inf if none)."""
    magnitude = np.abs(ref)
    scale = max(1.0, float(magnitude.max(initial=0.0)))
    slack = np.abs(cand - ref) - atol * scale
    over = slack > 0
    if not over.any():
        return 0.0
    if (magnitude[over] == 0.0).any():
        return math.inf
    with np.errstate(over="ignore"):
        return float((slack[over] / np.maximum(magnitude[over], _TINY)).max())


def _compare_float(
    name: str, cand: np.ndarray, ref: np.ndarray, rtol: float, atol: float, allowance: np.ndarray | float
) -> OutputCheck:
    c64, r64 = cand.astype(np.float64), ref.astype(np.float64)
    ref_finite, cand_finite = np.isfinite(r64), np.isfinite(c64)
    same_special = ~ref_finite & ((c64 == r64) | (np.isnan(c64) & np.isnan(r64)))
    bad = (ref_finite & ~cand_finite) | (~ref_finite & ~same_special)
    keep = ref_finite & cand_finite
    c64, r64 = np.where(keep, c64, 0.0), np.where(keep, r64, 0.0)
    max_abs, max_rel, rel_l2, cosine = _errors(c64, r64)
    needed = _needed_rtol(c64, r64, atol)
    if bad.any():
        max_abs = max_rel = rel_l2 = needed = math.inf
    scale = max(1.0, float(np.abs(r64).max(initial=0.0)))
    with np.errstate(over="ignore"):
        within = np.abs(c64 - r64) <= atol * scale + rtol * np.abs(r64) + np.where(keep, allowance, 0.0)
    passed = bool(not bad.any() and within.all())
    top1 = _top1(cand, ref)
    shape = tuple(ref.shape)
    return OutputCheck(name, shape, max_abs, max_rel, rel_l2, cosine, top1, needed, passed)


def _compare_exact(name: str, cand: np.ndarray, ref: np.ndarray) -> OutputCheck:
    equal = bool(np.array_equal(cand, ref))
    shape = tuple(ref.shape)
    if ref.dtype.kind not in "iub" or cand.dtype.kind not in "iub":
        if not equal:
            return _failed(name, shape)
        return OutputCheck(name, shape, 0.0, 0.0, 0.0, 1.0, None, 0.0, True)
    max_abs, max_rel, rel_l2, cosine = _errors(cand.astype(np.float64), ref.astype(np.float64))
    needed = 0.0 if equal else math.inf
    top1 = _top1(cand, ref)
    return OutputCheck(name, shape, max_abs, max_rel, rel_l2, cosine, top1, needed, equal)


def compare_outputs(
    name: str, candidate: np.ndarray | None, reference: np.ndarray, *,
    rtol: float = 1e-5, atol: float = 1e-6, allowance: np.ndarray | float = 0.0,
    mask: np.ndarray | None = None,
) -> OutputCheck:  # fmt: skip
    """Compare one candidate output with the reference (see the module docstring for the rules).

    Args:
        name: The output name, copied into the result.
        candidate: The candidate's array, or None when the candidate lacks this output.
        reference: The reference array.
        rtol: Relative tolerance of the pass rule.
        atol: Absolute tolerance, in units of ``max(1, max |reference|)``.
        allowance: Absolute difference allowed on top of the rule, per element (broadcast): the
            model's own numerical noise (float16 rounding, onnxruntime's level-to-level drift).
        mask: ``[B, S]`` token weights of ``pooled_cosine`` (a text model's attention mask, or ones);
            without one (not a text model) there is no ``pooled_cosine``.

    Returns:
        The metrics and verdict for this single comparison.
    """
    reference = np.asarray(reference)
    if candidate is None:
        logger.warning("the rewritten model has no output %r", name)
        return _failed(name, tuple(reference.shape))
    candidate = np.asarray(candidate)
    if candidate.shape != reference.shape:
        return _failed(name, tuple(reference.shape))
    if reference.dtype == object and any(isinstance(value, np.ndarray) for value in reference.flat):
        return _compare_ragged(name, candidate, reference, rtol, atol)
    if reference.dtype.kind == "f" and candidate.dtype.kind == "f":
        check = _compare_float(name, candidate, reference, rtol, atol, allowance)
        if mask is None or not math.isfinite(check.rel_l2_err):
            return check
        pooled = pooled_cosine(candidate, reference, mask)
        check = check if pooled is None else replace(check, pooled_cosine=pooled)
        tokens_c, tokens_r = token_rows(candidate, mask), token_rows(reference, mask)
        if tokens_c is None or tokens_r is None:
            return check
        _, _, rel_l2, _ = _errors(tokens_c.astype(np.float64), tokens_r.astype(np.float64))
        return replace(check, rel_l2_err=rel_l2)  # padded tokens' outputs are masked out downstream
    return _compare_exact(name, candidate, reference)


def _compare_ragged(
    name: str, candidate: np.ndarray, reference: np.ndarray, rtol: float, atol: float
) -> OutputCheck:
    """A sequence of tensors of different shapes (an object array of arrays), element by element.

    Each element is compared by the rules of its own type; the worst element gives the verdict.
    """
    checks = [
        compare_outputs(name, np.asarray(cand), np.asarray(ref), rtol=rtol, atol=atol)
        if isinstance(cand, np.ndarray) and isinstance(ref, np.ndarray)
        else _failed(name, tuple(reference.shape))
        for cand, ref in zip(candidate.flat, reference.flat, strict=True)
    ]
    if not checks:
        return OutputCheck(name, tuple(reference.shape), 0.0, 0.0, 0.0, 1.0, None, 0.0, True)
    return replace(merge_checks(checks), shape=tuple(reference.shape))


def merge_checks(checks: Sequence[OutputCheck]) -> OutputCheck:
    """Return the worst of several checks of one output.

    Errors and needed_rtol take the max, cosines and top-1 agreement the min (a NaN cosine wins),
    passed is True only if every check passed.
    """
    cosines = [c.cosine for c in checks]
    cosine = math.nan if any(math.isnan(v) for v in cosines) else min(cosines)
    top1s = [c.top1_agreement for c in checks if c.top1_agreement is not None]
    pooled = [c.pooled_cosine for c in checks if c.pooled_cosine is not None]
    return OutputCheck(
        name=checks[0].name,
        shape=checks[0].shape,
        max_abs_err=max(c.max_abs_err for c in checks),
        max_rel_err=max(c.max_rel_err for c in checks),
        rel_l2_err=max(c.rel_l2_err for c in checks),
        cosine=cosine,
        top1_agreement=min(top1s) if top1s else None,
        needed_rtol=max(c.needed_rtol for c in checks),
        passed=all(c.passed for c in checks),
        pooled_cosine=min(pooled) if pooled else None,
    )
