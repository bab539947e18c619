"""The proxy hierarchy of HPL (METHOD.md, "The hierarchy").

Levels l = 0..L. Level 0 holds one fine proxy per training class; level l >= 1 holds K_l coarse proxies.
The parent map a^l sends each proxy of level l-1 to one proxy of level l, so a sample's label at level l is
y^l = a^l(y^{l-1}).

The hierarchy is a pytree of arrays that lives in the train state. Its groupings are found and refreshed on
the host, with NumPy and scikit-learn, between epochs (METHOD.md, "How the groupings are found and
refreshed"): k-means over the L2-normalised vectors of the level below, with no empty cluster allowed. With
backend='jax' (config.hpl.kmeans_backend) the k-means itself runs on the default device (hpl_jax.kmeans).
Host functions accept jax or NumPy arrays and return jnp arrays, so their results are train-state leaves.
Pass them the unreplicated hierarchy (one copy, not the per-device stack that pmap holds).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import sklearn.cluster
import sklearn.exceptions
import sklearn.metrics

from hpl_jax import kmeans as kmeans_lib

REFRESH_POLICIES = ("reset", "rematch")
# The norm a coarse proxy takes when it is (re)set to a cluster centre: 'children_mean' (the mean norm of the
# proxies it groups, so it moves at their pace under the same Adam step size) or 'unit'.
COARSE_NORMS = ("children_mean", "unit")
# Where a grouping's k-means runs: scikit-learn on the host (float64), or hpl_jax.kmeans (jit-compiled,
# float32) on the default JAX device.
KMEANS_BACKENDS = ("sklearn", "jax")

# A fixed number of k-means restarts (not sklearn's 'auto') keeps a grouping a function of the seed alone.
KMEANS_N_INIT = 10

_NORM_EPS = 1e-12


@flax.struct.dataclass
class ProxyHierarchy:
    """Proxies of every level and the parent maps between them (a pytree).

    Attributes:
      proxies: per level l, f32[K_l, dim]; K_0 = number of training classes.
      parents: per level l >= 1, i32[K_{l-1}], entry i is the level-l parent of proxy i of level l-1
        (`parents[l - 1]` is a^l). Empty for a flat (single-level) hierarchy.
    """

    proxies: Tuple[jax.Array, ...]
    parents: Tuple[jax.Array, ...]

    @property
    def num_levels(self) -> int:
        return len(self.proxies)

    @property
    def level_sizes(self) -> Tuple[int, ...]:
        return tuple(int(p.shape[0]) for p in self.proxies)


def lift_labels(labels: jax.Array, parents: Tuple[jax.Array, ...]) -> Tuple[jax.Array, ...]:
    """Labels at every level: y^0 = y, y^l = a^l(y^{l-1}).

    Args:
      labels: i32[batch], class labels (level 0).
      parents: per level l >= 1, i32[K_{l-1}] (see `ProxyHierarchy.parents`).

    Returns:
      A tuple of L + 1 arrays i32[batch], one per level.
    """
    lifted = [labels]
    for parent_map in parents:
        lifted.append(jnp.take(parent_map, lifted[-1], axis=0))
    return tuple(lifted)


def group_sizes(hierarchy: ProxyHierarchy) -> Tuple[jax.Array, ...]:
    """Number of children of every coarse proxy (METHOD.md: every coarse proxy keeps at least one child).

    Works on the host and under jit.

    Returns:
      Per level l >= 1, i32[K_l]: entry j counts the proxies of level l-1 whose parent is proxy j.
    """
    return tuple(
        jnp.bincount(parent_map, length=size)
        for parent_map, size in zip(hierarchy.parents, hierarchy.level_sizes[1:])
    )


def init_proxies(rng: jax.Array, num_proxies: int, dim: int) -> jax.Array:
    """Initial proxies, normal with std sqrt(2 / num_proxies) (METHOD.md, "Training recipe": Proxies).

    This is PyTorch's untruncated kaiming-normal in fan-out mode on a [num_proxies, dim] matrix, which the
    official Proxy-Anchor code uses.

    Args:
      rng: a PRNG key.
      num_proxies: number of rows C.
      dim: embedding dimension d.

    Returns:
      f32[num_proxies, dim].
    """
    std = math.sqrt(2.0 / num_proxies)
    return std * jax.random.normal(rng, (num_proxies, dim), jnp.float32)


def _host_matrix(vectors) -> np.ndarray:
    """A jax or NumPy array as a host f64[n, d] array (k-means on f64 avoids f32 ties and round-off)."""
    return np.asarray(jax.device_get(vectors), dtype=np.float64)


def _l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows of f64[n, d] scaled to unit L2 norm (the cosine geometry of METHOD.md)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, _NORM_EPS)


def _cluster_means(vectors: np.ndarray, assignment: np.ndarray, num_clusters: int) -> np.ndarray:
    """f64[k, d] mean of the rows of `vectors` f64[n, d] in each cluster (zeros for an empty cluster)."""
    sums = np.zeros((num_clusters, vectors.shape[1]))
    np.add.at(sums, assignment, vectors)
    counts = np.bincount(assignment, minlength=num_clusters)
    return sums / np.maximum(counts, 1)[:, None]


def _fill_empty_clusters(vectors: np.ndarray, assignment: np.ndarray, num_clusters: int) -> np.ndarray:
    """Moves points into empty clusters until none is empty (METHOD.md: empty clusters are not allowed).

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
        means = _cluster_means(vectors, assignment, num_clusters)
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
    """k-means over L2-normalised vectors with no empty cluster (METHOD.md, "How the groupings are found").

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
      n_init: number of k-means restarts; the one of lowest inertia is kept. Each took about 6 s for
        11,318 x 512 random Gaussian vectors (SOP's class count) and k = 100 on two shared CPU cores.
      backend: one of KMEANS_BACKENDS.

    Returns:
      (assignment i32[n] with values in [0, k), every value used; centres f32[k, d], unit norm).
    """
    normalised = _l2_normalised(_host_matrix(vectors))
    num_vectors = normalised.shape[0]
    if not 1 <= num_clusters <= num_vectors:
        raise ValueError(
            f"num_clusters = {num_clusters} must be between 1 and the {num_vectors} vectors to cluster; "
            "ask for fewer clusters.")
    if backend == "jax":
        assignment = np.asarray(kmeans_lib.kmeans(normalised, num_clusters, seed=seed,
                                                  num_restarts=n_init).assignment, np.int64)
    elif backend == "sklearn":
        kmeans = sklearn.cluster.KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
        with warnings.catch_warnings():
            # Fewer distinct clusters than asked (duplicate points) is repaired just below.
            warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
            assignment = kmeans.fit_predict(normalised).astype(np.int64)
    else:
        raise ValueError(f"backend = {backend!r} is not a k-means backend; use one of {KMEANS_BACKENDS}.")
    assignment = _fill_empty_clusters(normalised, assignment, num_clusters)
    centres = _l2_normalised(_cluster_means(normalised, assignment, num_clusters))
    return jnp.asarray(assignment, jnp.int32), jnp.asarray(centres, jnp.float32)


