"""Analysis for uneven depthwise separation: which kernels of a conv repeat, up to a scale.

For ``Conv W[O, I, *k]`` (group 1), each kernel ``W[o, c]`` is written ``s[o, c]·B[c, u]`` with ``B[c, u]``
one of the ``u_c`` distinct unit kernels of input channel ``c`` (zero kernels need none). Then

    y_o = Σ_(c,u) P[o, (c,u)] · (B[c,u] ∗ x_c)

which ONNX writes as ``Gather(axis=1)`` → ``Conv(group=U)`` → ``Conv 1×1`` (docs/method.md,
"Uneven depthwise separation"). This module only analyses (pure numpy); ``red_onnx.rewrite.separation``
edits the graph.

Unit kernels: each nonzero kernel divided by its L2 norm, its sign chosen so that its first entry of
largest magnitude is positive. Two kernels share a unit when their unit vectors agree to ``atol`` in
every entry; the mixing coefficient is then the projection of the kernel on the shared unit, and the
worst relative reconstruction error is returned so that a caller can refuse what is not exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from red_onnx.analysis.components import component_labels

#: Unit kernels agreeing to this in every entry are the same kernel (float32 scaled copies: ~1e-7).
UNIT_ATOL = 1e-6
#: Singular values below this fraction of the layer's largest do not count in ``units_lower_bound``.
RANK_RTOL = 1e-5
#: Bucket step of the unit-kernel grouping (far above float noise, far below distinct kernels).
KEY_STEP = 1e-4


@dataclass(frozen=True)
class KernelBasis:
    """The separated form of one conv weight, kept sparse (one coefficient per nonzero kernel).

    Attributes:
        channels: Input channel of each unit kernel, ascending (length U: the Gather indices).
        units: The unit kernels, ``[U, *k]``.
        counts: ``u_c`` per input channel (length I).
        out_channels: O.
        kernel_output: Output channel of each nonzero kernel (length N).
        kernel_unit: Unit kernel index of each nonzero kernel (length N).
        kernel_scale: Its coefficient ``s[o, c]`` (length N).
        error: Worst relative L2 reconstruction error of a kernel (0 for an exact re-expression).
    """

    channels: np.ndarray
    units: np.ndarray
    counts: np.ndarray
    out_channels: int
    kernel_output: np.ndarray
    kernel_unit: np.ndarray
    kernel_scale: np.ndarray
    error: float

    @property
    def size(self) -> int:
        """U, the number of depthwise filters."""
        return int(self.channels.size)

    @property
    def uniform(self) -> bool:
        """Whether every input channel has the same nonzero count (a plain depthwise multiplier)."""
        return bool(self.counts.size and self.counts.min() == self.counts.max() > 0)

    @property
    def mix(self) -> np.ndarray:
        """The dense mixing matrix ``P[O, U]`` (the pointwise conv's weight)."""
        mix = np.zeros((self.out_channels, self.size))
        mix[self.kernel_output, self.kernel_unit] = self.kernel_scale
        return mix

    def reconstruct(self) -> np.ndarray:
        """``W`` back from the basis, ``[O, I, *k]``."""
        shape = self.units.shape[1:]
        out = np.zeros((self.out_channels, self.counts.size, math.prod(shape)))
        flat_units = self.units.reshape(self.size, -1)
        out[self.kernel_output, self.channels[self.kernel_unit]] = (
            self.kernel_scale[:, None] * flat_units[self.kernel_unit]
        )
        return out.reshape(self.out_channels, self.counts.size, *shape)


def _unit_kernels(kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with a canonical sign, and the nonzero mask; ``kernels`` is ``[..., K]``."""
    norms = np.linalg.norm(kernels, axis=-1, keepdims=True)
    nonzero = norms[..., 0] > 0
    units = kernels / np.where(norms > 0, norms, 1.0)
    # The sign of the entry of largest magnitude (first of equals); ties within rounding pick the
    # first index reliably because units of one kernel family differ by ~1e-7 only.
    lead = np.argmax(np.abs(np.round(units, 5)), axis=-1)
    sign = np.sign(np.take_along_axis(units, lead[..., None], axis=-1))
    return units * np.where(sign == 0, 1.0, sign), nonzero


def factor_kernels(weight: np.ndarray, *, atol: float = UNIT_ATOL) -> KernelBasis:
    """Factor a group-1 conv weight ``[O, I, *k]`` into repeated unit kernels (vectorised).

    Args:
        weight: The conv weight (any float dtype; computed in float64).
        atol: Unit kernels agreeing to ``atol`` in every entry count as one.

    Returns:
        The basis; ``error`` is the worst relative reconstruction error of a nonzero kernel.
    """
    w = np.asarray(weight, dtype=np.float64)
    out_channels, in_channels = w.shape[:2]
    kernels = w.reshape(out_channels, in_channels, -1).transpose(1, 0, 2)  # I, O, K
    units, nonzero = _unit_kernels(kernels)
    channel_of, output_of = np.nonzero(nonzero)  # ascending channel, then output
    label = _same_unit_labels(channel_of, units[channel_of, output_of], atol)
    _, first, inverse = np.unique(label, return_index=True, return_inverse=True)
    order = np.lexsort((first, channel_of[first]))  # units by channel, then first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    inverse = rank[inverse.reshape(-1)]
    first = first[order]
    basis_units = units[channel_of[first], output_of[first]]  # U, K
    nonzero_kernels = kernels[channel_of, output_of]
    coefficients = np.einsum("nk,nk->n", nonzero_kernels, basis_units[inverse])
    residual = np.linalg.norm(nonzero_kernels - coefficients[:, None] * basis_units[inverse], axis=1)
    error = residual / np.linalg.norm(nonzero_kernels, axis=1)
    unit_channels = channel_of[first]
    return KernelBasis(
        channels=unit_channels.astype(np.int64),
        units=basis_units.reshape(-1, *w.shape[2:]),
        counts=np.bincount(unit_channels, minlength=in_channels).astype(np.int64),
        out_channels=out_channels,
        kernel_output=output_of.astype(np.int64),
        kernel_unit=inverse.astype(np.int64),
        kernel_scale=coefficients,
        error=float(error.max(initial=0.0)),
    )


def _same_unit_labels(channel_of: np.ndarray, units: np.ndarray, atol: float) -> np.ndarray:
    """A label per kernel: equal labels = same input channel and unit vectors within ``atol``.

    Units are bucketed on two grids of step ``KEY_STEP`` offset by half a step (a pair closer than
    ``atol`` shares a bucket on at least one grid unless two coordinates straddle a boundary each), the
    buckets joined by connected components, and every member further than ``atol`` from its
    component's first member split off on its own (so a label never joins different kernels).
    """
    count = channel_of.size
    if count == 0:
        return np.zeros(0, np.int64)
    mixer = np.random.default_rng(0).integers(1, 2**62, units.shape[1] + 1, dtype=np.int64) | 1
    buckets = []
    for offset in (0.0, 0.5):
        keys = np.floor(units / KEY_STEP + offset).astype(np.int64)
        hashed = keys @ mixer[1:] + channel_of * mixer[0]  # wraps mod 2**64; a collision is split below
        buckets.append(np.unique(hashed, return_inverse=True)[1].reshape(-1))
    sizes = [int(b.max()) + 1 for b in buckets]
    rows = np.concatenate([np.arange(count), np.arange(count)])
    cols = np.concatenate([count + buckets[0], count + sizes[0] + buckets[1]])
    nodes = count + sum(sizes)
    component = component_labels(nodes, rows, cols)[:count]
    leader = np.zeros(int(component.max()) + 1, np.int64)
    leader[component[::-1]] = np.arange(count)[::-1]  # the first member of each component
    far = np.max(np.abs(units - units[leader[component]]), axis=1) > atol
    far |= channel_of != channel_of[leader[component]]
    return np.where(far, -1 - np.arange(count), component)


def units_lower_bound(weight: np.ndarray, *, rtol: float = RANK_RTOL) -> int:
    """A cheap lower bound on U: the sum over input channels of the rank of their ``O×K`` kernel matrix.

    Every kernel of channel c is a multiple of one of its ``u_c`` unit kernels, so that matrix has rank
    at most ``u_c``. Ranks count singular values above ``rtol`` times the largest of the whole layer
    (float noise of exact copies sits near 1e-7), from the ``K×K`` Gram matrices (batched ``eigvalsh``).
    """
    w = np.asarray(weight, dtype=np.float64)
    kernels = w.reshape(w.shape[0], w.shape[1], -1)
    gram = np.einsum("oik,oil->ikl", kernels, kernels)
    eigen = np.linalg.eigvalsh(gram)
    top = float(eigen.max(initial=0.0))
    return int(np.count_nonzero(eigen > (rtol**2) * top)) if top > 0 else 0


def conv_macs(out_channels: int, in_channels: int, kernel_size: int, out_pixels: int) -> int:
    """MACs of a group-1 conv: ``O·I·K`` per output pixel."""
    return out_channels * in_channels * kernel_size * out_pixels


def separated_macs(out_channels: int, units: int, kernel_size: int, out_pixels: int) -> int:
    """MACs of the separated form: ``U·K`` (depthwise) + ``O·U`` (pointwise) per output pixel."""
    return (units * kernel_size + out_channels * units) * out_pixels


def break_even_units(out_channels: int, in_channels: int, kernel_size: int) -> float:
    """The U below which the separated form has fewer MACs: ``O·I·K / (K + O)``."""
    return out_channels * in_channels * kernel_size / (kernel_size + out_channels)
