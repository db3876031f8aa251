"""How much a merge plan disturbs each group's consumers, estimated from one activation capture (analysis).

Merging atom j into atom i changes only the group's consumer weights (``red_onnx.search.simulate``): ``V_j``
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

Late layers have many channels but few positions (``P`` sampled in all, ``P < 2·(C + 1)``): there the
sampled rows ``X`` (``[C, P]``) are smaller than ``G`` and ``H`` and are kept instead. The same
quantities are then, with ``Y = Qᵀ·[X; 1]`` one row per merge (``s·x_i + c − x_j``, in float64 so
that near duplicates do not cancel) and ``V_src`` the weight rows of the merges' sources (gathered
from the model's weight, ``K`` columns):

    ‖Δy‖² ≈ ‖V_srcᵀ · Y‖²,    ‖y‖² ≈ ‖Vᵀ · X‖²

at ``O(merges · min(K·P, merges·(K + P)))`` per consumer (the product, or the trace of its two Grams).

The budget search orders merges by this estimate on large models and measures only the prefixes it
bisects (``red_onnx.search.budget``); what it keeps is always measured on the model's real outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from red_onnx.analysis.channels import ChannelGroup, GroupTensor
from red_onnx.analysis.merge_sets import ConsumerPlan, DenseMerges, MergeList, of_consumer, row_local, to_rows
from red_onnx.analysis.weights import channel_rows
from red_onnx.search.activations import captured_by_rows, channel_rows_sampled
from red_onnx.search.simulate import ConsumerSlot, consumer_slots, weight_rows

logger = logging.getLogger(__name__)

#: Positions sampled per feed and tensor for the Gram matrices (all when the tensor has fewer).
GRAM_POSITIONS = 1024
#: Per ``form`` of :class:`LocalSensitivity`: a tensor's sampled rows are kept instead of its Gram matrix
#: when it has fewer positions (all feeds) than this many per channel + 1 ("auto": the rows are smaller).
FORMS = {"auto": 2.0, "gram": 0.0, "rows": math.inf}
#: Elements of one ``Vᵀ·X`` block (the products are summed block by block: bounded temporaries).
PRODUCT_ELEMENTS = 1 << 22

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


@dataclass
class ConsumerRows:
    """One consumer of a group: its input's sampled rows and its weight (rows gathered per estimate)."""

    local: np.ndarray  # local channel of each atom in the tensor the consumer reads (-1: absent)
    inputs: np.ndarray  # [channels, positions], float32 for float32 activations
    slot: ConsumerSlot  # the consumer weight V, the model's own array (not a copy)
    energy: float  # ‖Vᵀ·X‖²: the consumer output's estimated squared norm