def validate_parents(parents: Sequence, level_sizes: Sequence[int]) -> None:
    """Checks that the parent maps a^1..a^L form a tree over levels of the given sizes (METHOD.md).

    Args:
      parents: per level l >= 1, i32[K_{l-1}] (see `ProxyHierarchy.parents`).
      level_sizes: (K_0, ..., K_L).

    Raises:
      ValueError: naming the level and the proxy, if a map has the wrong length, a non-integer dtype, or an
        entry out of [0, K_l), or leaves a coarse proxy without children.
    """
    if len(parents) != len(level_sizes) - 1:
        raise ValueError(
            f"parents holds {len(parents)} maps but {len(level_sizes)} levels need {len(level_sizes) - 1}; "
            "give one parent map per coarse level.")
    for level, parent_map in enumerate(parents, start=1):
        parent_map = np.asarray(jax.device_get(parent_map))
        below, size = level_sizes[level - 1], level_sizes[level]
        name = f"parents[{level - 1}] (a^{level}, level {level - 1} -> level {level})"
        if parent_map.shape != (below,):
            raise ValueError(
                f"{name} has shape {parent_map.shape}; it needs shape ({below},), one parent per proxy of "
                f"level {level - 1}.")
        if not np.issubdtype(parent_map.dtype, np.integer):
            raise ValueError(f"{name} has dtype {parent_map.dtype}; it needs integer proxy indices.")
        out_of_range = np.flatnonzero((parent_map < 0) | (parent_map >= size))
        if out_of_range.size:
            child = int(out_of_range[0])
            raise ValueError(
                f"{name} maps proxy {child} of level {level - 1} to {int(parent_map[child])}, out of range "
                f"for the {size} proxies of level {level}.")
        childless = np.flatnonzero(np.bincount(parent_map, minlength=size) == 0)
        if childless.size:
            raise ValueError(
                f"{name} leaves proxy {int(childless[0])} of level {level} without children; every coarse "
                "proxy needs at least one child.")


