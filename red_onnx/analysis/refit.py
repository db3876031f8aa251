"""Least-squares refit of a consumer after some of its input channels are removed (analysis, pure numpy).

A consumer reads ``C`` input channels; its weight in matrix form is ``V`` (``[C·B, O]``, ``B`` rows per
channel: 1 for 1×1 Conv, Gemm and MatMul, ``k²`` for a k×k Conv in im2col form, channel ``c`` owning
rows ``c·B .. c·B + B − 1``), and its output over the sampled positions is ``y = Xᵀ·V + 1·bᵀ`` with ``X``
the input rows (``[C·B, n]``). Everything here works from the augmented Gram matrix

    G1 = [[G, s], [sᵀ, n]],    G = X·Xᵀ,  s = X·1,  n = number of samples

(float64; ``red_onnx.search.sensitivity.capture_grams`` captures it with the constant channel last), never
from ``X`` itself.

**The refit.** Rows ``R`` are removed, rows ``K`` kept. With the change ``D = V'_K − V_K`` and the bias
change ``δb`` free (unpenalised), the refit minimises

    f(D, δb) = ‖X_Kᵀ·V'_K + 1·δbᵀ − Xᵀ·V‖² + λ·‖D‖²  =  ‖Xᵀ·ΔV + 1·δbᵀ‖² + λ·‖D‖²,

where ``ΔV`` is the change of the whole weight (``D`` on ``K``, ``−V_R`` on ``R``). Setting the
derivative in ``δb`` to zero, ``sᵀ·ΔV + n·δbᵀ = 0``:

    δb = −ΔVᵀ·s / n = (V_Rᵀ·s_R − Dᵀ·s_K) / n,

and the residual becomes the centred ``X̃ᵀ·ΔV`` (``X̃ = X − x̄·1ᵀ``), so with the centred Gram
``G_c = G − s·sᵀ/n``

    f(D) = tr(ΔVᵀ·G_c·ΔV) + λ·‖D‖²,    D = (G_c,KK + λ·I)⁻¹ · G_c,KR · V_R.

Without a free bias (``free_bias=False``) ``G_c`` is ``G`` itself and ``δb = 0``.

**Greedy OBS.** With ``H = G_c + λ·I`` (one matrix for the costs, the downdates and the closed form),
removing a set ``R`` at the optimal ``D`` costs

    E(R) = min_D tr(ΔVᵀ·H·ΔV) = ‖X̃ᵀ·ΔV‖² + λ·‖D‖² + λ·‖V_R‖² = tr(V_Rᵀ · ([H⁻¹]_RR)⁻¹ · V_R),

the refit objective ``f`` plus ``λ·‖V_R‖²`` (the penalty also counts the removed rows' change, which
is fixed at ``−V_R``: at equal data error, removing small weights is preferred). The optimal ``D`` is
the refit's. Removing channels one at a time with the OBS downdate of ``H⁻¹`` and the compensation of
``V`` is exact, so the costs of the steps add up to ``E`` of the removed set.

**k×k kernels from channel Grams.** ``capture_grams`` records a channel Gram (``[C + 1, C + 1]``), not
the im2col one. Under the approximation of ``red_onnx.search.sensitivity`` (taps independent about a
shared mean: centred im2col Gram ``G_c ⊗ I_B``) the problem splits by tap: pass the channel Gram with
``block=1`` and ``V`` as ``[C, B·O]`` (each column a (tap, output) pair); the rows of ``V'`` are the same,
and the bias change of an output is the sum of its taps' ``δb``. ``H⁻¹`` then has ``B``-fold smaller sides.

**Jitter.** ``λ = 0`` uses ``λ = JITTER · mean(diag(G_c))`` instead (``H`` must be positive definite);
dead channels (all-zero rows, or constant ones once centred) then cost ``≈ 0`` and keep ``D = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

#: ``λ = 0`` becomes ``JITTER · mean(diag(G_c))``, and a Cholesky factorisation that fails (a centred Gram
#: whose rounding errors exceed ``λ``) is retried with that much more on the diagonal, ×100 per try.
JITTER = 1e-12
#: Tries of the Cholesky factorisation before giving up.
CHOLESKY_TRIES = 8
#: The greedy OBS path drops removed rows from ``H⁻¹`` once this inverse fraction of them is removed
#: (4: a quarter); until then they are zeroed in place. A 3072-row FFN path: 6.0 s → 2.9 s.
COMPACT_AFTER = 4
#: Default ridge grid of :func:`choose_lambda`, in units of ``mean(diag(G_c))`` of the fit split.
DEFAULT_GRID = (1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)


class ObsPath(NamedTuple):
    """A greedy OBS removal path: ``order[t]`` is the channel removed at step ``t``."""

    order: np.ndarray  # [steps] int64, channel indices
    cost: np.ndarray  # [steps] float64, cumulative E(removed so far) after each step


class _System(NamedTuple):
    centred: np.ndarray  # G_c (G itself without a free bias), [rows, rows] float64
    sums: np.ndarray  # s, [rows]
    samples: float  # n
    lam: float  # the effective λ (the jitter for λ = 0)
    scale: float  # mean(diag(G_c)): the unit of λ and of the jitter
    free_bias: bool


def augmented_gram(rows: np.ndarray) -> np.ndarray:
    """``G1 = [x; 1]·[x; 1]ᵀ = [[X·Xᵀ, s], [sᵀ, n]]`` of input rows ``X`` (``[rows, samples]``), float64.

    The matrix ``capture_grams`` accumulates.
    """
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"input rows must be [rows, samples], got shape {x.shape}")
    augmented = np.vstack([x, np.ones((1, x.shape[1]))])
    return augmented @ augmented.T


def lambda_scale(gram: np.ndarray, *, free_bias: bool = True) -> float:
    """``mean(diag(G_c))`` of ``G1`` (of ``G`` without a free bias): the unit of ``λ``; 1 where it is 0."""
    g1 = np.asarray(gram, dtype=np.float64)
    n = g1[-1, -1]
    diag = np.diag(g1)[:-1] - (g1[:-1, -1] ** 2 / n if free_bias and n > 0 else 0.0)
    scale = float(np.mean(np.maximum(diag, 0.0))) if diag.size else 0.0
    return scale if scale > 0.0 else 1.0


def block_rows(channels: Sequence[int] | np.ndarray, block: int) -> np.ndarray:
    """Rows of ``V`` owned by ``channels`` (channel ``c``: rows ``c·block .. c·block + block − 1``)."""
    c = np.asarray(channels, dtype=np.int64).reshape(-1)
    return (c[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def _system(gram: np.ndarray, weight: np.ndarray, lam: float, free_bias: bool) -> tuple[_System, np.ndarray]:
    """The centred Gram and effective ``λ`` of ``G1``, and ``V`` in float64 (shapes checked)."""
    g1 = np.asarray(gram, dtype=np.float64)
    v = np.asarray(weight, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"V must be [rows, outputs], got shape {v.shape}")
    rows = v.shape[0]
    if g1.shape != (rows + 1, rows + 1):
        raise ValueError(f"G1 must be [rows + 1, rows + 1] for V of shape {v.shape}, got {g1.shape}")
    if not np.isfinite(g1).all() or not np.isfinite(v).all():
        raise ValueError("G1 and V must be finite")
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"λ must be finite and >= 0, got {lam}")
    s, n = g1[:-1, -1], float(g1[-1, -1])
    if free_bias and n <= 0:
        raise ValueError(f"the sample count G1[-1, -1] must be > 0 for a free bias, got {n}")
    centred = g1[:-1, :-1] - np.outer(s, s) / n if free_bias else g1[:-1, :-1].copy()
    centred = (centred + centred.T) / 2
    scale = lambda_scale(g1, free_bias=free_bias)
    effective = float(lam) if lam > 0 else JITTER * scale
    return _System(centred, s, n, effective, scale, free_bias), v


def _cholesky(matrix: np.ndarray, scale: float) -> np.ndarray:
    """Lower Cholesky factor of an SPD ``matrix``; rounding-level indefiniteness gets a little jitter."""
    extra = 0.0
    for attempt in range(CHOLESKY_TRIES):
        try:
            return np.linalg.cholesky(matrix + extra * np.eye(len(matrix)) if extra else matrix)
        except np.linalg.LinAlgError:
            extra = JITTER * scale * 100.0**attempt
    raise ValueError("H = G_c + λ·I is not positive definite even with jitter (is G1 a Gram matrix?)")


def _triangular_solve(lower: np.ndarray, rhs: np.ndarray, *, transpose: bool = False) -> np.ndarray:
    """``L⁻¹·rhs`` (or ``L⁻ᵀ·rhs``); numpy has no triangular solver, so LAPACK's general one."""
    return np.linalg.solve(lower.T if transpose else lower, rhs)


