"""Which consumers of a group are refit together, and the Grams each such system is refit on.

One refit serves a group whose consumers all read one tensor the same way: 1×1 convs, Gemms and
MatMuls over channels (their weight rows side by side on one activation Gram), or k×k convs of one
kernel tap by tap (one patch Gram). Where a group's consumers read different tensors (both sides of a
residual Add) or one tensor in ways one Gram cannot serve (a k×k conv beside a 1×1 one), each
:class:`RefitSystem` gets a refit of its own, on its own input, and the removal order is joint
(``budget_options.consumer_refit``). May import :mod:`red_onnx.analysis` and the search's activations,
simulator slots and options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from red_onnx.analysis.channels import ChannelGroup
from red_onnx.analysis.constants import takes_bias
from red_onnx.analysis.merge_sets import atom_rows
from red_onnx.search.activations import ConvTaps, captured_by_rows, conv_taps
from red_onnx.search.budget_options import REFIT_MAX_ATOMS, SystemGrams, rows_grams
from red_onnx.search.simulate import consumer_slots, tap_rows, weight_rows


@dataclass(frozen=True)
class RefitSystem:
    """Consumers of a group refit together: they read ``tensor`` the same way.

    Attributes:
        tensor: The tensor they read.
        consumers: Their indices among the group's consumers.
        taps: k×k convs: the taps of their patch Gram (the smallest strides among them); else None.
        rows: Rows per channel where the tensor is captured by rows (``captured_by_rows``), else 1.
    """

    tensor: str
    consumers: tuple[int, ...]
    taps: ConvTaps | None
    rows: int = 1

    @property
    def block(self) -> int:
        """Gram rows per channel: its kernel taps, its captured rows, or 1."""
        return self.taps.taps if self.taps is not None else self.rows


def consumer_systems(group: ChannelGroup) -> list[RefitSystem] | None:
    """The systems of a group that needs more than one refit; None where one serves (or none can).

    A consumer joins the system of its tensor and kind: k×k convs of one kernel, dilations and pads
    (``conv_taps``; up to ``REFIT_MAX_ATOMS`` tap rows, else refit over channels), a tensor captured by
    rows, or channels. A system reads the atoms its tensor carries (a Split's chunk reads a segment).
    None where every consumer falls in one system (the group's single refit is that).
    """
    if len(group.consumers) < 2:
        return None
    members: dict[tuple, list[int]] = {}
    convs: dict[tuple, list[ConvTaps]] = {}
    tapped: dict[str, ConvTaps] = {}  # tensor -> the tap kind its patch Gram is taken with (one per tensor)
    for index, consumer in enumerate(group.consumers):
        member = group.tensors[consumer.tensor]
        conv = conv_taps(consumer.node) if member.block == 1 else None
        if conv is not None and member.channels * conv.taps <= REFIT_MAX_ATOMS:
            kind = dataclasses.replace(conv, strides=())
            if tapped.setdefault(consumer.tensor, kind) == kind:
                key: tuple = (consumer.tensor, "taps", kind)
                convs.setdefault(key, []).append(conv)
                members.setdefault(key, []).append(index)
                continue
        rows = member.block if captured_by_rows(member, consumer.node) else 1
        members.setdefault((consumer.tensor, "rows", rows), []).append(index)
    if len(members) < 2:
        return None
    systems = []
    for key, indices in members.items():
        taps = min(convs[key], key=lambda r: math.prod(r.strides)) if key in convs else None
        systems.append(RefitSystem(key[0], tuple(indices), taps, 1 if taps is not None else key[2]))
    return systems


def system_grams(
    group: ChannelGroup,
    systems: list[RefitSystem],
    rows: Mapping[str, np.ndarray],
    held_rows: Mapping[str, np.ndarray],
    patches: Mapping[str, np.ndarray],
    held_patches: Mapping[str, np.ndarray],
) -> list[SystemGrams] | None:
    """Each system's Grams and weight rows over the group's atoms, atom by atom.

    Args:
        group: The group.
        systems: Its systems (:func:`consumer_systems`).
        rows: Per tensor, its captured rows on the fitted samples (``block`` rows per channel, in the
            tensor's channel order).
        held_rows: The same on the cv rows (absent: half the captured positions validate).
        patches: Per tensor, the augmented patch Gram on the fitted samples (k×k systems).
        held_patches: The same on the cv rows.

    Returns:
        The systems' Grams; None where a capture is missing.
    """
    slots = consumer_slots(group)
    found = []
    for system in systems:
        local = group.atom_index(system.tensor)
        atoms = np.flatnonzero(local >= 0)  # the atoms it reads, ascending
        readers = [slots[index] for index in system.consumers]
        if system.taps is not None:
            taps = system.taps.taps
            gram, held = patches.get(system.tensor), held_patches.get(system.tensor)
            if gram is None or held is None:
                return None
            picked = np.append(atom_rows(local[atoms], taps), gram.shape[0] - 1)  # and the constant row
            gram, held = gram[np.ix_(picked, picked)], held[np.ix_(picked, picked)]
            weight = np.hstack([tap_rows(slot, slot.local[atoms], taps) for slot in readers])
            found.append(
                SystemGrams(system.consumers, atoms, gram, gram, held, held, weight, taps, True, False)
            )
            continue
        captured, block = rows.get(system.tensor), system.rows
        channels = group.tensors[system.tensor].channels
        if captured is None or captured.shape[0] != channels * block or captured.shape[1] < 4:
            return None  # not captured, or captured in another form (by channels, by rows)
        picked = atom_rows(local[atoms], block)
        weight = np.hstack(
            [
                weight_rows(slot, slot.local[atoms]).reshape(atoms.size * block, -1).astype(np.float64)
                for slot in readers
            ]
        )
        free_bias = all(takes_bias(group.consumers[index].node) for index in system.consumers)
        validation = held_rows.get(system.tensor)
        gram, fit, val, held = rows_grams(
            captured[picked], None if validation is None else validation[picked]
        )
        found.append(
            SystemGrams(system.consumers, atoms, gram, fit, val, held, weight, block, False, free_bias)
        )
    return found
