"""The functional core: the method's equations as pure functions over arrays and pytrees (docs/method.md).

  losses.py     Proxy-Anchor, Proxy-NCA and the hierarchical proxy loss; the registry of base losses
  hierarchy.py  the proxy hierarchy pytree and its pure operations (lifting labels, group sizes, initialisation,
                the class means a first grouping clusters)
  metrics.py    retrieval metrics: Recall@K, Precision@1, R-Precision, MAP@R, NMI
  kmeans.py     k-means, jit-compiled on the default device (what the groupings use on accelerators)

Imports JAX, NumPy and Flax's struct only: no TensorFlow, orbax, ml_collections or scikit-learn.
"""
