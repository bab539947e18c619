"""Time of `retrieval_metrics` at SOP test scale, against an exact k-NN search (faiss) and the bare matmuls.

    python -m hpl_jax.benchmarks.retrieval [--num_items 60502 --num_classes 11316 --dim 512 --repeats 3]
        [--rank_on_device auto|true|false] [--top_k_recall_target 0.95]

Defaults are the SOP test split (docs/method.md: 60,502 images of 11,316 classes in 12 super-classes, d = 512):
random unit vectors with a planted structure (each super-class a random centre, each class its super-class's
centre plus noise, each item its class's centre plus Gaussian noise of norm about --noise), class sizes 2-12,
fixed seed. Timed, in turn within each repeat so that a load shared with other processes hits all alike, and
reported as medians of wall time and of this process's CPU time (the CPU time moves less with other
processes' load on a shared machine):
- `retrieval_metrics` with recall_at (1, 10, 100, 1000), nmi=False: Recall@K, P@1, R-Precision, MAP@R, on the path
  --rank_on_device picks (auto: the device program on an accelerator, the host path on a CPU), with
  --top_k_recall_target passed on when given;
- the same with super_labels (the `super/` metrics too), unless --no_super;
- the similarity products `retrieval_metrics` computes without super_labels, alone: each pair of blocks once;
- when faiss-cpu is importable (not a dependency of hpl-jax): IndexFlatIP add + search at k = 1001, the
  neighbours Recall@1000 needs with the query itself among them;
- with more than one device (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=4 on a CPU): the same metrics
  by `sharded_retrieval_metrics`, the queries split across every device (what the training loop evaluates with
  there), with and without super_labels, and how far they are from the single-device results (counts must be
  equal; the means within float32 rounding). Simulated CPU devices share the same cores: this checks the result
  and shows the cost of the structure, it cannot show a speed-up;
then the ratio of `retrieval_metrics` (without super_labels) to the faiss search, of the medians, and the recall of
jax.lax.approx_max_k against the exact lax.top_k at k = 1001 on the first 1,024 items (the recall target of
--top_k_recall_target, else 0.95).
Peak memory is the process's resident high-water mark during the first `retrieval_metrics` call (Linux,
reset just before it), and the device's peak where the backend reports one (GPU/TPU).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hpl_jax.core.metrics import retrieval_metrics, sharded_retrieval_metrics

RECALL_AT = (1, 10, 100, 1000)
FAISS_NAME = "faiss IndexFlatIP"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_items", type=int, default=60502)
    parser.add_argument("--num_classes", type=int, default=11316)
    parser.add_argument("--num_super_classes", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--min_class_size", type=int, default=2)
    parser.add_argument("--max_class_size", type=int, default=12)
    parser.add_argument("--noise", type=float, default=2.3, help="norm of an item's offset from its centre")
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_super", action="store_true", help="skip the run with super_labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_sharded", action="store_true", help="skip the sharded runs (with several devices)")
    parser.add_argument("--rank_on_device", choices=("auto", "true", "false"), default="auto",
                        help="retrieval_metrics' rank_on_device: auto (None), true or false")
    parser.add_argument("--top_k_recall_target", type=float, default=None,
                        help="retrieval_metrics' top_k_recall_target (approx_max_k); needs the device path")
    return parser.parse_args()


def planted_embeddings(num_items: int, num_classes: int, num_super_classes: int, dim: int, min_size: int,
                       max_size: int, noise: float, seed: int):
    """f32[num_items, dim] unit vectors, i32[num_items] labels and i32[num_classes] super-labels; every class
    holds min..max_size items."""
    if not num_classes * min_size <= num_items <= num_classes * max_size:
        raise ValueError(f"--num_items {num_items} cannot be split into {num_classes} classes of "
                         f"{min_size}-{max_size} items; change one of them.")
    rng = np.random.default_rng(seed)
    # Every class starts at min_size; the rest are spread over the classes' free slots at random.
    free_slots = np.repeat(np.arange(num_classes), max_size - min_size)
    extra = rng.choice(free_slots, size=num_items - num_classes * min_size, replace=False)
    sizes = min_size + np.bincount(extra, minlength=num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), sizes)).astype(np.int32)
    super_labels = rng.integers(0, num_super_classes, size=num_classes).astype(np.int32)
    super_centres = rng.normal(size=(num_super_classes, dim))
    super_centres /= np.linalg.norm(super_centres, axis=1, keepdims=True)
    centres = super_centres[super_labels] + rng.normal(size=(num_classes, dim)) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    embeddings = centres[labels] + noise / np.sqrt(dim) * rng.normal(size=(num_items, dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings.astype(np.float32), labels, super_labels


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_hits(queries: jax.Array, gallery: jax.Array, query_labels: jax.Array, gallery_labels: jax.Array,
              first: jax.Array, k: int) -> jax.Array:
    """i32[]: queries (f32[chunk, dim], rows first.. of the gallery) whose nearest neighbour, among the k of
    lax.top_k, shares their label; the query itself left out."""
    similarities = jnp.dot(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
    rows = jnp.arange(queries.shape[0])
    # Rows past the gallery (padding) index past its end: dropped, as JAX drops out-of-bounds updates.
    similarities = similarities.at[rows, rows + first].set(-jnp.inf)
    _, neighbours = jax.lax.top_k(similarities, k)
    return jnp.sum(gallery_labels[neighbours[:, 0]] == query_labels)


def exact_knn_recall_at_1(unit: np.ndarray, labels: np.ndarray, k: int, chunk: int = 4096) -> float:
    """Recall@1 of an exact k-NN search in JAX on the default device, every item against all others in query
    chunks: a matrix product and lax.top_k, as PyTorch's matmul + topk (what a plain search costs).

    Args:
      unit: f32[items, dim] unit vectors.
      labels: int[items].
      k: neighbours kept per query.
      chunk: queries searched at once (the last chunk padded with zero vectors of label -1).
    """
    gallery = jax.device_put(unit)
    gallery_labels = jax.device_put(labels.astype(np.int32))
    padded = np.pad(unit, ((0, -len(unit) % chunk), (0, 0)))
    padded_labels = np.pad(labels.astype(np.int32), (0, -len(unit) % chunk), constant_values=-1)
    hits = [_knn_hits(padded[first:first + chunk], gallery, padded_labels[first:first + chunk], gallery_labels,
                      np.int32(first), k=k) for first in range(0, len(unit), chunk)]
    return int(sum(hits)) / len(unit)


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def _top_k_overlap(queries: jax.Array, gallery: jax.Array, k: int, recall_target: float) -> jax.Array:
    """f32[]: the fraction of each query's exact top-k neighbours (lax.top_k) that approx_max_k also returns."""
    similarities = jnp.dot(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
    rows = jnp.arange(queries.shape[0])
    similarities = similarities.at[rows, rows].set(-jnp.inf)
    _, exact = jax.lax.top_k(similarities, k)
    _, approximate = jax.lax.approx_max_k(similarities, k, recall_target=recall_target)
    in_exact = jnp.zeros(similarities.shape, bool).at[rows[:, None], exact].set(True)
    return jnp.mean(in_exact[rows[:, None], approximate])


def approx_top_k_recall(unit: np.ndarray, k: int, recall_target: float, rows: int = 1024) -> float:
    """The recall of jax.lax.approx_max_k against the exact lax.top_k on the default device: the share of the first
    `rows` items' k nearest neighbours (among all items, the query left out) it finds. XLA approximates on TPUs
    only; its CPU and GPU fall back to the exact top-k (recall 1)."""
    rows = min(rows, len(unit))
    return float(_top_k_overlap(unit[:rows], jax.device_put(unit), k=k, recall_target=recall_target))


@jax.jit
def _block_product_max(rows: jax.Array, columns: jax.Array) -> jax.Array:
    """f32[block]: the largest similarity of each row; forces the block's full similarity matrix."""
    return jnp.max(jnp.dot(rows, columns.T, precision=jax.lax.Precision.HIGHEST), axis=1)


def _symmetric_products_only(embeddings: np.ndarray, chunk_size: int) -> None:
    """The similarity blocks `retrieval_metrics` computes in self-retrieval (each pair of blocks once, blocks
    of chunk_size rounded up to 128), and nothing else."""
    block = 128 * -(-chunk_size // 128)
    padded = np.pad(embeddings, ((0, -len(embeddings) % block), (0, 0)))
    blocks = [jax.device_put(padded[start:start + block]) for start in range(0, len(padded), block)]
    results = [_block_product_max(blocks[i], blocks[j]) for i in range(len(blocks)) for j in range(i, len(blocks))]
    jax.block_until_ready(results)


def _faiss_search(embeddings: np.ndarray, k: int) -> None:
    """Exact inner-product k-NN of every item among all items (the query itself is among its neighbours)."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    index.search(embeddings, k)


def _reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark of this process's resident set (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _memory_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise KeyError(field)


def _peak_device_gib() -> Optional[float]:
    """Peak bytes in use on the default device (GPU/TPU), or None where the backend does not report it."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def main() -> None:
    args = _parse_args()
    embeddings, labels, super_labels = planted_embeddings(
        args.num_items, args.num_classes, args.num_super_classes, args.dim, args.min_class_size,
        args.max_class_size, args.noise, args.seed)
    sizes = np.bincount(labels)
    print(f"data: {args.num_items} x {args.dim} f32 ({embeddings.nbytes / 2**20:.0f} MiB), {args.num_classes} "
          f"classes of {sizes.min()}-{sizes.max()} items in {args.num_super_classes} super-classes, noise "
          f"{args.noise}, seed {args.seed}; chunk_size {args.chunk_size}; {jax.devices()[0].platform} device; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        import faiss
        print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    except ImportError:
        faiss = None
        print("faiss-cpu is not importable: no faiss time and no ratio")

    metrics, super_metrics = {}, {}

    rank_on_device = {"auto": None, "true": True, "false": False}[args.rank_on_device]

    def run_metrics(output, **options):
        output.update(retrieval_metrics(embeddings, labels, recall_at=RECALL_AT, nmi=False,
                                        chunk_size=args.chunk_size, rank_on_device=rank_on_device,
                                        top_k_recall_target=args.top_k_recall_target, **options))

    runs: Dict[str, Callable[[], None]] = {"retrieval_metrics": functools.partial(run_metrics, metrics)}
    if not args.no_super:
        runs["retrieval_metrics + super"] = functools.partial(run_metrics, super_metrics,
                                                              super_labels=super_labels)
    sharded, sharded_super = {}, {}
    if jax.device_count() > 1 and not args.no_sharded:
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))

        def run_sharded(output, **options):
            output.update(sharded_retrieval_metrics(embeddings, labels, mesh=mesh, recall_at=RECALL_AT, nmi=False,
                                                    chunk_size=args.chunk_size,
                                                    top_k_recall_target=args.top_k_recall_target, **options))

        runs[f"sharded over {mesh.size} devices"] = functools.partial(run_sharded, sharded)
        if not args.no_super:
            runs["sharded + super"] = functools.partial(run_sharded, sharded_super, super_labels=super_labels)
    runs["similarity blocks only"] = functools.partial(_symmetric_products_only, embeddings, args.chunk_size)
    k = min(max(RECALL_AT) + 1, args.num_items)
    if faiss is not None:
        runs[FAISS_NAME] = functools.partial(_faiss_search, embeddings, k)

    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    rss_before = _memory_gib("VmRSS")
    peak_reset = _reset_peak_rss()
    memory_line = None
    for _ in range(args.repeats):
        for name, run in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
            if memory_line is None:
                peak = _memory_gib("VmHWM")
                memory_line = (f"peak resident memory during the first retrieval_metrics call: {peak:.2f} GiB, "
                               f"{peak - rss_before:+.2f} GiB over the {rss_before:.2f} GiB held before it"
                               if peak_reset else f"peak resident memory of the process so far: {peak:.2f} GiB")
                if _peak_device_gib() is not None:
                    memory_line += f"; device peak {_peak_device_gib():.2f} GiB"
    for name, values in (("metrics", metrics), ("super metrics", super_metrics)):
        if values:
            print(f"{name}: " + ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                                          for key, value in values.items() if not key.startswith("num_")))
    for name, single, split in (("sharded", metrics, sharded), ("sharded super", super_metrics, sharded_super)):
        if split:
            counts = [key for key in single if "recall" in key or "precision@1" in key or "num_" in key]
            means = [key for key in single if key not in counts]
            equal = all(split[k] == single[k] for k in counts)
            print(f"{name} vs single device: counts {'equal' if equal else 'DIFFER'}, largest relative difference "
                  f"of the means "
                  f"{max(abs(split[k] - single[k]) / max(abs(single[k]), 1e-12) for k in means):.1e}")
    print(memory_line)
    print(f"seconds over {args.repeats} repeats (the first run of each compiles): median wall, median CPU "
          f"(all threads of this process), then each run's wall:")
    for name in runs:
        print(f"  {name:28s} {statistics.median(wall[name]):7.1f} {statistics.median(cpu[name]):7.1f}   "
              + " ".join(f"{s:.1f}" for s in wall[name]))
    if faiss is not None:
        ratios = [ours / theirs for ours, theirs in zip(wall["retrieval_metrics"], wall[FAISS_NAME])]
        print(f"retrieval_metrics / faiss: {statistics.median(wall['retrieval_metrics']) / statistics.median(wall[FAISS_NAME]):.2f} "
              f"of the median walls, {statistics.median(cpu['retrieval_metrics']) / statistics.median(cpu[FAISS_NAME]):.2f} "
              f"of the median CPU times; per repeat (wall): " + " ".join(f"{r:.2f}" for r in ratios))
    target = args.top_k_recall_target or 0.95
    rows = min(1024, args.num_items)
    print(f"approx_max_k (recall target {target}) against lax.top_k at k = {k} on the first {rows} items: recall "
          f"{approx_top_k_recall(embeddings, k, target, rows):.4f}")


if __name__ == "__main__":
    main()
