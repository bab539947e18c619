"""Retrieval metrics on embedding arrays (docs/method.md, "Benchmarks and class splits"); no model, no I/O.

Host-side: called between steps with NumPy arrays, never under jit (they check their inputs, launch their own
jitted searches on the default device and read the counts back).

Recall@K as a hit rate, and the metrics of "A Metric Learning Reality Check" (Musgrave et al., 2020):
Precision@1, R-Precision and MAP@R, where R is the number of other items of the query's class in the searched
set. Similarities are cosine. Ties never help a query: an item whose similarity equals a positive's is ranked
above it (pessimistic ranking), so a negative tied with the only positive is a miss.

Every metric is a count, not a ranking. For a query with positives sorted by similarity s_1 >= ... >= s_R and
c_k = number of negatives with similarity >= s_k, the k-th positive sits at rank c_k + k of the pessimistic
ranking: Recall@K is a hit iff c_1 < K, and R-Precision and MAP@R follow from the c_k. A level whose queries
have at most 16 positives (SOP's and In-Shop's classes) is counted on the default JAX device in two steps,
with no sort and no top-k:
- thresholds: each query's positive similarities, read from the similarity block that holds them;
- counts: block by block, for each query and threshold, the items with similarity >= it. Counting every item
  (no class mask) and subtracting the query's positives, itself and the padding afterwards is exact: the
  thresholds are those very matrix entries, and padding items are zero vectors, of similarity exactly 0.
On the host path (the default on a CPU), self-retrieval lays the items out in blocks that hold whole classes, so
a query's positives all lie in its diagonal block, and computes each off-diagonal block once, counting it for its
rows and (transposed) for its columns: half the matrix products of a plain search. Memory is a few blocks of
chunk_size^2 similarities.

A level with larger R (super-classes: thousands for SOP; CUB's or Cars' classes) is ranked from full similarity
rows instead: its metrics depend only on each query's first max(R, largest K) ranks, which are its smallest
pessimistic keys (similarity descending, negatives first among equals), sorted. On the host path the host finds
them (np.partition, linear in the gallery) in rows copied back; such a level makes self-retrieval search chunks of
queries against the whole gallery (chunk_size x gallery similarities), as query mode always does.

On an accelerator (`rank_on_device`) every level is scored on the device in one program, query chunk by query
chunk against the whole gallery: classes counted as above (no symmetric blocks: one program instead of a Python
call per block pair), levels with large R ranked by a top-k of each row's keys (jax.lax.top_k of float32 scores
in the keys' order; jax.lax.approx_max_k as an opt-in), each chunk summed on the device; only the sums come back
to the host. `sharded_retrieval_metrics` runs the same program with the queries split across the devices of a
mesh (every process's) and adds the devices' sums. The host path (symmetric blocks, host ranking) stays the
reference.

Equal embeddings give bitwise-equal similarities within one run (one block shape, and a block product that
does not depend on the operands' order), so exact ties stay exact. Between the two paths, or against another
implementation, results can differ where two similarities lie within float32 rounding of each other:
matrix-product rounding depends on the block shapes.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hpl_jax.core import kmeans as kmeans_lib

# A count packs four 8-bit counters in a uint32 word and sums each word over groups of 128 items, so no counter
# passes 128 < 2^8 before the words are unpacked: one reduction counts four thresholds.
_FIELDS_PER_WORD = 4
_FIELD_BITS = 8
_GROUP = 128
# Levels whose queries have at most this many positives are counted on the device (at most 4 words of
# counters); larger ones, e.g. super-classes, are ranked on the host.
_MAX_COUNTED_POSITIVES = 16
# Rows of similarities whose top items the host sorts at once; bounds the host copies.
_HOST_ROWS = 128
# The pessimistic key of the query itself and of padding, ranked last.
_LAST_KEY = 2**32 - 1
# Rows normalised at once (`_l2_normalised`).
_NORMALISED_ROWS = 2048


class _Level(NamedTuple):
    """One labelling of the queries and the gallery (classes, or super-classes), as contiguous ids.

    Attributes:
      prefix: prefix of the metric names of this level ("" or "super/").
      query_classes: i64[num_queries].
      gallery_classes: i64[gallery].
      members: i64[gallery], gallery indices sorted by class (stable), so a class's members are contiguous.
      class_starts: i64[num_classes], where each class starts in `members`.
      class_sizes: i64[num_classes], gallery items of each class.
      num_positives: i64[num_queries], R of each query (its class's gallery items, less itself in
        self-retrieval).
    """

    prefix: str
    query_classes: np.ndarray
    gallery_classes: np.ndarray
    members: np.ndarray
    class_starts: np.ndarray
    class_sizes: np.ndarray
    num_positives: np.ndarray


def retrieval_metrics(
    embeddings,
    labels,
    *,
    query_embeddings=None,
    query_labels=None,
    recall_at: Sequence[int] = (1, 2, 4, 8),
    super_labels=None,
    nmi: bool = True,
    chunk_size: int = 1024,
    seed: int = 0,
    rank_on_device: Optional[bool] = None,
    top_k_recall_target: Optional[float] = None,
) -> Dict[str, float]:
    """Recall@K, P@1, R-Precision, MAP@R (and NMI) of cosine nearest-neighbour retrieval.

    Two modes. Self-retrieval (CUB, Cars, SOP; no query_* given): every item queries the others, the query
    itself left out by index (a duplicate embedding at another index is an ordinary item). Query-vs-gallery
    (In-Shop): each of `query_embeddings` searches `embeddings`; nothing is left out.

    Args:
      embeddings: f32[gallery, dim], the searched set; L2-normalised here.
      labels: int[gallery], class of each item.
      query_embeddings: f32[num_queries, dim] or None (self-retrieval).
      query_labels: int[num_queries] or None; given together with query_embeddings.
      recall_at: the K of the `recall@K` keys.
      super_labels: int[num_classes] or None: super_labels[c] is the super-class of class c, for every class
        value c in `labels` (and `query_labels`); one entry per class, not per item (`class_super_labels`
        makes it from per-item super-classes; a per-item array is refused). Adds the retrieval metrics at the
        super-class level under keys prefixed `super/`, from the same similarities. Self-retrieval then searches
        query chunks against the whole gallery instead of symmetric blocks, at a cost measured in
        docs/benchmarks.md, section "Evaluation".
      nmi: also cluster the (gallery) embeddings with k-means (hpl_jax.kmeans, on the device), k = number of
        classes, and report the NMI of the clusters against the labels.
      chunk_size: side of the similarity blocks (rounded up to a multiple of 128); with super_labels, classes
        of more than 17 items, query_embeddings or on the device, queries searched at once against the whole
        gallery.
      seed: k-means seed.
      rank_on_device: True: every level is scored on the default device in one program (`sharded_retrieval_metrics`
        on that one device: query chunks against the whole gallery, classes counted, levels with large R ranked by
        a top-k), and only per-chunk sums come back to the host. False: the classes of self-retrieval counted in
        symmetric blocks (half the matrix products), levels with large R ranked on the host (np.partition of rows
        copied back, u32[chunk_size, gallery] per chunk). The same counts either way; the float means agree to
        float32 rounding. None: on the device unless it is a CPU.
      top_k_recall_target: None: the device's top-k is exact (jax.lax.top_k). A float in (0, 1]: levels with large
        R are ranked from jax.lax.approx_max_k with this recall target instead, approximate on TPUs only (XLA's CPU
        and GPU fall back to the exact top-k); counted levels stay exact. Needs the device path (rank_on_device
        not False); the returned metrics then carry it as `top_k_recall_target`.

    Returns:
      `recall@K` for each K in recall_at, `precision@1`, `r_precision`, `map@r` (floats in [0, 1], means over
      the queries with R >= 1), `num_queries` (all queries) and `num_queries_without_positive` (queries with
      R = 0, left out of every mean), the same under `super/` when super_labels is given, `nmi` when nmi
      is True, and `top_k_recall_target` when given.
    """
    if rank_on_device is None:
        rank_on_device = jax.devices()[0].platform != "cpu"
    recall_target = _checked_recall_target(top_k_recall_target, bool(rank_on_device))
    gallery, gallery_labels, queries, levels, recall_at = _prepared(
        embeddings, labels, query_embeddings, query_labels, recall_at, super_labels, chunk_size)
    self_retrieval = query_embeddings is None
    if rank_on_device:
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("queries",))
        metrics = _metrics_on_mesh(queries, gallery, levels, self_retrieval, recall_at, int(chunk_size), mesh,
                                   recall_target)
    else:
        if self_retrieval and len(levels) == 1 and levels[0].num_positives.max() <= _MAX_COUNTED_POSITIVES:
            per_level = [_symmetric_block_scores(gallery, levels[0], int(chunk_size))]
        else:
            per_level = _query_chunk_scores(queries, gallery, levels, self_retrieval, int(chunk_size),
                                            max(recall_at))
        metrics = {}
        for level, scores in zip(levels, per_level):
            metrics.update(_mean_scores(*scores, recall_at, level.prefix))
    if nmi:
        metrics["nmi"] = _kmeans_nmi(gallery, gallery_labels, seed)
    return metrics


def sharded_retrieval_metrics(
    embeddings,
    labels,
    *,
    mesh: jax.sharding.Mesh,
    query_embeddings=None,
    query_labels=None,
    recall_at: Sequence[int] = (1, 2, 4, 8),
    super_labels=None,
    nmi: bool = True,
    chunk_size: int = 1024,
    seed: int = 0,
    top_k_recall_target: Optional[float] = None,
) -> Dict[str, float]:
    """`retrieval_metrics` with the queries split across every device of `mesh` (of every process): each device
    searches its share of the queries, chunk by chunk, against the whole gallery and sums its queries' scores;
    the host adds the devices' sums. The same counts as `retrieval_metrics` (Recall@K and P@1 exactly, for the
    same similarities), R-Precision and MAP@R to float32 rounding; NMI as there, on the default device.

    Every level, the class level too, is searched in query chunks (no symmetric blocks: with D devices each
    computes 1/D of the full product, against 1/2 on one device) and ranked on the device where its R is large.
    Each device holds the whole gallery and a chunk_size x gallery block of similarities at a time. In a
    multi-process run every process calls it with the same arguments (a collective; the training loop's hosts
    all hold every embedding).

    Args:
      mesh: a one-axis jax.sharding.Mesh (sharding.device_mesh); the rest as `retrieval_metrics`.

    Returns:
      What `retrieval_metrics` returns.
    """
    recall_target = _checked_recall_target(top_k_recall_target, True)
    gallery, gallery_labels, queries, levels, recall_at = _prepared(
        embeddings, labels, query_embeddings, query_labels, recall_at, super_labels, chunk_size)
    metrics = _metrics_on_mesh(queries, gallery, levels, query_embeddings is None, recall_at, int(chunk_size), mesh,
                               recall_target)
    if nmi:
        metrics["nmi"] = _kmeans_nmi(gallery, gallery_labels, seed)
    return metrics


def _metrics_on_mesh(queries: np.ndarray, gallery: np.ndarray, levels: Sequence[_Level], self_retrieval: bool,
                     recall_at: Tuple[int, ...], chunk_size: int, mesh: jax.sharding.Mesh,
                     recall_target: Optional[float]) -> Dict[str, float]:
    """Every level's metrics (and `top_k_recall_target` when given) from `_sharded_scorer`: the queries split over
    the mesh's devices, searched in chunks of chunk_size against the whole gallery; only the sums come back."""
    num_queries, num_gallery = len(queries), len(gallery)
    # Queries padded (zero vectors without positives, left out of every sum) to whole chunks on every device.
    per_device = -(-num_queries // mesh.size)
    chunk = min(chunk_size, per_device)
    per_device = chunk * -(-per_device // chunk)
    padding = mesh.size * per_device - num_queries
    gallery_padding = -num_gallery % _GROUP
    counted = bool(levels[0].num_positives.max() <= _MAX_COUNTED_POSITIVES)
    ranked = levels[1:] if counted else levels
    query_ids = np.arange(num_queries)
    indices, valid = _positives(levels[0], query_ids, self_retrieval,
                                _num_slots(levels[0].num_positives.max()) if counted else 0)
    ranked_depths = tuple(min(max(int(level.num_positives.max()), max(recall_at)), num_gallery - int(self_retrieval))
                          for level in ranked)
    hit_at = tuple(sorted(set(recall_at) | {1}))
    scores = _sharded_scorer(mesh, chunk=chunk, counted=counted, gallery_padding=gallery_padding,
                             ranked_depths=ranked_depths, hit_at=hit_at, recall_target=recall_target)

    axis = jax.sharding.PartitionSpec(mesh.axis_names[0])

    def rows(x, fill=0):
        return _on_mesh(np.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1), constant_values=fill), mesh, axis)

    def everywhere(x):
        return _on_mesh(x, mesh, jax.sharding.PartitionSpec())
    hits, sums = scores(
        rows(queries), rows(indices.astype(np.int32)), rows(valid),
        rows((query_ids if self_retrieval else np.full(num_queries, -1)).astype(np.int32), fill=-1),
        tuple(rows(level.query_classes.astype(np.int32)) for level in ranked),
        tuple(rows(level.num_positives.astype(np.int32)) for level in ranked),
        everywhere(np.pad(gallery, ((0, gallery_padding), (0, 0)))),
        tuple(everywhere(np.pad(level.gallery_classes, (0, gallery_padding), constant_values=-1).astype(np.int32))
              for level in ranked))
    # Replicated on every device: this process's first copy, summed over the chunks in 64 bits.
    hits = np.asarray(hits.addressable_shards[0].data).astype(np.int64).sum(axis=0)
    sums = np.asarray(sums.addressable_shards[0].data).astype(np.float64).sum(axis=0)
    metrics: Dict[str, float] = {}
    for level, level_hits, level_sums in zip(levels, hits, sums):
        metrics.update(_means_of_sums(level_hits, level_sums, level, hit_at, recall_at))
    if recall_target is not None:
        metrics["top_k_recall_target"] = recall_target
    return metrics


