"""hpl-jax: Hierarchical Proxy-based Loss (Yang et al., WACV 2022) in JAX/Flax."""
