"""Tests of hpl_jax.grouping (the host-side k-means groupings: init_hierarchy, refresh_hierarchy, the ground-truth
level 1) against independent NumPy references (docs/method.md, "The hierarchy")."""
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.cluster

from hpl_jax import grouping
from hpl_jax.core import hierarchy as hier
from tests.core.test_hierarchy import _normalise, _random_hierarchy


def _normalised_group_means(vectors, assignment, k):
    """Reference: centre j = normalised mean of the normalised vectors assigned to j (a plain loop)."""
    vectors = _normalise(vectors)
    assignment = np.asarray(assignment)
    means = np.stack([vectors[assignment == j].mean(axis=0) for j in range(k)])
    return _normalise(means)


def _same_partition(a, b):
    """True if the labellings a and b group the points identically, up to renaming the groups."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _assert_centres_of_children(h, level, children):
    """Proxies of `level` point along the normalised means of their children's normalised vectors
    f32[K_{l-1}, d] (their norms: `_assert_norms_of_children`)."""
    expected = _normalised_group_means(children, h.parents[level - 1], h.level_sizes[level])
    np.testing.assert_allclose(_normalise(h.proxies[level]), expected, atol=1e-6)


def _assert_norms_of_children(h, level):
    """Proxies of `level` have the mean norm of their children among the proxies of level - 1 (a loop)."""
    children_norms = np.linalg.norm(np.asarray(h.proxies[level - 1], np.float64), axis=1)
    parents = np.asarray(h.parents[level - 1])
    expected = [children_norms[parents == j].mean() for j in range(h.level_sizes[level])]
    np.testing.assert_allclose(np.linalg.norm(h.proxies[level], axis=1), expected, rtol=1e-5)


def _check_tree(h, sizes):
    """Structural invariants every built hierarchy must satisfy."""
    assert h.level_sizes == tuple(sizes)
    for level, (parent_map, size) in enumerate(zip(h.parents, sizes[1:]), start=1):
        parent_map = np.asarray(parent_map)
        assert parent_map.dtype == np.int32
        assert parent_map.shape == (sizes[level - 1],)
        assert parent_map.min() >= 0 and parent_map.max() < size
        assert np.all(np.bincount(parent_map, minlength=size) >= 1)
    for proxies in h.proxies:
        assert proxies.dtype == jnp.float32


# --- initialisation -------------------------------------------------------------------------------------

def test_init_hierarchy_three_levels_from_fine_proxies():
    h = grouping.init_hierarchy(jax.random.key(0), 40, (8, 3), 16, seed=5)
    _check_tree(h, (40, 8, 3))
    expected_fine = hier.init_proxies(jax.random.key(0), 40, 16)
    np.testing.assert_array_equal(h.proxies[0], expected_fine)
    _assert_centres_of_children(h, 1, expected_fine)
    _assert_centres_of_children(h, 2, h.proxies[1])


def test_init_hierarchy_groups_level1_vectors_when_given():
    vectors, truth = _separated_clusters(seed=1, num_clusters=4, per_cluster=10, dim=24)
    h = grouping.init_hierarchy(jax.random.key(0), 40, (4,), 24, level1_vectors=vectors)
    _check_tree(h, (40, 4))
    assert _same_partition(h.parents[0], truth)
    _assert_centres_of_children(h, 1, vectors)


def test_init_hierarchy_flat():
    h = grouping.init_hierarchy(jax.random.key(0), 10, (), 4)
    assert h.num_levels == 1 and h.parents == ()
    assert hier.group_sizes(h) == ()
    refreshed, reset = grouping.refresh_hierarchy(h, seed=0)
    assert reset == () and refreshed.parents == ()
    np.testing.assert_array_equal(refreshed.proxies[0], h.proxies[0])


def test_init_hierarchy_is_deterministic():
    a = grouping.init_hierarchy(jax.random.key(2), 30, (6, 2), 8, seed=4)
    b = grouping.init_hierarchy(jax.random.key(2), 30, (6, 2), 8, seed=4)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


# --- k-means grouping -----------------------------------------------------------------------------------

def _separated_clusters(seed, num_clusters, per_cluster, dim):
    """Points around orthogonal directions with small noise, shuffled; returns (vectors, true labels)."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, num_clusters)))[0].T
    truth = rng.permutation(np.repeat(np.arange(num_clusters), per_cluster))
    vectors = 3.0 * directions[truth] + 0.05 * rng.normal(size=(truth.size, dim))
    return vectors.astype(np.float32), truth


