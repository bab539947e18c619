"""What a refresh found, as scalars a run logs: the hierarchy made observable (host side, scikit-learn)."""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from hpl_jax.core import hier as hier_lib
from hpl_jax.core.hierarchy import ProxyHierarchy, cluster_means, host_matrix, l2_normalised


def _child_cosines(children: np.ndarray, parents: np.ndarray, parent_map: np.ndarray) -> np.ndarray:
    """f64[K_l]: cosine between each coarse proxy (parents f64[K_l, d]) and the mean of its children's
    normalised vectors (children f64[K_{l-1}, d], parent_map int[K_{l-1}])."""
    child_means = cluster_means(l2_normalised(children), parent_map, parents.shape[0])
    return np.sum(l2_normalised(child_means) * l2_normalised(parents), axis=1)


def hierarchy_metrics(hierarchy: ProxyHierarchy, *, super_labels=None, previous: ProxyHierarchy = None,
                      hier_curvature: float = 0.1, hier_clip_r: float = 2.3) -> Dict[str, float]:
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
    With HIER's proxies (hierarchy.hier_proxies), mapped into the ball of curvature -hier_curvature as the loss maps
    them (core.hier.to_poincare, clipping radius hier_clip_r):
      hier_radius_{min,mean,max}: their distance from the ball's centre as a fraction of its radius 1/sqrt(c)
        (near 0: ancestors of much of the data; near 1: of little); with curvature 0 (the sphere) there is no depth
        and these are left out.

    Args:
      hierarchy: the unreplicated ProxyHierarchy.
      super_labels: int[C] or None.
      previous: a ProxyHierarchy of the same level sizes, or None.
      hier_curvature, hier_clip_r: config.hier's curvature and clip_r.

    Returns:
      {name: float}, names without a prefix (e.g. 'level_1_nmi').
    """
    # Imported here, not with the module: sklearn (and the scipy.stats it imports) takes 1.6 s to load, which a
    # process that never groups (--help, a config error, an evaluation) need not pay.
    import sklearn.metrics
    values = {}
    proxies = [host_matrix(p) for p in hierarchy.proxies]
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
            before = [host_matrix(p) for p in previous.proxies[level - 1:level + 1]]
            previous_map = np.asarray(jax.device_get(previous.parents[level - 1]))
            values[prefix + "stability_ari"] = float(sklearn.metrics.adjusted_rand_score(previous_map, parent_map))
            cosines = _child_cosines(*before, previous_map)
            values[prefix + "child_cosine_before_min"] = float(np.min(cosines))
            values[prefix + "child_cosine_before_mean"] = float(np.mean(cosines))
            values[prefix + "norm_mean_before"] = float(np.mean(np.linalg.norm(before[1], axis=1)))
    if hierarchy.hier_proxies is not None and hier_curvature > 0:
        on_ball = np.asarray(hier_lib.to_poincare(jnp.asarray(hierarchy.hier_proxies), hier_curvature, hier_clip_r))
        radii = np.linalg.norm(on_ball.astype(np.float64), axis=1) * np.sqrt(hier_curvature)
        for stat, fn in (("min", np.min), ("mean", np.mean), ("max", np.max)):
            values[f"hier_radius_{stat}"] = float(fn(radii))
    if super_labels is not None and hierarchy.parents:
        groups = np.asarray(jax.device_get(hierarchy.parents[0]))
        truth = np.asarray(super_labels)
        values["level_1_nmi"] = float(sklearn.metrics.normalized_mutual_info_score(truth, groups))
        values["level_1_ari"] = float(sklearn.metrics.adjusted_rand_score(truth, groups))
        contingency = sklearn.metrics.cluster.contingency_matrix(groups, truth)  # [groups, super-classes]
        values["level_1_purity"] = float(contingency.max(axis=1).sum() / len(groups))
        values["level_1_purity_min"] = float(np.min(contingency.max(axis=1) / contingency.sum(axis=1)))
    return values