def _validate_coarse_sizes(sizes: Sequence[int], names: Sequence[str], size_below: int,
                           first_level: int = 1) -> None:
    """Checks 2 <= K_l < K_{l-1} for the coarse levels from `first_level` up (METHOD.md: K_1 > K_2 > ...).

    Args:
      sizes: (K_{first_level}, K_{first_level+1}, ...).
      names: the argument that sets each size, e.g. "num_coarse[0]".
      size_below: K_{first_level-1} (the number of classes when first_level is 1).
    """
    below = size_below
    for offset, (size, name) in enumerate(zip(sizes, names)):
        level = first_level + offset
        label = f"{name} (K_{level})"
        if size < 2:
            raise ValueError(f"{label} = {size} must be at least 2 proxies at level {level}.")
        if size >= below:
            what = "classes" if level == 1 else "proxies"
            raise ValueError(
                f"{label} = {size} must be smaller than the {below} {what} of level {level - 1}.")
        below = size


def coarse_proxy_norms(children, assignment, num_groups: int, coarse_norm: str) -> np.ndarray:
    """f64[num_groups]: the norm each coarse proxy takes at a (re)set (METHOD.md, "Coarse-proxy bookkeeping").

    'children_mean': the mean L2 norm of the proxies of the level below assigned to it (a unit-norm proxy over
    children of norm ~sqrt(2d/C) would turn several times faster than they do under the same Adam step);
    'unit': 1.

    Args:
      children: f32[K_{l-1}, d], the proxies of the level below.
      assignment: i32[K_{l-1}], values in [0, num_groups), every value used.
    """
    if coarse_norm not in COARSE_NORMS:
        raise ValueError(f"coarse_norm = {coarse_norm!r} is not one of {COARSE_NORMS}.")
    if coarse_norm == "unit":
        return np.ones(num_groups)
    norms = np.linalg.norm(_host_matrix(children), axis=1)
    assignment = np.asarray(jax.device_get(assignment))
    return np.bincount(assignment, weights=norms, minlength=num_groups) / np.bincount(assignment,
                                                                                        minlength=num_groups)


