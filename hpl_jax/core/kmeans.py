"""k-means on the default JAX device, jit-compiled: D^2 seeding in rounds, Lloyd iterations, no empty cluster.

Used for NMI (metrics.py) and, with config.hpl.kmeans_backend = 'jax', for the hierarchy's groupings
(hierarchy.kmeans_grouping). The steps:
- Seeding: greedy k-means++ as scikit-learn does it (Arthur and Vassilvitskii, 2007, with 2 + ln k local
  trials per centre: of that many candidates drawn in proportion to D^2, the squared distance to the nearest
  centre so far, keep the one that lowers the potential most), drawn in rounds: each round draws the
  candidates of several centres at once without replacement (Gumbel top-k) and scores them with one matrix
  product. One centre per round is the sequential algorithm; with k in the thousands that is k
  memory-bound passes over the data, so a round seeds ceil((k - 1) / 128) centres, at most 128 rounds: the
  batched D^2 sampling of k-means|| (Bahmani et al., 2012) without its oversampling and re-clustering.
- Lloyd iterations with scikit-learn's stopping rule: assignments unchanged, or the summed squared centre
  shift at most `tolerance` x the mean per-feature variance of the points; then one more assignment, so the
  assignment matches the centres. A cluster that empties keeps its centre until the end.
- Empty clusters are then repaired by the rule of hierarchy._fill_empty_clusters: while a cluster is empty,
  the point farthest from its own cluster's mean, among clusters with at least two members, becomes the
  sole member of the first empty cluster (ties to the lowest index).
The result depends only on the points, k and the seed (on one backend).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Most seeding rounds; more clusters are drawn several per round.
MAX_SEEDING_ROUNDS = 128
# Point-to-centre distances held at once in an assignment step (elements).
_DISTANCES_PER_STEP = 2**24


class KMeansResult(NamedTuple):
    """A k-means clustering.

    Attributes:
      assignment: i32[n], values in [0, k), every value used.
      centres: f32[k, d], the mean of each cluster's points.
      inertia: f32[], the sum of squared distances of the points to their cluster's mean.
      num_iterations: i32[], Lloyd iterations run (of the restart kept).
    """

    assignment: jax.Array
    centres: jax.Array
    inertia: jax.Array
    num_iterations: jax.Array


def kmeans(points, num_clusters: int, *, seed: int, num_restarts: int = 1, max_iterations: int = 300,
           tolerance: float = 1e-4) -> KMeansResult:
    """k-means of the points into num_clusters clusters, none empty (module docstring).

    Args:
      points: f32[n, d] (jax or NumPy), finite.
      num_clusters: k, 1 <= k <= n.
      seed: the result is a function of the points and the seed.
      num_restarts: independent seedings (keys folded from the seed); the lowest inertia is kept.
      max_iterations: most Lloyd iterations per restart.
      tolerance: relative centre-shift tolerance (scikit-learn's `tol`).

    Returns:
      The KMeansResult of the restart with the lowest inertia.
    """
    points = jnp.asarray(points, jnp.float32)
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-D array [n, d], got shape {points.shape}.")
    num_points = points.shape[0]
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters = {num_clusters} must be between 1 and the {num_points} points to "
                         "cluster; ask for fewer clusters.")
    if num_restarts < 1 or max_iterations < 1:
        raise ValueError(f"num_restarts ({num_restarts}) and max_iterations ({max_iterations}) must be >= 1.")
    best = None
    for restart in range(num_restarts):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), restart)
        result = _kmeans(points, key, jnp.float32(tolerance), max_iterations=max_iterations,
                         **program_options(num_points, num_clusters))
        if best is None or float(result.inertia) < float(best.inertia):
            best = result
    return best


def program_options(num_points: int, num_clusters: int) -> dict:
    """The static options of the compiled program for n points and k clusters: k, centres seeded per round,
    local trials per centre, points per assignment step."""
    per_round = -(-(num_clusters - 1) // MAX_SEEDING_ROUNDS) if num_clusters > 1 else 1
    # scikit-learn's number of local trials, as many as the points allow.
    local_trials = max(1, min(2 + int(np.log(num_clusters)), num_points // per_round))
    chunk = max(1, min(num_points, _DISTANCES_PER_STEP // max(num_clusters, per_round * local_trials)))
    return dict(num_clusters=num_clusters, per_round=per_round, local_trials=local_trials, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("num_clusters", "max_iterations", "per_round", "local_trials",
                                             "chunk"))
def _kmeans(points, key, tolerance, *, num_clusters, max_iterations, per_round, local_trials,
            chunk) -> KMeansResult:
    squared_norms = jnp.sum(points * points, axis=1)
    centres = _seeded_centres(points, squared_norms, key, num_clusters, per_round, local_trials, chunk)
    # scikit-learn's tolerance: relative to the mean variance of the features.
    absolute_tolerance = tolerance * jnp.mean(jnp.var(points, axis=0))

    def not_done(state):
        iteration, _, _, done = state
        return (iteration < max_iterations) & ~done

    def lloyd_step(state):
        iteration, assignment, centres, _ = state
        new_assignment = _nearest_centres(points, centres, chunk)
        new_centres = _cluster_means(points, new_assignment, num_clusters, empty=centres)
        shift = jnp.sum((new_centres - centres) ** 2)
        done = jnp.all(new_assignment == assignment) | (shift <= absolute_tolerance)
        return iteration + 1, new_assignment, new_centres, done

    initial = (jnp.int32(0), jnp.full(points.shape[0], -1, jnp.int32), centres, jnp.bool_(False))
    iterations, _, centres, _ = jax.lax.while_loop(not_done, lloyd_step, initial)
    assignment = _filled_empty_clusters(points, _nearest_centres(points, centres, chunk), num_clusters)
    centres = _cluster_means(points, assignment, num_clusters, empty=centres)
    inertia = jnp.sum((points - centres[assignment]) ** 2)
    return KMeansResult(assignment, centres, inertia, iterations)


def _seeded_centres(points, squared_norms, key, num_clusters: int, per_round: int, local_trials: int,
                    chunk: int):
    """f32[k, d]: greedy k-means++ seeding drawn in rounds (module docstring).

    The first centre is a uniformly drawn point. Each round draws per_round * local_trials candidates without
    replacement in proportion to D^2 (Gumbel top-k: the top scores of log D^2 + Gumbel noise), deals them
    into per_round groups, and keeps from each group the candidate that alone would leave the smallest
    potential (sum over the points of min(D^2, squared distance to it)).
    """
    num_points = points.shape[0]
    first_key, key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, num_points)
    squared_distances = _squared_distances(points, squared_norms, points[first][None])[:, 0]
    squared_distances = squared_distances.at[first].set(0.0)
    num_rounds = -(-(num_clusters - 1) // per_round)
    centres = jnp.zeros((1 + num_rounds * per_round, points.shape[1]), points.dtype).at[0].set(points[first])

    def draw_round(round_index, state):
        centres, squared_distances, key = state
        key, round_key = jax.random.split(key)
        # Points at D^2 = 0 (already centres, or duplicates of one) score -inf and are drawn only when
        # nothing else is left; the duplicate centres that gives are repaired as empty clusters.
        scores = jnp.log(squared_distances) + jax.random.gumbel(round_key, (num_points,))
        candidates = jax.lax.top_k(scores, per_round * local_trials)[1]
        potentials = _chunked_sum(
            lambda x, norms, d2: jnp.sum(jnp.minimum(d2[:, None], _squared_distances(x, norms, points[candidates])),
                                         axis=0),
            (points, squared_norms, squared_distances), chunk)
        best_trial = jnp.argmin(potentials.reshape(local_trials, per_round), axis=0)
        drawn = candidates[best_trial * per_round + jnp.arange(per_round)]
        new = points[drawn]
        centres = jax.lax.dynamic_update_slice(centres, new, (1 + round_index * per_round, 0))
        to_new = jnp.min(_squared_distances(points, squared_norms, new), axis=1)
        squared_distances = jnp.minimum(squared_distances, to_new).at[drawn].set(0.0)
        return centres, squared_distances, key

    centres, _, _ = jax.lax.fori_loop(0, num_rounds, draw_round, (centres, squared_distances, key))
    # The last round may draw more than needed; its last draws are dropped.
    return centres[:num_clusters]


def _chunked_sum(function, arrays, chunk: int):
    """Sum over chunks of `chunk` rows of function(*rows of arrays); the arrays are zero-padded, so function
    must give zero for zero rows (here: D^2 = 0 rows add nothing to a potential)."""
    num_rows = arrays[0].shape[0]
    padded = [jnp.pad(a, [(0, -num_rows % chunk)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    chunks = [a.reshape((-1, chunk) + a.shape[1:]) for a in padded]
    return jnp.sum(jax.lax.map(lambda rows: function(*rows), chunks), axis=0)


def _squared_distances(points, squared_norms, centres):
    """f32[n, m] squared Euclidean distances, clipped at 0 (the expanded form can round below it)."""
    products = points @ centres.T
    return jnp.maximum(squared_norms[:, None] - 2.0 * products + jnp.sum(centres * centres, axis=1)[None], 0.0)


def _nearest_centres(points, centres, chunk: int):
    """i32[n]: index of each point's nearest centre (lowest index among ties), chunk points at a time."""
    num_points = points.shape[0]
    padded = jnp.pad(points, ((0, -num_points % chunk), (0, 0)))
    centre_norms = jnp.sum(centres * centres, axis=1)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
    nearest = jax.lax.map(lambda x: jnp.argmin(centre_norms[None] - 2.0 * (x @ centres.T), axis=1),
                          padded.reshape(-1, chunk, points.shape[1]))
    return nearest.reshape(-1)[:num_points].astype(jnp.int32)


def _cluster_means(points, assignment, num_clusters: int, empty):
    """f32[k, d]: mean of each cluster's points; rows of `empty` (f32[k, d]) for clusters without points."""
    sums = jax.ops.segment_sum(points, assignment, num_segments=num_clusters)
    counts = jax.ops.segment_sum(jnp.ones_like(assignment), assignment, num_segments=num_clusters)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], empty)


