"""Retrieval metrics on embedding arrays (METHOD.md, "Benchmarks and class splits"); no model, no I/O.

Recall@K as a hit rate, and the metrics of "A Metric Learning Reality Check" (Musgrave et al., 2020):
Precision@1, R-Precision and MAP@R, where R is the number of other items of the query's class in the searched
set. Similarities are cosine. Ties never help a query: an item whose similarity equals a positive's is ranked
above it (pessimistic ranking), so a negative tied with the only positive is a miss.

The search runs in chunks of queries on the default JAX device; memory is bounded by chunk_size x gallery
size, never gallery x gallery. Nothing is sorted along the gallery. For a query with positives sorted by
similarity s_1 >= ... >= s_R and c_k = number of negatives with similarity >= s_k, the k-th positive sits at
rank c_k + k of the pessimistic ranking. So:
- Recall@K for every K follows from c_1 alone, one count over the gallery: a hit iff c_1 < K.
- R-Precision and MAP@R only look at ranks <= R, where c_k < R <= max_R: the top max_R + (largest class size)
  items of each query (top_k on the device) hold its top max_R negatives, which give every c_k exactly below
  max_R, and a count capped at max_R is outside the top R.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import sklearn.cluster
import sklearn.metrics


# Counts of gallery items are summed in float32 on the device, exact up to 2^24.
_MAX_GALLERY = 2**24


class _Level(NamedTuple):
    """One labelling of the queries and the gallery (classes, or super-classes), as contiguous ids.

    Attributes:
      prefix: prefix of the metric names of this level ("" or "super/").
      query_classes: i32[num_queries].
      gallery_classes: i32[gallery].
      members: i64[gallery], gallery indices sorted by class, so a class's members are contiguous.
      class_starts: i64[num_classes], where each class starts in `members`.
      class_sizes: i64[num_classes], gallery items of each class.
      width: positive slots per query, the largest class a query belongs to (it includes the query itself
        in self-retrieval, where that slot is always masked).
      max_r: the largest R over the queries.
    """

    prefix: str
    query_classes: np.ndarray
    gallery_classes: np.ndarray
    members: np.ndarray
    class_starts: np.ndarray
    class_sizes: np.ndarray
    width: int
    max_r: int


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
        value c in `labels` (and `query_labels`). Adds the retrieval metrics at the super-class level under
        keys prefixed `super/`, from the same similarities. Costlier: each query keeps its top
        max_R + (largest class size) items, both now at the super-class level (SOP: about 5,000 each; about
        4 s per chunk of 1,024 queries against 60,502 items on 2 CPU cores, against about 0.5 s without).
      nmi: also cluster the (gallery) embeddings with k-means, k = number of classes, and report the NMI of
        the clusters against the labels. Slow for many classes (SOP).
      chunk_size: queries searched at once; the device holds chunk_size x gallery similarities.
      seed: k-means seed.

    Returns:
      `recall@K` for each K in recall_at, `precision@1`, `r_precision`, `map@r` (floats in [0, 1], means over
      the queries with R >= 1), `num_queries` (all queries) and `num_queries_without_positive` (queries with
      R = 0, left out of every mean), the same under `super/` when super_labels is given, and `nmi` when nmi
      is True.
    """
    gallery, gallery_labels, queries, queries_labels = _checked_inputs(
        embeddings, labels, query_embeddings, query_labels)
    if len(gallery) > _MAX_GALLERY:
        raise ValueError(f"embeddings has {len(gallery)} items; counts are exact up to {_MAX_GALLERY}, so "
                         f"evaluate a smaller gallery.")
    self_retrieval = query_embeddings is None
    recall_at = _checked_recall_at(recall_at)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")

    gallery = _l2_normalised(gallery, "embeddings")
    queries = gallery if self_retrieval else _l2_normalised(queries, "query_embeddings")
    levels = [_level("", queries_labels, gallery_labels, self_retrieval)]
    if levels[0].max_r == 0:
        raise ValueError("labels: no query has another item of its class to retrieve; every class needs at "
                         "least two items (self-retrieval) or one gallery item (query mode).")
    if super_labels is not None:
        query_super, gallery_super = _super_classes(super_labels, queries_labels, gallery_labels)
        levels.append(_level("super/", query_super, gallery_super, self_retrieval))

    per_level = _per_query_scores(queries, gallery, levels, self_retrieval, int(chunk_size))
    metrics: Dict[str, float] = {}
    for level, scores in zip(levels, per_level):
        metrics.update(_mean_scores(*scores, recall_at, level.prefix))
    if nmi:
        metrics["nmi"] = _kmeans_nmi(gallery, gallery_labels, seed)
    return metrics


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
    embeddings = embeddings.astype(np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if np.any(norms == 0):
        row = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{name} row {row} is all zeros, so its cosine similarity is undefined; drop that "
                         "item or check the model's outputs.")
    return (embeddings / norms).astype(np.float32)


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
    return super_labels[queries_labels], super_labels[gallery_labels]


