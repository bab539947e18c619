"""Tests of hpl_jax.core.kmeans against scikit-learn, and its empty-cluster repair against the host grouping's
(hpl_jax.grouping.refresh). kmeans_grouping's own tests, both backends: tests/grouping/test_refresh.py."""
import numpy as np
import pytest
import sklearn.cluster

from hpl_jax import grouping
from hpl_jax.core import kmeans as kmeans_lib


def _blobs(seed, num_points, dim, num_blobs, spread):
    """f32[num_points, dim]: Gaussian blobs of the given spread around unit-variance random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_blobs, dim))
    return (centres[rng.integers(0, num_blobs, num_points)] + spread * rng.normal(size=(num_points, dim))).astype(
        np.float32)


@pytest.mark.parametrize("num_clusters, spread", [(8, 0.3), (40, 1.0)])
def test_inertia_is_close_to_sklearn(num_clusters, spread):
    # Overlapping blobs (spread 1.0) and more clusters than blobs: k-means has many local optima, so both
    # sides get 4 restarts and ours must come within 3% of scikit-learn's inertia.
    points = _blobs(0, 600, 8, 10, spread)
    ours = kmeans_lib.kmeans(points, num_clusters, seed=0, num_restarts=4)
    theirs = sklearn.cluster.KMeans(n_clusters=num_clusters, n_init=4, random_state=0).fit(points)
    assert float(ours.inertia) == pytest.approx(kmeans_lib.inertia(points, ours.assignment, num_clusters), rel=1e-4)
    assert kmeans_lib.inertia(points, ours.assignment, num_clusters) <= 1.03 * theirs.inertia_
    assert np.all(np.bincount(np.asarray(ours.assignment), minlength=num_clusters) >= 1)
    assert 1 <= int(ours.num_iterations) <= 300


def test_recovers_separated_blobs_and_centres_are_the_means():
    # Same shape and k as test_inertia_is_close_to_sklearn[8-0.3], so the compiled k-means is reused.
    rng = np.random.default_rng(1)
    truth = rng.permutation(np.repeat(np.arange(8), 75))
    points = (10.0 * np.eye(8)[truth] + 0.1 * rng.normal(size=(600, 8))).astype(np.float32)
    result = kmeans_lib.kmeans(points, 8, seed=3)
    assignment = np.asarray(result.assignment)
    # Same partition up to renaming: a one-to-one map between found clusters and blobs.
    assert len(set(zip(assignment.tolist(), truth.tolist()))) == 8
    means = np.stack([points[assignment == j].mean(axis=0) for j in range(8)])
    np.testing.assert_allclose(result.centres, means, atol=1e-5)
    # Converged: each point's nearest centre is its own.
    distances = ((points[:, None, :] - means[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(np.argmin(distances, axis=1), assignment)


def test_is_deterministic_for_a_seed():
    points = _blobs(2, 600, 8, 10, 1.0)
    a, b = (kmeans_lib.kmeans(points, 40, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.centres, b.centres)
    c = kmeans_lib.kmeans(points, 40, seed=8)
    assert not np.array_equal(a.assignment, c.assignment)


def test_batched_seeding_rounds_keep_every_cluster_and_quality():
    # k = 300 > MAX_SEEDING_ROUNDS + 1: the seeding draws 3 centres per round.
    assert -(-299 // kmeans_lib.MAX_SEEDING_ROUNDS) == 3
    points = _blobs(3, 1500, 4, 50, 0.5)
    ours = kmeans_lib.kmeans(points, 300, seed=0)
    theirs = sklearn.cluster.KMeans(n_clusters=300, n_init=1, random_state=0).fit(points)
    assert np.all(np.bincount(np.asarray(ours.assignment), minlength=300) >= 1)
    assert kmeans_lib.inertia(points, ours.assignment, 300) <= 1.03 * theirs.inertia_


def test_duplicate_points_fill_every_cluster_by_the_hierarchy_rule():
    # 18 copies of one point and 2 others: 3 distinct points for 5 clusters, so clusters start empty.
    points = np.tile(np.float32([[1.0, 0.0, 0.0]]), (20, 1))
    points[7] = [0.0, 1.0, 0.0]
    points[13] = [0.0, 0.0, 1.0]
    assignment = np.asarray(kmeans_lib.kmeans(points, 5, seed=0).assignment)
    assert np.all(np.bincount(assignment, minlength=5) >= 1)
    assert np.sum(assignment == assignment[7]) == 1 and np.sum(assignment == assignment[13]) == 1


def test_repair_moves_the_same_points_as_hierarchy_fill_empty_clusters():
    rng = np.random.default_rng(4)
    points = rng.normal(size=(60, 5)).astype(np.float32)
    assignment = rng.integers(0, 4, size=60)  # clusters 4..9 empty
    ours = np.asarray(kmeans_lib._filled_empty_clusters(points, assignment.astype(np.int32), 10))
    theirs = grouping.refresh._fill_empty_clusters(points.astype(np.float64), assignment, 10)
    np.testing.assert_array_equal(ours, theirs)


def test_errors():
    with pytest.raises(ValueError, match="num_clusters = 5"):
        kmeans_lib.kmeans(np.ones((4, 2)), 5, seed=0)