def _filled_empty_clusters(points, assignment, num_clusters: int):
    """The assignment with every empty cluster filled by hierarchy._fill_empty_clusters's rule.

    Each move fills one cluster and empties none (the donor's cluster keeps at least one member), so the loop
    ends after at most k moves; n >= k guarantees a donor while a cluster is empty.
    """
    def counts_of(assignment):
        return jax.ops.segment_sum(jnp.ones_like(assignment), assignment, num_segments=num_clusters)

    def has_empty(assignment):
        return jnp.any(counts_of(assignment) == 0)

    def move_one(assignment):
        counts = counts_of(assignment)
        means = _cluster_means(points, assignment, num_clusters, empty=jnp.zeros((num_clusters, points.shape[1])))
        distance = jnp.linalg.norm(points - means[assignment], axis=1)
        distance = jnp.where(counts[assignment] < 2, -1.0, distance)
        donor = jnp.argmax(distance)
        return assignment.at[donor].set(jnp.argmin(counts).astype(assignment.dtype))

    return jax.lax.while_loop(has_empty, move_one, assignment)


def inertia(points, assignment, num_clusters: int) -> float:
    """Sum of squared distances of the points (f[n, d]) to their cluster's mean, in float64 on the host."""
    points = np.asarray(points, np.float64)
    assignment = np.asarray(assignment)
    sums = np.zeros((num_clusters, points.shape[1]))
    np.add.at(sums, assignment, points)
    means = sums / np.maximum(np.bincount(assignment, minlength=num_clusters), 1)[:, None]
    return float(np.sum((points - means[assignment]) ** 2))
