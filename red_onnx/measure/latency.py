"""The latency service: measures models on the execution target with onnxruntime, cached.

Passes that need a cost oracle (``passes/separate_depthwise.py``) receive a :class:`LatencyProbe` and
never build sessions themselves, so tests can hand them a double. :class:`LatencyService` is the real
one: one onnxruntime provider (CPU by default), graph optimisations on (as deployed), a few warm-up
runs, then ``runs`` timed runs **interleaved** between the two models it compares, so that drift of
the machine (another process, frequency scaling) hits both alike; the median of each is returned.

With a ``cache_file`` (``--latency-cache``) the service replays the timings recorded there (keyed by the
content of the two models, the feed's shapes, the provider, threads and runs) and records the ones it
measures, so a latency-checked run can be repeated byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from red_onnx.errors import UsageError
from red_onnx.options import CPU_PROVIDER

logger = logging.getLogger(__name__)

#: Timed runs per model (a median of at least 20).
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
#: What a latency cache file says it is (``--latency-cache``).
CACHE_FORMAT = "red-onnx latency cache 1"

Feed = Mapping[str, np.ndarray]


class LatencyProbe(Protocol):
    """What a pass asks of a latency oracle."""

    provider: str

    def compare(
        self, before: onnx.ModelProto, after: onnx.ModelProto, feed: Feed, *, runs: int | None = None
    ) -> tuple[float, float]:
        """Median seconds per run of ``before`` and of ``after`` on ``feed`` (more ``runs``: re-measure)."""
        ...


def check_provider(provider: str) -> str:
    """``provider`` when this onnxruntime build has it; a one-line UsageError naming the ones it has."""
    available = ort.get_available_providers()
    if provider not in available:
        raise UsageError(
            f"--provider {provider} is not available in this onnxruntime; it has: {', '.join(available)}"
        )
    return provider


@dataclass
class LatencyService:
    """Measures onnxruntime latency of small models (probes) or whole models, with a cache.

    Attributes:
        provider: The execution provider measured.
        runs: Timed runs per model, after ``warmup`` untimed ones.
        warmup: Untimed runs first.
        threads: ``intra_op_num_threads`` (None: onnxruntime's default, all cores).
        probes: How many comparisons were measured (cache hits not counted).
        seconds: Wall time spent measuring.
        cache_file: A JSON file of recorded timings (``--latency-cache``): replayed when they match,
            and every new measurement is added to it (written atomically).
        replayed: How many comparisons came from ``cache_file``.
    """

    provider: str = CPU_PROVIDER
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    threads: int | None = None
    probes: int = 0
    seconds: float = 0.0
    cache_file: Path | None = None
    replayed: int = 0
    _cache: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _recorded: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_provider(self.provider)
        if self.runs < 1 or self.warmup < 0:
            raise UsageError(f"latency runs must be >= 1 and warm-up >= 0, got {self.runs} and {self.warmup}")
        if self.cache_file is not None:
            self._recorded = read_cache(self.cache_file)

    def session_options(self) -> ort.SessionOptions:
        """The options of a measured session: graph optimisations on (as deployed), the thread count."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        return options

    def session(
        self, model: onnx.ModelProto | str, options: ort.SessionOptions | None = None
    ) -> ort.InferenceSession:
        """A session on the measured provider (``options``: default :meth:`session_options`)."""
        source = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(source, options or self.session_options(), providers=[self.provider])

    def compare(
        self, before: onnx.ModelProto, after: onnx.ModelProto, feed: Feed, *, runs: int | None = None
    ) -> tuple[float, float]:
        """Median seconds per run of each model, timed in interleaved runs (cached by content).

        Args:
            before: The first model.
            after: The second model (same inputs).
            feed: Arrays by input name.
            runs: Timed runs per model (None: ``self.runs``); a re-measurement asks for more.
        """
        runs = runs or self.runs
        parts = (_digest(before), _digest(after), _shapes(feed), self.provider, self.threads, runs)
        key = "|".join(str(part) for part in parts)
        if key not in self._cache and key in self._recorded:
            self._cache[key] = self._recorded[key]
            self.replayed += 1
        if key not in self._cache:
            started = time.perf_counter()
            before_s, after_s = self.time_sessions([self.session(before), self.session(after)], feed, runs)
            self._cache[key] = (before_s, after_s)
            self.probes += 1
            self.seconds += time.perf_counter() - started
            if self.cache_file is not None:
                self._recorded[key] = (before_s, after_s)
                write_cache(self.cache_file, self._recorded)
        return self._cache[key]

    def time_sessions(
        self, sessions: list[ort.InferenceSession], feed: Feed, runs: int | None = None
    ) -> tuple[float, ...]:
        """Median seconds per run of each session: warm-up, then the runs interleaved across sessions.

        Args:
            sessions: The sessions to time.
            feed: Arrays by input name (each session takes the ones it declares).
            runs: Timed runs per session (None: ``self.runs``).
        """
        feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
        for _ in range(self.warmup):
            for session, inputs in zip(sessions, feeds, strict=True):
                session.run(None, inputs)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(runs or self.runs):
            for session, inputs, record in zip(sessions, feeds, times, strict=True):
                start = time.perf_counter()
                session.run(None, inputs)
                record.append(time.perf_counter() - start)
        return tuple(statistics.median(record) for record in times)


def read_cache(path: Path) -> dict[str, tuple[float, float]]:
    """The timings recorded in a latency cache file (none when it does not exist yet).

    Raises:
        UsageError: The file exists but is not a latency cache.
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return {str(key): (float(pair[0]), float(pair[1])) for key, pair in data["timings"].items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise UsageError(f"--latency-cache {path} is not a red-onnx latency cache ({error})") from None


def write_cache(path: Path, timings: Mapping[str, tuple[float, float]]) -> None:
    """Write ``timings`` to the latency cache file ``path``, atomically (exact floats: replays match).

    Raises:
        UsageError: The file cannot be written.
    """
    data = {"format": CACHE_FORMAT, "timings": {key: list(pair) for key, pair in sorted(timings.items())}}
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=1) + "\n")
        temp.replace(path)
    except OSError as error:
        raise UsageError(f"cannot write --latency-cache {path}: {error.strerror or error}") from None
    logger.debug("latency cache %s: %d timings", path, len(timings))


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _shapes(feed: Feed) -> tuple:
    return tuple(
        sorted((name, tuple(np.shape(value)), str(np.asarray(value).dtype)) for name, value in feed.items())
    )
