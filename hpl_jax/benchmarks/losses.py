"""Forward + backward time of HPL on Proxy-Anchor against its matrix-product lower bound.

    python -m hpl_jax.benchmarks.losses [--batch 180 --dim 512 --num_classes 11318 --num_coarse 512]

Defaults are SOP scale (docs/method.md: 11,318 training classes, batch 180, d = 512) with a 2-level hierarchy,
on random data with a fixed seed. Each function is jit-compiled (compile excluded), differentiated w.r.t.
the embeddings and every level's proxies, and timed with block_until_ready; the functions are timed in
turn within each repeat so that a load shared with other processes hits all of them alike, and the
medians are printed. The lower bound is the three products every proxy loss needs per level:
x.P^T forward, G.P and G^T.x backward (G = dL/ds).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Sequence

import jax
import jax.numpy as jnp

from hpl_jax.core.hierarchy import ProxyHierarchy
from hpl_jax.core.losses import hierarchical_proxy_loss, proxy_anchor_loss


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--num_classes", type=int, default=11318, help="fine proxies (level 0)")
    parser.add_argument("--num_coarse", type=int, default=512, help="coarse proxies (level 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _median_times_ms(fns: Dict[str, Callable[[], jax.Array]], repeats: int) -> Dict[str, float]:
    """Median wall time of each zero-argument function, in ms, after one untimed (compiling) call."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def _matrix_products(
        embeddings: jax.Array, proxies: Sequence[jax.Array], similarity_grads: Sequence[jax.Array]):
    """x.P^T, G.P and G^T.x of every level: the matmuls of a proxy loss's forward + backward."""
    return [(embeddings @ p.T, g @ p, g.T @ embeddings) for p, g in zip(proxies, similarity_grads)]


def time_against_bound(*, batch: int, dim: int, num_classes: int, num_coarse: int, repeats: int,
                       seed: int = 0) -> Dict[str, float]:
    """Median ms of HPL-PA (2 levels), flat PA, and the matmul bounds of 2 and 1 levels, on random data.

    Returns {'hpl', 'pa', 'bound_2', 'bound_1'}: jit forward + backward w.r.t. embeddings and proxies.
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    embeddings = jax.random.normal(keys[0], (batch, dim))
    labels = jax.random.randint(keys[1], (batch,), 0, num_classes)
    fine = jax.random.normal(keys[2], (num_classes, dim))
    coarse = jax.random.normal(keys[3], (num_coarse, dim))
    # Every coarse proxy keeps at least one child (docs/method.md), as after a k-means refresh.
    parents = jax.random.permutation(keys[4], jnp.arange(num_classes) % num_coarse)
    parents = parents.astype(jnp.int32)
    similarity_grads = [jax.random.normal(keys[5], (batch, n)) for n in (num_classes, num_coarse)]

    def hpl_on_proxy_anchor(embeddings, proxies):
        hierarchy = ProxyHierarchy(proxies=proxies, parents=(parents,))
        total, _ = hierarchical_proxy_loss(
            embeddings, labels, hierarchy, base_loss=proxy_anchor_loss, weights=(1.0, 0.1))
        return total

    hpl_step = jax.jit(jax.value_and_grad(hpl_on_proxy_anchor, argnums=(0, 1)))
    pa_step = jax.jit(jax.value_and_grad(
        lambda embeddings, proxies: proxy_anchor_loss(embeddings, labels, proxies), argnums=(0, 1)))
    products = jax.jit(_matrix_products)
    return _median_times_ms({
        "hpl": lambda: hpl_step(embeddings, (fine, coarse)),
        "pa": lambda: pa_step(embeddings, fine),
        "bound_2": lambda: products(embeddings, (fine, coarse), similarity_grads),
        "bound_1": lambda: products(embeddings, (fine,), similarity_grads[:1]),
    }, repeats)


def main() -> None:
    args = _parse_args()
    times = time_against_bound(batch=args.batch, dim=args.dim, num_classes=args.num_classes,
                               num_coarse=args.num_coarse, repeats=args.repeats, seed=args.seed)
    print(f"batch {args.batch}, dim {args.dim}, proxies {args.num_classes} + {args.num_coarse} (2 levels), "
          f"{jax.devices()[0].platform}, median of {args.repeats} repeats, jit forward + backward "
          "(grads w.r.t. embeddings and proxies)")
    rows = [
        ("HPL on Proxy-Anchor, 2 levels", times["hpl"], times["bound_2"]),
        ("matmul lower bound, 2 levels", times["bound_2"], times["bound_2"]),
        ("Proxy-Anchor, fine level only", times["pa"], times["bound_1"]),
        ("matmul lower bound, 1 level", times["bound_1"], times["bound_1"]),
    ]
    for name, ms, bound_ms in rows:
        print(f"  {name:32s} {ms:8.1f} ms   {ms / bound_ms:5.2f} x bound")


if __name__ == "__main__":
    main()