def _checked_recall_target(top_k_recall_target, on_device: bool) -> Optional[float]:
    if top_k_recall_target is None:
        return None
    if (not isinstance(top_k_recall_target, (int, float, np.floating)) or isinstance(top_k_recall_target, bool)
            or not 0 < top_k_recall_target <= 1):
        raise ValueError(f"top_k_recall_target must be None (exact top-k) or a number in (0, 1], got "
                         f"{top_k_recall_target!r}.")
    if not on_device:
        raise ValueError("top_k_recall_target applies to the device's top-k, but rank_on_device is False (the host "
                         "ranks exactly); leave rank_on_device unset or True, or drop top_k_recall_target.")
    return float(top_k_recall_target)


def _prepared(embeddings, labels, query_embeddings, query_labels, recall_at, super_labels, chunk_size):
    """The checked inputs of `retrieval_metrics`: (unit gallery f32[gallery, dim], gallery labels, unit queries
    f32[num_queries, dim] (the gallery in self-retrieval), its levels [class level, super level if asked], recall_at
    as a tuple)."""
    gallery, gallery_labels, queries, queries_labels = _checked_inputs(
        embeddings, labels, query_embeddings, query_labels)
    self_retrieval = query_embeddings is None
    recall_at = _checked_recall_at(recall_at)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")

    gallery = _l2_normalised(gallery, "embeddings")
    queries = gallery if self_retrieval else _l2_normalised(queries, "query_embeddings")
    levels = [_level("", queries_labels, gallery_labels, self_retrieval)]
    if levels[0].num_positives.max() == 0:
        raise ValueError("labels: no query has another item of its class to retrieve; every class needs at "
                         "least two items (self-retrieval) or one gallery item (query mode).")
    if super_labels is not None:
        query_super, gallery_super = _super_classes(super_labels, queries_labels, gallery_labels)
        levels.append(_level("super/", query_super, gallery_super, self_retrieval))
    return gallery, gallery_labels, queries, levels, recall_at


