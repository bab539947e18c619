"""hpl-jax: Hierarchical Proxy-based Loss (Yang et al., WACV 2022) in JAX/Flax.

The functional API, for your own training loop (docs/own_training_loop.py runs it end to end):

  The loss (pure, jit-able; METHOD.md "The base losses" and "The hierarchy"):
    hierarchical_proxy_loss(embeddings, labels, hierarchy, base_loss=..., weights=...) -> (total, per_level)
    proxy_anchor_loss(embeddings, labels, proxies, alpha=32.0, delta=0.1) -> f32[]
    proxy_nca_loss(embeddings, labels, proxies, temperature=1.0) -> f32[]
  The proxy hierarchy (a pytree; its groupings come from k-means, on the host or the device):
    ProxyHierarchy(proxies=(f32[K_0, d], f32[K_1, d], ...), parents=(i32[K_0], ...))
    init_hierarchy(rng, num_classes, num_coarse, dim) -> ProxyHierarchy
    refresh_hierarchy(hierarchy, seed=...) -> (ProxyHierarchy, reset flags per coarse level)
    lift_labels(labels, parents) -> labels of every level
    class_means(embeddings, labels, num_classes) -> f32[num_classes, d], a first grouping's input
    hierarchy_metrics(hierarchy, super_labels=...) -> how well the coarse level matches a known one
  Evaluation (retrieval of unseen classes, METHOD.md "Evaluation"):
    retrieval_metrics(embeddings, labels) -> Recall@K, P@1, R-Precision, MAP@R, NMI
    hpl_jax.kmeans.kmeans(points, num_clusters, seed=...) -> KMeansResult, jit-compiled on the default device

The trainer (`python -m hpl_jax.main`), its configs and the experiment commands are in README.md and docs/.
"""
from hpl_jax.hierarchy import (ProxyHierarchy, class_means, hierarchy_metrics, init_hierarchy, lift_labels,
                               refresh_hierarchy)
# The k-means function stays hpl_jax.kmeans.kmeans: exported here, its name would hide the module `hpl_jax.kmeans`
# from every later `from hpl_jax import kmeans`.
from hpl_jax.kmeans import KMeansResult
from hpl_jax.losses import hierarchical_proxy_loss, proxy_anchor_loss, proxy_nca_loss
from hpl_jax.metrics import retrieval_metrics

__version__ = "0.3.0"

__all__ = [
    "KMeansResult", "ProxyHierarchy", "class_means", "hierarchical_proxy_loss", "hierarchy_metrics",
    "init_hierarchy", "lift_labels", "proxy_anchor_loss", "proxy_nca_loss", "refresh_hierarchy",
    "retrieval_metrics",
]