def _scaled(centres, norms: np.ndarray) -> jax.Array:
    """Unit-norm centres f32[k, d] scaled row-wise to `norms` f64[k]."""
    return jnp.asarray(_host_matrix(centres) * norms[:, None], jnp.float32)


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
        centres = _scaled(centres, coarse_proxy_norms(children, assignment, size, coarse_norm))
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
    """The initial hierarchy (METHOD.md, "The hierarchy" and "How the groupings are found and refreshed").

    Fine proxies come from `init_proxies`. Level 1 groups `level1_vectors` (METHOD.md's default first
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
    _validate_coarse_sizes(num_coarse, [f"num_coarse[{i}]" for i in range(len(num_coarse))], num_classes)
    fine = init_proxies(rng, num_classes, dim)
    if level1_vectors is None:
        level1_vectors = fine
    _check_level1_vectors(level1_vectors, num_classes, dim)
    coarse, parents = _kmeans_levels(level1_vectors, fine, num_coarse, seed, n_init, coarse_norm, backend)
    validate_parents(parents, (num_classes, *num_coarse))
    return ProxyHierarchy(proxies=(fine, *coarse), parents=tuple(parents))


def placeholder_hierarchy(rng: jax.Array, num_classes: int, num_coarse: Sequence[int], dim: int, *,
                          coarse_norm: str = "children_mean") -> ProxyHierarchy:
    """A hierarchy of the final level sizes whose groupings are placeholders, made without k-means.

    What a run holds from its creation until its first grouping (`refresh_hierarchy`, METHOD.md's default from
    the class means) replaces every coarse level, or a restore template: a k-means here would be discarded. Fine
    proxies come from `init_proxies` (as in `init_hierarchy`); proxy i of level l-1 gets parent i mod K_l, and a
    coarse proxy is the normalised mean of its children's normalised vectors at the norm `coarse_proxy_norms`
    gives, so the tree is valid and every proxy finite.

    Args:
      rng: PRNG key of the fine proxies.
      num_classes: C = K_0.
      num_coarse: (K_1, ..., K_L) with C > K_1 > ... > K_L >= 2.
      dim: embedding dimension d.
      coarse_norm: 'children_mean' or 'unit'.

    Returns:
      A ProxyHierarchy with proxies (f32[C, d], f32[K_1, d], ...) and parents (i32[C], i32[K_1], ...).
    """
    _validate_coarse_sizes(num_coarse, [f"num_coarse[{i}]" for i in range(len(num_coarse))], num_classes)
    fine = init_proxies(rng, num_classes, dim)
    proxies, parents = [fine], []
    for size in num_coarse:
        children = _host_matrix(proxies[-1])
        assignment = np.arange(len(children)) % size
        directions = _l2_normalised(_cluster_means(_l2_normalised(children), assignment, size))
        proxies.append(_scaled(directions, coarse_proxy_norms(children, assignment, size, coarse_norm)))
        parents.append(jnp.asarray(assignment, jnp.int32))
    return ProxyHierarchy(proxies=tuple(proxies), parents=tuple(parents))


def _matched_labels(centres: jax.Array, proxies: jax.Array) -> np.ndarray:
    """i64[k]: entry j is the existing proxy that new cluster j goes to (Hungarian matching).

    The one-to-one matching maximises the total cosine similarity between each new centre f32[k, d] and
    the existing proxy f32[k, d] it is given.
    """
    similarity = _l2_normalised(_host_matrix(centres)) @ _l2_normalised(_host_matrix(proxies)).T
    clusters, matched = scipy.optimize.linear_sum_assignment(similarity, maximize=True)
    labels = np.empty_like(matched)
    labels[clusters] = matched
    return labels


def refresh_hierarchy(hierarchy: ProxyHierarchy, *, seed: int, policy: str = "reset",
                      level1_vectors=None, n_init: int = KMEANS_N_INIT,
                      coarse_norm: str = "children_mean",
                      backend: str = "sklearn") -> Tuple[ProxyHierarchy, Tuple[jax.Array, ...]]:
    """Re-groups every coarse level (METHOD.md, "How the groupings are found and refreshed"), on the host.

    Level 1 clusters the normalised fine proxies, or `level1_vectors` if given; level l >= 2 clusters the
    new level l-1 proxies. The fine proxies are never changed. What happens to the coarse proxies:
      'reset' (METHOD.md's default): they take the cluster centres' directions, with the norm
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
    return ProxyHierarchy(proxies=(hierarchy.proxies[0], *coarse), parents=tuple(parents)), reset


def hierarchy_from_super_labels(fine_proxies, super_labels, *, num_coarse_above: Sequence[int] = (),
                                seed: int = 0, n_init: int = KMEANS_N_INIT,
                                coarse_norm: str = "children_mean",
                                backend: str = "sklearn") -> ProxyHierarchy:
    """A hierarchy whose level 1 is a dataset's ground-truth super-classes (METHOD.md's ablation).

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
    _validate_coarse_sizes((num_super,), ("super-classes among the classes",), num_classes)
    _validate_coarse_sizes(num_coarse_above, [f"num_coarse_above[{i}]" for i in range(len(num_coarse_above))],
                           num_super, first_level=2)
    directions = _l2_normalised(_cluster_means(_l2_normalised(_host_matrix(fine)), super_labels, num_super))
    level1 = _scaled(directions, coarse_proxy_norms(fine, super_labels, num_super, coarse_norm))
    coarse, parents = _kmeans_levels(level1, level1, num_coarse_above, seed, n_init, coarse_norm, backend)
    parents = [jnp.asarray(super_labels, jnp.int32), *parents]
    validate_parents(parents, (num_classes, num_super, *num_coarse_above))
    return ProxyHierarchy(proxies=(fine, level1, *coarse), parents=tuple(parents))


def class_means(embeddings, labels, num_classes: int) -> jax.Array:
    """Mean of the L2-normalised embeddings of each class: METHOD.md's default first grouping's input.

    Args:
      embeddings: f32[n, d] (jax or NumPy), any norm.
      labels: i32[n], values in [0, num_classes).
      num_classes: C.

    Returns:
      f32[C, d] (not renormalised; k-means normalises it).
    """
    embeddings = _host_matrix(embeddings)
    labels = np.asarray(jax.device_get(labels))
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"labels has shape {labels.shape}; it needs one label per embedding, "
            f"shape ({embeddings.shape[0]},).")
    out_of_range = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if out_of_range.size:
        raise ValueError(
            f"labels[{int(out_of_range[0])}] = {int(labels[out_of_range[0]])} is outside the {num_classes} "
            "classes; labels must lie in [0, num_classes).")
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        shown = ", ".join(str(int(c)) for c in missing[:10]) + (", ..." if missing.size > 10 else "")
        raise ValueError(
            f"classes {shown} ({missing.size} in all) have no example among the embeddings; each class needs at "
            "least one (a class none of whose images decode has none: replace its broken files).")
    return jnp.asarray(_cluster_means(_l2_normalised(embeddings), labels, num_classes), jnp.float32)


def _child_cosines(children: np.ndarray, parents: np.ndarray, parent_map: np.ndarray) -> np.ndarray:
    """f64[K_l]: cosine between each coarse proxy (parents f64[K_l, d]) and the mean of its children's
    normalised vectors (children f64[K_{l-1}, d], parent_map int[K_{l-1}])."""
    child_means = _cluster_means(_l2_normalised(children), parent_map, parents.shape[0])
    return np.sum(_l2_normalised(child_means) * _l2_normalised(parents), axis=1)


def hierarchy_metrics(hierarchy: ProxyHierarchy, *, super_labels=None,
                      previous: ProxyHierarchy = None) -> Dict[str, float]:
    """What a refresh found, as scalars a run logs (the hierarchy made observable).

    For every coarse level l >= 1:
      level_l_group_size_{min,mean,max}: children per coarse proxy;
      level_l_norm_{min,mean,max}: norms of the coarse proxies, next to level_{l-1}_norm_mean, their
        children's (a coarse proxy much shorter than its children turns faster under the same Adam step);
      level_l_child_cosine_{min,mean}: cosine between each coarse proxy and the mean of its children's
        normalised vectors (1 = the proxy sits on its group's centre, as right after a 'reset' refresh).
    For level 1, when `super_labels` (the dataset's ground-truth super-class of each class) is given:
      level_1_nmi, level_1_ari: normalised mutual information and adjusted Rand index of the level-1
        grouping of the classes against the super-classes (1 = the families found exactly; ~0 = unrelated);
      level_1_purity: fraction of classes whose group's majority super-class is their own;
      level_1_purity_min: the purity of the least pure group.
    When `previous` (the hierarchy just before this refresh) is given:
      level_l_stability_ari: adjusted Rand index between the previous and the new grouping of level l-1
        (1 = unchanged; label permutations do not count);
      level_l_child_cosine_before_{min,mean}, level_l_norm_mean_before: the same as above for the coarse
        proxies as training left them, before the refresh: how far they drifted from their groups.

    Args:
      hierarchy: the unreplicated ProxyHierarchy.
      super_labels: int[C] or None.
      previous: a ProxyHierarchy of the same level sizes, or None.

    Returns:
      {name: float}, names without a prefix (e.g. 'level_1_nmi').
    """
    values = {}
    proxies = [_host_matrix(p) for p in hierarchy.proxies]
    if len(proxies) > 1:
        values["level_0_norm_mean"] = float(np.mean(np.linalg.norm(proxies[0], axis=1)))
    for level, parent_map in enumerate(hierarchy.parents, start=1):
        prefix = f"level_{level}_"
        parent_map = np.asarray(jax.device_get(parent_map))
        sizes = np.bincount(parent_map, minlength=proxies[level].shape[0])
        norms = np.linalg.norm(proxies[level], axis=1)
        for stat, fn in (("min", np.min), ("mean", np.mean), ("max", np.max)):
            values[prefix + f"group_size_{stat}"] = float(fn(sizes))
            values[prefix + f"norm_{stat}"] = float(fn(norms))
        cosines = _child_cosines(proxies[level - 1], proxies[level], parent_map)
        values[prefix + "child_cosine_min"] = float(np.min(cosines))
        values[prefix + "child_cosine_mean"] = float(np.mean(cosines))
        if previous is not None:
            before = [_host_matrix(p) for p in previous.proxies[level - 1:level + 1]]
            previous_map = np.asarray(jax.device_get(previous.parents[level - 1]))
            values[prefix + "stability_ari"] = float(sklearn.metrics.adjusted_rand_score(previous_map, parent_map))
            cosines = _child_cosines(*before, previous_map)
            values[prefix + "child_cosine_before_min"] = float(np.min(cosines))
            values[prefix + "child_cosine_before_mean"] = float(np.mean(cosines))
            values[prefix + "norm_mean_before"] = float(np.mean(np.linalg.norm(before[1], axis=1)))
    if super_labels is not None and hierarchy.parents:
        groups = np.asarray(jax.device_get(hierarchy.parents[0]))
        truth = np.asarray(super_labels)
        values["level_1_nmi"] = float(sklearn.metrics.normalized_mutual_info_score(truth, groups))
        values["level_1_ari"] = float(sklearn.metrics.adjusted_rand_score(truth, groups))
        contingency = sklearn.metrics.cluster.contingency_matrix(groups, truth)  # [groups, super-classes]
        values["level_1_purity"] = float(contingency.max(axis=1).sum() / len(groups))
        values["level_1_purity_min"] = float(np.min(contingency.max(axis=1) / contingency.sum(axis=1)))
    return values