@pytest.mark.parametrize("backend", grouping.KMEANS_BACKENDS)
def test_kmeans_recovers_well_separated_clusters_exactly(backend):
    vectors, truth = _separated_clusters(seed=0, num_clusters=5, per_cluster=12, dim=16)
    assignment, centres = grouping.kmeans_grouping(vectors, 5, seed=0, backend=backend)
    assert assignment.dtype == jnp.int32 and centres.dtype == jnp.float32
    assert _same_partition(assignment, truth)
    np.testing.assert_allclose(centres, _normalised_group_means(vectors, assignment, 5), atol=1e-6)
    # Converged: every point's nearest centre (cosine) is its own.
    nearest = np.argmax(_normalise(vectors) @ np.asarray(centres, np.float64).T, axis=1)
    np.testing.assert_array_equal(nearest, assignment)


def test_kmeans_is_deterministic_for_a_seed():
    vectors = np.random.default_rng(0).normal(size=(80, 6))
    a = grouping.kmeans_grouping(vectors, 7, seed=11)
    b = grouping.kmeans_grouping(jnp.asarray(vectors), 7, seed=11)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-7)


def _duplicate_points():
    """18 copies of one point and 2 others: only 3 distinct points, so 5-means must leave clusters empty."""
    vectors = np.tile([[1.0, 0.0, 0.0]], (20, 1))
    vectors[7] = [0.0, 1.0, 0.0]
    vectors[13] = [0.0, 0.0, 1.0]
    return vectors


def test_kmeans_fills_clusters_sklearn_leaves_empty():
    vectors = _duplicate_points()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = sklearn.cluster.KMeans(n_clusters=5, n_init=10, random_state=0).fit_predict(vectors)
    assert np.sum(np.bincount(raw, minlength=5) == 0) >= 2  # the premise: sklearn alone leaves some empty
    assignment, centres = grouping.kmeans_grouping(vectors, 5, seed=0)
    assignment = np.asarray(assignment)
    assert assignment.min() >= 0 and assignment.max() < 5
    assert np.all(np.bincount(assignment, minlength=5) >= 1)
    np.testing.assert_allclose(centres, _normalised_group_means(vectors, assignment, 5), atol=1e-6)
    # The two distinct points keep clusters of their own.
    assert np.sum(assignment == assignment[7]) == 1 and np.sum(assignment == assignment[13]) == 1


def test_kmeans_grouping_jax_backend_invariants():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(600, 8))
    assignment, centres = grouping.kmeans_grouping(vectors, 8, seed=2, n_init=2, backend="jax")
    again, _ = grouping.kmeans_grouping(vectors, 8, seed=2, n_init=2, backend="jax")
    assignment = np.asarray(assignment)
    np.testing.assert_array_equal(assignment, again)
    assert assignment.dtype == np.int32 and np.all(np.bincount(assignment, minlength=8) >= 1)
    np.testing.assert_allclose(centres, _normalised_group_means(vectors, assignment, 8), atol=1e-6)


# --- refresh --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", grouping.KMEANS_BACKENDS)
@pytest.mark.parametrize("policy", ["reset", "rematch"])
def test_refresh_invariants(policy, backend):
    h = _random_hierarchy(4, (50, 9, 3), 12)
    refreshed, reset = grouping.refresh_hierarchy(h, seed=0, policy=policy, backend=backend)
    _check_tree(refreshed, (50, 9, 3))
    assert refreshed.proxies[0] is h.proxies[0]
    assert [r.shape for r in reset] == [(9,), (3,)]
    assert all(r.dtype == jnp.bool_ for r in reset)
    assert all(bool(np.all(r)) == (policy == "reset") for r in reset)
    if policy == "reset":
        for level in (1, 2):
            _assert_norms_of_children(refreshed, level)
    else:
        for new, old in zip(refreshed.proxies[1:], h.proxies[1:]):
            np.testing.assert_array_equal(new, old)


def test_coarse_norm_unit_resets_to_unit_norm_and_children_mean_follows_the_children():
    h = _random_hierarchy(4, (50, 9, 3), 12)
    h = h.replace(proxies=(h.proxies[0] * 3.0,) + h.proxies[1:])  # fine proxies of norm ~10, not 1
    unit, _ = grouping.refresh_hierarchy(h, seed=0, coarse_norm="unit")
    for proxies in unit.proxies[1:]:
        np.testing.assert_allclose(np.linalg.norm(proxies, axis=1), 1.0, atol=1e-6)
    scaled, _ = grouping.refresh_hierarchy(h, seed=0)
    assert np.linalg.norm(scaled.proxies[1], axis=1).min() > 5.0
    for a, b in zip(unit.parents, scaled.parents):  # the norm changes nothing else
        np.testing.assert_array_equal(a, b)
    fresh = grouping.init_hierarchy(jax.random.PRNGKey(0), 40, (6, 2), 16)
    _assert_norms_of_children(fresh, 1)
    _assert_norms_of_children(fresh, 2)
    with pytest.raises(ValueError, match="coarse_norm"):
        grouping.refresh_hierarchy(h, seed=0, coarse_norm="huge")