def _level(prefix: str, queries_labels: np.ndarray, gallery_labels: np.ndarray, self_retrieval: bool) -> _Level:
    """Contiguous class ids and the gallery's class membership, for building each query's positive list."""
    classes = np.unique(np.concatenate([queries_labels, gallery_labels]), return_inverse=True)[1]
    query_classes = classes[:len(queries_labels)].astype(np.int32)
    gallery_classes = classes[len(queries_labels):].astype(np.int32)
    class_sizes = np.bincount(gallery_classes, minlength=int(classes.max()) + 1)
    width = int(class_sizes[query_classes].max())
    return _Level(
        prefix=prefix,
        query_classes=query_classes,
        gallery_classes=gallery_classes,
        members=np.argsort(gallery_classes, kind="stable"),
        class_starts=np.cumsum(class_sizes) - class_sizes,
        class_sizes=class_sizes,
        width=width,
        max_r=width - 1 if self_retrieval else width,
    )


def _positives(level: _Level, query_ids: np.ndarray, exclude: np.ndarray):
    """Gallery indices of each query's positives (i32[chunk, width]) and which slots hold one (bool).

    exclude: i64[chunk], the gallery index of the query itself (self-retrieval), or -1.
    """
    classes = level.query_classes[query_ids]
    slots = np.arange(level.width)
    offsets = level.class_starts[classes][:, None] + slots
    indices = level.members[np.minimum(offsets, len(level.members) - 1)]
    valid = (slots < level.class_sizes[classes][:, None]) & (indices != exclude[:, None])
    return np.where(valid, indices, 0).astype(np.int32), valid


@functools.partial(jax.jit, static_argnames=("max_rs", "num_top"))
def _negative_counts(queries, gallery, query_classes, gallery_classes, positive_indices, positive_valid,
                     max_rs, num_top):
    """Per query and level: negatives ranked above the best positive, and above each positive.

    A negative is ranked above a positive when its similarity is >= the positive's (pessimistic ties).
    All comparisons use entries of one similarity matrix, so exact ties stay exact.

    Args:
      queries: f32[chunk, dim], unit rows.
      gallery: f32[gallery, dim], unit rows.
      query_classes, gallery_classes, positive_indices, positive_valid: one per level, i32[chunk],
        i32[gallery], i32[chunk, width], bool[chunk, width] (see `_positives`).
      max_rs: static, one per level: the largest R.
      num_top: static, min(gallery, largest max_r + width over the levels): the most similar items kept.

    Returns:
      One pair per level: i32[chunk], negatives with similarity >= the query's best positive (exact; every
      negative when the query has no positive); and i32[chunk, width], for each positive slot the
      negatives with similarity >= that positive's, exact below max_r, else max_r (also for empty slots).
    """
    similarities = queries @ gallery.T
    # The top max_r + width items of a row hold at least max_r negatives (at most width items share the
    # query's class), so a positive with fewer than max_r negatives above it has them all among these.
    top_sims, top_items = jax.lax.top_k(similarities, num_top)
    counts = []
    for q_classes, g_classes, indices, valid, max_r in zip(
            query_classes, gallery_classes, positive_indices, positive_valid, max_rs):
        negative = q_classes[:, None] != g_classes[None, :]
        positive_sims = jnp.take_along_axis(similarities, indices, axis=1)
        # top_k, not max: XLA:CPU fuses a reduction with the broadcast below into a materialised
        # chunk x gallery array, which costs as much as the count itself.
        best = jax.lax.top_k(jnp.where(valid, positive_sims, -jnp.inf), 1)[0][:, 0]
        # Summed in float32, which XLA:CPU reduces several times faster than int32; exact below 2^24 items.
        above_best = jnp.sum((negative & (similarities >= best[:, None])).astype(jnp.float32), axis=1)
        # top_sims is descending, so the top items with similarity >= s are a prefix: its length is a search
        # in the negated, ascending copy, and its same-class items a lookup in their running count.
        num_at_least = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(-top_sims, -positive_sims)
        same_class_so_far = jnp.cumsum(g_classes[top_items] == q_classes[:, None], axis=1, dtype=jnp.int32)
        same_class_so_far = jnp.pad(same_class_so_far, ((0, 0), (1, 0)))
        above_each = num_at_least - jnp.take_along_axis(same_class_so_far, num_at_least, axis=1)
        counts.append((above_best.astype(jnp.int32),
                       jnp.where(valid, jnp.minimum(above_each, max_r), max_r).astype(jnp.int32)))
    return tuple(counts)