def _checked_inputs(embeddings, labels, query_embeddings, query_labels):
    """The inputs as NumPy arrays (gallery, gallery labels, queries, query labels), checked for shape."""
    if (query_embeddings is None) != (query_labels is None):
        raise ValueError("query_embeddings and query_labels must be given together (query-vs-gallery mode) "
                         "or both left out (self-retrieval).")
    gallery, gallery_labels = _checked_pair(embeddings, labels, "embeddings", "labels")
    if query_embeddings is None:
        return gallery, gallery_labels, gallery, gallery_labels
    queries, queries_labels = _checked_pair(query_embeddings, query_labels, "query_embeddings", "query_labels")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query_embeddings has dimension {queries.shape[1]} but embeddings has "
                         f"{gallery.shape[1]}; embed queries and gallery with the same model.")
    return gallery, gallery_labels, queries, queries_labels


def _checked_pair(embeddings, labels, embeddings_name: str, labels_name: str):
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"{embeddings_name} must be a non-empty 2-D array [items, dim], got shape "
                         f"{embeddings.shape}.")
    if labels.shape != (embeddings.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_name} must be a 1-D integer array with one label per row of "
                         f"{embeddings_name} ({embeddings.shape[0]}), got {labels.dtype} {labels.shape}.")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"{embeddings_name} contains NaN or infinite values; check the model's outputs.")
    return embeddings, labels


def _checked_recall_at(recall_at: Sequence[int]) -> Tuple[int, ...]:
    recall_at = tuple(recall_at)
    if not recall_at or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in recall_at):
        raise ValueError(f"recall_at must be a non-empty sequence of positive integers, got {recall_at!r}.")
    return tuple(int(k) for k in recall_at)


def _l2_normalised(embeddings: np.ndarray, name: str) -> np.ndarray:
    """f32[items, dim] rows scaled to unit norm (in float64, so equal rows stay exactly equal)."""
    unit = np.empty(embeddings.shape, np.float32)
    # A few thousand rows at a time: the float64 copy stays in cache (the whole array at once took 2-3 times as
    # long at SOP's size); every row is computed as before, so the result is bitwise the same.
    for start in range(0, len(embeddings), _NORMALISED_ROWS):
        rows = embeddings[start:start + _NORMALISED_ROWS].astype(np.float64)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        if np.any(norms == 0):
            row = start + int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise ValueError(f"{name} row {row} is all zeros, so its cosine similarity is undefined; drop that "
                             "item or check the model's outputs.")
        unit[start:start + _NORMALISED_ROWS] = rows / norms
    return unit


