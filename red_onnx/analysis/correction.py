"""Sequential correction of a linear layer towards a target output (analysis, pure numpy).

After channels were removed, a consumer ``y = Xᵀ·M`` (``M = [W; b]``: ``[C + 1, O]``, the input rows
augmented with a constant 1 last, as :func:`red_onnx.analysis.refit.augmented_gram`) reads inputs that
differ from the original model's, and its output drifts from the original layer's output ``T``. The
correction refits ``M`` on the inputs it now receives towards ``T`` (He et al. 2017's reconstruction,
done layer after layer):

    min_Δ ‖Xᵀ·(M + Δ) − T‖² + λ·‖Δ_W‖²,    (G1 + P)·Δ = Xᵀ·T − G1·M,

with ``G1`` the augmented Gram, ``P = λ·diag(1, …, 1, 0)`` (the intercept change is free) and
``λ = α · mean(diag(G_c))`` (``refit.lambda_scale``): a ridge towards the current weight, not
towards zero. Everything works from :class:`LinearStats` (``G1``, ``X·T`` and ``‖T‖²`` of one set of
rows), so the rows need not be kept. ``α`` is chosen by K-fold cross-validation over the fitted
samples (:func:`cross_validated_change`: each fold's statistics are held back in turn, in closed
form), so the rows that later judge the corrected model played no part in fitting it.

May import numpy and :mod:`red_onnx.analysis`; never runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from red_onnx.analysis.refit import lambda_scale

#: The ridge strengths tried per layer, in units of ``mean(diag(G_c))`` of the fitted rows. MobileNetV2
#: at 0.85 of the MACs, test output error 0.324 one-shot: 0.277 / 0.294 / 0.309 with α 0.01 / 0.1 / 1
#: on every layer (each left as it is where α does not lower its held-back error), 0.295 chosen per
#: layer; at 0.9 0.239: 0.221 / 0.220 / 0.225, 0.219 per layer.
CORRECTION_ALPHAS = (0.01, 0.1, 1.0, 10.0)


@dataclass
class LinearStats:
    """Sufficient statistics of a linear layer's inputs and target outputs over a set of rows.

    Attributes:
        gram: ``G1``, the Gram of the inputs augmented with a constant 1 last (``[C + 1, C + 1]``).
        cross: ``[X; 1]·T`` (``[C + 1, O]``).
        energy: ``‖T‖²``.
        rows: How many rows were added.
    """

    gram: np.ndarray
    cross: np.ndarray
    energy: float = 0.0
    rows: int = 0

    @classmethod
    def empty(cls, inputs: int, outputs: int) -> LinearStats:
        """Statistics of no rows for ``inputs`` input and ``outputs`` output features."""
        return cls(np.zeros((inputs + 1, inputs + 1)), np.zeros((inputs + 1, outputs)))

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Add rows: ``inputs`` ``[n, C]`` and the target outputs ``targets`` ``[n, O]`` of the same rows."""
        x = np.hstack([np.asarray(inputs, np.float64), np.ones((len(inputs), 1))])
        t = np.asarray(targets, np.float64)
        self.gram += x.T @ x
        self.cross += x.T @ t
        self.energy += float(np.sum(t * t))
        self.rows += len(x)

    def __add__(self, other: LinearStats) -> LinearStats:
        gram, cross = self.gram + other.gram, self.cross + other.cross
        return LinearStats(gram, cross, self.energy + other.energy, self.rows + other.rows)

    def __sub__(self, other: LinearStats) -> LinearStats:
        gram, cross = self.gram - other.gram, self.cross - other.cross
        return LinearStats(gram, cross, self.energy - other.energy, self.rows - other.rows)

    def squared_error(self, matrix: np.ndarray) -> float:
        """``‖Xᵀ·M − T‖²`` of the augmented weight ``matrix`` on these rows."""
        m = np.asarray(matrix, np.float64)
        squared = self.energy - 2.0 * float(np.sum(m * self.cross)) + float(np.sum(m * (self.gram @ m)))
        return max(squared, 0.0)

    def error(self, matrix: np.ndarray) -> float:
        """Relative L2 error ``‖Xᵀ·M − T‖ / ‖T‖`` of the augmented weight ``matrix`` on these rows."""
        if self.energy <= 0.0:
            return 0.0
        return float(np.sqrt(self.squared_error(matrix) / self.energy))


def ridge_change(fit: LinearStats, matrix: np.ndarray, alpha: float) -> np.ndarray:
    """The change ``Δ`` of the augmented weight ``matrix`` (``[C + 1, O]``) that fits ``fit`` best.

    Ridge towards no change at ``λ = alpha · mean(diag(G_c))``, the intercept row unpenalised.
    """
    m = np.asarray(matrix, np.float64)
    penalty = np.full(len(fit.gram), alpha * lambda_scale(fit.gram))
    penalty[-1] = 0.0
    system = fit.gram + np.diag(penalty)
    rhs = fit.cross - fit.gram @ m
    try:
        return np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:  # singular at this α (dead inputs and no rows): least squares
        return np.linalg.lstsq(system, rhs, rcond=None)[0]


@dataclass(frozen=True)
class ChosenChange:
    """The correction chosen for one layer.

    Attributes:
        alpha: The ridge strength chosen (0: no change, none lowered the cross-validated error).
        change: ``Δ`` of the augmented weight, fitted on every fold (zeros when ``alpha`` is 0).
        fit_before: Relative error on the fitted rows before the change.
        fit_after: The same after it.
        held_back_after: Relative error on each fold of the change fitted without it, pooled over the
            folds (``fit_before`` when unchanged: the folds are the fitted rows).
    """

    alpha: float
    change: np.ndarray
    fit_before: float
    fit_after: float
    held_back_after: float


def cross_validated_change(
    folds: Sequence[LinearStats], matrix: np.ndarray, alphas: Sequence[float] = CORRECTION_ALPHAS
) -> ChosenChange:
    """The change at the ``alphas`` value with the least K-fold error; none if none lowers it.

    Each fold is held back in turn: the change is fitted on the others' statistics and scored on it;
    the squared errors are pooled over the folds. The chosen ``α`` is then fitted on all of them.
    Fewer than two folds with rows choose nothing.
    """
    m = np.asarray(matrix, np.float64)
    used = [fold for fold in folds if fold.rows]
    total = sum(used[1:], start=used[0]) if used else None
    if total is None or len(used) < 2 or total.energy <= 0.0:
        before = total.error(m) if total is not None else 0.0
        return ChosenChange(0.0, np.zeros_like(m), before, before, before)
    before = total.squared_error(m)
    scored = [
        (sum(fold.squared_error(m + ridge_change(total - fold, m, alpha)) for fold in used), alpha)
        for alpha in alphas
    ]
    after, alpha = min(scored)
    relative = float(np.sqrt(before / total.energy))
    if not after < before:
        return ChosenChange(0.0, np.zeros_like(m), relative, relative, relative)
    change = ridge_change(total, m, alpha)
    held_back = float(np.sqrt(after / total.energy))
    return ChosenChange(alpha, change, relative, total.error(m + change), held_back)
