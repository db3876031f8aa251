"""The pass contract, after onnx_ir's ``passes/_pass_infra.py``: ``call(model) -> PassResult``.

A pass is a small class with one job. It decides a plan from analysis, hands it to
``red_onnx.rewrite.editor`` and returns what it did: ``modified``, its statistics and its skip reasons.
It never builds onnxruntime sessions or writes files itself.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from red_onnx.io.graph import WorkingModel

logger = logging.getLogger(__name__)


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
    """What a pass did to the model (edited in place).

    Attributes:
        model: The model, after the pass.
        modified: Whether anything changed.
        stats: The pass's statistics (JSON-ready values).
        skips: What the pass left alone, with reasons.
        seconds: Wall time of the pass (filled by ``Pass.__call__``).
    """

    model: WorkingModel
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    skips: list[Skip] = field(default_factory=list)
    seconds: float = 0.0


class Pass(abc.ABC):
    """Base class of every pass: subclasses implement :meth:`call`."""

    name: ClassVar[str] = "pass"

    def __call__(self, model: WorkingModel) -> PassResult:
        """Run the pass and time it."""
        start = time.perf_counter()
        result = self.call(model)
        result.seconds = time.perf_counter() - start
        logger.info("%s: modified=%s in %.3fs %s", self.name, result.modified, result.seconds, result.stats)
        return result

    @abc.abstractmethod
    def call(self, model: WorkingModel) -> PassResult:
        """Transform ``model`` in place and report."""