def _cho_solve(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``(L·Lᵀ)⁻¹·rhs``."""
    return _triangular_solve(lower, _triangular_solve(lower, rhs), transpose=True)


def _split(keep_rows: Sequence[int] | np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, removed) row indices; ``keep_rows`` is indices or a boolean mask over the rows."""
    keep = np.asarray(keep_rows)
    if keep.dtype == bool:
        if keep.shape != (rows,):
            raise ValueError(f"a boolean keep mask must have {rows} entries, got shape {keep.shape}")
        keep = np.flatnonzero(keep)
    keep = keep.astype(np.int64).reshape(-1)
    if keep.size and (keep.min() < 0 or keep.max() >= rows):
        raise ValueError(f"keep_rows must lie in [0, {rows}), got {keep.min()}..{keep.max()}")
    if np.unique(keep).size != keep.size:
        raise ValueError("keep_rows has repeated rows")
    if keep.size == 0:
        raise ValueError("removing every row leaves nothing to refit (keep at least one channel)")
    return keep, np.setdiff1d(np.arange(rows), keep)


def _regression(system: _System, keep: np.ndarray, removed: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``(G_c,KK + λ·I)⁻¹ · rhs``: the ridge regression of the removed rows on the kept ones."""
    h = system.centred[np.ix_(keep, keep)]
    h[np.diag_indices_from(h)] += system.lam
    return _cho_solve(_cholesky(h, system.scale), rhs)


def _change(system: _System, v: np.ndarray, keep: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """``D = (G_c,KK + λ·I)⁻¹ · G_c,KR · V_R``."""
    if removed.size == 0:
        return np.zeros((keep.size, v.shape[1]))
    return _regression(system, keep, removed, system.centred[np.ix_(keep, removed)] @ v[removed])


def _bias(system: _System, v: np.ndarray, keep: np.ndarray, removed: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``δb = (V_Rᵀ·s_R − Dᵀ·s_K) / n`` (zero without a free bias)."""
    if not system.free_bias:
        return np.zeros(v.shape[1])
    return (system.sums[removed] @ v[removed] - system.sums[keep] @ d) / system.samples


def _augmented_change(
    v: np.ndarray, keep: np.ndarray, removed: np.ndarray, d: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """``W = [ΔV; δbᵀ]`` (``[rows + 1, O]``): the output changes by ``[X; 1]ᵀ·W``."""
    w = np.empty((v.shape[0] + 1, v.shape[1]))
    w[keep] = d
    w[removed] = -v[removed]
    w[-1] = bias
    return w


def _trace_form(gram: np.ndarray, w: np.ndarray) -> float:
    """``tr(Wᵀ·G·W)``, clipped at 0 (rounding)."""
    return float(max(np.einsum("io,io->", w, np.asarray(gram, dtype=np.float64) @ w), 0.0))


def mixing(
    gram: np.ndarray, keep_rows: Sequence[int] | np.ndarray, lam: float, *, free_bias: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The refit as a regression of the removed rows' inputs on the kept ones: ``A`` and the intercept.

    ``A = (G_c,KK + λ·I)⁻¹·G_c,KR`` (``[K, R]``, in the order of ``keep_rows`` and of the removed rows,
    ascending) and ``c = (s_R − Aᵀ·s_K) / n`` (zero without a free bias): for any consumer weight ``V``,
    :func:`refit` is ``V'_K = V_K + A·V_R`` and ``δb = V_Rᵀ·c``. So removing row ``j`` is a merge into
    every kept row ``i`` with scale ``A_ij``, and ``c_j`` is its offset: it does not depend on ``V``.

    Returns:
        ``(A, c)``; empty when nothing is removed.
    """
    rows = np.asarray(gram).shape[0] - 1
    system, _ = _system(gram, np.zeros((rows, 1)), lam, free_bias)
    keep, removed = _split(keep_rows, rows)
    if removed.size == 0:
        return np.zeros((keep.size, 0)), np.zeros(0)
    a = _regression(system, keep, removed, system.centred[np.ix_(keep, removed)])
    if not system.free_bias:
        return a, np.zeros(removed.size)
    return a, (system.sums[removed] - a.T @ system.sums[keep]) / system.samples


def refit(
    gram: np.ndarray,
    weight: np.ndarray,
    keep_rows: Sequence[int] | np.ndarray,
    lam: float,
    *,
    free_bias: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Remove the rows of ``V`` not in ``keep_rows`` and refit the kept ones by ridge least squares.

    Minimises ``‖X_Kᵀ·V'_K + 1·δbᵀ − Xᵀ·V‖² + λ·‖V'_K − V_K‖²`` over ``V'_K`` and ``δb``:

        V'_K = V_K + (G_c,KK + λ·I)⁻¹ · G_c,KR · V_R,    δb = (V_Rᵀ·s_R − (V'_K − V_K)ᵀ·s_K) / n.

    Args:
        gram: ``G1 = [[G, s], [sᵀ, n]]``, ``[rows + 1, rows + 1]``.
        weight: ``V``, the consumer weight as ``[rows, O]`` (``rows = C·B``).
        keep_rows: Kept row indices (the order of the result) or a boolean mask over the rows.
        lam: Ridge strength ``λ >= 0`` in the units of ``G`` (0: a jitter of ``JITTER·mean diag``).
        free_bias: Whether the bias may change; if not, ``G`` is used uncentred and ``δb = 0``.

    Returns:
        ``V'_K`` (``[len(keep_rows), O]``, float64) and ``δb`` (``[O]``), to be added to the bias.

    Raises:
        ValueError: Mismatched shapes, repeated or out-of-range rows, every row removed, ``λ < 0``.
    """
    system, v = _system(gram, weight, lam, free_bias)
    keep, removed = _split(keep_rows, v.shape[0])
    if removed.size == 0:
        return v[keep].copy(), np.zeros(v.shape[1])
    d = _change(system, v, keep, removed)
    return v[keep] + d, _bias(system, v, keep, removed, d)


def refit_error(
    gram: np.ndarray,
    weight: np.ndarray,
    keep_rows: Sequence[int] | np.ndarray,
    lam: float,
    *,
    free_bias: bool = True,
) -> float:
    """``‖X_Kᵀ·V'_K + 1·δbᵀ − Xᵀ·V‖²`` of :func:`refit`, from ``G1`` alone.

    ``tr(Wᵀ·G1·W)`` with ``W = [ΔV; δbᵀ]``: the data term only, no penalty (with a free bias it equals
    ``tr(ΔVᵀ·G_c·ΔV)``). Divide by :func:`output_energy` for the squared relative error.
    """
    return validation_error(gram, gram, weight, keep_rows, lam, free_bias=free_bias)


def penalised_error(
    gram: np.ndarray,
    weight: np.ndarray,
    keep_rows: Sequence[int] | np.ndarray,
    lam: float,
    *,
    free_bias: bool = True,
) -> float:
    """``E = tr(ΔVᵀ·(G_c + λ·I)·ΔV)`` at the refit: the objective :func:`greedy_obs` adds up.

    Equals ``refit_error + λ·‖V'_K − V_K‖² + λ·‖V_R‖²`` (``λ`` the effective one: the jitter for 0).
    """
    system, v = _system(gram, weight, lam, free_bias)
    keep, removed = _split(keep_rows, v.shape[0])
    delta = np.zeros_like(v)
    delta[keep] = _change(system, v, keep, removed)
    delta[removed] = -v[removed]
    data = np.einsum("io,io->", delta, system.centred @ delta)
    return float(max(data + system.lam * np.einsum("io,io->", delta, delta), 0.0))


def output_energy(gram: np.ndarray, weight: np.ndarray, *, centred: bool = False) -> float:
    """``‖Xᵀ·V‖² = tr(Vᵀ·G·V)``: the squared norm of the consumer output without its bias.

    Uncentred by default: the denominator of ``red_onnx.search.sensitivity`` (``trace(G·H)``), so that
    ``sqrt(refit_error / output_energy)`` is on the scale of ``LocalSensitivity.error``. ``centred``:
    ``tr(Vᵀ·G_c·V)``, the output's energy about its mean (the part no bias change can remove).
    """
    g1 = np.asarray(gram, dtype=np.float64)
    v = np.asarray(weight, dtype=np.float64)
    g = g1[:-1, :-1]
    if centred:
        g = g - np.outer(g1[:-1, -1], g1[:-1, -1]) / g1[-1, -1]
    return float(max(np.einsum("io,io->", v, g @ v), 0.0))


def validation_error(
    gram_fit: np.ndarray,
    gram_val: np.ndarray,
    weight: np.ndarray,
    keep_rows: Sequence[int] | np.ndarray,
    lam: float,
    *,
    free_bias: bool = True,
) -> float:
    """Squared output error on the validation samples of the refit fitted on the fit samples.

    ``tr(Wᵀ·G1_val·W)`` with ``W = [ΔV; δbᵀ]`` of ``refit(G1_fit, …)``: the bias change is the fit
    split's too, so the error includes the shift of the validation mean.
    """
    system, v = _system(gram_fit, weight, lam, free_bias)
    keep, removed = _split(keep_rows, v.shape[0])
    if removed.size == 0:
        return 0.0
    d = _change(system, v, keep, removed)
    return _trace_form(gram_val, _augmented_change(v, keep, removed, d, _bias(system, v, keep, removed, d)))


def choose_lambda_gram(
    gram_fit: np.ndarray,
    gram_val: np.ndarray,
    weight: np.ndarray,
    keep_rows: Sequence[int] | np.ndarray,
    grid: Sequence[float] | None = None,
    *,
    free_bias: bool = True,
) -> float:
    """The ``λ`` of ``grid`` whose refit on ``G1_fit`` has the least :func:`validation_error` on ``G1_val``.

    Args:
        gram_fit: ``G1_fit``, the augmented Gram of the fit split.
        gram_val: ``G1_val``, the augmented Gram of the validation split.
        weight: ``V``, ``[rows, O]``.
        keep_rows: Kept rows (indices or mask).
        grid: Multipliers of ``mean(diag(G_c))`` of ``G1_fit`` (default :data:`DEFAULT_GRID`).
        free_bias: As in :func:`refit`.

    Returns:
        The absolute ``λ`` for ``G1_fit``. ``λ`` is in the units of the Gram, which grows with the
        sample count: for a Gram over ``m`` samples scale it by ``m / n_fit`` (or keep the multiplier
        ``λ / lambda_scale(G1_fit)``). Ties go to the larger ``λ``.
    """
    multipliers = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).reshape(-1)
    if multipliers.size == 0 or (multipliers < 0).any():
        raise ValueError("the λ grid must be non-empty and >= 0")
    unit = lambda_scale(gram_fit, free_bias=free_bias)
    candidates = np.sort(multipliers)[::-1] * unit  # largest first: argmin keeps the first of a tie
    errors = [
        validation_error(gram_fit, gram_val, weight, keep_rows, float(lam), free_bias=free_bias)
        for lam in candidates
    ]
    return float(candidates[int(np.argmin(errors))])


def choose_lambda(
    rows_fit: np.ndarray,
    rows_val: np.ndarray,
    weight: np.ndarray,
    keep_rows: Sequence[int] | np.ndarray,
    grid: Sequence[float] | None = None,
    *,
    free_bias: bool = True,
) -> float:
    """:func:`choose_lambda_gram` from input rows ``X_fit``, ``X_val`` (``[rows, samples]`` each)."""
    return choose_lambda_gram(
        augmented_gram(rows_fit), augmented_gram(rows_val), weight, keep_rows, grid, free_bias=free_bias
    )


class _ObsState:
    """One system of the greedy OBS path: ``H⁻¹`` and the compensated ``V``, compacted as rows go."""

    def __init__(self, gram: np.ndarray, weight: np.ndarray, lam: float, block: int, free_bias: bool) -> None:
        system, v = _system(gram, weight, lam, free_bias)
        rows = v.shape[0]
        if block < 1 or rows % block:
            raise ValueError(f"{rows} rows do not split into channels of {block} rows")
        self.channels = rows // block
        self.block = block
        self.offsets = np.arange(block)
        h = system.centred.copy()
        h[np.diag_indices_from(h)] += system.lam
        lower_inv = _triangular_solve(_cholesky(h, system.scale), np.eye(rows))
        self.inverse = lower_inv.T @ lower_inv  # H⁻¹, symmetric positive definite by construction
        self.full = v.copy()  # the caller's shape: V is compacted below, its rows copied back at the end
        self.v = self.full
        self.position = np.arange(rows)  # row -> its index in the compacted H⁻¹ and V (-1: removed)
        self.present = np.arange(rows)  # compacted index -> row
        self.dropped = np.zeros(rows, bool)  # over the compacted indices: removed since the last compaction

    def costs(self, live: np.ndarray) -> np.ndarray:
        """Each live channel's own removal cost ``tr(V_Jᵀ·([H⁻¹]_JJ)⁻¹·V_J)``."""
        inverse, v = self.inverse, self.v
        if self.block == 1:
            at = self.position[live]
            return np.einsum("io,io->i", v[at], v[at]) / np.diag(inverse)[at]
        index = self.position[live[:, None] * self.block + self.offsets[None, :]]  # [m, B]
        blocks = inverse[index[:, :, None], index[:, None, :]]  # [m, B, B]: [H⁻¹]_JJ per channel
        vj = v[index]  # [m, B, O]
        return np.einsum("mbo,mbo->m", vj, np.linalg.solve(blocks, vj))

    def remove(self, channels: np.ndarray) -> float:
        """Remove ``channels`` together (downdate ``V`` and ``H⁻¹``); their joint cost."""
        v = self.v
        j = self.position[(channels[:, None] * self.block + self.offsets[None, :]).reshape(-1)]
        columns = self.inverse[:, j]  # H⁻¹_{:,J} (a copy)
        if j.size == 1:
            pivot = columns[j[0], 0]
            joint = float(v[j[0]] @ v[j[0]]) / pivot
            v -= np.outer(columns[:, 0] / pivot, v[j[0]])
            half = columns[:, 0] / np.sqrt(pivot)
            self.inverse -= np.outer(half, half)
        else:
            pivots = columns[j]  # [H⁻¹]_JJ = L·Lᵀ
            factor = _cholesky(pivots, float(np.mean(np.diag(pivots))))
            solved = _cho_solve(factor, v[j])
            joint = float(np.einsum("io,io->", v[j], solved))  # tr(V_Jᵀ·([H⁻¹]_JJ)⁻¹·V_J)
            v -= columns @ solved
            half_t = _triangular_solve(factor, columns.T)  # L⁻¹·H⁻¹_{J,:}
            self.inverse -= half_t.T @ half_t
        v[j] = 0.0
        self.dropped[j] = True
        if (
            self.dropped.sum() * COMPACT_AFTER >= self.dropped.size
        ):  # drop the removed rows: later steps cost less
            kept = np.flatnonzero(~self.dropped)
            self.full[self.present] = v
            self.inverse, self.v, self.present = self.inverse[np.ix_(kept, kept)], v[kept], self.present[kept]
            self.position[:] = -1
            self.position[self.present] = np.arange(self.present.size)
            self.dropped = np.zeros(self.present.size, bool)
        else:
            self.inverse[j, :] = 0.0
            self.inverse[:, j] = 0.0
        return joint

    def compensated(self) -> np.ndarray:
        """``V`` after the removals so far (the removed rows zero), in the caller's shape."""
        self.full[self.present] = self.v
        return self.full


def _obs_path(
    gram: np.ndarray,
    weight: np.ndarray,
    n_remove: int,
    lam: float,
    block: int,
    candidates: Sequence[int] | np.ndarray | None,
    free_bias: bool,
    batch: int = 1,
) -> tuple[ObsPath, np.ndarray]:
    """:func:`greedy_obs`, also returning the compensated ``V`` (the removed rows zero)."""
    state = _ObsState(gram, weight, lam, block, free_bias)
    path = _joint_path([state], n_remove, candidates, batch)
    return path, state.compensated()


def _joint_path(
    states: Sequence[_ObsState],
    n_remove: int,
    candidates: Sequence[int] | np.ndarray | None,
    batch: int,
    members: Sequence[np.ndarray] | None = None,
    channels: int | None = None,
) -> ObsPath:
    """The greedy path over systems sharing channels: a channel's cost is the sum of its costs.

    ``members[s]`` (with ``channels``, the channels in all): the channel of each of system ``s``'s
    channels, where a system reads only some of them; a channel whose removal would leave a system
    with none is not taken, and the path ends early where no channel can go. Without ``members``
    every system reads every channel in the same order.
    """
    if members is None:
        channels = states[0].channels
        if any(state.channels != channels for state in states):
            raise ValueError(f"systems of {sorted({s.channels for s in states})} channels share no channels")
        if n_remove >= channels:
            raise ValueError("removing every channel leaves nothing to refit (keep at least one channel)")
        members = [np.arange(channels)] * len(states)
    elif channels is None or len(members) != len(states):
        raise ValueError("systems reading some channels need their channels and the channel count")
    position = np.full((len(states), channels), -1)
    for index, (state, member) in enumerate(zip(states, members, strict=True)):
        if member.size != state.channels or np.unique(member).size != member.size:
            raise ValueError(f"system {index} has {state.channels} channels, {member.size} distinct given")
        position[index, member] = np.arange(member.size)
    pool = np.arange(channels) if candidates is None else np.unique(np.asarray(candidates, dtype=np.int64))
    if pool.size and (pool.min() < 0 or pool.max() >= channels):
        raise ValueError(f"candidates must lie in [0, {channels})")
    if not 0 <= n_remove <= pool.size:
        raise ValueError(f"cannot remove {n_remove} of {pool.size} candidate channels")
    left = np.array([state.channels for state in states])  # channels each system still has
    alive = np.ones(pool.size, bool)
    order = np.zeros(n_remove, np.int64)
    cost = np.zeros(n_remove)
    total = 0.0
    step = 0
    while step < n_remove:
        live = pool[alive]
        local = position[:, live]  # [systems, live]
        costs = np.zeros(live.size)
        for index, state in enumerate(states):
            inside = local[index] >= 0
            costs[inside] += state.costs(local[index, inside])
        last = ((local >= 0) & (left[:, None] <= 1)).any(axis=0)  # would empty a system
        costs[last] = np.inf
        picks = _batch(np.argsort(costs, kind="stable"), costs, local >= 0, left, min(batch, n_remove - step))
        if picks.size == 0:
            return ObsPath(order[:step], cost[:step])
        removed = live[picks]
        alive[np.flatnonzero(alive)[picks]] = False
        joint = 0.0
        for index, state in enumerate(states):
            inside = local[index, picks] >= 0
            if inside.any():
                joint += max(state.remove(local[index, picks][inside]), 0.0)
                left[index] -= int(inside.sum())
        # within a batch, the channels' own costs in order; the batch's end carries the joint cost
        steps = total + np.cumsum(np.maximum(costs[picks], 0.0))
        total += joint
        steps[-1] = total
        take = picks.size
        order[step : step + take], cost[step : step + take] = removed, np.minimum(steps, total)
        step += take
    return ObsPath(order, cost)


def _batch(
    ranked: np.ndarray, costs: np.ndarray, inside: np.ndarray, left: np.ndarray, take: int
) -> np.ndarray:
    """The cheapest ``take`` channels (indices in ``ranked`` order) that leave every system a channel."""
    if take == 1 or bool((left > take).all()):
        first = ranked[:take]
        return first[np.isfinite(costs[first])]
    picks: list[int] = []
    remaining = left.copy()
    for index in ranked:
        if len(picks) == take or not np.isfinite(costs[index]):
            break
        hit = inside[:, index]
        if (remaining[hit] > 1).all():
            remaining[hit] -= 1
            picks.append(int(index))
    return np.array(picks, np.int64)


def greedy_obs(
    gram: np.ndarray,
    weight: np.ndarray,
    n_remove: int,
    lam: float,
    block: int = 1,
    candidates: Sequence[int] | np.ndarray | None = None,
    *,
    free_bias: bool = True,
    batch: int = 1,
) -> ObsPath:
    """Greedy structured OBS: remove ``n_remove`` whole channels (blocks of ``block`` rows), cheapest first.

    With ``H = G_c + λ·I``, removing channel ``j`` (rows ``J``) costs ``tr(V_Jᵀ·([H⁻¹]_JJ)⁻¹·V_J)``
    (``‖V_j‖² / [H⁻¹]_jj`` for ``block = 1``); then

        V ← V − H⁻¹_{:,J}·([H⁻¹]_JJ)⁻¹·V_J,    H⁻¹ ← H⁻¹ − H⁻¹_{:,J}·([H⁻¹]_JJ)⁻¹·H⁻¹_{J,:},

    and ``J`` is dropped, so later costs see the compensated weights. The cumulative cost after a step
    is ``E(R) = tr(ΔVᵀ·H·ΔV) = ‖X̃ᵀ·ΔV‖² + λ·‖ΔV‖²`` at the closed-form refit of the removed set ``R``
    (:func:`penalised_error`): the refit objective plus ``λ·‖V_R‖²``. The kept rows of the compensated
    ``V`` are those of :func:`refit` (call it for them and for the bias change).

    Args:
        gram: ``G1 = [[G, s], [sᵀ, n]]``, ``[C·B + 1, C·B + 1]``.
        weight: ``V``, the consumer weight as ``[C·B, O]``.
        n_remove: Channels to remove (fewer than ``C``, at most ``len(candidates)``).
        lam: Ridge strength ``λ >= 0`` (0: a jitter of ``JITTER·mean diag``).
        block: Rows per channel ``B``.
        candidates: Channels that may be removed (default all); the others are kept and compensate.
        free_bias: As in :func:`refit`.
        batch: Channels removed per step: the ``batch`` cheapest by their own costs, then one joint
            downdate (their joint cost, exact for the set). 1 is the greedy path; wide groups take more
            (one ``[C, batch]`` update instead of ``batch`` rank-one ones, BLAS-3 instead of memory-bound).

    Returns:
        The removal order (channel indices) and the cumulative cost ``E`` after each step (within a
        batch, its channels' own costs added up, and ``E`` of the set at the batch's last step).

    Raises:
        ValueError: Mismatched shapes, ``n_remove`` out of range, removing every channel.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    path, _ = _obs_path(gram, weight, n_remove, lam, block, candidates, free_bias, batch)
    return path


def greedy_obs_joint(
    systems: Sequence[tuple[np.ndarray, np.ndarray, float, int, bool]],
    n_remove: int,
    *,
    batch: int = 1,
    members: Sequence[np.ndarray] | None = None,
    channels: int | None = None,
) -> ObsPath:
    """:func:`greedy_obs` over several consumers that share channels, each with its own Gram.

    ``systems``: per consumer (or consumers sharing an input), ``(G1, V, λ, block, free_bias)`` over
    their channels (``block`` rows each, which may differ between systems). Removing a channel costs
    the sum of its costs in every system that reads it; each system's ``H⁻¹`` and ``V`` are downdated
    on their own. With one system, :func:`greedy_obs`.

    Args:
        systems: The systems.
        n_remove: Channels to remove (the path ends early where every channel left is the last of
            some system).
        batch: Channels removed per step, as in :func:`greedy_obs`.
        members: Per system, the channel (of ``channels``) of each of its channels, where systems read
            different channels (Split and Concat segments); None: every system reads all, in order.
        channels: The channel count, with ``members``.

    Raises:
        ValueError: No system, systems over different channel counts without ``members``, or as
            :func:`greedy_obs`.
    """
    if not systems:
        raise ValueError("the joint greedy path needs at least one system")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    states = [_ObsState(gram, weight, lam, block, bias) for gram, weight, lam, block, bias in systems]
    return _joint_path(states, n_remove, None, batch, members, channels)