@pytest.mark.parametrize("policy", ["reset", "rematch"])
def test_refresh_is_deterministic_for_a_seed(policy):
    h = _random_hierarchy(5, (40, 7, 3), 8)
    a, _ = grouping.refresh_hierarchy(h, seed=3, policy=policy)
    b, _ = grouping.refresh_hierarchy(h, seed=3, policy=policy)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_refresh_reset_sets_coarse_proxies_to_normalised_centres():
    h = _random_hierarchy(6, (45, 8, 3), 10)
    refreshed, _ = grouping.refresh_hierarchy(h, seed=1, policy="reset")
    _assert_centres_of_children(refreshed, 1, h.proxies[0])
    _assert_centres_of_children(refreshed, 2, refreshed.proxies[1])


def test_refresh_reset_groups_level1_vectors_when_given():
    vectors, truth = _separated_clusters(seed=2, num_clusters=3, per_cluster=8, dim=10)
    h = _random_hierarchy(7, (24, 3), 10)
    refreshed, _ = grouping.refresh_hierarchy(h, seed=0, level1_vectors=vectors)
    assert _same_partition(refreshed.parents[0], truth)
    _assert_centres_of_children(refreshed, 1, vectors)
    np.testing.assert_array_equal(refreshed.proxies[0], h.proxies[0])


@pytest.mark.parametrize("backend", grouping.KMEANS_BACKENDS)
def test_refresh_survives_duplicate_level1_vectors(backend):
    h = _random_hierarchy(8, (20, 5), 3)
    refreshed, _ = grouping.refresh_hierarchy(h, seed=0, level1_vectors=_duplicate_points(), backend=backend)
    _check_tree(refreshed, (20, 5))


def _best_matching_total(similarity):
    k = similarity.shape[0]
    return max(sum(similarity[i, p[i]] for i in range(k)) for p in itertools.permutations(range(k)))


def test_refresh_rematch_keeps_proxies_and_matching_maximises_similarity():
    h = _random_hierarchy(9, (36, 5, 3), 6)
    refreshed, _ = grouping.refresh_hierarchy(h, seed=2, policy="rematch")
    reference, _ = grouping.refresh_hierarchy(h, seed=2, policy="reset")
    for level in (1, 2):
        assert refreshed.proxies[level] is h.proxies[level]
    below = [h.proxies[0], h.proxies[1]]
    for level, k in ((1, 5), (2, 3)):
        parent_map = refreshed.parents[level - 1]
        # The new groups, named by the proxy they were matched to; proxy j now owns group j.
        centres = _normalised_group_means(below[level - 1], parent_map, k)
        similarity = centres @ _normalise(h.proxies[level]).T
        np.testing.assert_allclose(np.trace(similarity), _best_matching_total(similarity), rtol=1e-6)
    # Level 1 is the same partition as 'reset' would find (same k-means, relabelled).
    assert _same_partition(refreshed.parents[0], reference.parents[0])


def test_refresh_rematch_relabels_to_the_closest_existing_proxies():
    vectors, truth = _separated_clusters(seed=3, num_clusters=4, per_cluster=6, dim=8)
    true_centres = _normalised_group_means(vectors, truth, 4)
    order = np.array([2, 0, 3, 1])
    existing = jnp.asarray(true_centres[order] + 0.01, jnp.float32)  # proxy i sits near true cluster order[i]
    h = hier.ProxyHierarchy(proxies=(jnp.asarray(vectors), existing),
                            parents=(jnp.asarray(np.arange(24) % 4, jnp.int32),))
    refreshed, _ = grouping.refresh_hierarchy(h, seed=0, policy="rematch")
    expected = np.argsort(order)[truth]
    np.testing.assert_array_equal(refreshed.parents[0], expected)


