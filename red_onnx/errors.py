"""The one small error hierarchy of red_onnx.

Every error carries a one-line message that says what is wrong and what to do; the CLI prints it
without a traceback and exits with the class's ``exit_code``.
"""

from __future__ import annotations

from typing import Any


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name): what a one-line error quotes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class RedOnnxError(Exception):
    """Base class of every error red_onnx raises on purpose."""

    exit_code = 2


class InputError(RedOnnxError):
    """The input model, inputs file or an option value cannot be used (exit code 2)."""

    exit_code = 2


class UsageError(RedOnnxError):
    """The options contradict each other or are malformed (exit code 2)."""

    exit_code = 2


class VerificationError(RedOnnxError):
    """The rewritten model does not match the original within tolerance (exit code 1).

    Attributes:
        result: The run's result (model and report) when the failure came after a full run, else None.
    """

    exit_code = 1
    result: Any = None


class RewriteError(RedOnnxError):
    """A rewrite plan is inconsistent with the graph; an internal error, reported with its numbers."""

    exit_code = 1


class InternalError(RedOnnxError):
    """A broken internal invariant: a bug to report, never an outcome (exit code 3)."""

    exit_code = 3


class PassContractError(InternalError):
    """A pass broke its contract: a failed precondition or postcondition, or a changed model interface."""
