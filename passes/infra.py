"""The pass contract and a small pass manager, after onnx_ir's ``passes/_pass_infra.py``.

A pass is a small class with one job: ``call(model) -> PassResult``. It decides a plan from analysis,
hands it to ``red_onnx.rewrite`` and returns what it did: ``modified``, its statistics and its skip
reasons. It never builds onnxruntime sessions or writes files itself; services it needs (the shape
service, the latency service, the merges a search chose) are given to its constructor.

Each pass declares whether it works ``in_place`` (every pass here edits the working model it is given
and returns it), and may check a ``requires`` precondition before and an ``ensures`` postcondition
after its work. Every pass keeps the model's interface: the names and order of the graph's inputs
and outputs. A broken contract is a bug, raised as :class:`~red_onnx.errors.PassContractError`.

:class:`PassManager` runs a list of steps in order. A step is a pass, or a function that builds the
next pass from the model as the earlier passes left it (or returns None to skip it): that is how an
orchestration step such as the budget search hands its decision to the pass that applies it.

May import :mod:`red_onnx.io`, :mod:`red_onnx.analysis`, :mod:`red_onnx.rewrite` and
:mod:`red_onnx.errors` (and, as a type, the latency probe of :mod:`red_onnx.measure`).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from red_onnx.errors import PassContractError
from red_onnx.io.graph import WorkingModel

logger = logging.getLogger(__name__)

#: Ops whose second input is a weight the channel passes read as a constant.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class Skip:
    """Something a pass left alone, and why (a reason from ``red_onnx.analysis.reasons``)."""

    subject: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"subject": self.subject, "reason": self.reason}


@dataclass
class PassResult:
    """What a pass did to the model.

    Attributes:
        model: The model, after the pass (the same object for an in-place pass).
        modified: Whether anything changed.
        stats: The pass's statistics (JSON-ready values).
        skips: What the pass left alone, with reasons.
        seconds: Wall time of the pass (filled by ``Pass.__call__``).
        name: The pass's name (filled by ``Pass.__call__``).
    """

    model: WorkingModel
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    skips: list[Skip] = field(default_factory=list)
    seconds: float = 0.0
    name: str = ""


def _interface(model: WorkingModel) -> tuple[list[str], list[str]]:
    return [t.name for t in model.graph.inputs], [t.name for t in model.graph.outputs]


class Pass(abc.ABC):
    """Base class of every pass: subclasses implement :meth:`call`, and may check conditions.

    Attributes:
        name: The name the report and the progress display use.
        in_place: Whether :meth:`call` edits and returns the model it is given.
    """

    name: ClassVar[str] = "pass"
    in_place: ClassVar[bool] = True

    def __call__(self, model: WorkingModel) -> PassResult:
        """Check the precondition, run the pass, check its result and the postcondition; time it.

        Raises:
            PassContractError: A condition failed, the model's inputs or outputs changed, or an
                in-place pass returned another model.
        """
        self.requires(model)
        interface = _interface(model)
        start = time.perf_counter()
        result = self.call(model)
        result.seconds = time.perf_counter() - start
        result.name = self.name
        if self.in_place and result.model is not model:
            raise PassContractError(f"pass {self.name} is in place but returned another model")
        after = _interface(result.model)
        if after != interface:
            raise PassContractError(
                f"pass {self.name} changed the model's interface: inputs/outputs {interface} became {after}"
            )
        self.ensures(result.model)
        logger.info("%s: modified=%s in %.3fs %s", self.name, result.modified, result.seconds, result.stats)
        return result

    @abc.abstractmethod
    def call(self, model: WorkingModel) -> PassResult:
        """Transform ``model`` and report."""

    def requires(self, model: WorkingModel) -> None:
        """Raise :class:`PassContractError` when ``model`` is not fit for this pass (default: no check)."""
        del model

    def ensures(self, model: WorkingModel) -> None:
        """Raise :class:`PassContractError` when the pass left ``model`` short of its promise (no check)."""
        del model


def require_constant_weights(model: WorkingModel, pass_name: str) -> None:
    """The precondition of the channel passes: weights written as ``Constant`` nodes were folded.

    ``red_onnx.io.graph.normalise_constants`` folds them at import; a ``Constant`` node still feeding a
    weight would make the analysis freeze a group that is in fact constant.

    Raises:
        PassContractError: Naming the first layer whose weight is still a ``Constant`` node's output.
    """
    for node in model.graph.nodes:
        if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
            continue
        producers = node.inputs[1].inputs
        if producers and producers[0].op == "Constant":
            raise PassContractError(
                f"pass {pass_name} needs normalised constants, but the weight of {node.op} node "
                f"{node.name!r} is the output of Constant node {producers[0].name!r}"
            )


#: A step of a pass list: a pass, or a function building one from the model as it is by then.
PassStep = Pass | Callable[[WorkingModel], Pass | None]


class PassManager:
    """Runs a list of pass steps in order over one working model."""

    def __init__(self, steps: Sequence[PassStep], *, progress: Callable[[str], None] | None = None) -> None:
        """Configure the manager.

        Args:
            steps: The passes, in order; a callable step builds its pass when its turn comes (None:
                nothing to run).
            progress: Called with each pass's name as it starts.
        """
        self.steps = list(steps)
        self.progress = progress

    def __call__(self, model: WorkingModel) -> list[PassResult]:
        """Run every step on ``model``; the results in order (steps that built no pass leave none)."""
        results = []
        for step in self.steps:
            item = step if isinstance(step, Pass) else step(model)
            if item is None:
                continue
            if self.progress is not None:
                self.progress(item.name)
            result = item(model)
            model = result.model
            results.append(result)
        return results
