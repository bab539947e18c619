"""The host side of the hierarchy, beside the functional core: k-means groupings (scikit-learn or the JAX
k-means), Hungarian re-matching, the ground-truth level 1, and the hierarchy's metrics.

These run between steps on NumPy copies, never under jit; the pytree and its pure operations are
hpl_jax.core.hierarchy.
"""
from hpl_jax.grouping.hierarchy_metrics import hierarchy_metrics
from hpl_jax.grouping.refresh import (KMEANS_BACKENDS, KMEANS_N_INIT, REFRESH_POLICIES, hierarchy_from_super_labels,
                                      init_hierarchy, kmeans_grouping, refresh_hierarchy)

__all__ = ["KMEANS_BACKENDS", "KMEANS_N_INIT", "REFRESH_POLICIES", "hierarchy_from_super_labels", "hierarchy_metrics",
           "init_hierarchy", "kmeans_grouping", "refresh_hierarchy"]
