"""The proxy hierarchy of HPL (docs/method.md, "The hierarchy").

Levels l = 0..L. Level 0 holds one fine proxy per training class; level l >= 1 holds K_l coarse proxies.
The parent map a^l sends each proxy of level l-1 to one proxy of level l, so a sample's label at level l is
y^l = a^l(y^{l-1}).

The hierarchy is a pytree of arrays that lives in the train state. This module holds the pytree and its pure
operations: lifting labels, group sizes, the proxies' initialisation, the placeholder a run holds before its first
grouping, the class means a first grouping clusters, and the tree checks. Finding and refreshing the groupings
(k-means, Hungarian re-matching) and the hierarchy's metrics are host-side work: hpl_jax/grouping/.
Functions on NumPy accept jax or NumPy arrays and return jnp arrays, so their results are train-state leaves.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# The norm a coarse proxy takes when it is (re)set to a cluster centre: 'children_mean' (the mean norm of the
# proxies it groups, so it moves at their pace under the same Adam step size) or 'unit'.
COARSE_NORMS = ("children_mean", "unit")


_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class ProxyHierarchy:
    """Proxies of every level and the parent maps between them (a pytree).

    Attributes:
      proxies: per level l, f32[K_l, dim]; K_0 = number of training classes.
      parents: per level l >= 1, i32[K_{l-1}], entry i is the level-l parent of proxy i of level l-1
        (`parents[l - 1]` is a^l). Empty for a flat (single-level) hierarchy.
      hier_proxies: HIER's P hierarchical proxies f32[P, dim] (Euclidean; core/hier.py maps them into the Poincare
        ball), trained beside the levels when HIER regularises the loss (docs/method.md, "HIER, the other
        hierarchical proxy method"); None without HIER. No parent map: HIER's hierarchy is implicit in them.
    """

    proxies: Tuple[jax.Array, ...]
    parents: Tuple[jax.Array, ...]
    hier_proxies: Optional[jax.Array] = None

    def replace(self, **fields) -> "ProxyHierarchy":
        return dataclasses.replace(self, **fields)

    @property
    def num_levels(self) -> int:
        return len(self.proxies)

    @property
    def level_sizes(self) -> Tuple[int, ...]:
        return tuple(int(p.shape[0]) for p in self.proxies)


# A pytree whose children are the fields, as flax.struct.dataclass would make it, but without `hier_proxies` in a
# hierarchy made without them: a run without HIER keeps the tree, and so the checkpoint layout, of the versions
# before HIER. Whether the field is a child is the node's static data, kept through tree maps (which may put None
# in its place, e.g. orbax's save arguments), not read from its value.
def _has_hier(hierarchy: ProxyHierarchy) -> bool:
    return hierarchy.__dict__.get("_has_hier", hierarchy.hier_proxies is not None)


def _hierarchy_children(hierarchy: ProxyHierarchy):
    children = [(jax.tree_util.GetAttrKey("proxies"), hierarchy.proxies),
                (jax.tree_util.GetAttrKey("parents"), hierarchy.parents)]
    if _has_hier(hierarchy):
        children.append((jax.tree_util.GetAttrKey("hier_proxies"), hierarchy.hier_proxies))
    return children, _has_hier(hierarchy)


def _hierarchy_from_children(has_hier: bool, children) -> ProxyHierarchy:
    children = list(children)
    hierarchy = ProxyHierarchy(proxies=children[0], parents=children[1],
                               hier_proxies=children[2] if has_hier else None)
    object.__setattr__(hierarchy, "_has_hier", has_hier)
    return hierarchy


jax.tree_util.register_pytree_with_keys(
    ProxyHierarchy, _hierarchy_children, _hierarchy_from_children,
    flatten_func=lambda hierarchy: ([child for _, child in _hierarchy_children(hierarchy)[0]], _has_hier(hierarchy)))


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
    """Number of children of every coarse proxy (docs/method.md: every coarse proxy keeps at least one child).

    Works on the host and under jit.

    Returns:
      Per level l >= 1, i32[K_l]: entry j counts the proxies of level l-1 whose parent is proxy j.
    """
    return tuple(
        jnp.bincount(parent_map, length=size)
        for parent_map, size in zip(hierarchy.parents, hierarchy.level_sizes[1:])
    )


def init_proxies(rng: jax.Array, num_proxies: int, dim: int) -> jax.Array:
    """Initial proxies, normal with std sqrt(2 / num_proxies) (docs/method.md, "Training recipe": Proxies).

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


def host_matrix(vectors) -> np.ndarray:
    """A jax or NumPy array as a host f64[n, d] array (k-means on f64 avoids f32 ties and round-off)."""
    return np.asarray(jax.device_get(vectors), dtype=np.float64)


def l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows of f64[n, d] scaled to unit L2 norm (the cosine geometry of docs/method.md)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, _NORM_EPS)