def _super_classes(super_labels, queries_labels: np.ndarray, gallery_labels: np.ndarray):
    """Query and gallery labels mapped through super_labels (class -> super-class)."""
    super_labels = np.asarray(super_labels)
    if super_labels.ndim != 1 or not np.issubdtype(super_labels.dtype, np.integer):
        raise ValueError(f"super_labels must be a 1-D integer array (class -> super-class), got "
                         f"{super_labels.dtype} {super_labels.shape}.")
    for name, values in (("labels", gallery_labels), ("query_labels", queries_labels)):
        if values.min() < 0 or values.max() >= len(super_labels):
            raise ValueError(f"{name} holds classes outside [0, {len(super_labels)}), the range that "
                             f"super_labels maps; give super_labels one entry per class value.")
    num_classes = int(max(gallery_labels.max(), queries_labels.max())) + 1
    if len(super_labels) in (len(gallery_labels), len(queries_labels)) and len(super_labels) > num_classes:
        # One entry per item, not per class (e.g. an `evaluate --export` file's example_super_labels): indexing it
        # by class would give a wrong super-class to almost every item, silently.
        raise ValueError(f"super_labels has one entry per item ({len(super_labels)}) but maps classes: the labels "
                         f"hold {num_classes} class values. Give one entry per class, e.g. "
                         "class_super_labels(labels, item_super_labels).")
    return super_labels[queries_labels], super_labels[gallery_labels]


def class_super_labels(labels, item_super_labels) -> np.ndarray:
    """int[max(labels) + 1]: the super-class of each class, from one super-class per item.

    What `retrieval_metrics(super_labels=...)` takes, from per-item arrays such as `evaluate --export`'s
    `labels` and `example_super_labels` (of one split). Classes without items map to -1.

    Args:
      labels: int[items], class of each item.
      item_super_labels: int[items], super-class of each item; every item of a class must have the same.
    """
    labels, item_super_labels = np.asarray(labels), np.asarray(item_super_labels)
    if labels.shape != item_super_labels.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and item_super_labels {item_super_labels.shape} must be 1-D "
                         "arrays of the same length, one entry per item.")
    per_class = np.full(int(labels.max()) + 1, -1, dtype=item_super_labels.dtype)
    per_class[labels] = item_super_labels
    mixed = np.flatnonzero(per_class[labels] != item_super_labels)
    if len(mixed):
        raise ValueError(f"class {int(labels[mixed[0]])} has items of several super-classes; a class has one "
                         "super-class.")
    return per_class


def _level(prefix: str, queries_labels: np.ndarray, gallery_labels: np.ndarray, self_retrieval: bool) -> _Level:
    """Contiguous class ids and the gallery's class membership, for building each query's positive list."""
    classes = np.unique(np.concatenate([queries_labels, gallery_labels]), return_inverse=True)[1]
    query_classes = classes[:len(queries_labels)].astype(np.int64)
    gallery_classes = classes[len(queries_labels):].astype(np.int64)
    class_sizes = np.bincount(gallery_classes, minlength=int(classes.max()) + 1)
    return _Level(
        prefix=prefix,
        query_classes=query_classes,
        gallery_classes=gallery_classes,
        members=np.argsort(gallery_classes, kind="stable"),
        class_starts=np.cumsum(class_sizes) - class_sizes,
        class_sizes=class_sizes,
        num_positives=class_sizes[query_classes] - int(self_retrieval),
    )


