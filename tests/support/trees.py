"""Comparisons of whole pytrees (states, params), leaf by leaf."""

import jax
import numpy as np


def assert_trees_equal(expected, actual, check_sharding: bool = False) -> None:
    """The same tree structure, and every leaf bitwise equal with the same dtype (and the same
    sharding, if asked); a failure names the leaf's path."""
    expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    assert len(expected_leaves) > 0
    for (path, a), (_, b) in zip(expected_leaves, actual_leaves):
        name = jax.tree_util.keystr(path)
        a_host, b_host = np.asarray(a), np.asarray(b)
        assert a_host.dtype == b_host.dtype, (name, a_host.dtype, b_host.dtype)
        np.testing.assert_array_equal(a_host, b_host, err_msg=name)
        if check_sharding:
            assert a.sharding == b.sharding, name
