"""component_labels: scipy's connected components and numbering, without importing scipy at run time."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from red_onnx.analysis.components import component_labels


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 120),
    edges=st.lists(st.tuples(st.integers(0, 119), st.integers(0, 119)), max_size=240),
    chain=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_labels_equal_scipys(count: int, edges: list[tuple[int, int]], chain: bool, seed: int) -> None:
    pairs = np.array([(a % count, b % count) for a, b in edges], np.int64).reshape(-1, 2)
    if chain:  # a path through the nodes in random order: the slowest case for label propagation
        order = np.random.default_rng(seed).permutation(count)
        pairs = np.concatenate([pairs, np.stack([order[:-1], order[1:]], axis=1)])
    rows, cols = pairs[:, 0], pairs[:, 1]
    adjacency = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(count, count))
    expected = connected_components(adjacency, directed=False)[1]
    np.testing.assert_array_equal(component_labels(count, rows, cols), expected)


def test_no_edges_and_no_nodes() -> None:
    np.testing.assert_array_equal(component_labels(4, np.zeros(0), np.zeros(0)), np.arange(4))
    assert component_labels(0, np.zeros(0), np.zeros(0)).size == 0


def test_a_long_shuffled_chain_is_one_component() -> None:
    order = np.random.default_rng(0).permutation(100_000)
    labels = component_labels(100_000, order[:-1], order[1:])
    assert not labels.any()
