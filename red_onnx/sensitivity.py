"""How much a merge plan disturbs each group's consumers, estimated from one activation capture (analysis).

Merging atom j into atom i changes only the group's consumer weights (``red_onnx.simulate``): ``V_j``
becomes 0 and ``V_i`` gains ``s·V_j``. So a consumer's output changes by ``Δy = conv(x, ΔV)`` with its
input ``x`` unchanged, and with ``ΔV = P·V`` (``P`` has one column per merge, ``s·e_i − e_j``):

    ‖Δy‖² ≈ trace(G · P·H·Pᵀ),    ‖y‖² ≈ trace(G · H)

where ``G`` is the channel Gram matrix of ``x`` over the sampled positions of the search inputs (one
capture run of the base model for every group) and ``H = V·Vᵀ`` the Gram matrix of the consumer's
weight rows. The approximation treats the weight columns (kernel taps, output channels, Flatten blocks)
as if each read its own copy of ``x``: spatial correlation between taps is ignored, in the numerator
and the denominator alike. Offsets (merges fitted with ``y_j ≈ s·y_i + c``) enter through a constant
channel appended to ``x``. The estimate of a plan is the relative error of all its consumers' outputs
together; it costs ``O(merges²)`` per consumer, no onnxruntime run.

The budget search orders merges by this estimate on large models and measures only the prefixes it
bisects (``red_onnx.budget``); what it keeps is always measured on the model's real outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from red_onnx.activations import channel_rows_sampled
from red_onnx.channels import ChannelGroup
from red_onnx.redundancy import Merge
from red_onnx.simulate import ConsumerSlot, consumer_slots
from red_onnx.weights import channel_rows

logger = logging.getLogger(__name__)

#: Positions sampled per feed and tensor for the Gram matrices (all when the tensor has fewer).
GRAM_POSITIONS = 1024

Feed = Mapping[str, np.ndarray]
#: Runs the model on one feed and returns the values of the named tensors.
Fetch = Callable[[Sequence[str], Feed], Sequence[np.ndarray]]


@dataclass
class ConsumerGrams:
    """One consumer of a group: its input's channel Gram (with a constant channel last) and ``V·Vᵀ``."""

    local: np.ndarray  # local channel of each atom in the tensor the consumer reads (-1: absent)
    inputs: np.ndarray  # [channels + 1, channels + 1]
    weights: np.ndarray  # [channels, channels], float32
    energy: float  # trace(G·H): the consumer output's estimated squared norm


def capture_grams(
    fetch: Fetch, feeds: Sequence[Feed], tensors: Mapping[str, tuple[int, int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Channel Gram matrices ``[x; 1]·[x; 1]ᵀ`` of the named tensors over every feed, one run per feed.

    Args:
        fetch: Runs the model on one feed and returns the named tensors (e.g. the merge simulator's).
        feeds: Input dicts.
        tensors: Tensor name → (channel axis, block).
        seed: Seed of the position sampling.

    Returns:
        Tensor name → ``[channels + 1, channels + 1]`` float64 (the last row/column: sums and count).
    """
    names = list(tensors)
    rng = np.random.default_rng(seed)
    grams: dict[str, np.ndarray] = {}
    for feed in feeds:  # one feed at a time: only one feed's activations are alive at once
        for name, value in zip(names, fetch(names, feed), strict=True):
            rows = channel_rows_sampled(np.asarray(value), *tensors[name], rng, GRAM_POSITIONS)
            augmented = np.vstack([rows, np.ones((1, rows.shape[1]))])
            gram = augmented @ augmented.T
            grams[name] = grams[name] + gram if name in grams else gram
    return grams


def _consumer_grams(slot: ConsumerSlot, inputs: np.ndarray) -> ConsumerGrams:
    flat = channel_rows(slot.values, slot.axis, slot.block).astype(np.float32)
    weights = flat @ flat.T  # kept in float32: no cancellation happens in H (it does in G)
    energy = float(np.einsum("ij,ij->", inputs[:-1, :-1], weights, dtype=np.float64))
    return ConsumerGrams(slot.local, inputs, weights, energy)


def disturbance(consumer: ConsumerGrams, merges: Sequence[Merge]) -> float:
    """``trace(G·P·H·Pᵀ)``: the estimated squared change of the consumer's output under ``merges``.

    With ``q_m = s_m·e_dst + c_m·e_const − e_src`` (one column of P per merge), ``Qᵀ·G·Q`` is summed
    term by term from gathered ``[merges, merges]`` blocks of G: O(merges²), never a dense product.
    """
    inside = [m for m in merges if consumer.local[m.source] >= 0 and consumer.local[m.target] >= 0]
    if not inside:
        return 0.0
    src = consumer.local[[m.source for m in inside]]
    terms = [(consumer.local[[m.target for m in inside]], np.array([m.scale for m in inside])),
             (src, -np.ones(len(inside)))]  # fmt: skip
    offset = np.array([m.offset for m in inside])
    if offset.any():  # the constant channel, last in the Gram matrix
        terms.append((np.full(len(inside), consumer.inputs.shape[0] - 1), offset))
    qgq = np.zeros((len(inside), len(inside)))
    for rows, a in terms:
        for cols, b in terms:
            qgq += a[:, None] * consumer.inputs[np.ix_(rows, cols)] * b[None, :]
    return float(max(np.einsum("ij,ij->", qgq, consumer.weights[np.ix_(src, src)]), 0.0))


def consumer_inputs(groups: Sequence[ChannelGroup]) -> dict[str, tuple[int, int]]:
    """The tensors the groups' consumers read: name → (channel axis, block)."""
    wanted = {}
    for group in groups:
        for consumer in group.consumers:
            member = group.tensors[consumer.tensor]
            wanted[consumer.tensor] = (member.axis, member.block)
    return wanted


class LocalSensitivity:
    """Estimated relative error of each group's consumers under a merge plan of that group.

    Args:
        fetch: Runs the model merges start from on one feed, returning the named tensors (at least
            :func:`consumer_inputs` of ``groups``).
        groups: The analysed groups of that model (consumer weights must be initializers or constants).
        feeds: The search inputs (one capture run each).
    """

    def __init__(self, fetch: Fetch, groups: Sequence[ChannelGroup], feeds: Sequence[Feed]) -> None:
        slots = {group.name: consumer_slots(group) for group in groups}
        grams = capture_grams(fetch, feeds, consumer_inputs(groups))
        self.consumers: dict[str, list[ConsumerGrams]] | None = {}
        for group in groups:
            pairs = zip(slots[group.name], group.consumers, strict=True)
            self.consumers[group.name] = [_consumer_grams(slot, grams[c.tensor]) for slot, c in pairs]
        logger.debug("local sensitivity: %d tensors captured for %d groups", len(grams), len(groups))

    @property
    def released(self) -> bool:
        """Whether :meth:`release` dropped the Gram matrices."""
        return self.consumers is None

    def release(self) -> None:
        """Drop the Gram matrices (a search's largest arrays: 277 MB on conv25m); ``error`` then raises."""
        self.consumers = None

    def error(self, group: str, merges: Sequence[Merge]) -> float:
        """Estimated relative L2 change of the group's consumer outputs (all consumers together)."""
        if self.consumers is None:
            raise RuntimeError("the local estimate was released; estimate before LocalSensitivity.release()")
        consumers = self.consumers[group]
        energy = sum(c.energy for c in consumers)
        if not merges or energy <= 0.0:
            return 0.0
        return float(np.sqrt(sum(disturbance(c, merges) for c in consumers) / energy))
