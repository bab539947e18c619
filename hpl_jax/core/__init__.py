"""The functional core: the method's equations as pure functions over arrays and pytrees (docs/method.md).

Jit-able (call them inside a step, on any device):
  losses.py           Proxy-Anchor, Proxy-NCA and the hierarchical proxy loss; the registry of base losses
  hierarchy.py        the proxy hierarchy pytree and its pure operations (lifting labels, group sizes,
                      initialisation); its host helpers (class_means, cluster_means, ...) take NumPy arrays
  optimizer_state.py  each proxy level's own optimiser state: resetting the groups a refresh replaced
  hier.py             HIER (Kim et al., CVPR 2023): Poincare-ball maths, hierarchical proxies, reciprocal
                      top-k triplet mining with a PRNG key, the gHHC loss, the HIER-regularised objective
Host-side (NumPy in, between steps; they run their own jitted programs on the default device):
  metrics.py          retrieval metrics: Recall@K, Precision@1, R-Precision, MAP@R, NMI
  kmeans.py           k-means, jit-compiled on the default device (what the groupings use on accelerators)

Imports JAX, NumPy and Flax's struct only: no TensorFlow, orbax, ml_collections or scikit-learn.
"""
