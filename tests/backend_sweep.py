"""The onnx backend test suite through ``red_onnx.compress(exact=True)``: every model verifies or is refused.

Each case (a model and its reference inputs and outputs) is compressed twice: once with the reference
inputs' shapes (``InputSpec(shapes=...)``, synthetic values) and once with the reference inputs
themselves in an ``.npz`` (``InputSpec(npz=...)``). The outcome of a run is one of

- ``verified``: the run passed, and every output of the result matches the reference outputs wherever
  the original's does (rtol 1e-3, atol 1e-4; outputs of ops with random results compared for shape
  and type only);
- ``refused``: a one-line :class:`~red_onnx.errors.RedOnnxError` (bad or unsupported input);
- ``wrong``: the result differs from the reference where the original does not;
- ``internal``: any other exception, or a multi-line error message (a bug);
- ``timeout``: the run took longer than the per-case limit.

The folders are the suite's ``node/`` (from the zoo's ``backend/node``, unpacked by ``bench/zoo.py``:
the installed onnx may not ship it), ``pytorch-converted/``, ``pytorch-operator/``, ``simple/`` and
``light/`` (the installed onnx's data; light models' inputs are the runner's deterministic dummy data).

Run by hand::

    python tests/backend_sweep.py                 # all folders, both modes, 2 workers
    python tests/backend_sweep.py --folder simple --mode npz -v
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

#: Folders of the suite, in the order they are swept.
FOLDERS = ("node", "pytorch-converted", "pytorch-operator", "simple", "light")
MODES = ("shapes", "npz")
#: Ops whose outputs are random: compared for shape and type only.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})  # fmt: skip
RTOL, ATOL = 1e-3, 1e-4
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Case:
    """One model of the suite: its file, and where its reference data lies."""

    folder: str
    name: str
    model: Path
    data_sets: tuple[Path, ...]  # test_data_set_* folders (empty for light models)
    light_outputs: tuple[Path, ...] = ()  # light models: <stem>_output_<i>.pb beside the model


@dataclass(frozen=True)
class Outcome:
    """What one run of one case gave."""

    case: str
    mode: str
    kind: str  # verified, refused, wrong, internal, timeout
    message: str = ""
    seconds: float = 0.0


def folder_path(folder: str) -> Path | None:
    """The directory of ``folder`` of the suite, or None when it is not on this machine."""
    if folder == "node":
        from bench.zoo import zoo_dir  # the repository root is on the path (pytest, or main below)

        path = zoo_dir() / "backend" / "node"
        installed = _installed_data() / "node"
        return path if path.is_dir() else (installed if installed.is_dir() else None)
    path = _installed_data() / folder
    return path if path.is_dir() else None


def _installed_data() -> Path:
    import onnx.backend.test

    return Path(onnx.backend.test.__file__).parent / "data"


def cases(folder: str) -> list[Case]:
    """Every case of ``folder`` (none when the folder is absent)."""
    root = folder_path(folder)
    if root is None:
        return []
    if folder == "light":
        found = []
        for model in sorted(root.glob("*.onnx")):
            outputs = tuple(sorted(root.glob(f"{model.stem}_output_*.pb")))
            found.append(Case(folder, model.stem, model, (), outputs))
        return found
    return [
        Case(folder, path.name, path / "model.onnx", tuple(sorted(path.glob("test_data_set_*"))))
        for path in sorted(root.iterdir())
        if (path / "model.onnx").is_file()
    ]


def _read_value(path: Path, type_proto: Any) -> Any:
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(data)
        return numpy_helper.to_list(sequence)
    if type_proto.HasField("optional_type"):
        optional = onnx.OptionalProto()
        optional.ParseFromString(data)
        return numpy_helper.to_optional(optional)
    if type_proto.HasField("map_type"):
        raise NotImplementedError("map values")
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def reference_data(case: Case, model: Any) -> list[tuple[dict[str, Any], list[Any]]]:
    """Per data set: the inputs by name and the reference outputs in graph order."""
    from onnx.backend.test.runner import Runner

    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    outputs = list(model.graph.output)
    if case.folder == "light":
        feed = {vi.name: Runner.generate_dummy_data(vi, seed=0, name=case.name) for vi in graph_inputs}
        refs = [_read_value(path, vi.type) for path, vi in zip(case.light_outputs, outputs, strict=False)]
        return [(feed, refs)]
    sets = []
    for data_set in case.data_sets:
        input_files = sorted(data_set.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        output_files = sorted(data_set.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        feed = {
            vi.name: _read_value(path, vi.type) for path, vi in zip(input_files, graph_inputs, strict=False)
        }
        refs = [_read_value(path, vi.type) for path, vi in zip(output_files, outputs, strict=False)]
        sets.append((feed, refs))
    return sets


def _close(got: Any, want: Any, loose: bool) -> bool:
    """Whether ``got`` matches ``want`` (values within rtol/atol; shape and type only when ``loose``)."""
    if want is None or got is None:
        return want is None and got is None
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_close(g, w, loose) for g, w in zip(got, want, strict=True))
        )
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if loose:
        return got.dtype == want.dtype
    if want.dtype.kind in "fc":
        return bool(np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True))
    return bool(np.array_equal(got, want))


def _run_session(model: Any, feed: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    source = model if isinstance(model, str) else model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _input_spec(mode: str, sets: list[tuple[dict[str, Any], list[Any]]], scratch: Path) -> Any:
    from red_onnx.options import InputSpec

    feed = sets[0][0] if sets else {}
    arrays = {name: value for name, value in feed.items() if isinstance(value, np.ndarray)}
    if mode == "shapes":
        return InputSpec(shapes={name: tuple(a.shape) for name, a in arrays.items()})
    path = scratch / "inputs.npz"
    np.savez(path, **feed) if all(isinstance(v, np.ndarray) for v in feed.values()) else np.savez(
        path, **arrays
    )
    return InputSpec(npz=path)


def check_case(case: Case, mode: str) -> Outcome:
    """Compress ``case`` exactly in ``mode`` and classify the outcome."""
    import onnx

    from red_onnx import compress
    from red_onnx.errors import RedOnnxError

    started = time.perf_counter()
    label = f"{case.folder}/{case.name}"

    def outcome(kind: str, message: str = "") -> Outcome:
        return Outcome(label, mode, kind, message, round(time.perf_counter() - started, 2))

    try:
        model = onnx.load(str(case.model))
        sets = reference_data(case, model)
    except Exception as error:  # the suite's own data: not a finding about red_onnx
        return outcome("refused", f"reference data unreadable here: {type(error).__name__}: {error}")
    random_outputs = _random_outputs(model)
    with tempfile.TemporaryDirectory(prefix="red-onnx-sweep-") as scratch:
        spec = _input_spec(mode, sets, Path(scratch))
        try:
            result = compress(str(case.model), exact=True, input_spec=spec, latency_check=False)
        except RedOnnxError as error:
            text = str(error)
            if "\n" in text.strip() or not text.strip():
                return outcome("internal", f"{type(error).__name__} not on one line: {text!r}")
            return outcome("refused", f"{type(error).__name__}: {text}")
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return outcome("internal", f"{type(error).__name__}: {first}")
    for feed, refs in sets:
        try:
            original = _run_session(str(case.model), feed)
        except Exception:
            continue  # the original cannot run on the reference inputs: nothing to compare
        candidate = _run_session(result.model, feed)
        for index, (name, want) in enumerate(zip([o.name for o in model.graph.output], refs, strict=False)):
            loose = name in random_outputs
            if _close(original[index], want, loose) and not _close(candidate[index], want, loose):
                return outcome(
                    "wrong", f"output {name!r} differs from the reference where the original's does not"
                )
    return outcome("verified")


def _random_outputs(model: Any) -> set[str]:
    """Outputs of ops with random results (and of training-mode Dropout), anywhere upstream."""
    random_nodes = [
        n for n in model.graph.node
        if n.op_type in RANDOM_OPS or (n.op_type == "Dropout" and len(n.input) > 2 and n.input[2])
    ]  # fmt: skip
    tainted = {name for n in random_nodes for name in n.output}
    for node in model.graph.node:  # graph nodes are topologically sorted
        if tainted & set(node.input):
            tainted |= set(node.output)
    return tainted & {o.name for o in model.graph.output}


def _worker(connection: Connection) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        task = connection.recv()
        if task is None:
            return
        case, mode = task
        try:
            connection.send(check_case(case, mode))
        except Exception as error:  # the sweep itself must never stop on a case
            connection.send(Outcome(f"{case.folder}/{case.name}", mode, "internal", f"sweep: {error!r}"))


class _Slot:
    """One worker process, restarted after a timeout."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.start()

    def start(self) -> None:
        self.connection, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()
        self.task: tuple[Case, str] | None = None
        self.since = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.start()


