"""Tests of hpl_jax.core.hierarchy, the proxy-hierarchy pytree and its pure operations, against independent NumPy
references (docs/method.md, "The hierarchy"). The k-means groupings that build and refresh it: tests/grouping/."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpl_jax import grouping
from hpl_jax.core import hierarchy as hier


def _normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_hierarchy(seed, sizes, dim):
    """A hierarchy with random proxies at every level and random valid parent maps (every proxy a child)."""
    rng = np.random.default_rng(seed)
    proxies = tuple(jnp.asarray(rng.normal(size=(k, dim)), jnp.float32) for k in sizes)
    parents = []
    for below, size in zip(sizes[:-1], sizes[1:]):
        parent_map = np.concatenate([np.arange(size), rng.integers(0, size, below - size)])
        parents.append(jnp.asarray(rng.permutation(parent_map), jnp.int32))
    return hier.ProxyHierarchy(proxies=proxies, parents=tuple(parents))


# --- initialisation -------------------------------------------------------------------------------------

def test_init_proxies_is_untruncated_normal_with_kaiming_fan_out_std():
    num_proxies, dim = 2000, 512
    proxies = hier.init_proxies(jax.random.key(3), num_proxies, dim)
    assert proxies.shape == (num_proxies, dim) and proxies.dtype == jnp.float32
    proxies = np.asarray(proxies, np.float64)
    target = np.sqrt(2.0 / num_proxies)
    # ~1e6 samples: relative standard error of the std is ~7e-4, of the mean ~1e-3 std.
    assert abs(proxies.std() / target - 1.0) < 5e-3
    assert abs(proxies.mean()) < 5e-3 * target
    # An untruncated normal has ~60 of 1e6 samples beyond 4 std; a truncated (2 std) one has none.
    assert np.abs(proxies).max() > 4.0 * target


def test_init_proxies_dtype_and_determinism():
    a = hier.init_proxies(jax.random.key(0), 7, 5)
    b = hier.init_proxies(jax.random.key(0), 7, 5)
    c = hier.init_proxies(jax.random.key(1), 7, 5)
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# --- labels and the pytree ------------------------------------------------------------------------------

@pytest.mark.parametrize("coarse_norm", hier.COARSE_NORMS)
def test_placeholder_hierarchy_is_a_valid_tree_of_the_final_sizes_without_kmeans(monkeypatch, coarse_norm):
    monkeypatch.setattr(grouping.refresh, "kmeans_grouping", None)  # any k-means call fails
    h = hier.placeholder_hierarchy(jax.random.key(3), 40, (8, 3), 16, coarse_norm=coarse_norm)
    assert h.level_sizes == (40, 8, 3)
    hier.validate_parents(h.parents, h.level_sizes)
    np.testing.assert_array_equal(h.proxies[0], hier.init_proxies(jax.random.key(3), 40, 16))
    for level in (1, 2):
        children = np.asarray(h.proxies[level - 1], np.float64)
        parents = np.asarray(h.parents[level - 1])
        unit = children / np.linalg.norm(children, axis=1, keepdims=True)
        for group in range(h.level_sizes[level]):
            members = parents == group
            direction = unit[members].mean(axis=0)
            norm = np.linalg.norm(children[members], axis=1).mean() if coarse_norm == "children_mean" else 1.0
            np.testing.assert_allclose(h.proxies[level][group], norm * direction / np.linalg.norm(direction),
                                       rtol=1e-5, atol=1e-6)


def test_lift_labels_three_levels_matches_hand_loop():
    h = _random_hierarchy(0, (20, 6, 3, 2), 4)
    labels = np.random.default_rng(1).integers(0, 20, 64)
    lifted = hier.lift_labels(jnp.asarray(labels, jnp.int32), h.parents)
    assert len(lifted) == 4
    maps = [np.asarray(p) for p in h.parents]
    for i, y in enumerate(labels):
        expected = [int(y)]
        for parent_map in maps:
            expected.append(int(parent_map[expected[-1]]))
        assert [int(level[i]) for level in lifted] == expected


def test_hierarchy_is_a_pytree_usable_under_jit():
    h = _random_hierarchy(3, (12, 4, 2), 5)
    assert len(jax.tree_util.tree_leaves(h)) == 5

    @jax.jit
    def score(hierarchy, labels):
        lifted = hier.lift_labels(labels, hierarchy.parents)
        total = sum(jnp.sum(p[y]) for p, y in zip(hierarchy.proxies, lifted))
        return total, hier.group_sizes(hierarchy)

    labels = np.array([0, 5, 11, 3], np.int32)
    total, sizes = score(h, jnp.asarray(labels))
    maps = [np.asarray(p) for p in h.parents]
    y1 = maps[0][labels]
    y2 = maps[1][y1]
    expected = sum(np.asarray(p, np.float64)[y].sum() for p, y in zip(h.proxies, (labels, y1, y2)))
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_array_equal(sizes[0], np.bincount(maps[0], minlength=4))
    np.testing.assert_array_equal(sizes[1], np.bincount(maps[1], minlength=2))
    doubled = jax.tree_util.tree_map(lambda x: x * 2, h)
    assert isinstance(doubled, hier.ProxyHierarchy)


# --- class means ----------------------------------------------------------------------------------------

def test_class_means_matches_numpy_loop():
    rng = np.random.default_rng(11)
    embeddings = rng.normal(size=(50, 7)).astype(np.float32)
    labels = np.concatenate([np.arange(5), rng.integers(0, 5, 45)]).astype(np.int32)
    means = hier.class_means(jnp.asarray(embeddings), labels, 5)
    normalised = _normalise(embeddings)
    expected = np.stack([normalised[labels == c].mean(axis=0) for c in range(5)])
    assert means.dtype == jnp.float32 and means.shape == (5, 7)
    np.testing.assert_allclose(means, expected, atol=1e-6)


# --- errors ---------------------------------------------------------------------------------------------

_ERROR_CASES = {
    "class without example": (
        lambda: hier.class_means(np.ones((3, 2)), np.array([0, 2, 2]), 4),
        r"classes 1, 3 \(2 in all\) have no example"),
    "label out of range": (
        lambda: hier.class_means(np.ones((3, 2)), np.array([0, 5, 1]), 4),
        r"labels\[1\] = 5 is outside the 4 classes"),
    "parents count": (
        lambda: hier.validate_parents((np.zeros(5, np.int32),), (5, 2, 1)),
        r"parents holds 1 maps but 3 levels need 2"),
    "parents length": (
        lambda: hier.validate_parents((np.array([0, 1, 0]), np.array([0, 0, 0])), (3, 2, 1)),
        r"parents\[1\] \(a\^2, level 1 -> level 2\) has shape \(3,\); it needs shape \(2,\).*level 1"),
    "parents out of range": (
        lambda: hier.validate_parents((np.array([0, 1, 5, 1]),), (4, 2)),
        r"maps proxy 2 of level 0 to 5, out of range for the 2 proxies of level 1"),
    "parents childless": (
        lambda: hier.validate_parents((np.array([0, 1, 0]), np.array([0, 0])), (3, 2, 2)),
        r"parents\[1\] \(a\^2, level 1 -> level 2\) leaves proxy 1 of level 2 without children"),
    "parents float": (
        lambda: hier.validate_parents((np.array([0.0, 1.0]),), (2, 2)),
        r"parents\[0\].*dtype float64"),
}


@pytest.mark.parametrize("case", sorted(_ERROR_CASES))
def test_user_errors_raise_value_error_naming_the_level(case):
    call, message = _ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()
