"""Time and inertia of hpl_jax.kmeans against scikit-learn's KMeans at SOP (and In-Shop) scale.

    python -m hpl_jax.benchmarks.kmeans [--case refresh|nmi_inshop|nmi|all --repeats 1 --seed 0]

Three cases, all on the planted data of hpl_jax.benchmarks.retrieval (unit vectors, d = 512):
- refresh: one SOP hierarchy refresh, the 11,318 class vectors into k = 512 coarse proxies (configs/sop.py);
- nmi_inshop: the NMI clustering of an In-Shop evaluation, the 12,612 gallery embeddings into k = 3,985
  clusters (one per item);
- nmi: the NMI clustering of an SOP evaluation, the 60,502 test embeddings into k = 11,316 clusters (one per
  class);
for the NMI cases also the NMI of each clustering against the planted classes.
Each side gets one restart (n_init=1, scikit-learn's own greedy k-means++ and its default max_iter and tol);
--no_sklearn times ours alone (scikit-learn's seeding grows with n x k; what it cost here at the nmi cases:
docs/benchmarks.md, the hpl_jax.benchmarks.kmeans row).
Printed per case: wall and CPU seconds of each run (ours: the first run also compiles; its compile time is
measured apart), Lloyd iterations, and the inertia of each result recomputed in float64 on the host from the
assignment (so both sides are scored alike), with the ratio ours / scikit-learn.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import sklearn.cluster
import sklearn.metrics

from hpl_jax.benchmarks.retrieval import planted_embeddings
from hpl_jax.core import kmeans as kmeans_lib

CASES = {  # name: (points, classes of the planted data, k)
    "refresh": (11318, 11318, 512),
    "nmi_inshop": (12612, 3985, 3985),
    "nmi": (60502, 11316, 11316),
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=(*CASES, "all"), default="all")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no_sklearn", action="store_true",
                        help="time hpl_jax.kmeans alone (scikit-learn's times at the nmi cases: docs/benchmarks.md)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _timed(function):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - start_wall, time.process_time() - start_cpu


def _compile_seconds(points: np.ndarray, num_clusters: int) -> float:
    """Seconds to trace and compile hpl_jax.kmeans's device program for these shapes (cached afterwards)."""
    start = time.perf_counter()
    kmeans_lib._kmeans.lower(jnp.asarray(points), jax.random.PRNGKey(0), jnp.float32(1e-4), max_iterations=300,
                             **kmeans_lib.program_options(len(points), num_clusters)).compile()
    return time.perf_counter() - start


def run_case(name: str, repeats: int, seed: int, with_sklearn: bool) -> None:
    num_points, num_classes, num_clusters = CASES[name]
    points, labels, _ = planted_embeddings(num_points, num_classes, 12, 512, 1 if num_points == num_classes else 2,
                                           12, 2.3, seed)
    print(f"{name}: {num_points} x 512 unit vectors, k = {num_clusters}; {jax.devices()[0].platform} device")
    print(f"  hpl_jax.kmeans compile: {_compile_seconds(points, num_clusters):.1f} s")
    for repeat in range(repeats):
        ours, ours_wall, ours_cpu = _timed(lambda: jax.block_until_ready(
            kmeans_lib.kmeans(points, num_clusters, seed=seed + repeat)))
        ours_inertia = kmeans_lib.inertia(points, ours.assignment, num_clusters)
        if not with_sklearn:
            nmi = sklearn.metrics.normalized_mutual_info_score(labels, np.asarray(ours.assignment))
            print(f"  repeat {repeat}: hpl_jax.kmeans {ours_wall:.1f} s wall ({ours_cpu:.1f} CPU-s), "
                  f"{int(ours.num_iterations)} iterations; inertia {ours_inertia:.1f}; NMI {nmi:.4f}", flush=True)
            continue
        theirs, their_wall, their_cpu = _timed(lambda: sklearn.cluster.KMeans(
            n_clusters=num_clusters, n_init=1, random_state=seed + repeat).fit(points))
        their_inertia = kmeans_lib.inertia(points, theirs.labels_, num_clusters)
        line = (f"  repeat {repeat}: hpl_jax.kmeans {ours_wall:.1f} s wall ({ours_cpu:.1f} CPU-s), "
                f"{int(ours.num_iterations)} iterations; scikit-learn {their_wall:.1f} s wall ({their_cpu:.1f} CPU-s), "
                f"{theirs.n_iter_} iterations; time ratio {ours_wall / their_wall:.2f}; inertia {ours_inertia:.1f} vs "
                f"{their_inertia:.1f}, ratio {ours_inertia / their_inertia:.4f}")
        if name.startswith("nmi"):
            nmi = [sklearn.metrics.normalized_mutual_info_score(labels, np.asarray(a))
                   for a in (ours.assignment, theirs.labels_)]
            line += f"; NMI {nmi[0]:.4f} vs {nmi[1]:.4f}"
        print(line, flush=True)


def main() -> None:
    args = _parse_args()
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in (CASES if args.case == "all" else (args.case,)):
        run_case(name, args.repeats, args.seed, not args.no_sklearn)


if __name__ == "__main__":
    main()
