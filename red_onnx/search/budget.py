"""The fidelity budget search (orchestration): how many channels each group may lose.

One knob: the largest allowed relative L2 error of every model output on the verification inputs
(``--tolerance``), or the fraction of MACs to keep (``--target-macs``). The search

1. ranks, per channel group, the merge candidates (``search.budget_options``, ``analysis.similarity``)
   and the MACs each atom costs;
2. finds each group's error alone at a few removal levels (kept counts rounded to the channel multiple):
   measured on the model's outputs, stopping at the first level over budget, or estimated from one
   activation capture (``red_onnx.search.sensitivity``), optionally calibrated by one run per group;
3. orders the level steps greedily by MACs saved per squared error added (errors of independent
   groups add roughly in squares);
4. bisects the prefix of that order whose *measured* joint error fits the budget (or whose MACs reach the
   target), and re-checks the choice on a seed the search did not use, backing off if needed.

Measurements run in one onnxruntime session with the consumer weights as inputs (``red_onnx.search.simulate``;
the model is rebuilt only where that cannot run); nothing here edits the caller's model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from red_onnx.analysis.channels import ChannelGroup
from red_onnx.analysis.constants import offset_atoms
from red_onnx.analysis.merge_sets import (
    ConsumerMerges,
    DenseMerges,
    MergeList,
    atom_rows,
    merge_key,
    removed_atoms,
)
from red_onnx.analysis.similarity import (
    activation_candidates,
    atom_macs,
)
from red_onnx.errors import InternalError, VerificationError
from red_onnx.io import graph as graph_utils
from red_onnx.io.memory import release_free_memory
from red_onnx.measure import metrics
from red_onnx.options import SENSITIVITY_MODES, InputSpec
from red_onnx.passes.merge_near import GroupCandidates, MergeNear, candidates_of, mergeable_groups
from red_onnx.runtime.sessions import HeldSessions
from red_onnx.runtime.shapes import ShapeService
from red_onnx.runtime.stream import find_state_pairs
from red_onnx.runtime.tensor_values import tensor_fetch
from red_onnx.search.activations import (
    ConvTaps,
    capture,
    captured_by_rows,
    conv_taps,
    flattened_rows,
    patch_grams,
)
from red_onnx.search.budget_options import (
    HASH_RUNGS,
    LEVEL_FRACTIONS,
    REFIT_MAX_ATOMS,
    BudgetResult,
    ConsumerRefitOrdering,
    Counts,
    GroupOption,
    Ordering,
    Ranking,
    RefitOrdering,
    achievable,
    consumer_refit,
    hashed_orderings,
    refit_from_grams,
    refit_ordering,
    removal_levels,
)
from red_onnx.search.channel_steps import ChannelSteps
from red_onnx.search.refit_systems import RefitSystem, consumer_systems, system_grams
from red_onnx.search.sensitivity import LocalSensitivity, consumer_inputs
from red_onnx.search.simulate import MacsCounter, MergeSimulator, consumer_slots, weight_rows
from red_onnx.search.suffix import SuffixSimulator
from red_onnx.verify.inputs import load_samples, real_inputs
from red_onnx.verify.verifier import Verifier

logger = logging.getLogger(__name__)

#: Seeds of the inputs the search measures on (one sample each at the default batch of 1) and of
#: the held-out re-check. 16 samples: with 4, the MNIST-1D model at 56% of its MACs kept 0.796
#: test accuracy, with 16 it kept 0.945 (the search's choices are only as good as its estimate).
SEARCH_SEEDS = tuple(range(100, 116))
HELDOUT_SEEDS = tuple(range(200, 216))
#: Other groups' steps tried, besides the greedy order's, where it crosses a ``--target-macs`` target.
LANDINGS = 4
#: A crossing step landing further than this under a ``--target-macs`` target (a fraction of the MACs)
#: has earlier steps taken back too (``BudgetSearch._landing``).
OVERSHOOT_SLACK = 0.01
#: Seeds of the inputs the refit's ridge strength is validated on (synthetic runs; a calibration
#: file's "cv" rows otherwise).
CV_SEEDS = tuple(range(300, 316))
#: Groups with at least this many weights get the heap's free pages returned before they are hashed:
#: its work arrays (~27 bytes a weight) beside the free pages earlier groups left were the search's
#: peak (conv25m, 5.3M weights in the last stage's group: 120 MB free in the heap at that point).
HASHING_RELEASE_WEIGHTS = 2**20
#: Inputs with more elements than this per sample get half the seeds (search time).
LARGE_SAMPLE = 100_000
#: Models above this many MACs per verification feed (a calibration file's rows count together: a
#: measurement runs them all) get the large-model search: LARGE_SEEDS samples,
#: LARGE_HASH_RUNGS, the local estimate, and LARGE_LEVEL_FRACTIONS where levels are measured, so that its
#: measurements (each a full onnxruntime run of every sample) stay in the hundreds, not thousands (a
#: 25M-parameter ResNet-50 at --target-macs 0.8 took 53 min on 2 cores with the small-model settings).
#: Estimated levels cost no run, so there every level of LEVEL_FRACTIONS is kept (a 3072-neuron FFN
#: stepped 384 → 768 → 1536 neurons otherwise).
LARGE_MODEL_MACS = 1_000_000_000
LARGE_SEEDS = 4
LARGE_LEVEL_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)
LARGE_HASH_RUNGS = (4,)
#: Prefixes of the greedy order measured for the reported MACs-vs-error curve.
CURVE_POINTS = 8
#: Joint error above which a candidate is hopeless even for --target-macs.
DESTROYED = 1.0
#: --target-macs measures levels up to this error alone first, and raises the cap by TARGET_CAP_GROWTH
#: only while the levels measured cannot reach the target (MobileNetV2 at 0.85: 585 measurements with
#: every level measured up to DESTROYED).
TARGET_START_CAP = 0.05
TARGET_CAP_GROWTH = 4.0
#: A --target-macs this far under the MACs floor (every group at its deepest level, first ranking) is
#: refused before any error is measured: other rankings may remove channels that carry other MACs.
FLOOR_MARGIN = 0.02
#: How each group's error alone is found: "measured" (a full run per group, level and ranking),
#: "local" (estimated from one activation capture: ``red_onnx.search.sensitivity``; only the bisected
#: prefixes are measured), "calibrated" (local, scaled per group by one measured run), "auto"
#: (calibrated for models above LARGE_MODEL_MACS per sample, measured below).
#: The search measures with graph optimisations off (the final verification adds ORT_ENABLE_ALL).
LEVEL = ("disable_all",)


def _simulator(
    working: graph_utils.WorkingModel, groups: list, capture: Sequence[str] = ()
) -> MergeSimulator | None:
    """The one-session merge simulator (able to fetch ``capture``), or None (then measurements rebuild)."""
    try:
        return MergeSimulator.of_working(working, groups, extra_outputs=capture)
    except Exception as error:  # onnxruntime's errors share no base class; the rebuild path still works
        logger.warning("measuring by rebuilding the model (the one-session simulator failed: %s)", error)
        return None


def _samples_cover_inputs(structure: onnx.ModelProto, spec: InputSpec) -> bool:
    """Whether the user's samples give every real input of the model (then seeds change nothing)."""
    if spec.calibration is None:
        return False
    given = load_samples(structure, spec)
    return all(value.name in given for value in real_inputs(structure))