def _add_gram(total: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """``total + [x; 1]·[x; 1]ᵀ`` of one feed's sampled rows (float64)."""
    augmented = np.vstack([rows, np.ones((1, rows.shape[1]))])
    gram = augmented @ augmented.T
    return gram if total is None else total + gram


def capture_grams(
    fetch: Fetch,
    feeds: Sequence[Feed],
    tensors: Mapping[str, tuple[int, int]],
    seed: int = 0,
    rows_below: float = FORMS["auto"],
    masks: Sequence[np.ndarray | None] = (),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Channel Gram matrices ``[x; 1]·[x; 1]ᵀ`` of the named tensors over every feed, one run per feed.

    A tensor's sampled rows are kept instead if all feeds give it fewer than ``rows_below·(channels + 1)``
    positions: they are kept until they are more, then folded into the Gram matrix feed by feed (the
    same sums as from the start).

    Args:
        fetch: Runs the model on one feed and returns the named tensors (e.g. the merge simulator's).
        feeds: Input dicts.
        tensors: Tensor name → (channel axis, block).
        seed: Seed of the position sampling.
        rows_below: Positions per channel + 1 under which a tensor keeps its rows.
        masks: Per feed, a text model's attention mask: only the tokens it keeps are positions.

    Returns:
        Tensor name → ``[channels + 1, channels + 1]`` float64 (the last row/column: sums and count), and
        for the other tensors name → ``[channels, positions]`` (float32 for float32 activations).
    """
    names = list(tensors)
    rng = np.random.default_rng(seed)
    grams: dict[str, np.ndarray] = {}
    pending: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for index, feed in enumerate(feeds):  # one feed at a time: only one feed's activations are alive
        mask = masks[index] if index < len(masks) else None
        for name, value in zip(names, fetch(names, feed), strict=True):
            value = np.asarray(value)
            rows = channel_rows_sampled(value, *tensors[name], rng, GRAM_POSITIONS, mask)
            if name in grams:
                grams[name] = _add_gram(grams[name], rows)
                continue
            pending[name].append(rows.astype(np.result_type(value.dtype, np.float32)))  # exact
            if sum(part.shape[1] for part in pending[name]) >= rows_below * (rows.shape[0] + 1):
                for part in pending.pop(name):
                    grams[name] = _add_gram(grams.get(name), part)
    return grams, {name: np.concatenate(parts, axis=1) for name, parts in pending.items() if parts}


def _consumer_grams(slot: ConsumerSlot, inputs: np.ndarray) -> ConsumerGrams:
    flat = channel_rows(slot.values, slot.axis, slot.block).astype(np.float32)
    weights = flat @ flat.T  # kept in float32: no cancellation happens in H (it does in G)
    energy = float(np.einsum("ij,ij->", inputs[:-1, :-1], weights, dtype=np.float64))
    return ConsumerGrams(slot.local, inputs, weights, energy)


def _consumer(
    slot: ConsumerSlot, tensor: str, grams: dict[str, np.ndarray], rows: dict[str, np.ndarray]
) -> ConsumerGrams | ConsumerRows:
    """The consumer's estimate inputs, in the form its input tensor was captured in."""
    if tensor not in rows:
        return _consumer_grams(slot, grams[tensor])
    energy = _product_norm(channel_rows(slot.values, slot.axis, slot.block), rows[tensor])
    return ConsumerRows(slot.local, rows[tensor], slot, energy)


def _product_norm(weights: np.ndarray, rows: np.ndarray) -> float:
    """``‖weightsᵀ·rows‖²`` (``[n, columns]`` and ``[n, positions]``) by the cheaper of two routes.

    Few rows (``n·(columns + positions) < columns·positions``): ``trace(weights·weightsᵀ · rows·rowsᵀ)``,
    the rows' Gram in float64 (it holds the cancellation, as G does). Otherwise the product itself, a
    block of columns at a time, float32 for float32 weights (the rows hold no cancellation left).
    """
    (n, columns), positions = weights.shape, rows.shape[1]
    dtype = np.result_type(weights.dtype, np.float32)
    if n * (columns + positions) < columns * positions:
        flat = weights.astype(dtype, copy=False)
        rows = rows.astype(np.float64, copy=False)
        return float(max(np.einsum("ij,ij->", flat @ flat.T, rows @ rows.T, dtype=np.float64), 0.0))
    rows = rows.astype(dtype, copy=False)
    step = max(1, PRODUCT_ELEMENTS // max(1, positions))
    total = 0.0
    for start in range(0, columns, step):
        product = weights[:, start : start + step].T.astype(dtype, copy=False) @ rows
        total += float(np.einsum("ij,ij->", product, product, dtype=np.float64))
    return total


@dataclass
class SourceChanges:
    """A plan's merges within one consumer, per removed channel: what replaces it in the consumer.

    Channel ``sources[k]`` is read no more; the consumer reads instead ``Σ s·x_t`` over its merges'
    targets plus their offsets: its change is ``y_k = mix[k]·x[columns] + constant[k]`` (``mix`` holds
    −1 at the source's own column). One merge per source (λ-merges) and many (the refit, which merges a
    removed channel into every kept one) are the same sums.
    """

    sources: np.ndarray  # [S] local channels removed
    columns: np.ndarray  # [U] local channels read by the changes (targets and sources)
    mix: np.ndarray  # [S, U] float64
    constant: np.ndarray  # [S] float64


def source_changes(local: np.ndarray, merges: ConsumerPlan) -> SourceChanges | None:
    """The per-source change of ``merges`` whose source and target the consumer reads (``local`` ≥ 0).

    None when no merge is inside the tensor.
    """
    if isinstance(merges, DenseMerges):
        return _dense_changes(local, merges)
    merges = [m for m in merges if local[m.source] >= 0 and local[m.target] >= 0]
    if not merges:
        return None
    source = np.array([local[m.source] for m in merges], np.int64)
    target = np.array([local[m.target] for m in merges], np.int64)
    sources, row = np.unique(source, return_inverse=True)
    columns = np.union1d(sources, target)
    mix = np.zeros((sources.size, columns.size))
    np.add.at(mix, (row, np.searchsorted(columns, target)), np.array([m.scale for m in merges]))
    mix[np.arange(sources.size), np.searchsorted(columns, sources)] -= 1.0
    constant = np.zeros(sources.size)
    np.add.at(constant, row, np.array([m.offset for m in merges]))
    return SourceChanges(sources, columns, mix, constant)


def _dense_changes(local: np.ndarray, merges: DenseMerges) -> SourceChanges | None:
    """:func:`source_changes` of dense merges: ``mix`` is ``merges.mix`` transposed, −1 on each source."""
    source, target = local[merges.sources], local[merges.targets]
    inside, present = source >= 0, target >= 0
    if not inside.any():
        return None
    order = np.argsort(source[inside])
    sources = source[inside][order]
    columns = np.union1d(sources, target[present])
    mix = np.zeros((sources.size, columns.size))
    mix[:, np.searchsorted(columns, target[present])] = merges.mix[np.ix_(present, inside)].T[order]
    mix[np.arange(sources.size), np.searchsorted(columns, sources)] -= 1.0
    return SourceChanges(sources, columns, mix, np.asarray(merges.offsets, np.float64)[inside][order])


def _rows_disturbance(consumer: ConsumerRows, changes: SourceChanges) -> float:
    """``‖V_srcᵀ·Y‖²`` with one row of ``Y`` per removed channel: ``mix·x[columns] + constant`` (float64)."""
    change = changes.mix @ consumer.inputs[changes.columns].astype(np.float64) + changes.constant[:, None]
    return _product_norm(weight_rows(consumer.slot, changes.sources), change)


def disturbance(consumer: ConsumerGrams | ConsumerRows, merges: ConsumerPlan) -> float:
    """``trace(G·P·H·Pᵀ)``: the estimated squared change of the consumer's output under ``merges``.

    With one column of P per removed channel (``mix`` on the channels its merges read, ``constant``
    on the constant channel: :class:`SourceChanges`), ``Pᵀ·G·P`` comes from the gathered block of G
    over the columns read: O(sources·columns²), never a dense product over all channels.
    From rows: ``‖V_srcᵀ·Pᵀ·[X; 1]‖²``.
    """
    changes = source_changes(consumer.local, merges)
    if changes is None:
        return 0.0
    if isinstance(consumer, ConsumerRows):
        return _rows_disturbance(consumer, changes)
    gram, columns, mix, constant = consumer.inputs, changes.columns, changes.mix, changes.constant
    mixed = mix @ gram[np.ix_(columns, columns)]  # [S, U]
    cross = mix @ gram[columns, -1]  # [S]: the channels against the constant channel
    pgp = mixed @ mix.T + np.outer(cross, constant) + np.outer(constant, cross)
    pgp += gram[-1, -1] * np.outer(constant, constant)
    src = changes.sources
    return float(max(np.einsum("ij,ij->", pgp, consumer.weights[np.ix_(src, src)]), 0.0))


def consumer_inputs(groups: Sequence[ChannelGroup]) -> dict[str, tuple[int, int]]:
    """The tensors the groups' consumers read: name → (channel axis, block; 1 where captured by rows)."""
    wanted = {}
    for group in groups:
        for consumer in group.consumers:
            member = group.tensors[consumer.tensor]
            by_rows = captured_by_rows(member, consumer.node)
            wanted[consumer.tensor] = (member.axis, 1 if by_rows else member.block)
    return wanted


def _by_rows(slot: ConsumerSlot, member: GroupTensor, node: gs.Node) -> ConsumerSlot:
    """The slot as the estimate reads it: each row of a block an atom of its own where captured by rows."""
    if not captured_by_rows(member, node):
        return slot
    return dataclasses.replace(slot, block=1, local=row_local(slot.local, slot.block))


class LocalSensitivity:
    """Estimated relative error of each group's consumers under a merge plan of that group.

    Args:
        fetch: Runs the model merges start from on one feed, returning the named tensors (at least
            :func:`consumer_inputs` of ``groups``).
        groups: The analysed groups of that model (consumer weights must be initializers or constants).
        feeds: The search inputs (one capture run each).
        form: "auto" (a tensor's sampled rows where they are smaller than its Gram matrix), "gram" or
            "rows" (every tensor so; the same estimate up to rounding).
        masks: Per feed, a text model's attention mask (only its tokens are sampled).
    """

    def __init__(
        self,
        fetch: Fetch,
        groups: Sequence[ChannelGroup],
        feeds: Sequence[Feed],
        *,
        form: str = "auto",
        masks: Sequence[np.ndarray | None] = (),
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form {form!r} is not one of {', '.join(FORMS)}")
        slots = {group.name: consumer_slots(group) for group in groups}
        wanted = consumer_inputs(groups)
        grams, rows = capture_grams(fetch, feeds, wanted, rows_below=FORMS[form], masks=masks)
        self.consumers: dict[str, list[ConsumerGrams | ConsumerRows]] | None = {}
        self.blocks: dict[str, list[int]] = {}  # per group and consumer: rows per atom read as atoms
        for group in groups:
            entries = []
            for slot, consumer in zip(slots[group.name], group.consumers, strict=True):
                read = _by_rows(slot, group.tensors[consumer.tensor], consumer.node)
                entries.append((_consumer(read, consumer.tensor, grams, rows), slot.block // read.block))
            self.consumers[group.name] = [consumer for consumer, _ in entries]
            self.blocks[group.name] = [block for _, block in entries]
        logger.debug("local sensitivity: %d Gram matrices, %d sampled rows for %d groups (%.1f MB)",
                     len(grams), len(rows), len(groups), self.nbytes / 1e6)  # fmt: skip

    @property
    def released(self) -> bool:
        """Whether :meth:`release` dropped the captured arrays."""
        return self.consumers is None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held (Gram matrices, ``H``, sampled rows; not the model's weights)."""
        held: dict[int, int] = {}  # id(array) -> nbytes, an array shared by consumers counted once
        for consumer in (c for consumers in (self.consumers or {}).values() for c in consumers):
            arrays = [consumer.inputs] + ([consumer.weights] if isinstance(consumer, ConsumerGrams) else [])
            held.update((id(array), array.nbytes) for array in arrays)
        return sum(held.values())

    def release(self) -> None:
        """Drop the Gram matrices and rows (a search's largest arrays); ``error`` then raises."""
        self.consumers = None

    def error(self, group: str, merges: MergeList) -> float:
        """Estimated relative L2 change of the group's consumer outputs (all consumers together)."""
        if self.consumers is None:
            raise RuntimeError("the local estimate was released; estimate before LocalSensitivity.release()")
        consumers = self.consumers[group]
        energy = sum(c.energy for c in consumers)
        if not merges or energy <= 0.0:
            return 0.0
        blocks = self.blocks[group]
        changes = sum(
            disturbance(c, to_rows(of_consumer(merges, index), b))
            for index, (c, b) in enumerate(zip(consumers, blocks, strict=True))
        )
        return float(np.sqrt(changes / energy))
