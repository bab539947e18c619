"""Finding and refreshing the coarse groupings, on the host (docs/method.md, "How the groupings are found
and refreshed").

k-means over the L2-normalised vectors of the level below, with no empty cluster allowed: scikit-learn on the
host, or with backend='jax' (config.hpl.kmeans_backend) the JAX k-means of hpl_jax.core.kmeans on the default
device. Functions take the unreplicated hierarchy (one copy, not the per-device stack the trainer holds) and return
jnp arrays, so their results are train-state leaves. Not jit-able: they run between steps, at the loop's edges.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hpl_jax.core import kmeans as kmeans_lib
from hpl_jax.core.hierarchy import (ProxyHierarchy, cluster_means, coarse_proxy_norms, host_matrix,
                                    init_proxies, l2_normalised, scaled, validate_coarse_sizes, validate_parents)


REFRESH_POLICIES = ("reset", "rematch")


# Where a grouping's k-means runs: scikit-learn on the host (float64), or hpl_jax.kmeans (jit-compiled,
# float32) on the default JAX device.
KMEANS_BACKENDS = ("sklearn", "jax")


# A fixed number of k-means restarts (not sklearn's 'auto') keeps a grouping a function of the seed alone.
KMEANS_N_INIT = 10


def _fill_empty_clusters(vectors: np.ndarray, assignment: np.ndarray, num_clusters: int) -> np.ndarray:
    """Moves points into empty clusters until none is empty (docs/method.md: empty clusters are not allowed).

    k-means leaves a cluster empty when, e.g., several initial centres coincide on duplicate points. While a
    cluster is empty, the point farthest from its own cluster's mean, among clusters with at least two
    members, becomes the sole member of the first empty cluster. Each move fills one cluster and empties
    none, so it ends after at most k moves; ties go to the lowest index, so it is deterministic.

    Args:
      vectors: f64[n, d], n >= num_clusters.
      assignment: i64[n], values in [0, num_clusters).

    Returns:
      i64[n], the repaired assignment.
    """
    assignment = assignment.copy()
    counts = np.bincount(assignment, minlength=num_clusters)
    while np.any(counts == 0):
        means = cluster_means(vectors, assignment, num_clusters)
        distance = np.linalg.norm(vectors - means[assignment], axis=1)
        distance[counts[assignment] < 2] = -1.0
        donor = int(np.argmax(distance))
        empty = int(np.argmin(counts))
        counts[assignment[donor]] -= 1
        counts[empty] += 1
        assignment[donor] = empty
    return assignment


def kmeans_grouping(vectors, num_clusters: int, *, seed: int, n_init: int = KMEANS_N_INIT,
                    backend: str = "sklearn") -> Tuple[jax.Array, jax.Array]:
    """k-means over L2-normalised vectors with no empty cluster (docs/method.md, "The hierarchy").

    scikit-learn's KMeans (k-means++ initialisation, `n_init` seeded restarts) runs on the normalised rows.
    If it leaves a cluster empty, `_fill_empty_clusters` moves the point farthest from its cluster's mean
    into it, and repeats, so every cluster keeps at least one member. The centres are then recomputed from
    the final assignment as the normalised mean of the members' normalised vectors, so they always match
    the assignment (sklearn's centres need not after a non-converged run or a repair).

    The result depends only on the inputs and `seed`, up to the summation order of sklearn's multithreaded
    centre updates, which can in rare near-ties flip a point between processes with different threads.
    backend='jax' runs hpl_jax.kmeans instead (the same steps on the default device in float32, with its own
    seeding and the same empty-cluster rule); its result depends only on the inputs, `seed` and the backend.

    Args:
      vectors: f32[n, d] (jax or NumPy), any norm.
      num_clusters: k, 1 <= k <= n.
      seed: random state of the k-means initialisation.
      n_init: number of k-means restarts; the one of lowest inertia is kept. What each costs is measured in
        docs/benchmarks.md, section "The hierarchy refresh's k-means".
      backend: one of KMEANS_BACKENDS.

    Returns:
      (assignment i32[n] with values in [0, k), every value used; centres f32[k, d], unit norm).
    """
    normalised = l2_normalised(host_matrix(vectors))
    num_vectors = normalised.shape[0]
    if not 1 <= num_clusters <= num_vectors:
        raise ValueError(
            f"num_clusters = {num_clusters} must be between 1 and the {num_vectors} vectors to cluster; "
            "ask for fewer clusters.")
    if backend == "jax":
        assignment = np.asarray(kmeans_lib.kmeans(normalised, num_clusters, seed=seed,
                                                  num_restarts=n_init).assignment, np.int64)
    elif backend == "sklearn":
        # Imported on first use: 1.6 s with the scipy.stats it imports, which a process that never clusters
        # (--help, a config error, an evaluation) need not pay.
        import sklearn.cluster
        import sklearn.exceptions
        kmeans = sklearn.cluster.KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
        with warnings.catch_warnings():
            # Fewer distinct clusters than asked (duplicate points) is repaired just below.
            warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
            assignment = kmeans.fit_predict(normalised).astype(np.int64)
    else:
        raise ValueError(f"backend = {backend!r} is not a k-means backend; use one of {KMEANS_BACKENDS}.")
    assignment = _fill_empty_clusters(normalised, assignment, num_clusters)
    centres = l2_normalised(cluster_means(normalised, assignment, num_clusters))
    return jnp.asarray(assignment, jnp.int32), jnp.asarray(centres, jnp.float32)


def _kmeans_levels(vectors, children, sizes: Sequence[int], seed: int, n_init: int,
                   coarse_norm: str, backend: str) -> Tuple[list, list]:
    """Coarse levels by k-means, each over the normalised proxies of the level below.

    Args:
      vectors: f32[K_{l-1}, d], what the first of these levels clusters (its children's stand-ins).
      children: f32[K_{l-1}, d], the proxies of the level below the first of these levels (their norms set
        the new proxies' norms).
      sizes: (K_l, K_{l+1}, ...).
      coarse_norm: see `coarse_proxy_norms`.
      backend: where k-means runs (see `kmeans_grouping`).

    Returns:
      (proxies: list of f32[K, d] scaled centres, parents: list of i32[K_below]).
    """
    proxies, parents = [], []
    for size in sizes:
        assignment, centres = kmeans_grouping(vectors, size, seed=seed, n_init=n_init, backend=backend)
        centres = scaled(centres, coarse_proxy_norms(children, assignment, size, coarse_norm))
        proxies.append(centres)
        parents.append(assignment)
        vectors = children = centres
    return proxies, parents


def _check_level1_vectors(level1_vectors, num_classes: int, dim: int) -> None:
    """Checks that what level 1 clusters is one dim-vector per class: f32[num_classes, dim]."""
    shape = tuple(np.shape(level1_vectors))
    if shape != (num_classes, dim):
        raise ValueError(
            f"level1_vectors has shape {shape}; level 1 clusters one vector per class of level 0, so it "
            f"needs shape ({num_classes}, {dim}) (e.g. class_means of the training embeddings).")


def init_hierarchy(rng: jax.Array, num_classes: int, num_coarse: Sequence[int], dim: int, *,
                   level1_vectors=None, seed: int = 0, n_init: int = KMEANS_N_INIT,
                   coarse_norm: str = "children_mean", backend: str = "sklearn") -> ProxyHierarchy:
    """The initial hierarchy (docs/method.md, "The hierarchy" and "How the groupings are found and refreshed").

    Fine proxies come from `init_proxies`. Level 1 groups `level1_vectors` (docs/method.md's default first
    grouping: the class-mean embeddings under the initial network, see `class_means`) or, when None, the
    initial fine proxies, by `kmeans_grouping`; level l >= 2 groups the level l-1 proxies. Coarse proxies
    are the cluster centres' directions with the norm `coarse_proxy_norms` gives.

    Args:
      rng: PRNG key of the fine proxies.
      num_classes: C = K_0.
      num_coarse: (K_1, ..., K_L) with C > K_1 > ... > K_L >= 2; () gives a flat hierarchy.
      dim: embedding dimension d.
      level1_vectors: f32[C, d] or None.
      seed: random state of the k-means.
      n_init: k-means restarts per level (see `kmeans_grouping`).
      coarse_norm: 'children_mean' or 'unit' (see `coarse_proxy_norms`).
      backend: where k-means runs (see `kmeans_grouping`).

    Returns:
      A ProxyHierarchy with proxies (f32[C, d], f32[K_1, d], ...) and parents (i32[C], i32[K_1], ...).
    """
    validate_coarse_sizes(num_coarse, [f"num_coarse[{i}]" for i in range(len(num_coarse))], num_classes)
    fine = init_proxies(rng, num_classes, dim)
    if level1_vectors is None:
        level1_vectors = fine
    _check_level1_vectors(level1_vectors, num_classes, dim)
    coarse, parents = _kmeans_levels(level1_vectors, fine, num_coarse, seed, n_init, coarse_norm, backend)
    validate_parents(parents, (num_classes, *num_coarse))
    return ProxyHierarchy(proxies=(fine, *coarse), parents=tuple(parents))


def _matched_labels(centres: jax.Array, proxies: jax.Array) -> np.ndarray:
    """i64[k]: entry j is the existing proxy that new cluster j goes to (Hungarian matching).

    The one-to-one matching maximises the total cosine similarity between each new centre f32[k, d] and
    the existing proxy f32[k, d] it is given.
    """
    similarity = l2_normalised(host_matrix(centres)) @ l2_normalised(host_matrix(proxies)).T
    import scipy.optimize  # on first use, as sklearn above (0.4 s)
    clusters, matched = scipy.optimize.linear_sum_assignment(similarity, maximize=True)
    labels = np.empty_like(matched)
    labels[clusters] = matched
    return labels


def refresh_hierarchy(hierarchy: ProxyHierarchy, *, seed: int, policy: str = "reset",
                      level1_vectors=None, n_init: int = KMEANS_N_INIT,
                      coarse_norm: str = "children_mean",
                      backend: str = "sklearn") -> Tuple[ProxyHierarchy, Tuple[jax.Array, ...]]:
    """Re-groups every coarse level (docs/method.md, "How the groupings are found and refreshed"), on the host.

    Level 1 clusters the normalised fine proxies, or `level1_vectors` if given; level l >= 2 clusters the
    new level l-1 proxies. The fine proxies are never changed. What happens to the coarse proxies:
      'reset' (docs/method.md's default): they take the cluster centres' directions, with the norm
        `coarse_norm` says (default: the mean norm of their children), and `reset` flags all of them so the
        trainer re-initialises their optimiser state.
      'rematch': they are kept, and the new clusters are relabelled by Hungarian matching on the cosine
        similarity between new centres and existing proxies, so each proxy takes the cluster most like it
        overall; `reset` flags none.

    Args:
      hierarchy: the unreplicated ProxyHierarchy.
      seed: random state of the k-means; the same seed gives the same hierarchy.
      policy: 'reset' or 'rematch'.
      level1_vectors: f32[K_0, d] or None.
      n_init: k-means restarts per level (see `kmeans_grouping`).
      coarse_norm: 'children_mean' or 'unit' (see `coarse_proxy_norms`); 'reset' only.
      backend: where k-means runs (see `kmeans_grouping`).

    Returns:
      (the new ProxyHierarchy, reset: per level l >= 1, bool[K_l], True where the proxy was replaced).

    The defaults are the trainer's (configs/default.py: scikit-learn in float64, 10 restarts), with which the
    embedded datasets' study ran. At SOP scale one scikit-learn restart takes 79 s on the host while the devices
    wait (docs/benchmarks.md, "The hierarchy refresh's k-means"), so the real-dataset configs use backend='jax'
    (configs/imagenet_recipe.py), with n_init=1 at SOP and In-Shop scale; do the same there. With 'reset', give the flagged levels a fresh optimiser state
    (`reset_optimizer_groups`).
    """
    if policy not in REFRESH_POLICIES:
        raise ValueError(f"policy = {policy!r} is not a refresh policy; use one of {REFRESH_POLICIES}.")
    for level, proxies in enumerate(hierarchy.proxies):
        if np.ndim(proxies) != 2:
            raise ValueError(
                f"proxies of level {level} have shape {tuple(np.shape(proxies))}, not [K_{level}, dim]; "
                "pass the unreplicated hierarchy (flax.jax_utils.unreplicate).")
    sizes = hierarchy.level_sizes
    dim = int(hierarchy.proxies[0].shape[1])
    if level1_vectors is None:
        level1_vectors = hierarchy.proxies[0]
    _check_level1_vectors(level1_vectors, sizes[0], dim)

    if policy == "reset":
        coarse, parents = _kmeans_levels(level1_vectors, hierarchy.proxies[0], sizes[1:], seed, n_init,
                                         coarse_norm, backend)
    else:
        coarse, parents = [], []
        vectors = level1_vectors
        for proxies, size in zip(hierarchy.proxies[1:], sizes[1:]):
            assignment, centres = kmeans_grouping(vectors, size, seed=seed, n_init=n_init, backend=backend)
            labels = _matched_labels(centres, proxies)
            coarse.append(proxies)
            parents.append(jnp.asarray(labels[np.asarray(assignment)], jnp.int32))
            vectors = proxies
    validate_parents(parents, sizes)
    reset = tuple(jnp.full((size,), policy == "reset") for size in sizes[1:])
    # .replace: HIER's proxies, if any, are no grouping's business and stay as they are.
    return hierarchy.replace(proxies=(hierarchy.proxies[0], *coarse), parents=tuple(parents)), reset


def hierarchy_from_super_labels(fine_proxies, super_labels, *, num_coarse_above: Sequence[int] = (),
                                seed: int = 0, n_init: int = KMEANS_N_INIT,
                                coarse_norm: str = "children_mean",
                                backend: str = "sklearn") -> ProxyHierarchy:
    """A hierarchy whose level 1 is a dataset's ground-truth super-classes (docs/method.md's ablation).

    The super-classes present among the classes are renumbered 0..S-1 in increasing order of their ids (a
    training split need not hold every super-class of a dataset: CIFAR-100's classes 0-49 miss some), so
    level 1 has S proxies, S = the number of distinct super-classes. Level-1 proxy s points along the
    normalised mean of the normalised fine proxies of the classes in super-class s, with the norm
    `coarse_proxy_norms` gives; levels 2.. come from k-means as in `init_hierarchy`.

    Args:
      fine_proxies: f32[C, d].
      super_labels: int[C], class -> super-class id (any non-negative ids).
      num_coarse_above: (K_2, ..., K_L) with S > K_2 > ... >= 2.
      seed: random state of the k-means of levels 2...
      n_init: k-means restarts per level (see `kmeans_grouping`).
      coarse_norm: 'children_mean' or 'unit'.
      backend: where k-means runs (see `kmeans_grouping`).

    Returns:
      A ProxyHierarchy with proxies (f32[C, d], f32[S, d], f32[K_2, d], ...).
    """
    fine = jnp.asarray(fine_proxies, jnp.float32)
    num_classes = int(fine.shape[0])
    super_labels = np.asarray(jax.device_get(super_labels))
    if super_labels.shape != (num_classes,) or not np.issubdtype(super_labels.dtype, np.integer):
        raise ValueError(
            f"super_labels has shape {super_labels.shape} and dtype {super_labels.dtype}; level 1 needs one "
            f"integer super-class per class, shape ({num_classes},).")
    if super_labels.min() < 0:
        raise ValueError(
            f"super_labels gives class {int(np.argmin(super_labels))} the negative super-class "
            f"{int(super_labels.min())}; super-class ids must be >= 0.")
    _, super_labels = np.unique(super_labels, return_inverse=True)
    num_super = int(super_labels.max()) + 1
    validate_coarse_sizes((num_super,), ("super-classes among the classes",), num_classes)
    validate_coarse_sizes(num_coarse_above, [f"num_coarse_above[{i}]" for i in range(len(num_coarse_above))],
                           num_super, first_level=2)
    directions = l2_normalised(cluster_means(l2_normalised(host_matrix(fine)), super_labels, num_super))
    level1 = scaled(directions, coarse_proxy_norms(fine, super_labels, num_super, coarse_norm))
    coarse, parents = _kmeans_levels(level1, level1, num_coarse_above, seed, n_init, coarse_norm, backend)
    parents = [jnp.asarray(super_labels, jnp.int32), *parents]
    validate_parents(parents, (num_classes, num_super, *num_coarse_above))
    return ProxyHierarchy(proxies=(fine, level1, *coarse), parents=tuple(parents))
