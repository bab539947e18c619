"""hpl-jax: Hierarchical Proxy-based Loss (Yang et al., WACV 2022) in JAX/Flax.

The functional API, for your own training loop: docs/own_training_loop.py runs it end to end on one device,
docs/multi_device_loss.py over several (the global-batch gather). The method's equations are written out in
docs/method.md; docs/equations.md says where each one is in the code. Defaults are the trainer's
(configs/default.py; tests/test_examples.py checks that they agree).

  Jit-able and pure (hpl_jax/core/): call them inside your jitted step, on any device.
    hierarchical_proxy_loss(embeddings, labels, hierarchy, base_loss=..., weights=..., mask=None)
        -> (total f32[], per_level f32[L + 1])
    proxy_anchor_loss(embeddings, labels, proxies, alpha=32.0, delta=0.1, mask=None) -> f32[]
    proxy_nca_loss(embeddings, labels, proxies, temperature=1/32, exclude_positive=False, mask=None) -> f32[]
    ProxyHierarchy(proxies=(f32[K_0, d], f32[K_1, d], ...), parents=(i32[K_0], ...), hier_proxies=None), a
        pytree (hier_proxies: HIER's f32[P, d], hpl_jax/core/hier.py, whose hier_regularised_loss adds HIER)
    lift_labels(labels, parents) -> labels of every level
    reset_optimizer_groups(opt_state, fresh_state, groups) -> opt_state with the named optax.partition groups'
        states fresh (the coarse levels a refresh reset)
  Host-only: NumPy in, between steps, never under jit (they read arrays back or run k-means / SciPy).
    class_means(embeddings, labels, num_classes) -> f32[num_classes, d], the first grouping's input
    retrieval_metrics(embeddings, labels, super_labels=None) -> Recall@K, P@1, R-Precision, MAP@R, NMI (the
        similarity search runs on the default device)
    hpl_jax.kmeans.kmeans(points, num_clusters, seed=...) -> KMeansResult, jit-compiled on the default device
  Host-only groupings (hpl_jax/grouping/; scikit-learn and SciPy, imported on first use):
    init_hierarchy(rng, num_classes, num_coarse, dim, level1_vectors=None) -> ProxyHierarchy
    refresh_hierarchy(hierarchy, seed=..., policy='reset') -> (ProxyHierarchy, reset flags per coarse level)
    hierarchy_metrics(hierarchy, super_labels=...) -> how well the coarse level matches a known one

`import hpl_jax` loads JAX and NumPy, not TensorFlow, orbax, ml_collections or scikit-learn. The trainer
(`python -m hpl_jax.main`), its configs and the experiment commands are in README.md and docs/.

The package, by layer (each imports only those above it in this list):
  errors.py     the errors a user can fix (one line, no traceback)
  core/         the equations: losses, the hierarchy pytree, metrics, the JAX k-means
  grouping/     the host side of the hierarchy: k-means groupings, Hungarian re-matching, hierarchy metrics
  models/       backbones, the embedding head, weight conversion
  data/         the dataset protocol, the registry, embedded generators, tf.data / TFDS / image folders
  trainer/      loop, state, sharding, optimiser, guards, evaluation, checkpoints, reporting, processes
  experiments/  sweeps, reports, the MLRC protocol, pictures, evaluating a finished run
  benchmarks/   scripts that print measured figures
  main.py, evaluate.py, convert_weights.py, sweep.py, report.py, visualize.py, mlrc.py, mlrc_report.py
                the commands (`python -m hpl_jax.<command>`), thin entry points
"""
import importlib

from hpl_jax.core import kmeans
from hpl_jax.core.hierarchy import ProxyHierarchy, class_means, lift_labels
from hpl_jax.core.kmeans import KMeansResult
from hpl_jax.core.losses import hierarchical_proxy_loss, proxy_anchor_loss, proxy_nca_loss
from hpl_jax.core.metrics import retrieval_metrics
from hpl_jax.core.optimizer_state import reset_optimizer_groups

__version__ = "0.5.0"

# Host-side functions that need scikit-learn / SciPy: loaded on first access (PEP 562), so that `import hpl_jax`
# stays light.
_LAZY = {"init_hierarchy": "hpl_jax.grouping", "refresh_hierarchy": "hpl_jax.grouping",
         "hierarchy_metrics": "hpl_jax.grouping"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "KMeansResult", "ProxyHierarchy", "class_means", "hierarchical_proxy_loss", "hierarchy_metrics",
    "init_hierarchy", "lift_labels", "proxy_anchor_loss", "proxy_nca_loss", "refresh_hierarchy",
    "reset_optimizer_groups", "retrieval_metrics",
]
