"""Connected components of an undirected graph given as edge arrays (numpy only, no scipy import).

scipy.sparse costs ~0.2 s to import, a fifth of the command line's start-up; the graphs here (channel
slots coupled by ops, separation units sharing a key) have at most tens of thousands of nodes.
"""

from __future__ import annotations

import numpy as np


def component_labels(count: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Component of each of ``count`` nodes joined by the edges ``rows[k] — cols[k]``.

    Components are numbered 0, 1, ... in the order of their smallest node, as
    ``scipy.sparse.csgraph.connected_components`` numbers them: trees hooked root under smaller root
    along the edges, then compressed by pointer jumping, until every edge lies within one tree.
    """
    labels = np.arange(count)  # every node's root; a root is its own label and the smallest of its tree
    rows, cols = np.asarray(rows, np.int64).ravel(), np.asarray(cols, np.int64).ravel()
    while True:
        first, second = labels[rows], labels[cols]
        apart = first != second
        if not apart.any():
            break
        # hook the larger root of every edge between two trees under the smaller one
        np.minimum.at(labels, np.maximum(first, second)[apart], np.minimum(first, second)[apart])
        while not np.array_equal(jumped := labels[labels], labels):  # point every node at its root
            labels = jumped
    return np.unique(labels, return_inverse=True)[1].reshape(-1)