@dataclasses.dataclass(frozen=True)
class RefitCaptures:
    """What the refits beyond a group's first tensor are fitted on.

    Attributes:
        taps: Per group refit tap by tap: the tensor its k×k Conv consumers read, and the taps its
            Grams are taken with.
        fit: Per tensor: the augmented patch Gram (``activations.patch_grams``) on the rows the refit
            is fitted on.
        held: Per tensor: the same on the cv rows.
        systems: Per group refit consumer by consumer: its systems (``refit_systems``).
        rows: Per tensor such a system reads over channels or rows: its captured rows (fitted rows).
        held_rows: The same on the cv rows.
    """

    taps: dict[str, tuple[str, ConvTaps]]
    fit: dict[str, np.ndarray]
    held: dict[str, np.ndarray]
    systems: dict[str, list[RefitSystem]] = dataclasses.field(default_factory=dict)
    rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    held_rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def covers(self, group: str) -> bool:
        """Whether ``group`` is refit tap by tap and its patch Gram was captured."""
        return group in self.taps and self.taps[group][0] in self.fit


def _cache_key(plan: dict[str, MergeList], role: str) -> tuple:
    """What a measured error is cached under: the inputs' role and the plan's merges by content."""
    return role, tuple(sorted((name, merge_key(merges)) for name, merges in plan.items() if merges))