def _per_query_scores(queries: np.ndarray, gallery: np.ndarray, levels: Sequence[_Level],
                      self_retrieval: bool, chunk_size: int):
    """Per level: (R, negatives above the best positive, R-Precision, AP@R), each f64/i64[num_queries].

    The last chunk is padded to the chunk size, so the device step compiles once.
    """
    num_queries = len(queries)
    chunk_size = min(chunk_size, num_queries)
    gallery_device = jax.device_put(gallery)
    gallery_classes = tuple(jax.device_put(level.gallery_classes) for level in levels)
    max_rs = tuple(level.max_r for level in levels)
    num_top = min(len(gallery), max(level.max_r + level.width for level in levels))
    chunks = [[] for _ in levels]
    for start in range(0, num_queries, chunk_size):
        query_ids = np.arange(start, min(start + chunk_size, num_queries))
        padding = chunk_size - len(query_ids)
        exclude = query_ids if self_retrieval else np.full(len(query_ids), -1)
        positives = [_positives(level, query_ids, exclude) for level in levels]
        device_counts = _negative_counts(
            np.pad(queries[query_ids], ((0, padding), (0, 0))),
            gallery_device,
            tuple(np.pad(level.query_classes[query_ids], (0, padding), constant_values=-1) for level in levels),
            gallery_classes,
            tuple(np.pad(indices, ((0, padding), (0, 0))) for indices, _ in positives),
            tuple(np.pad(valid, ((0, padding), (0, 0))) for _, valid in positives),
            max_rs=max_rs,
            num_top=num_top,
        )
        for chunk, (above_best, above_each), (_, valid) in zip(chunks, device_counts, positives):
            chunk.append(_scores_from_counts(
                np.asarray(above_best)[:len(query_ids)], np.asarray(above_each)[:len(query_ids)], valid))
    return [tuple(np.concatenate(parts) for parts in zip(*chunk)) for chunk in chunks]


def _scores_from_counts(above_best: np.ndarray, above_each: np.ndarray, valid: np.ndarray):
    """(R, above_best, R-Precision, AP@R) per query from the negative counts of `_negative_counts`.

    Sorting a query's counts orders its positives by similarity (ties among positives do not matter: they
    have equal counts), and the k-th positive is at rank count_k + k. Ranks that are not within R contribute
    nothing; a capped count (max_r >= R) always lands outside R.
    """
    r = valid.sum(axis=1)
    k = np.arange(1, above_each.shape[1] + 1)
    ranks = np.sort(above_each, axis=1) + k
    within_r = ranks <= r[:, None]
    safe_r = np.maximum(r, 1)
    r_precision = within_r.sum(axis=1) / safe_r
    # MAP@R: (1/R) * sum over ranks i <= R holding a positive of precision@i = k / rank_k.
    average_precision = np.sum(np.where(within_r, k / ranks, 0.0), axis=1) / safe_r
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


def _kmeans_nmi(unit_embeddings: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """NMI between the labels and k-means clusters (k = number of classes) of the unit embeddings."""
    num_classes = len(np.unique(labels))
    clusters = sklearn.cluster.KMeans(n_clusters=num_classes, n_init=1, random_state=seed).fit_predict(
        unit_embeddings)
    return float(sklearn.metrics.normalized_mutual_info_score(labels, clusters))