# --- ground-truth super-classes -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", grouping.KMEANS_BACKENDS)
def test_hierarchy_from_super_labels(backend):
    rng = np.random.default_rng(10)
    fine = rng.normal(size=(30, 8)).astype(np.float32)
    super_labels = rng.permutation(np.arange(30) % 6).astype(np.int32)
    h = grouping.hierarchy_from_super_labels(fine, super_labels, num_coarse_above=(3, 2), seed=1, backend=backend)
    _check_tree(h, (30, 6, 3, 2))
    np.testing.assert_array_equal(h.proxies[0], fine)
    np.testing.assert_array_equal(h.parents[0], super_labels)
    _assert_centres_of_children(h, 1, fine)
    _assert_centres_of_children(h, 2, h.proxies[1])
    _assert_centres_of_children(h, 3, h.proxies[2])
    for level in (1, 2, 3):
        _assert_norms_of_children(h, level)


def test_hierarchy_from_super_labels_renumbers_the_super_classes_present():
    """A training split need not hold every super-class (CIFAR-100's classes 0-49, an image folder whose
    hierarchy.csv has test-only super-classes): level 1 has one proxy per super-class present, in id order."""
    fine = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    h = grouping.hierarchy_from_super_labels(fine, np.array([14, 3, 3, 14, 10, 3]))
    _check_tree(h, (6, 3, ))
    np.testing.assert_array_equal(h.parents[0], [2, 0, 0, 2, 1, 0])


# --- errors ---------------------------------------------------------------------------------------------

_KEY = jax.random.key(0)
_GOOD = _random_hierarchy(12, (10, 4), 3)

_ERROR_CASES = {
    "K_1 not below classes": (
        lambda: grouping.init_hierarchy(_KEY, 100, (100,), 8),
        r"num_coarse\[0\] \(K_1\) = 100 must be smaller than the 100 classes of level 0"),
    "K_2 not below K_1": (
        lambda: grouping.init_hierarchy(_KEY, 100, (8, 10), 8),
        r"num_coarse\[1\] \(K_2\) = 10 must be smaller than the 8 proxies of level 1"),
    "K below 2": (
        lambda: grouping.init_hierarchy(_KEY, 100, (10, 1), 8),
        r"num_coarse\[1\] \(K_2\) = 1 must be at least 2 proxies at level 2"),
    "init level1_vectors shape": (
        lambda: grouping.init_hierarchy(_KEY, 10, (3,), 8, level1_vectors=np.zeros((9, 8))),
        r"level1_vectors has shape \(9, 8\).*level 1.*\(10, 8\)"),
    "kmeans too many clusters": (
        lambda: grouping.kmeans_grouping(np.ones((4, 2)), 5, seed=0),
        r"num_clusters = 5 .* 4 vectors"),
    "kmeans backend": (
        lambda: grouping.kmeans_grouping(np.ones((4, 2)), 2, seed=0, backend="faiss"),
        r"backend = 'faiss'"),
    "refresh policy": (
        lambda: grouping.refresh_hierarchy(_GOOD, seed=0, policy="keep"),
        r"policy = 'keep'.*'reset', 'rematch'"),
    "refresh replicated": (
        lambda: grouping.refresh_hierarchy(
            jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), _GOOD), seed=0),
        r"proxies of level 0 .*unreplicated"),
    "refresh level1_vectors shape": (
        lambda: grouping.refresh_hierarchy(_GOOD, seed=0, level1_vectors=np.zeros((10, 4))),
        r"level1_vectors has shape \(10, 4\).*\(10, 3\)"),
    "super_labels length": (
        lambda: grouping.hierarchy_from_super_labels(np.ones((6, 3)), np.array([0, 1, 0, 1])),
        r"super_labels has shape \(4,\).*level 1.*\(6,\)"),
    "super_labels negative": (
        lambda: grouping.hierarchy_from_super_labels(np.ones((4, 3)), np.array([0, -1, 0, 1])),
        r"class 1 the negative super-class -1"),
    "super-classes as many as classes": (
        lambda: grouping.hierarchy_from_super_labels(np.ones((4, 3)), np.array([0, 1, 2, 3])),
        r"super-classes among the classes \(K_1\) = 4 must be smaller than the 4 classes of level 0"),
    "num_coarse_above too large": (
        lambda: grouping.hierarchy_from_super_labels(np.ones((6, 3)), np.array([0, 1, 2, 3, 0, 1]),
                                                     num_coarse_above=(4,)),
        r"num_coarse_above\[0\] \(K_2\) = 4 must be smaller than the 4 proxies of level 1"),
}


@pytest.mark.parametrize("case", sorted(_ERROR_CASES))
def test_user_errors_raise_value_error_naming_the_level(case):
    call, message = _ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()