class BudgetSearch:
    """Search per-group merge counts on ``base`` against ``reference`` (the user's original model).

    Args:
        base: The model after exact rewrites (what approximate merging starts from): a proto, or the
            caller's working model, which the search only reads (no copy of its weights: the simulator's
            session is fed the working model's arrays).
        reference: The original model the error is measured against (a path keeps no copy in memory).
        spec: How verification inputs are built.
        shapes: The shape service (at the run's concrete inputs).
        freeze: Node-name glob patterns of protected layers.
        channel_multiple: Kept channel counts are multiples of this, per segment of a group (a Split chunk,
            a Concat part); a narrower one keeps a smaller power of two (``effective_multiple``).
        hashing: Also rank merge candidates on KDE-hashed weights and keep, per group and level,
            whichever ranking measures better (off: the ablation without hashing).
        activations: Also rank candidates by a least-squares fit of channel activations on the
            synthetic search inputs (``red_onnx.analysis.similarity.activation_candidates``).
        refit: With ``activations``, also rank removals by the least-squares refit
            (``red_onnx.search.budget_options.RefitOrdering``; off: the ablation without it).
        sensitivity: One of SENSITIVITY_MODES.
        progress: Called with a short label for every measurement.
        reference_structure: ``reference`` as a ModelProto when the caller holds it while passing a path
            (the verifiers read its inputs there instead of loading the file once each).
        held: The reference's sessions, open already (``sessions.HeldSessions``): the search's
            reference outputs are computed with them instead of opening the reference again; released
            once they are.
    """

    def __init__(
        self,
        base: onnx.ModelProto | graph_utils.WorkingModel,
        reference: onnx.ModelProto | str | Path,
        spec: InputSpec,
        shapes: ShapeService,
        *,
        freeze: Sequence[str] = (),
        channel_multiple: int = 1,
        hashing: bool = True,
        activations: bool = True,
        refit: bool = True,
        sensitivity: str = "auto",
        progress: Callable[[str], None] | None = None,
        reference_structure: onnx.ModelProto | None = None,
        held: HeldSessions | None = None,
    ) -> None:
        if sensitivity not in SENSITIVITY_MODES:
            raise ValueError(f"sensitivity {sensitivity!r} is not one of {', '.join(SENSITIVITY_MODES)}")
        self.freeze = tuple(freeze)
        self.refit = refit
        self.progress = progress or (lambda label: None)
        self.base: onnx.ModelProto | None
        if isinstance(base, onnx.ModelProto):
            working, self.base = graph_utils.import_model(base), base
        else:  # exported only where a measurement has to rebuild the model (apply_plan)
            working, self.base = base, None
        self.working = working
        self.shapes = shapes(working, self.base)
        structure, _ = graph_utils.export_light(working)  # dims only: no weight copied
        volume = sum(math.prod(shape) for shape in shapes.input_shapes.values())
        figures = metrics.measure(structure, shapes.input_shapes, self.shapes)
        self.total_macs = max(figures.macs, 1)
        self.large = figures.macs > LARGE_MODEL_MACS
        count = len(SEARCH_SEEDS) if volume <= LARGE_SAMPLE else len(SEARCH_SEEDS) // 2
        count = LARGE_SEEDS if self.large else count
        self.covered = _samples_cover_inputs(structure, spec)
        if self.covered:  # every seed would give the same feed: one is enough
            count = 1
        # an --inputs batch is split: the search sees one half, the held-out re-check the other. Not a
        # recurrent model's stream: on half of silero-vad's 121-chunk calibration stream the search
        # overfits (held-out speech: worst step 0.10-0.19 at a 0.02 budget; whole stream: within 0.02)
        split = not find_state_pairs(structure)
        self.part = "search" if split else "all"
        self.split, self.seed_count = split, count
        self.reference, self.spec, self.reference_structure = reference, spec, reference_structure
        self.held = held
        # the rankings and the refit are fitted on the search part; the plans are measured on the cv
        # part, which no fit saw: a calibration file's cv rows (MobileNetV2, 64 fit views of 29 photos,
        # MACs 0.9: measured on the fitted rows, error 0.105 there and 0.28 held out, top-1 agreement
        # 0.33 on other photos; measured on the cv rows, 0.25 and 0.26, agreement 0.65), or synthetic
        # draws of other seeds (data-free digits at 0.62 of the MACs: measured on the fitted seeds,
        # error 0.148 there and 0.43 held out, run refused by the drift check; on other seeds 0.18 and
        # 0.15)
        self.measured_part = "cv" if split and activations else self.part
        fit_verifier = self._verifier(SEARCH_SEEDS[:count], self.part)
        self.verifier = (
            fit_verifier if self.measured_part == self.part else self._verifier(CV_SEEDS[:count], "cv")
        )
        self.heldout = self._verifier(HELDOUT_SEEDS[:count], "heldout" if split else "all")
        for verifier in (self.verifier, self.heldout):  # now, while little else is alive: the held-out
            verifier.reference_outputs(LEVEL[0])  # reference session at the end was the search's peak
        if held is not None:  # not alive beside the rankings' work arrays
            held.release()
        self.calibration_verifier: Verifier | None = None
        self.suffix: SuffixSimulator | None = None
        self.input_shapes = shapes.input_shapes
        layer_macs = {name: layer.macs for name, layer in figures.layers.items()}
        self.merges: dict[str, dict[int, MergeList]] = {}
        self.channel_multiple = channel_multiple
        self.orderings: dict[str, list[Ranking]] = {}
        self.chosen: dict[tuple[str, int], Ranking] = {}
        self.atom_cost: dict[str, np.ndarray] = {}
        groups = mergeable_groups(working, self.shapes, self.freeze)
        # levels cost measurements only when measured: estimated, a large model keeps every level
        local = sensitivity in ("local", "calibrated") or (sensitivity == "auto" and self.large)
        self.fractions = LEVEL_FRACTIONS if local or not self.large else LARGE_LEVEL_FRACTIONS
        # k×k Conv consumers are refit tap by tap from their input patches (a plan of theirs is
        # estimated on the patches: the local estimate reads channel Grams); a group whose consumers
        # one refit cannot serve is also refit consumer by consumer, each on its own input
        refitting = activations and refit and self.split
        taps = self._tap_groups(groups) if refitting else {}
        systems = {g.name: found for g in groups if refitting and (found := consumer_systems(g))}
        extra = self._system_tensors(groups, systems)
        samples, rows = self._captures(groups, fit_verifier, extra) if activations else ({}, {})
        requests = dict(taps.values()) | {s.tensor: s.taps for ss in systems.values() for s in ss if s.taps}
        patches = self._patch_grams(requests, fit_verifier) if requests else {}
        del fit_verifier
        cv = self._cv_verifier() if refitting else None
        cv_groups, held_rows = self._captures(groups, cv, extra) if cv is not None else ({}, {})
        validation = {name: captured for name, (_, captured, _) in cv_groups.items()}
        held_patches = self._patch_grams(requests, cv) if patches and cv is not None else {}
        del cv
        # a group's atom vectors (a copy of its weights) live only while its rankings are made: all
        # groups' at once beside the hashing's work arrays were the search's peak (conv25m: 138 MB)
        captures = RefitCaptures(taps, patches, held_patches, systems, rows, held_rows)
        self.options = [
            self._option(
                candidates_of(g), layer_macs, samples, validation, hashing=hashing, captures=captures
            )
            for g in groups
        ]
        del samples, validation, cv_groups, patches, held_patches, rows, held_rows, captures
        self.cache: dict[tuple, float] = {}  # errors measured (their count is the report's evaluations)
        self.macs_cache: dict[tuple, float] = {}
        self.macs_counter = MacsCounter(layer_macs, groups)
        self.simulator = _simulator(working, groups, list(consumer_inputs(groups)) if local else [])
        if self.simulator is None and self.base is None:  # every measurement rebuilds: export once
            self.base = graph_utils.export_model(working)
        elif self.simulator is not None and self.large:  # one sample a run: a batch's activations beside
            self.simulator.batched = False  # a plan's merged weights were the peak (conv25m: -85 MB, +0.1 s)
        self.local = self._local_sensitivity(groups) if local else None
        self.calibrate = sensitivity != "local"
        self.gain: dict[str, float] = {}  # per group: measured / estimated error ("calibrated")

    def _option(
        self,
        item: GroupCandidates,
        layer_macs: dict[str, int],
        samples: dict,
        validation: dict[str, np.ndarray],
        *,
        hashing: bool,
        captures: RefitCaptures | None = None,
    ) -> GroupOption:
        """One group's rankings (weights, hashed, activations, refit), removal levels and MACs per level."""
        name, n_atoms = item.group.name, item.group.n_atoms
        orderings: list[Ranking] = [Ordering("weights", 0.0, 0, item.candidates)]
        if hashing:
            if item.params.scaled.size >= HASHING_RELEASE_WEIGHTS:  # its work arrays come next
                release_free_memory("hashing")
            orderings += hashed_orderings(item, LARGE_HASH_RUNGS if self.large else HASH_RUNGS)
        if name in samples:
            tensor, rows, per_channel = samples[name]
            params = item.params
            if params.outgoing is None:
                raise InternalError(f"group {name}: its atom params lack the outgoing norms")
            channels = rows.reshape(-1, per_channel, rows.shape[1]).reshape(-1, per_channel * rows.shape[1])
            found = activation_candidates(item.group, tensor, channels, params.outgoing, params.signature)
            orderings.append(Ordering("activations", 0.0, 0, found))
        multiple = -(-self.channel_multiple // item.group.atom_width)  # heads: whole heads, a step of 1
        steps = ChannelSteps.of(item.params.signature, multiple)
        one_segment = np.unique(item.params.signature).size == 1  # every kept atom may compensate any
        refit = None
        if self.refit and captures is not None and captures.covers(name) and one_segment:
            tensor, conv = captures.taps[name]
            refit = self._tap_refit_ordering(item.group, tensor, conv, captures.fit[tensor],
                                             captures.held.get(tensor))  # fmt: skip
        refits: list[Ranking] = [refit] if refit is not None else []
        if refit is None and self.refit and name in samples and one_segment:
            tensor, rows, per_channel = samples[name]
            held, fit_validation = validation.get(name), self.measured_part != "cv"
            refit = self._refit_ordering(item.group, tensor, rows, held, per_channel, fit_validation)
            if refit is not None and per_channel > 1 and _flattened(item.group):
                # the rows refit beside the refit of whole channels: fewer positions than rows (one
                # per sample), it can fit worse; each level keeps the one that measures better
                refits.append(dataclasses.replace(refit, label="refit rows"))
                held = None if held is None else _by_channel(held, per_channel)
                refit = self._refit_ordering(item.group, tensor, _by_channel(rows, per_channel), held, 1,
                                             fit_validation)  # fmt: skip
            if refit is not None:
                refits.insert(0, refit)
        if self.refit and captures is not None and name in captures.systems:  # segments: on their steps
            grams = system_grams(item.group, captures.systems[name], captures.rows, captures.held_rows,
                                 captures.fit, captures.held)  # fmt: skip
            consumers, fit_validation = len(item.group.consumers), self.measured_part != "cv"
            each = None if grams is None else consumer_refit(grams, n_atoms, consumers,
                                                            fit_validation=fit_validation)  # fmt: skip
            if each is not None:
                refits.append(each)
        orderings += refits
        orderings = [dataclasses.replace(o, steps=steps) for o in orderings]
        available = achievable(orderings, n_atoms)
        levels = removal_levels(n_atoms, available, multiple, self.fractions, steps=steps)
        self.orderings[name] = orderings
        self.atom_cost[name] = atom_macs(item.group, layer_macs)
        self.merges[name] = {level: orderings[0].merges(level) for level in levels}
        option = GroupOption(name, n_atoms, levels, [self._saved(name, level) for level in levels])
        option.producers = [p.node.name for p in item.group.producers]
        option.unit = "heads" if item.group.atom_width > 1 else "channels"
        option.bandwidths = {o.label: o.bandwidth for o in orderings}
        option.basins = {o.label: o.basins for o in orderings}
        return option

    @staticmethod
    def _refit_ordering(
        group: ChannelGroup,
        tensor: str,
        rows: np.ndarray,
        validation: np.ndarray | None = None,
        per_channel: int = 1,
        fit_validation: bool = True,
    ) -> RefitOrdering | None:
        """The least-squares refit ranking of ``group`` on ``tensor``'s activations (its first consumer's).

        ``validation`` (the same tensor on the "cv" inputs) chooses the ridge strength; without it, a
        split of the captured positions does. ``per_channel`` rows of ``rows`` make a channel where the
        tensor is captured by rows (attention heads: the output projection is refit row by row).
        ``fit_validation``: the refit also fits on ``validation`` (off where the search measures its
        plans on those inputs; ``validation``'s Gram is then kept for the plan written).

        Every consumer reading that tensor enters the cost (their weight rows side by side: the costs
        add up on one Gram). None where the tensor does not carry every atom of the group (the
        compensation must reach all).
        """
        local = group.atom_index(tensor)
        if (local < 0).any() or not group.consumers or group.consumers[0].tensor != tensor:
            return None
        atoms = np.arange(group.n_atoms)
        pairs = zip(consumer_slots(group), group.consumers, strict=True)
        slots = [slot for slot, consumer in pairs if consumer.tensor == tensor]
        picked = atom_rows(local[atoms], per_channel)  # the rows of each atom, atom by atom
        weight = np.hstack(
            [
                weight_rows(slot, slot.local[atoms]).reshape(atoms.size * per_channel, -1).astype(np.float64)
                for slot in slots
            ]
        )
        held = None if validation is None else validation[picked]
        free_bias = bool(offset_atoms(group).all())
        return refit_ordering(rows[picked], atoms, weight, free_bias, held, block=per_channel,
                              fit_validation=fit_validation)  # fmt: skip

    def _tap_refit_ordering(
        self, group: ChannelGroup, tensor: str, conv: ConvTaps, gram: np.ndarray, held: np.ndarray | None
    ) -> RefitOrdering | None:
        """The refit ranking of a group read by k×k Conv consumers, every kernel tap refit on its own.

        ``gram``: the augmented Gram of the consumers' input patches on the fitted rows (row ``c·taps +
        t``: channel ``c`` at tap ``t``); ``held``: the same on the cv rows. The consumers' weights enter
        as ``W[:, c, t]`` rows side by side (one system of ``refit_systems.system_grams``). No
        intercept: a padded border does not see one. None where the tensor does not carry every atom
        of the group.
        """
        if (group.atom_index(tensor) < 0).any() or held is None:
            return None
        readers = tuple(index for index, consumer in enumerate(group.consumers) if consumer.tensor == tensor)
        found = system_grams(
            group, [RefitSystem(tensor, readers, conv)], {}, {}, {tensor: gram}, {tensor: held}
        )
        if found is None:
            return None
        (grams,) = found
        fit_validation = self.measured_part != "cv"
        return refit_from_grams(grams.gram, grams.fit, grams.val, grams.atoms, grams.weight, False,
                                held=grams.held, block=grams.block, fit_validation=fit_validation,
                                taps=True)  # fmt: skip

    def _tap_groups(self, groups: list[ChannelGroup]) -> dict[str, tuple[str, ConvTaps]]:
        """Per group: the tensor its consumers read and the kernel taps its patch Gram is taken with.

        Only where every consumer of the group reads that tensor and is a k×k Conv with the same kernel,
        dilations and pads: their weights then share one patch Gram, and a plan over taps reaches no
        other kind of consumer. Strides may differ (YOLOv8's neck reads a tensor with two 3×3 convs and
        a strided one): a strided conv's patches are every other one of the unstrided conv's, so the
        Gram is taken with the smallest strides, which samples the most positions.
        """
        found = {}
        for group in groups:
            if not group.consumers or group.tensors[group.consumers[0].tensor].block != 1:
                continue
            tensor = group.consumers[0].tensor
            if any(consumer.tensor != tensor for consumer in group.consumers):  # the plan reaches them all
                continue
            readers = [conv_taps(consumer.node) for consumer in group.consumers]
            convs = [r for r in readers if r is not None]
            if len(convs) != len(readers) or len({dataclasses.replace(r, strides=()) for r in convs}) != 1:
                continue
            taps = min(convs, key=lambda r: math.prod(r.strides))
            if group.tensors[tensor].channels * taps.taps <= REFIT_MAX_ATOMS:  # else no Gram is taken
                found[group.name] = (group.tensors[tensor].tensor.name, taps)
        return found

    def _patch_grams(self, requests: dict[str, ConvTaps], verifier: Verifier) -> dict:
        """The patch Grams of the tensors of ``requests`` (with their taps) on ``verifier``'s inputs."""
        base = self.base_model()
        return patch_grams(base, verifier.inputs, requests)

    @staticmethod
    def _system_tensors(
        groups: list[ChannelGroup], systems: dict[str, list[RefitSystem]]
    ) -> dict[str, tuple[int, int]]:
        """The tensors the consumer systems read over channels or rows: name → (channel axis, block)."""
        wanted = {}
        for group in groups:
            for system in systems.get(group.name, []):
                if system.taps is None:
                    member = group.tensors[system.tensor]
                    wanted[system.tensor] = (member.axis, member.block // system.rows)
        return wanted

    def _cv_verifier(self) -> Verifier:
        """The verifier of the cv inputs: the measuring one where it holds them (see ``_captures``)."""
        if self.measured_part == "cv":
            return self.verifier
        return self._verifier(CV_SEEDS[: self.seed_count], "cv")

    def _captures(
        self, groups: list[ChannelGroup], verifier: Verifier, extra: Mapping[str, tuple[int, int]]
    ) -> tuple[dict[str, tuple[str, np.ndarray, int]], dict[str, np.ndarray]]:
        """One capture run on ``verifier``'s inputs: per group, and per tensor of ``extra``.

        Per group: the tensor its first consumer reads, its sampled activations, and rows per channel.
        The activations are one row per channel (a block's elements as positions), or one row per
        element of a block where the consumer's input is captured by rows (``captured_by_rows``:
        attention heads, flattened channels), ``rows per channel`` of them for each channel. Per tensor
        of ``extra`` (name → channel axis, block): its rows, the same way; one that a group's first
        consumer reads in another form is left out. On the cv verifier (``_cv_verifier``: a
        calibration file's "cv" rows, or other seeds on synthetic inputs) the captures validate the
        refit's ridge strength on samples the fit never saw (a split of one capture's positions shares
        its samples between fit and validation: positions of one image are correlated); a recurrent
        stream is not split and gets none.
        """
        wanted = {}
        for group in groups:
            if group.consumers:
                consumer = group.consumers[0]
                member = group.tensors[consumer.tensor]
                rows = member.block if captured_by_rows(member, consumer.node) else 1
                wanted[group.name] = (member.tensor.name, member.axis, member.block // rows, rows)
        base = self.base_model()
        tensors = {t: (a, b) for t, a, b, _ in wanted.values()}
        more = {t: form for t, form in extra.items() if tensors.setdefault(t, form) == form}
        captured = capture(base, verifier.inputs, tensors, masks=verifier.token_masks)
        by_group = {name: (t, captured[t], rows) for name, (t, _, _, rows) in wanted.items() if t in captured}
        return by_group, {t: captured[t] for t in more if t in captured}

    def _local_sensitivity(self, groups: list) -> LocalSensitivity | None:
        """The capture-based estimate of every group's error (None: measure instead, with the reason)."""
        self.progress("capture activations")
        try:
            names = list(consumer_inputs(groups))
            fetch: Callable[[Sequence[str], Mapping[str, np.ndarray]], list[np.ndarray]]
            if self.simulator:
                fetch = self.simulator.tensors
            elif self.base is not None:
                fetch = tensor_fetch(self.base, names)
            else:  # __init__ exports the base model whenever there is no simulator
                raise InternalError("no simulator and no exported base model to capture activations from")
            return LocalSensitivity(fetch, groups, self.verifier.inputs, masks=self.verifier.token_masks)
        except Exception as error:  # onnxruntime's errors share no base class; measuring still works
            logger.warning("measuring each group's error (the activation capture failed: %s)", error)
            return None

    @property
    def sensitivity(self) -> str:
        """How the groups' errors alone were found ("local" estimate or "measured")."""
        if self.local is None:
            return "measured"
        return "calibrated" if self.calibrate else "local"

    def _saved(self, name: str, level: int) -> float:
        return float(self.atom_cost[name][removed_atoms(self.merges[name][level])].sum())

    # -- measurements --------------------------------------------------------------------------

    def _plan(self, counts: Counts) -> dict[str, MergeList]:
        """The merges ``counts`` stands for."""
        return {name: self.merges[name][count] for name, count in counts.items() if count}

    def apply_plan(self, plan: dict[str, MergeList], base: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The base model (``base``, when the caller holds it already) with the given merges applied."""
        working = graph_utils.import_model(base if base is not None else self.base_model())
        MergeNear(shapes=lambda _: self.shapes, merges=plan, freeze=self.freeze)(working)
        return graph_utils.export_model(working)

    def base_model(self) -> onnx.ModelProto:
        """The model the merges are applied to (exact rewrites only), as a proto."""
        return self.base if self.base is not None else graph_utils.export_model(self.working)

    def correction_verifiers(self) -> tuple[Verifier, Verifier, Verifier] | None:
        """The verifiers of the rows a correction is fitted on, validated on, and re-checked on.

        The search's fit rows (a calibration file's "search" part, or the search seeds), its cv rows
        and its held-out rows; None for a recurrent stream (used whole, not split).
        """
        if not self.split:
            return None
        fit = self._verifier(SEARCH_SEEDS[: self.seed_count], self.part)
        return fit, self._cv_verifier(), self.heldout

    def _measured(self, counts: Counts) -> float | None:
        """The error of ``counts`` on the search inputs if it was measured already, else None."""
        return self.cache.get(_cache_key(self._plan(counts), "search"))

    def final_plan(self, counts: Counts) -> dict[str, MergeList]:
        """The merges to write for ``counts``: its plan, refit groups refit on the cv rows too.

        Where the search measured on the cv rows (``measured_part``), a refit ranking chosen at a
        level is refit once more on the search and cv rows together (``RefitOrdering.final_merges``);
        the held-out error the search reports is this plan's. Elsewhere, the plan itself.
        """
        plan = self._plan(counts)
        for name, count in counts.items():
            ordering = self.chosen.get((name, count))
            if count and isinstance(ordering, (RefitOrdering, ConsumerRefitOrdering)):
                plan[name] = ordering.final_merges(count)  # the plan itself where nothing is kept apart
        return plan

    def _final_heldout(self, counts: Counts) -> float:
        """The held-out error of :meth:`final_plan` (cached by content)."""
        return self._plan_error(self.final_plan(counts), "heldout")

    def error(self, counts: Counts, *, heldout: bool = False) -> float:
        """Worst relative L2 error over outputs and the search (or held-out) inputs (cached)."""
        return self.plan_error(self._plan(counts), heldout=heldout)

    def plan_error(self, plan: dict[str, MergeList], *, heldout: bool = False) -> float:
        """Worst relative L2 error of the base model with ``plan`` applied (cached by content)."""
        return self._plan_error(plan, "heldout" if heldout else "search")

    def _plan_error(self, plan: dict[str, MergeList], role: str) -> float:
        """:meth:`plan_error` on the inputs of ``role``: "search", "heldout" or "calibration" (one sample)."""
        key = _cache_key(plan, role)
        if key not in self.cache:
            self.progress(f"measure {len(self.cache) + 1}")
            verifier = {"search": self.verifier, "heldout": self.heldout}.get(role) or self._calibrator()
            try:
                got = self._simulated(plan, verifier)
                if got is not None:
                    errors = verifier.rel_l2_errors_of(got, "disable_all")
                else:
                    errors = verifier.rel_l2_errors(self.apply_plan(plan), level="disable_all")
                self.cache[key] = max(errors.values(), default=0.0)
            except VerificationError as error:
                logger.warning("candidate could not run: %s", error)
                self.cache[key] = math.inf
        return self.cache[key]

    def _verifier(self, seeds: Sequence[int], part: str) -> Verifier:
        """A verifier of the reference on ``seeds`` at the search's level."""
        structure = self.reference_structure
        return Verifier(
            self.reference,
            self.spec,
            seeds=seeds,
            levels=LEVEL,
            part=part,
            structure=structure,
            held=self.held,
        )

    def _calibrator(self) -> Verifier:
        """The one-sample verifier that calibrates local estimates: the search's first feed or stream."""
        if self.calibration_verifier is None:
            self.calibration_verifier = self.verifier.head(1)  # shares the reference outputs
            self.suffix = self._suffix(self.calibration_verifier)
        return self.calibration_verifier

    def _suffix(self, verifier: Verifier) -> SuffixSimulator | None:
        """Suffix sessions for the one calibration feed (None: its runs use the whole simulator)."""
        if self.simulator is None or verifier.pairs:  # a stream's feeds change step by step
            return None
        try:
            return SuffixSimulator(self.simulator, verifier.inputs[0])
        except Exception as error:  # onnxruntime's errors share no base class; the full runs still work
            logger.info("calibration runs the whole model (no suffix sessions: %s)", error)
            return None

    def _simulated(self, plan: dict[str, MergeList], verifier: Verifier) -> list[dict] | None:
        """The plan's outputs from the one-session simulator, or None (then the model is rebuilt).

        Through ``verifier.outputs_of``: a recurrent model's streams carry the simulated model's own state.
        """
        if self.simulator is None or not self.simulator.supports(plan):
            return None
        if verifier is self.calibration_verifier and self.suffix is not None:
            suffix = self.suffix
            try:
                return verifier.outputs_of(lambda feeds: suffix.run(plan, feeds))
            except Exception as error:  # onnxruntime's errors share no base class
                logger.info("calibration runs the whole model (a suffix session failed: %s)", error)
                self.suffix = None
        simulator = self.simulator
        try:
            return verifier.outputs_of(lambda feeds: simulator.run(plan, feeds))
        except Exception as error:  # onnxruntime's errors share no base class
            logger.warning("measuring by rebuilding the model (the simulator failed: %s)", error)
            self.simulator = self.suffix = None
            return None

    def _sensitivity(self, cap: float) -> None:
        """Each group's error alone per level, with the best ordering (weights or hashed) per level.

        Incremental: a later call with a larger cap goes on from the last level measured. With the
        local estimate every level is estimated at once (no run; the cap does not apply).
        """
        if self.local is not None:
            self._estimate_levels()
            return
        for option in self.options:
            if not option.errors:
                option.errors, option.orderings = [0.0], ["-"]
            elif option.errors[-1] > cap:
                continue  # measured up to a level over this cap already
            for level in option.levels[len(option.errors) :]:
                if self._add_level(option, level, lambda name, merges: self.plan_error({name: merges})) > cap:
                    break

    def _estimate_levels(self) -> None:
        """Each group's local error estimate per level, with the best ranking per level.

        In "calibrated" mode each group's estimates are then scaled by its measured/estimated ratio at
        one level (one run per group), which carries the estimate from the consumers to the outputs.
        """
        assert self.local is not None
        for option in self.options:
            if option.errors:
                continue
            option.errors, option.orderings = [0.0], ["-"]
            for level in option.levels[1:]:
                self._add_level(option, level, self._estimate)
            if self.calibrate and len(option.levels) > 1:
                self.gain[option.name] = self._calibration(option)
                option.errors = [self.gain[option.name] * value for value in option.errors]

    def _add_level(self, option: GroupOption, level: int, score: Callable[[str, MergeList], float]) -> float:
        """Score every ranking's merges at ``level``, keep the best for the group; its error."""
        tried = [(o, o.merges(level)) for o in self.orderings[option.name]]
        scored = [(score(option.name, merges), o, merges) for o, merges in tried if merges]
        value, ordering, merges = min(scored, key=lambda item: item[0])
        self.merges[option.name][level] = merges
        self.chosen[(option.name, level)] = ordering
        option.macs_saved[option.levels.index(level)] = self._saved(option.name, level)
        option.errors.append(value)
        option.orderings.append(ordering.label)
        return value

    def _calibration(self, option: GroupOption) -> float:
        """Measured (on one sample) over estimated error of one group at its middle level (1 when 0)."""
        middle = len(option.levels) // 2
        level, estimate = option.levels[middle], option.errors[middle]
        measured = self._plan_error({option.name: self.merges[option.name][level]}, "calibration")
        if estimate <= 0.0 or measured <= 0.0:
            return 1.0
        return measured / estimate if math.isfinite(measured) else DESTROYED / estimate

    def _alone(self, name: str, count: int) -> float:
        """One group's error alone at ``count`` merges: estimated (local) or measured."""
        if self.local is not None and not self.local.released:
            return self.gain.get(name, 1.0) * self._estimate(name, self.merges[name][count])
        return self.error({name: count})

    def _estimate(self, name: str, merges: MergeList) -> float:
        """The local estimate of one group's plan; a plan over kernel taps is estimated on the patches."""
        if isinstance(merges, DenseMerges) and merges.taps:
            (ranking,) = [o for o in self.orderings[name] if isinstance(o, RefitOrdering) and o.taps]
            return ranking.estimated_error(merges)
        if isinstance(merges, ConsumerMerges):  # its systems' Grams: the local estimate may lack patches
            (each,) = [o for o in self.orderings[name] if isinstance(o, ConsumerRefitOrdering)]
            return each.estimated_error(merges)
        assert self.local is not None
        return self.local.error(name, merges)

    def _release_estimates(self) -> None:
        """Free the local estimate's Gram matrices before the joint measurements.

        Their batched runs are the search's memory peak; a later error alone is measured instead.
        """
        if self.local is not None:
            self.local.release()

    def _greedy_order(self, cap: float) -> list[Counts]:
        cap = DESTROYED if self.local is not None else cap  # estimates: every level short of destroyed
        state = {o.name: 0 for o in self.options}
        order: list[Counts] = [{}]
        while True:
            best, best_score = None, -1.0
            for option in self.options:
                step = state[option.name] + 1
                if step >= len(option.errors) or option.errors[step] > cap:
                    continue
                gained = option.macs_saved[step] - option.macs_saved[step - 1]
                added = max(option.errors[step] ** 2 - option.errors[step - 1] ** 2, 1e-12)
                if gained / added > best_score:
                    best, best_score = option, gained / added
            if best is None:
                return order
            state[best.name] += 1
            order.append({o.name: o.levels[state[o.name]] for o in self.options if state[o.name]})

    def _largest_within(self, order: list[Counts], tolerance: float) -> int:
        low, high = 0, len(order) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self.error(order[middle]) <= tolerance:
                low = middle
            else:
                high = middle - 1
        return low

    def _result(self, order: list[Counts], index: int, heldout: float) -> BudgetResult:
        counts = order[index]
        return BudgetResult(
            counts=counts, error=self.error(counts), heldout_error=heldout,
            macs_fraction=self.measured_fraction(counts), evaluations=len(self.cache),
            curve=self._curve(order, index), groups=self.options, sensitivity=self.sensitivity,
            measured_part=self.measured_part,
        )  # fmt: skip

    def _curve(
        self, order: list[Counts], chosen: int, points: int = CURVE_POINTS
    ) -> list[tuple[float, float]]:
        """(MACs kept, error) along the greedy order: a few evenly spaced prefixes and the chosen one."""
        picks = {int(k) for k in np.linspace(0, len(order) - 1, min(points, len(order)))} | {chosen}
        if self.local is not None:  # only what the search measured anyway (the curve is for the report)
            picks = {k for k in picks if self._measured(order[k]) is not None} | {chosen}
        finite = [(self.measured_fraction(order[k]), self.error(order[k])) for k in sorted(picks)]
        return sorted((m, e) for m, e in finite if math.isfinite(e))

    def within_tolerance(self, tolerance: float) -> BudgetResult:
        """The most MACs removed with every output's relative L2 error within ``tolerance``."""
        self._sensitivity(tolerance)
        order = self._greedy_order(tolerance)
        self._release_estimates()
        index = self._largest_within(order, tolerance)
        heldout = self._final_heldout(order[index])
        while index > 0 and heldout > tolerance:  # over budget on unseen inputs: step back
            index -= max(1, index // 5)
            heldout = self._final_heldout(order[index])
        return self._result(order, index, heldout)

    def measured_fraction(self, counts: Counts) -> float:
        """The fraction of MACs kept, counted per layer from kept channels (``red_onnx.search.simulate``)."""
        plan = self._plan(counts)  # a refit merges each removed atom into many: count the removed atoms
        key = tuple(sorted((name, removed_atoms(merges).size) for name, merges in plan.items()))
        if key not in self.macs_cache:
            self.macs_cache[key] = self.macs_counter.fraction(self._plan(counts))
        return self.macs_cache[key]

    def macs_floor(self) -> float:
        """The fraction of MACs kept with every group at its deepest level (first ranking; no run)."""
        return self.measured_fraction({o.name: o.levels[-1] for o in self.options if o.levels})

    def to_target(self, fraction: float) -> tuple[BudgetResult, float]:
        """The smallest error reaching ``fraction`` of the MACs; also the lowest fraction reachable.

        A target under the MACs floor by more than ``FLOOR_MARGIN`` is answered at once (no error
        measured), with the floor as the lowest fraction reachable.
        """
        floor = self.macs_floor()
        if floor > fraction + FLOOR_MARGIN:
            return self._result([{}], 0, math.inf), floor
        cap = DESTROYED if self.local is not None else TARGET_START_CAP
        while True:  # measure deeper levels only while the cheap ones cannot reach the target
            self._sensitivity(cap)
            order = self._greedy_order(cap)
            reachable = self.measured_fraction(order[-1])
            if reachable <= fraction or cap >= DESTROYED:
                break
            cap = min(cap * TARGET_CAP_GROWTH, DESTROYED)
        if reachable > fraction:
            return self._result(order, len(order) - 1, math.inf), reachable
        low, high = 0, len(order) - 1  # the shortest prefix that reaches the target
        while low < high:
            middle = (low + high) // 2
            if self.measured_fraction(order[middle]) <= fraction:
                high = middle
            else:
                low = middle + 1
        order[low] = self._landing(order[low - 1] if low else {}, order[low], fraction)
        self._release_estimates()
        heldout = self._final_heldout(order[low])
        return self._result(order, low, heldout), reachable

    def _landing(self, before: Counts, crossing: Counts, fraction: float) -> Counts:
        """The plan near ``crossing`` that reaches ``fraction`` with the least measured error.

        The greedy order's crossing step may be a coarse one (half of a 32-channel group on a step of 16:
        the demo at 0.5 jumped from 0.62 to 0.33 of its MACs). Besides that step cut down by
        :meth:`_refine`, swaps are tried: one group of ``crossing`` one level back (the crossing group's
        is ``before``) and another raised to its first level that reaches the target, cut down the same
        way (the demo at 0.5: the stem's step without the block's, with a first level of the
        downsampling conv, lands at 0.49 with error 0.44 against 0.50 at 0.33). Where the crossing
        step lands within ``OVERSHOOT_SLACK`` of the target only the crossing group's step is taken
        back (a landing nearer the target would keep few more MACs). The ``LANDINGS`` swaps of least
        estimated error (each group's error alone, added in squares) are measured with the crossing
        step, and the least error wins (ties: the most MACs kept).
        """
        stepped = next((name for name in crossing if crossing[name] != before.get(name, 0)), None)
        greedy = self._refine(before, crossing, fraction)
        overshoot = self.measured_fraction(greedy) < fraction - OVERSHOOT_SLACK
        swaps: list[tuple[float, Counts, Counts]] = []
        for lowered in self._lowerings(crossing, stepped, others=overshoot):
            base = before if lowered == stepped else self._lowered(crossing, lowered)
            for option in self.options:
                if option.name == lowered:
                    continue
                raised = self._first_reaching(base, option, fraction)
                if raised is not None:
                    swaps.append((self._estimated(raised), base, raised))
        swaps.sort(key=lambda swap: swap[0])
        found = [greedy] + [self._refine(base, raised, fraction) for _, base, raised in swaps[:LANDINGS]]
        unique = list({tuple(sorted(counts.items())): counts for counts in found}.values())
        return min(unique, key=lambda counts: (self.error(counts), -self.measured_fraction(counts)))

    def _lowerings(self, crossing: Counts, stepped: str | None, *, others: bool) -> list[str]:
        """The groups whose last step a landing may take back.

        The crossing group, and (``others``) the ``LANDINGS`` others whose last step added the most
        squared error per MAC saved.
        """
        costs = []
        for option in self.options:
            position = _position(option, crossing.get(option.name, 0))
            if not others or option.name == stepped or not position or position >= len(option.errors):
                continue
            gained = option.macs_saved[position] - option.macs_saved[position - 1]
            added = option.errors[position] ** 2 - option.errors[position - 1] ** 2
            costs.append((added / max(gained, 1.0), option.name))
        return ([stepped] if stepped is not None else []) + [name for _, name in sorted(costs)[-LANDINGS:]]

    def _lowered(self, counts: Counts, name: str) -> Counts:
        """``counts`` with group ``name`` one level back (dropped at level 0)."""
        option = next(o for o in self.options if o.name == name)
        level = option.levels[_position(option, counts[name]) - 1]
        return {**{k: v for k, v in counts.items() if k != name}, **({name: level} if level else {})}

    def _first_reaching(self, base: Counts, option: GroupOption, fraction: float) -> Counts | None:
        """``base`` with ``option``'s group at its first measured level that reaches ``fraction``."""
        current = base.get(option.name, 0)
        levels = [
            level
            for level in option.levels[: len(option.errors)]
            if level > current and (option.name, level) in self.chosen
        ]
        if not levels or self.measured_fraction({**base, option.name: levels[-1]}) > fraction:
            return None
        plans = ({**base, option.name: level} for level in levels)
        return next(plan for plan in plans if self.measured_fraction(plan) <= fraction)

    def _estimated(self, counts: Counts) -> float:
        """The error of ``counts`` estimated from each group's error alone, added in squares."""
        total = 0.0
        for option in self.options:
            position = _position(option, counts.get(option.name, 0))
            total += option.errors[position] ** 2 if position < len(option.errors) else math.inf
        return math.sqrt(total)

    def _refine(self, before: Counts, after: Counts, fraction: float) -> Counts:
        """Land just under ``fraction``: the fewest merges of the last step's group that still reach it.

        The greedy order moves in whole levels (fractions of a group); the step that crosses the target
        is cut to the smallest merge count in between, with the same ranking, that reaches it.
        """
        changed = [name for name in after if after[name] != before.get(name, 0)]
        if len(changed) != 1:
            return after
        name = changed[0]
        ordering = self.chosen.get((name, after[name]))
        if ordering is None:
            return after
        option = next(o for o in self.options if o.name == name)
        allowed = ordering.allowed()  # the counts keeping every segment on its step (ChannelSteps)
        start = before.get(name, 0) + 1
        counts = [k for k in range(start, after[name]) if allowed is None or k in allowed] + [after[name]]
        low, high = 0, len(counts) - 1
        while low < high:
            middle = (low + high) // 2
            self.merges[name].setdefault(counts[middle], ordering.merges(counts[middle]))
            if self.measured_fraction({**after, name: counts[middle]}) <= fraction:
                high = middle
            else:
                low = middle + 1
        low = counts[low]
        self.merges[name].setdefault(low, ordering.merges(low))
        if low not in option.levels:
            position = next(k for k, level in enumerate(option.levels) if level > low)
            option.levels.insert(position, low)
            option.macs_saved.insert(position, self._saved(name, low))
            option.errors.insert(position, self._alone(name, low))
            option.orderings.insert(position, ordering.label)
        return {**after, name: low}


def _position(option: GroupOption, level: int) -> int:
    """Where ``level`` stands in ``option``'s levels (0: the group untouched)."""
    return option.levels.index(level) if level else 0


def _flattened(group: ChannelGroup) -> bool:
    """Whether the group's first consumer reads a flattened tensor row by row (``flattened_rows``)."""
    consumer = group.consumers[0]
    return flattened_rows(group.tensors[consumer.tensor], consumer.node)


def _by_channel(rows: np.ndarray, per_channel: int) -> np.ndarray:
    """Rows captured ``per_channel`` to a channel as one row per channel (its rows' values as positions)."""
    return rows.reshape(-1, per_channel * rows.shape[1])