def cluster_means(vectors: np.ndarray, assignment: np.ndarray, num_clusters: int) -> np.ndarray:
    """f64[k, d] mean of the rows of `vectors` f64[n, d] in each cluster (zeros for an empty cluster)."""
    sums = np.zeros((num_clusters, vectors.shape[1]))
    np.add.at(sums, assignment, vectors)
    counts = np.bincount(assignment, minlength=num_clusters)
    return sums / np.maximum(counts, 1)[:, None]


def validate_parents(parents: Sequence, level_sizes: Sequence[int]) -> None:
    """Checks that the parent maps a^1..a^L form a tree over levels of the given sizes (docs/method.md).

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


def validate_coarse_sizes(sizes: Sequence[int], names: Sequence[str], size_below: int,
                           first_level: int = 1) -> None:
    """Checks 2 <= K_l < K_{l-1} for the coarse levels from `first_level` up (docs/method.md: K_1 > K_2 > ...).

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
    """f64[num_groups]: the norm each coarse proxy takes at a (re)set (docs/method.md, "Coarse-proxy bookkeeping").

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
    norms = np.linalg.norm(host_matrix(children), axis=1)
    assignment = np.asarray(jax.device_get(assignment))
    return np.bincount(assignment, weights=norms, minlength=num_groups) / np.bincount(assignment,
                                                                                        minlength=num_groups)


def scaled(centres, norms: np.ndarray) -> jax.Array:
    """Unit-norm centres f32[k, d] scaled row-wise to `norms` f64[k]."""
    return jnp.asarray(host_matrix(centres) * norms[:, None], jnp.float32)


def placeholder_hierarchy(rng: jax.Array, num_classes: int, num_coarse: Sequence[int], dim: int, *,
                          coarse_norm: str = "children_mean") -> ProxyHierarchy:
    """A hierarchy of the final level sizes whose groupings are placeholders, made without k-means.

    What a run holds from its creation until its first grouping (`refresh_hierarchy`, docs/method.md's default from
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
    validate_coarse_sizes(num_coarse, [f"num_coarse[{i}]" for i in range(len(num_coarse))], num_classes)
    fine = init_proxies(rng, num_classes, dim)
    proxies, parents = [fine], []
    for size in num_coarse:
        children = host_matrix(proxies[-1])
        assignment = np.arange(len(children)) % size
        directions = l2_normalised(cluster_means(l2_normalised(children), assignment, size))
        proxies.append(scaled(directions, coarse_proxy_norms(children, assignment, size, coarse_norm)))
        parents.append(jnp.asarray(assignment, jnp.int32))
    return ProxyHierarchy(proxies=tuple(proxies), parents=tuple(parents))


def class_means(embeddings, labels, num_classes: int) -> jax.Array:
    """Mean of the L2-normalised embeddings of each class: docs/method.md's default first grouping's input.

    Args:
      embeddings: f32[n, d] (jax or NumPy), any norm.
      labels: i32[n], values in [0, num_classes).
      num_classes: C.

    Returns:
      f32[C, d] (not renormalised; k-means normalises it).
    """
    embeddings = host_matrix(embeddings)
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
    return jnp.asarray(cluster_means(l2_normalised(embeddings), labels, num_classes), jnp.float32)


