"""Values of any tensor of a model (made extra outputs of a copy), with onnxruntime, optimisations off."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from red_onnx.runtime.rows import RowChunks
from red_onnx.runtime.sessions import batch_chunks, feeder, session_options


def tensor_fetch(
    model: onnx.ModelProto, names: Sequence[str]
) -> Callable[[Sequence[str], Mapping[str, np.ndarray]], list[np.ndarray]]:
    """``fetch(names, feed)``: values of any of ``names`` (made extra outputs of a copy of ``model``).

    One session, built once; graph optimisations are off, so every named tensor exists. The feed may
    hold more arrays than the model's inputs. A feed holding a batch of many rows runs in chunks of
    rows (``runtime.rows``; the check that this is safe is made once per list of names). Raises what
    onnxruntime raises.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    session = ort.InferenceSession(
        probe.SerializeToString(), session_options("disable_all"), providers=["CPUExecutionProvider"]
    )
    del probe
    feed_of = feeder(session)
    chunkers: dict[tuple[str, ...], RowChunks] = {}

    def fetch(fetched: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple(fetched)
        chunks = chunkers.get(key) or chunkers.setdefault(key, batch_chunks(session))
        return chunks.run(lambda part: session.run(list(fetched), feed_of(part)), feed)

    return fetch


def run_tensors(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Values of any tensors of ``model`` (made extra outputs of a copy), one list per feed.

    Graph optimisations are off, so every named tensor exists. Raises what onnxruntime raises.
    """
    fetch = tensor_fetch(model, names)
    return [fetch(names, feed) for feed in feeds]