def _num_slots(max_positives: int) -> int:
    """Threshold slots for queries with up to max_positives positives: whole words of counters."""
    return _FIELDS_PER_WORD * -(-int(max_positives) // _FIELDS_PER_WORD)


def _positives(level: _Level, query_ids: np.ndarray, self_retrieval: bool, num_slots: int):
    """Gallery indices of each query's positives (i64[rows, num_slots]) and which slots hold one (bool).

    The first R slots of a row hold its positives (in self-retrieval, not the query itself); the rest are
    empty. num_slots >= the largest R of the rows.
    """
    classes = level.query_classes[query_ids]
    width = num_slots + int(self_retrieval)
    offsets = level.class_starts[classes][:, None] + np.arange(width)
    indices = level.members[np.minimum(offsets, len(level.members) - 1)]
    valid = np.arange(width) < level.class_sizes[classes][:, None]
    if self_retrieval:
        valid &= indices != query_ids[:, None]
        first_valid = np.argsort(~valid, axis=1, kind="stable")
        indices = np.take_along_axis(indices, first_valid, axis=1)
        valid = np.take_along_axis(valid, first_valid, axis=1)
    return np.where(valid, indices, 0)[:, :num_slots], valid[:, :num_slots]


def _similarities(rows: jax.Array, columns: jax.Array) -> jax.Array:
    """f32[rows, columns] dot products in full float32 (no TF32 or bfloat16 passes on accelerators)."""
    return jnp.dot(rows, columns.T, precision=jax.lax.Precision.HIGHEST)


def _counts_at_least(similarities: jax.Array, thresholds: jax.Array, axis: int) -> jax.Array:
    """i32[items, slots]: per item of one side, the items of the other side with similarity >= each threshold.

    Args:
      similarities: f32[rows, columns], both multiples of 128.
      thresholds: f32[slots, rows] (axis=1: count along each row) or f32[slots, columns] (axis=0: along each
        column); slots a multiple of 4; +inf in an empty slot counts nothing. Slot-major, so that counting
        along columns reads one slot's thresholds contiguously (items-major was slower on CPU: docs/benchmarks.md,
        section "Evaluation").
    """
    rows, columns = similarities.shape
    if axis == 1:
        grouped = similarities.reshape(rows, columns // _GROUP, _GROUP)
        threshold = lambda slot: thresholds[slot, :, None, None]  # noqa: E731
    else:
        grouped = similarities.reshape(rows // _GROUP, _GROUP, columns)
        threshold = lambda slot: thresholds[slot, None, None, :]  # noqa: E731
    fields = range(_FIELDS_PER_WORD)
    words = tuple(sum(jnp.where(grouped >= threshold(first + f), jnp.uint32(1 << (_FIELD_BITS * f)), jnp.uint32(0))
                      for f in fields)
                  for first in range(0, thresholds.shape[0], _FIELDS_PER_WORD))
    if not words:
        return jnp.zeros((similarities.shape[1 - axis], 0), jnp.int32)
    # One variadic reduction sums every word in a single pass over the similarities (a reduction per word
    # re-reads them, which costs as much as the matrix product once they outgrow the cache).
    group_sums = jax.lax.reduce(words, (jnp.uint32(0),) * len(words),
                                lambda x, y: tuple(a + b for a, b in zip(x, y)), (axis + 1,))
    counts = [jnp.sum((word >> (_FIELD_BITS * f)) & (2**_FIELD_BITS - 1), axis=axis, dtype=jnp.int32)
              for word in group_sums for f in fields]
    return jnp.stack(counts, axis=1)


def _gathered_thresholds(similarities: jax.Array, positive_columns: jax.Array, positive_valid: jax.Array):
    """f32[slots, rows]: each row's similarity to each of its positives, +inf in empty slots (slot-major)."""
    return jnp.where(positive_valid, jnp.take_along_axis(similarities, positive_columns, axis=1), jnp.inf).T


@jax.jit
def _diagonal_block(block, positive_columns, positive_valid):
    """Thresholds (f32[slots, block]), self-similarities (f32[block]) and row counts of a diagonal block,
    which holds every positive of its rows (positive_columns: i32[block, slots] indices within the block)."""
    similarities = _similarities(block, block)
    thresholds = _gathered_thresholds(similarities, positive_columns, positive_valid)
    return thresholds, jnp.diagonal(similarities), _counts_at_least(similarities, thresholds, axis=1)


@functools.partial(jax.jit, donate_argnums=(4, 5))
def _off_diagonal_block(row_block, column_block, row_thresholds, column_thresholds, row_counts, column_counts):
    """Adds one off-diagonal block's counts to its rows' and (transposed) its columns' running counts."""
    similarities = _similarities(row_block, column_block)
    return (row_counts + _counts_at_least(similarities, row_thresholds, axis=1),
            column_counts + _counts_at_least(similarities, column_thresholds, axis=0))


@jax.jit
def _query_chunk(queries, gallery, positive_indices, positive_valid, self_indices, ranked_query_classes,
                 ranked_gallery_classes):
    """One chunk of queries against the whole gallery.

    Returns thresholds (f32[slots, chunk]), self-similarities (f32[chunk], -inf in query mode) and row counts
    of the counted class level (no slots: none), and for each ranked level (ranked_query_classes: i32[chunk],
    ranked_gallery_classes: i32[gallery], -1 on padding) u32[chunk, gallery] pessimistic keys, the query
    itself and the padding given the largest key.
    """
    similarities = _similarities(queries, gallery)
    thresholds = _gathered_thresholds(similarities, positive_indices, positive_valid)
    itself = jnp.take_along_axis(similarities, jnp.maximum(self_indices, 0)[:, None], axis=1)[:, 0]
    self_similarities = jnp.where(self_indices >= 0, itself, -jnp.inf)
    counts = _counts_at_least(similarities, thresholds, axis=1)
    is_self = jnp.arange(gallery.shape[0])[None, :] == self_indices[:, None]
    keys = tuple(
        jnp.where(is_self | (gallery_classes[None, :] < 0), jnp.uint32(_LAST_KEY),
                  _pessimistic_keys(similarities, query_classes[:, None] == gallery_classes[None, :]))
        for query_classes, gallery_classes in zip(ranked_query_classes, ranked_gallery_classes))
    return thresholds, self_similarities, counts, keys


def _pessimistic_keys(similarities: jax.Array, positive: jax.Array) -> jax.Array:
    """u32 keys whose ascending order is the pessimistic ranking: similarity descending, negatives first among
    equal similarities (equal keys: same similarity and same kind, interchangeable).

    The label takes the place of bit 30 of the float32, the top exponent bit, which is 0 for every |x| < 2, so
    cosine similarities keep their exact order: the sign-magnitude bits with bit 30 dropped are flipped so
    that larger similarities get smaller keys.
    """
    bits = jax.lax.bitcast_convert_type(similarities, jnp.uint32)
    bits = jnp.where(similarities == 0, jnp.uint32(0), bits)  # -0.0 and 0.0 are equal similarities
    order = (bits & jnp.uint32(2**30 - 1)) ^ (jnp.uint32(2**30 - 1) + (bits >> 31))
    return (order << 1) | positive.astype(jnp.uint32)


def _descending_scores(keys: jax.Array) -> jax.Array:
    """f32[rows, columns] whose descending order is the ascending order of the pessimistic keys u32[rows, columns],
    one score per key (`_keys_of_scores` inverts it); the query itself and padding get -inf.

    XLA selects the top-k of float32 in a partial sort (CPU) or a select-k kernel (GPU, small k), of integers only by
    a full sort. Reversing a key (x ^ 0x7FFFFFFF of keys below 2^31; keys from 2^31, negative similarities, keep
    their bits) and reading it as a sign-magnitude float32 keeps every order; it is finite for similarities
    within (-1.5, 1.5).
    """
    reversed_keys = jnp.where(keys < jnp.uint32(2**31), keys ^ jnp.uint32(2**31 - 1), keys)
    scores = jax.lax.bitcast_convert_type(reversed_keys, jnp.float32)
    return jnp.where(keys == jnp.uint32(_LAST_KEY), -jnp.inf, scores)


def _keys_of_scores(scores: jax.Array) -> jax.Array:
    """u32 pessimistic keys of `_descending_scores` (of real items: no -inf)."""
    bits = jax.lax.bitcast_convert_type(scores, jnp.uint32)
    return jnp.where(bits < jnp.uint32(2**31), bits ^ jnp.uint32(2**31 - 1), bits)


def _negatives_at_least(counts: np.ndarray, thresholds: np.ndarray, valid: np.ndarray,
                        self_similarities: np.ndarray, num_padding: int) -> np.ndarray:
    """i64[rows, slots]: negatives with similarity >= each threshold, from counts over every searched column.

    The counts also hold the row's positives at or above each threshold (known exactly: the thresholds are
    those positives' matrix entries), the query itself in self-retrieval, and the padding items (zero
    vectors, similarity exactly 0). Empty slots get a count no query reaches.
    """
    positives = np.sum(valid[:, None, :] & (thresholds[:, None, :] >= thresholds[:, :, None]), axis=2)
    itself = self_similarities[:, None] >= thresholds
    padding = num_padding * (thresholds <= 0)
    negatives = counts.astype(np.int64) - positives - itself - padding
    return np.where(valid, negatives, np.iinfo(np.int32).max)


def _scores_from_counts(negatives_above: np.ndarray, valid: np.ndarray):
    """(R, negatives above the best positive, R-Precision, AP@R) per query, each i64/f64[rows].

    Sorting a query's counts orders its positives by similarity (ties among positives do not matter: they
    have equal counts), and the k-th positive is at rank count_k + k. Ranks that are not within R contribute
    nothing.
    """
    r = valid.sum(axis=1)
    k = np.arange(1, negatives_above.shape[1] + 1)
    sorted_counts = np.sort(negatives_above, axis=1)  # at least one slot: a counted level has R >= 1 somewhere
    ranks = sorted_counts + k
    within_r = ranks <= r[:, None]
    safe_r = np.maximum(r, 1)
    r_precision = within_r.sum(axis=1) / safe_r
    # MAP@R: (1/R) * sum over ranks i <= R holding a positive of precision@i = k / rank_k.
    average_precision = np.sum(np.where(within_r, k / ranks, 0.0), axis=1) / safe_r
    return r, sorted_counts[:, 0], r_precision, average_precision


def _class_layout(class_sizes: np.ndarray, block: int) -> Tuple[np.ndarray, int]:
    """Where each class starts in a layout of blocks of `block` slots that never splits a class (first fit
    in class order, so a block ends in padding when the next class does not fit), and the block count."""
    starts = np.empty(len(class_sizes), np.int64)
    end = 0
    for c, size in enumerate(class_sizes):
        if end % block + size > block:
            end += block - end % block
        starts[c] = end
        end += size
    return starts, -(-end // block)


def _symmetric_block_scores(unit: np.ndarray, level: _Level, chunk_size: int):
    """Self-retrieval class-level scores (R, negatives above the best positive, R-Precision, AP@R), each per
    item, from the symmetric block sweep (module docstring). Needs R <= _MAX_COUNTED_POSITIVES."""
    num_items, dim = unit.shape
    block = _GROUP * -(-chunk_size // _GROUP)
    starts, num_blocks = _class_layout(level.class_sizes, block)
    rank_in_class = np.empty(num_items, np.int64)
    rank_in_class[level.members] = np.arange(num_items) - np.repeat(level.class_starts, level.class_sizes)
    position = starts[level.gallery_classes] + rank_in_class
    layout = np.zeros((num_blocks * block, dim), np.float32)
    layout[position] = unit
    num_slots = _num_slots(level.num_positives.max())
    indices, valid = _positives(level, np.arange(num_items), True, num_slots)
    # A class lies in one block, so a positive's column within its block is its position modulo the block.
    columns = np.zeros((num_blocks * block, num_slots), np.int32)
    columns[position] = np.where(valid, position[indices] % block, 0)
    slot_valid = np.zeros((num_blocks * block, num_slots), bool)
    slot_valid[position] = valid

    blocks, thresholds, self_similarities, counts = [], [], [], []
    for b in range(num_blocks):
        rows = slice(b * block, (b + 1) * block)
        blocks.append(jax.device_put(layout[rows]))
        block_thresholds, block_self, block_counts = _diagonal_block(blocks[b], columns[rows], slot_valid[rows])
        thresholds.append(block_thresholds)
        self_similarities.append(block_self)
        counts.append(block_counts)
    for i in range(num_blocks):
        for j in range(i + 1, num_blocks):
            counts[i], counts[j] = _off_diagonal_block(blocks[i], blocks[j], thresholds[i], thresholds[j],
                                                       counts[i], counts[j])
    negatives_above = _negatives_at_least(
        np.concatenate([np.asarray(c) for c in counts]), np.concatenate([np.asarray(t).T for t in thresholds]),
        slot_valid, np.concatenate([np.asarray(s) for s in self_similarities]), num_blocks * block - num_items)
    return _scores_from_counts(negatives_above[position], valid)


def _query_chunk_scores(queries: np.ndarray, gallery: np.ndarray, levels: Sequence[_Level],
                        self_retrieval: bool, chunk_size: int, max_recall_at: int):
    """Per level: (R, negatives above the best positive, R-Precision, AP@R), each per query, from chunks of
    queries searched against the whole gallery (query mode, or self-retrieval with a level ranked by sorting).

    The class level is counted on the device when its R allows, every other level ranked on the host
    (`_ranked_scores`) from the chunk's keys copied back. Chunks are padded to chunk_size and the gallery to a
    multiple of 128 with zero vectors, so the device step compiles once.
    """
    num_queries, num_gallery = len(queries), len(gallery)
    chunk_size = min(chunk_size, num_queries)
    num_padding = -num_gallery % _GROUP
    gallery_device = jax.device_put(np.pad(gallery, ((0, num_padding), (0, 0))))
    counted = levels[0].num_positives.max() <= _MAX_COUNTED_POSITIVES
    ranked = levels[1:] if counted else levels
    num_slots = _num_slots(levels[0].num_positives.max()) if counted else 0
    ranked_gallery_classes = tuple(jax.device_put(np.pad(level.gallery_classes, (0, num_padding),
                                                         constant_values=-1).astype(np.int32)) for level in ranked)

    def dispatch(query_ids):
        """Starts the device step of a chunk (asynchronously) and returns what scoring it needs."""
        padding = chunk_size - len(query_ids)
        indices, valid = _positives(levels[0], query_ids, self_retrieval, num_slots)
        self_indices = query_ids if self_retrieval else np.full(len(query_ids), -1)
        outputs = _query_chunk(
            np.pad(queries[query_ids], ((0, padding), (0, 0))),
            gallery_device,
            np.pad(indices, ((0, padding), (0, 0))).astype(np.int32),
            np.pad(valid, ((0, padding), (0, 0))),
            np.pad(self_indices, (0, padding), constant_values=-1).astype(np.int32),
            tuple(np.pad(level.query_classes[query_ids], (0, padding)).astype(np.int32) for level in ranked),
            ranked_gallery_classes,
        )
        return query_ids, valid, outputs

    def scores_of(query_ids, valid, outputs):
        thresholds, self_similarities, counts, keys = outputs
        rows = len(query_ids)
        scores = []
        if counted:
            negatives_above = _negatives_at_least(np.asarray(counts)[:rows], np.asarray(thresholds).T[:rows], valid,
                                                  np.asarray(self_similarities)[:rows], num_padding)
            scores.append(_scores_from_counts(negatives_above, valid))
        scores += [_ranked_scores(np.asarray(level_keys)[:rows], level.num_positives[query_ids], max_recall_at,
                                  num_gallery - int(self_retrieval)) for level, level_keys in zip(ranked, keys)]
        return scores

    chunks = [[] for _ in levels]
    pending = None
    # The host scores one chunk while the device computes the next.
    for start in list(range(0, num_queries, chunk_size)) + [None]:
        started = None if start is None else dispatch(np.arange(start, min(start + chunk_size, num_queries)))
        if pending is not None:
            for chunk, level_scores in zip(chunks, scores_of(*pending)):
                chunk.append(level_scores)
        pending = started
    return [tuple(np.concatenate(parts) for parts in zip(*chunk)) for chunk in chunks]


def _ranked_chunk(keys: jax.Array, r: jax.Array, *, num_ranked: int, recall_target: Optional[float] = None):
    """`_ranked_scores` on the device: (negatives above the best positive i32[rows], R-Precision f32[rows],
    AP@R f32[rows]) from pessimistic keys u32[rows, columns] of full rows and R i32[rows].

    Each row's first `num_ranked` ranks (>= max(R, largest K) of every row) are its smallest keys, sorted: a top-k
    of their `_descending_scores` (jax.lax.top_k; jax.lax.approx_max_k with recall_target). With the exact top-k
    the counts are exact, as on the host, and the means are float32 sums. The count above the best positive is
    num_ranked when none is ranked, which decides every Recall@K alike.
    """
    scores = _descending_scores(keys)
    if recall_target is None:
        top_scores = jax.lax.top_k(scores, num_ranked)[0]
    else:
        top_scores = jax.lax.approx_max_k(scores, num_ranked, recall_target=recall_target)[0]
    top = _keys_of_scores(top_scores)
    positive = (top & jnp.uint32(1)).astype(bool)
    rank = jnp.arange(1, num_ranked + 1)
    counted = positive & (rank[None, :] <= r[:, None])
    safe_r = jnp.maximum(r, 1).astype(jnp.float32)
    r_precision = jnp.sum(counted, axis=1) / safe_r
    # MAP@R: (1/R) * sum over ranks i <= R holding a positive of precision@i.
    precision = jnp.cumsum(positive, axis=1) / rank[None, :]
    average_precision = jnp.sum(jnp.where(counted, precision, 0.0), axis=1) / safe_r
    above_best = jnp.where(jnp.any(positive, axis=1), jnp.argmax(positive, axis=1), num_ranked)
    return above_best, r_precision, average_precision


def _ranked_scores(keys: np.ndarray, r: np.ndarray, max_recall_at: int, num_searched: int):
    """(R, negatives above the best positive, R-Precision, AP@R) per row, from pessimistic keys of full rows.

    A row's metrics depend only on its first max(R, largest K) ranks: its smallest keys, which np.partition
    finds in time linear in the gallery, sorted. The count above the best positive is exact when it is below
    that many ranks, and that many otherwise, which decides every Recall@K alike.

    Args:
      keys: u32[rows, columns] from `_pessimistic_keys`, the query itself and padding largest.
      r: i64[rows], R of each row.
      num_searched: the items each row ranks (the gallery, less the query itself in self-retrieval).
    """
    num_rows = len(keys)
    above_best = np.zeros(num_rows, np.int64)
    r_precision, average_precision = np.zeros(num_rows), np.zeros(num_rows)
    for start in range(0, num_rows, _HOST_ROWS):
        part = slice(start, min(start + _HOST_ROWS, num_rows))
        num_ranked = min(max(int(r[part].max()), max_recall_at), num_searched)
        top = np.sort(np.partition(keys[part], num_ranked - 1, axis=1)[:, :num_ranked], axis=1)
        positive = (top & np.uint32(1)).astype(bool)
        rank = np.arange(1, num_ranked + 1)
        counted = positive & (rank <= r[part][:, None])
        safe_r = np.maximum(r[part], 1)
        r_precision[part] = counted.sum(axis=1) / safe_r
        # MAP@R: (1/R) * sum over ranks i <= R holding a positive of precision@i.
        precision = np.cumsum(positive, axis=1) / rank
        average_precision[part] = np.sum(np.where(counted, precision, 0.0), axis=1) / safe_r
        above_best[part] = np.where(positive.any(axis=1), np.argmax(positive, axis=1), num_ranked)
    return r, above_best, r_precision, average_precision


def _mean_scores(r, above_best, r_precision, average_precision, recall_at: Tuple[int, ...],
                 prefix: str) -> Dict[str, float]:
    """Means over the queries with R >= 1 (Musgrave et al. leave out queries without a positive)."""
    has_positive = r > 0
    best_rank_minus_one = above_best[has_positive]
    metrics = {f"{prefix}recall@{k}": float(np.mean(best_rank_minus_one < k)) for k in recall_at}
    metrics[f"{prefix}precision@1"] = float(np.mean(best_rank_minus_one == 0))
    metrics[f"{prefix}r_precision"] = float(np.mean(r_precision[has_positive]))
    metrics[f"{prefix}map@r"] = float(np.mean(average_precision[has_positive]))
    metrics[f"{prefix}num_queries"] = int(len(r))
    metrics[f"{prefix}num_queries_without_positive"] = int(np.sum(~has_positive))
    return metrics


def _on_mesh(x: np.ndarray, mesh: jax.sharding.Mesh, spec: jax.sharding.PartitionSpec) -> jax.Array:
    """A host array every process holds whole, as a global array over `mesh` laid out by `spec`."""
    return jax.make_array_from_callback(x.shape, jax.sharding.NamedSharding(mesh, spec), lambda index: x[index])


# A count no query reaches: an empty slot's negatives (int32; adding the slot's rank must not overflow).
_NO_POSITIVE = 2**30


def _counted_scores(counts: jax.Array, thresholds: jax.Array, valid: jax.Array, self_similarities: jax.Array,
                    num_padding: int):
    """`_negatives_at_least` and `_scores_from_counts` on the device, for one chunk: (R i32[rows], negatives above
    the best positive i32[rows], R-Precision f32[rows], AP@R f32[rows]).

    counts: i32[rows, slots]; thresholds: f32[rows, slots] (+inf in empty slots); valid: bool[rows, slots];
    self_similarities: f32[rows] (-inf in query mode); num_padding: the gallery's zero vectors.
    """
    positives = jnp.sum(valid[:, None, :] & (thresholds[:, None, :] >= thresholds[:, :, None]), axis=2)
    itself = self_similarities[:, None] >= thresholds
    padding = num_padding * (thresholds <= 0)
    negatives = jnp.where(valid, counts - positives - itself - padding, _NO_POSITIVE)
    r = jnp.sum(valid, axis=1)
    k = jnp.arange(1, counts.shape[1] + 1)
    sorted_counts = jnp.sort(negatives, axis=1)
    ranks = sorted_counts + k
    within_r = ranks <= r[:, None]
    safe_r = jnp.maximum(r, 1).astype(jnp.float32)
    r_precision = jnp.sum(within_r, axis=1) / safe_r
    # MAP@R: (1/R) * sum over ranks i <= R holding a positive of precision@i = k / rank_k.
    average_precision = jnp.sum(jnp.where(within_r, k / ranks, 0.0), axis=1) / safe_r
    return r, sorted_counts[:, 0], r_precision, average_precision


def _chunk_sums(r, above_best, r_precision, average_precision, hit_at: Tuple[int, ...]):
    """One chunk's sums over its queries with R >= 1: (i32[len(hit_at) + 1]: hits within each K of hit_at, then
    the number of such queries; f32[2]: sums of R-Precision and of AP@R)."""
    has_positive = r > 0
    hits = [jnp.sum(has_positive & (above_best < k)) for k in hit_at] + [jnp.sum(has_positive)]
    sums = [jnp.sum(jnp.where(has_positive, r_precision, 0.0)), jnp.sum(jnp.where(has_positive, average_precision,
                                                                                    0.0))]
    return jnp.stack(hits).astype(jnp.int32), jnp.stack(sums).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _sharded_scorer(mesh: jax.sharding.Mesh, *, chunk: int, counted: bool, gallery_padding: int,
                    ranked_depths: Tuple[int, ...], hit_at: Tuple[int, ...], recall_target: Optional[float]):
    """The device program of `sharded_retrieval_metrics` (and of `retrieval_metrics` on the device, over a mesh of
    that one device), compiled once per mesh and shape (hence the cache).

    Takes, split over the mesh's devices: unit queries f32[queries, dim], positive_indices i32[queries, slots] and
    positive_valid bool[queries, slots] of the class level (no slots when it is ranked), self_indices i32[queries]
    (-1: none), per ranked level query classes and R (i32[queries] each); on every device: the padded gallery
    f32[gallery, dim] and per ranked level its classes i32[gallery] (-1 on padding). Returns, replicated, per
    chunk of every device: hits i32[chunks, levels, len(hit_at) + 1] and sums f32[chunks, levels, 2]
    (`_chunk_sums`).
    """
    axis = mesh.axis_names[0]

    def per_device(queries, indices, valid, self_indices, query_classes, r, gallery, gallery_classes):
        def one_chunk(chunk_inputs):
            queries, indices, valid, self_indices, query_classes, r = chunk_inputs
            thresholds, self_similarities, counts, keys = _query_chunk(
                queries, gallery, indices, valid, self_indices, query_classes, gallery_classes)
            per_level = []
            if counted:
                per_level.append(_chunk_sums(*_counted_scores(counts, thresholds.T, valid, self_similarities,
                                                              gallery_padding), hit_at))
            for level_keys, level_r, depth in zip(keys, r, ranked_depths):
                per_level.append(_chunk_sums(level_r, *_ranked_chunk(level_keys, level_r, num_ranked=depth,
                                                                     recall_target=recall_target), hit_at))
            return jnp.stack([hits for hits, _ in per_level]), jnp.stack([sums for _, sums in per_level])

        # Chunk by chunk (lax.map: one chunk's similarities in memory at a time).
        num_chunks = queries.shape[0] // chunk
        chunks = jax.tree_util.tree_map(lambda x: x.reshape((num_chunks, chunk) + x.shape[1:]),
                                        (queries, indices, valid, self_indices, query_classes, r))
        hits, sums = jax.lax.map(one_chunk, chunks)
        return gathered(hits), gathered(sums)

    def gathered(x):
        """[chunks, ...] of this device -> [devices * chunks, ...] on every device: a psum of each device's
        chunks placed among zeros (exact; all_gather's result would not count as replicated)."""
        placed = jnp.zeros((mesh.size,) + x.shape, x.dtype).at[jax.lax.axis_index(axis)].set(x)
        return jax.lax.psum(placed, axis).reshape((-1,) + x.shape[1:])

    split, replicated = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(split,) * 6 + (replicated,) * 2,
                                 out_specs=(replicated, replicated)))


def _means_of_sums(hits: np.ndarray, sums: np.ndarray, level: _Level, hit_at: Tuple[int, ...],
                   recall_at: Tuple[int, ...]) -> Dict[str, float]:
    """`_mean_scores` from one level's summed counts (`_chunk_sums`, summed over every chunk)."""
    num_with_positive = np.float64(hits[-1])
    hits_within = dict(zip(hit_at, hits[:-1]))
    metrics = {f"{level.prefix}recall@{k}": float(hits_within[k] / num_with_positive) for k in recall_at}
    metrics[f"{level.prefix}precision@1"] = float(hits_within[1] / num_with_positive)
    metrics[f"{level.prefix}r_precision"] = float(sums[0] / num_with_positive)
    metrics[f"{level.prefix}map@r"] = float(sums[1] / num_with_positive)
    metrics[f"{level.prefix}num_queries"] = int(len(level.num_positives))
    metrics[f"{level.prefix}num_queries_without_positive"] = int(np.sum(level.num_positives == 0))
    return metrics


def _kmeans_nmi(unit_embeddings: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """NMI between the labels and k-means clusters (k = number of classes) of the unit embeddings."""
    num_classes = len(np.unique(labels))
    clusters = kmeans_lib.kmeans(unit_embeddings, num_classes, seed=seed).assignment
    return normalized_mutual_information(labels, np.asarray(clusters))


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution of `counts` (zeros ignored)."""
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def normalized_mutual_information(labels, clusters) -> float:
    """NMI(Y; C) = I(Y; C) / ((H(Y) + H(C)) / 2), in nats: scikit-learn's `normalized_mutual_info_score` with its
    default arithmetic mean, written here so the core needs NumPy only.

    Args:
      labels: int[n], the true classes.
      clusters: int[n], the predicted clusters.

    Returns:
      A float in [0, 1]; 1 when both give a single group (scikit-learn's convention), 0 when I(Y; C) = 0.
    """
    _, labels = np.unique(np.asarray(labels), return_inverse=True)
    _, clusters = np.unique(np.asarray(clusters), return_inverse=True)
    num_labels, num_clusters = labels.max(initial=-1) + 1, clusters.max(initial=-1) + 1
    if num_labels == num_clusters and num_labels <= 1:
        return 1.0
    joint = np.zeros((num_labels, num_clusters))
    np.add.at(joint, (labels, clusters), 1.0)
    n = joint.sum()
    rows, columns = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    # I(Y; C) = sum_ij p_ij log(p_ij / (p_i p_j)), clipped at 0 against round-off as scikit-learn does.
    mutual = max(float(np.sum(joint[nonzero] / n * np.log(joint[nonzero] * n / (rows @ columns)[nonzero]))), 0.0)
    if mutual == 0.0:
        return 0.0
    return float(mutual / ((_entropy(rows.ravel()) + _entropy(columns.ravel())) / 2))