def sweep(
    tasks: Iterable[tuple[Case, str]], *, workers: int = 2, timeout: float = DEFAULT_TIMEOUT
) -> list[Outcome]:
    """Run every (case, mode) task on ``workers`` processes, each task limited to ``timeout`` seconds."""
    context = multiprocessing.get_context("spawn")
    pending = list(tasks)[::-1]
    slots = [_Slot(context) for _ in range(max(1, min(workers, len(pending))))]
    results: list[Outcome] = []
    try:
        while pending or any(slot.task for slot in slots):
            for slot in slots:
                if slot.task is None and pending:
                    slot.task, slot.since = pending.pop(), time.monotonic()
                    slot.connection.send(slot.task)
            busy = [slot for slot in slots if slot.task]
            ready = wait([slot.connection for slot in busy], timeout=1.0)
            for slot in busy:
                assert slot.task is not None
                if slot.connection in ready:
                    try:
                        results.append(slot.connection.recv())
                    except EOFError:  # the worker died (a crash in native code)
                        case, mode = slot.task
                        results.append(Outcome(f"{case.folder}/{case.name}", mode, "internal", "worker died"))
                        slot.kill()
                    slot.task = None
                elif time.monotonic() - slot.since > timeout:
                    case, mode = slot.task
                    results.append(
                        Outcome(f"{case.folder}/{case.name}", mode, "timeout", f"over {timeout:.0f} s")
                    )
                    slot.kill()
                    slot.task = None
    finally:
        for slot in slots:
            if slot.process.is_alive():
                slot.connection.send(None)
                slot.process.join(timeout=5)
                if slot.process.is_alive():
                    slot.process.kill()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Sweep the suite and print the outcomes that are not ``verified``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", action="append", choices=FOLDERS, help="folders (default: all)")
    parser.add_argument("--mode", action="append", choices=MODES, help="input modes (default: both)")
    parser.add_argument("--name", help="only cases whose name contains this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("-v", "--verbose", action="store_true", help="print refusals too")
    args = parser.parse_args(argv)
    tasks = [
        (case, mode)
        for folder in args.folder or FOLDERS
        for case in cases(folder)
        if args.name is None or args.name in case.name
        for mode in args.mode or MODES
    ]
    started = time.perf_counter()
    results = sweep(tasks, workers=args.workers, timeout=args.timeout)
    for item in sorted(results, key=lambda o: (o.kind, o.case, o.mode)):
        if item.kind != "verified" and (args.verbose or item.kind != "refused"):
            print(f"{item.kind:9} {item.mode:6} {item.case}: {item.message}")
    counts = Counter(item.kind for item in results)
    slowest = sorted(results, key=lambda o: -o.seconds)[:3]
    print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s: {dict(sorted(counts.items()))}")
    print("slowest: " + ", ".join(f"{o.case} ({o.mode}) {o.seconds:.1f} s" for o in slowest))
    return 0 if not counts.keys() - {"verified", "refused"} else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    sys.exit(main())
