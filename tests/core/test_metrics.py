"""Tests of hpl_jax.core.metrics against hand-worked cases and a brute-force NumPy ranking.

The brute force (a full sort of every query's similarities, ties broken against the query) is the oracle: it
is the behaviour of the earlier top-k implementation, which matched it exactly on these cases.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hpl_jax.core import metrics
from hpl_jax.core.metrics import normalized_mutual_information, retrieval_metrics, sharded_retrieval_metrics
from tests import xla

RETRIEVAL_KEYS = ("precision@1", "r_precision", "map@r", "num_queries", "num_queries_without_positive")


def on_circle(degrees):
    """f64[n, 2] unit vectors at the given angles; cosine similarity falls with the angle between them."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def brute_force_metrics(queries, query_labels, gallery, gallery_labels, recall_at, self_retrieval):
    """Musgrave et al.'s metrics from a full sort of every query's similarities, ties broken against it."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    similarities = queries @ gallery.T
    hits = {k: [] for k in recall_at}
    precision_at_1, r_precision, map_at_r = [], [], []
    without_positive = 0
    for i in range(len(queries)):
        searched = np.arange(len(gallery))
        if self_retrieval:
            searched = searched[searched != i]
        sims = similarities[i, searched]
        relevant = gallery_labels[searched] == query_labels[i]
        r = int(relevant.sum())
        if r == 0:
            without_positive += 1
            continue
        # lexsort's last key is the primary one: similarity descending, then negatives (False) first.
        ranked = relevant[np.lexsort((relevant, -sims))]
        for k in recall_at:
            hits[k].append(ranked[:k].any())
        precision_at_1.append(ranked[0])
        r_precision.append(ranked[:r].sum() / r)
        positives_so_far = np.cumsum(ranked[:r])
        precision_at_i = positives_so_far / np.arange(1, r + 1)
        map_at_r.append(np.sum(precision_at_i * ranked[:r]) / r)
    expected = {f"recall@{k}": np.mean(hits[k]) for k in recall_at}
    expected.update({
        "precision@1": np.mean(precision_at_1),
        "r_precision": np.mean(r_precision),
        "map@r": np.mean(map_at_r),
        "num_queries": len(queries),
        "num_queries_without_positive": without_positive,
    })
    return expected


def random_signs(rng, n, dim):
    """f64[n, dim] of +-1: after normalisation every coordinate is +-1/sqrt(dim), exact for dim = 4^j, so
    similarities are exact multiples of 1/dim in float32 and float64 alike, with many exact ties."""
    return rng.choice([-1.0, 1.0], size=(n, dim))


def random_labels(rng, n, num_classes):
    return rng.integers(0, num_classes, size=n)


def assert_metrics_equal(actual, expected, keys):
    for key in keys:
        assert actual[key] == pytest.approx(expected[key], abs=1e-12), key


def test_hand_worked_self_retrieval_on_a_circle():
    # Items at 0, 10, 25, 45, 70 degrees, labels 0, 0, 1, 0, 0; neighbours by angular distance:
    #   q0 (0):  1(10) 2(25) 3(45) 4(70) -> relevant 1 0 1 1, R=3: P@1 1, R-Prec 2/3, AP@R (1 + 2/3)/3 = 5/9
    #   q1 (10): 0(10) 2(15) 3(35) 4(60) -> 1 0 1 1, same: 1, 2/3, 5/9
    #   q2 (25): the only item of class 1, R=0 -> left out, counted in num_queries_without_positive
    #   q3 (45): 2(20) 4(25) 1(35) 0(45) -> 0 1 1 1: P@1 0, first positive at rank 2, R-Prec 2/3,
    #            AP@R (1/2 + 2/3)/3 = 7/18
    #   q4 (70): 3(25) 2(45) 1(60) 0(70) -> 1 0 1 1: 1, 2/3, 5/9
    # Means over the 4 queries: Recall@1 = P@1 = 3/4, Recall@2 = 1, R-Prec 2/3, MAP@R (3 * 5/9 + 7/18)/4 = 37/72.
    metrics = retrieval_metrics(on_circle([0, 10, 25, 45, 70]), np.array([0, 0, 1, 0, 0]), recall_at=(1, 2),
                                nmi=False)
    assert metrics == pytest.approx({
        "recall@1": 3 / 4, "recall@2": 1.0, "precision@1": 3 / 4, "r_precision": 2 / 3, "map@r": 37 / 72,
        "num_queries": 5, "num_queries_without_positive": 1,
    })
    assert all(type(value) is float for key, value in metrics.items() if not key.startswith("num_"))
    assert type(metrics["num_queries"]) is int and type(metrics["num_queries_without_positive"]) is int


def test_hand_worked_query_vs_gallery():
    # Gallery at 0, 20, 50, 90 degrees with labels 7, 8, 7, 9. Nothing is left out.
    #   query at 15, label 7: 1(5, neg) 0(15, pos) 2(35, pos) 3(75) -> R=2: P@1 0, Recall@2 hit,
    #                          R-Prec 1/2, AP@R (1/2)/2 = 1/4
    #   query at 85, label 9: 3(5, pos) -> R=1: P@1 1, R-Prec 1, AP@R 1
    #   query at 40, label 5: no gallery item of class 5 -> left out
    metrics = retrieval_metrics(
        on_circle([0, 20, 50, 90]), np.array([7, 8, 7, 9]),
        query_embeddings=on_circle([15, 85, 40]), query_labels=np.array([7, 9, 5]),
        recall_at=(1, 2), nmi=False)
    assert metrics == pytest.approx({
        "recall@1": 1 / 2, "recall@2": 1.0, "precision@1": 1 / 2, "r_precision": 3 / 4, "map@r": 5 / 8,
        "num_queries": 3, "num_queries_without_positive": 1,
    })


def test_negative_tied_with_the_only_positive_is_a_miss_whatever_the_order():
    # The query (1, 0) has the same similarity 1/sqrt(2) to the positive (1, 1) and the negative (1, -1).
    query = np.array([[1.0, 0.0]])
    for gallery, labels in [([[1.0, 1.0], [1.0, -1.0]], [0, 1]), ([[1.0, -1.0], [1.0, 1.0]], [1, 0])]:
        metrics = retrieval_metrics(np.array(gallery), np.array(labels), query_embeddings=query,
                                    query_labels=np.array([0]), recall_at=(1, 2), nmi=False)
        assert metrics["recall@1"] == 0.0 and metrics["precision@1"] == 0.0
        assert metrics["recall@2"] == 1.0
        assert metrics["r_precision"] == 0.0 and metrics["map@r"] == 0.0


def test_negative_tied_with_two_positives_is_ranked_first():
    # All three gallery items tie; pessimistic order: negative, positive, positive. R=2:
    # R-Prec 1/2, AP@R (1/2 at rank 2) / 2 = 1/4.
    gallery = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    metrics = retrieval_metrics(gallery, np.array([0, 1, 0]), query_embeddings=np.array([[1.0, 0.0]]),
                                query_labels=np.array([0]), recall_at=(1, 2), nmi=False)
    assert metrics["recall@1"] == 0.0 and metrics["recall@2"] == 1.0
    assert metrics["r_precision"] == 0.5 and metrics["map@r"] == 0.25


def test_query_is_left_out_by_index_not_by_position():
    # Items 0 and 1 are the same vector with different labels; 2 is near them, 3 is orthogonal:
    #   q0 (label 0): 1 (sim 1, its duplicate, a negative) comes before the positive 2 -> rank 2
    #   q1 (label 1): 0 (1, neg), 2 (neg), 3 (pos) -> rank 3
    #   q2 (label 0): 0 (pos) and 1 (neg) tie -> the negative first, rank 2
    #   q3 (label 1): 2 (neg), then 0 (neg) and 1 (pos) tie at 0 -> rank 3
    # Recall@1 0, Recall@2 2/4 (q0 and q2), Recall@4 1; every R is 1 and no positive is first: R-Prec 0.
    embeddings = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    metrics = retrieval_metrics(embeddings, np.array([0, 1, 0, 1]), recall_at=(1, 2, 4), nmi=False)
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@2"] == 0.5
    assert metrics["recall@4"] == 1.0
    assert metrics["r_precision"] == 0.0 and metrics["map@r"] == 0.0


def test_single_sample_classes_are_excluded_and_counted():
    # Classes 3 and 4 hold one item each. The remaining two items find each other at rank 1.
    embeddings = on_circle([0, 5, 60, 120])
    metrics = retrieval_metrics(embeddings, np.array([1, 1, 3, 4]), recall_at=(1,), nmi=False)
    assert metrics["num_queries"] == 4 and metrics["num_queries_without_positive"] == 2
    assert metrics["recall@1"] == 1.0 and metrics["map@r"] == 1.0


@pytest.mark.parametrize("dim", [16, 64])
def test_self_retrieval_matches_brute_force_with_exact_ties(dim):
    rng = np.random.default_rng(dim)
    embeddings, labels = random_signs(rng, 150, dim), random_labels(rng, 150, 40)
    recall_at = (1, 2, 4, 8, 32, 1000)
    metrics = retrieval_metrics(embeddings, labels, recall_at=recall_at, nmi=False, chunk_size=64)
    expected = brute_force_metrics(embeddings, labels, embeddings, labels, recall_at, self_retrieval=True)
    assert expected["num_queries_without_positive"] > 0
    assert_metrics_equal(metrics, expected, expected.keys())


def test_ties_stay_exact_across_a_larger_gallery():
    # 3,000 items: the similarity matrix spans several matmul tiles and chunks (the last one padded), and
    # with 65 possible similarity values nearly every positive is tied with negatives somewhere in its row.
    rng = np.random.default_rng(7)
    embeddings, labels = random_signs(rng, 3000, 64), random_labels(rng, 3000, 600)
    recall_at = (1, 10, 100, 1000)
    metrics = retrieval_metrics(embeddings, labels, recall_at=recall_at, nmi=False, chunk_size=512)
    expected = brute_force_metrics(embeddings, labels, embeddings, labels, recall_at, self_retrieval=True)
    assert_metrics_equal(metrics, expected, expected.keys())


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_large_classes_ranked_on_the_host_match_brute_force(self_retrieval):
    # About 37 items per class: R > 16, so the class level is ranked on the host, not counted on the device.
    rng = np.random.default_rng(8)
    gallery, gallery_labels = random_signs(rng, 300, 16), random_labels(rng, 300, 8)
    queries, query_labels = random_signs(rng, 60, 16), random_labels(rng, 60, 9)
    if self_retrieval:
        queries, query_labels = gallery, gallery_labels
    query_args = {} if self_retrieval else {"query_embeddings": queries, "query_labels": query_labels}
    recall_at = (1, 2, 8, 100, 1000)
    metrics = retrieval_metrics(gallery, gallery_labels, **query_args, recall_at=recall_at, nmi=False,
                                chunk_size=64)
    expected = brute_force_metrics(queries, query_labels, gallery, gallery_labels, recall_at, self_retrieval)
    assert np.bincount(gallery_labels).max() > 17
    assert_metrics_equal(metrics, expected, expected.keys())


def test_duplicates_in_different_blocks_are_exact_ties():
    # Gaussian embeddings (no accidental ties) where 60 items repeat others, some with another label, spread
    # over several 128-item blocks: a duplicate must tie exactly with its original whichever block, and
    # whichever side of a block pair (row or transposed column), computed its similarity.
    rng = np.random.default_rng(9)
    embeddings, labels = rng.normal(size=(500, 16)), random_labels(rng, 500, 120)
    embeddings[rng.choice(500, 60, replace=False)] = embeddings[rng.choice(500, 60, replace=False)]
    recall_at = (1, 4, 16)
    metrics = retrieval_metrics(embeddings, labels, recall_at=recall_at, nmi=False, chunk_size=128)
    expected = brute_force_metrics(embeddings, labels, embeddings, labels, recall_at, self_retrieval=True)
    assert_metrics_equal(metrics, expected, expected.keys())


def test_query_vs_gallery_matches_brute_force_with_exact_ties():
    rng = np.random.default_rng(1)
    gallery, gallery_labels = random_signs(rng, 120, 16), random_labels(rng, 120, 30)
    queries, query_labels = random_signs(rng, 90, 16), random_labels(rng, 90, 35)
    recall_at = (1, 10, 20, 50)
    metrics = retrieval_metrics(gallery, gallery_labels, query_embeddings=queries, query_labels=query_labels,
                                recall_at=recall_at, nmi=False, chunk_size=32)
    expected = brute_force_metrics(queries, query_labels, gallery, gallery_labels, recall_at,
                                   self_retrieval=False)
    assert expected["num_queries_without_positive"] > 0
    assert_metrics_equal(metrics, expected, expected.keys())


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_gaussian_embeddings_match_brute_force(self_retrieval):
    rng = np.random.default_rng(2)
    gallery, gallery_labels = rng.normal(size=(160, 8)), random_labels(rng, 160, 25)
    queries, query_labels = rng.normal(size=(70, 8)), random_labels(rng, 70, 25)
    recall_at = (1, 2, 4, 8)
    if self_retrieval:
        queries, query_labels = gallery, gallery_labels
        metrics = retrieval_metrics(gallery, gallery_labels, recall_at=recall_at, nmi=False, chunk_size=50)
    else:
        metrics = retrieval_metrics(gallery, gallery_labels, query_embeddings=queries,
                                    query_labels=query_labels, recall_at=recall_at, nmi=False, chunk_size=50)
    expected = brute_force_metrics(queries, query_labels, gallery, gallery_labels, recall_at, self_retrieval)
    assert_metrics_equal(metrics, expected, expected.keys())


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_chunked_equals_unchunked(self_retrieval):
    rng = np.random.default_rng(3)
    gallery, gallery_labels = random_signs(rng, 60, 16), random_labels(rng, 60, 12)
    query_args = {} if self_retrieval else {
        "query_embeddings": random_signs(rng, 45, 16), "query_labels": random_labels(rng, 45, 12)}
    results = [retrieval_metrics(gallery, gallery_labels, **query_args, recall_at=(1, 4, 16), nmi=False,
                                 chunk_size=chunk_size) for chunk_size in (1, 7, 1000)]
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_super_class_metrics_equal_metrics_of_mapped_labels(self_retrieval):
    rng = np.random.default_rng(4)
    super_labels = rng.integers(0, 4, size=30)
    gallery, gallery_labels = random_signs(rng, 100, 16), random_labels(rng, 100, 30)
    queries, query_labels = random_signs(rng, 50, 16), random_labels(rng, 50, 30)
    recall_at = (1, 2, 8)
    if self_retrieval:
        queries, query_labels = gallery, gallery_labels
        query_args, mapped_query_args = {}, {}
    else:
        query_args = {"query_embeddings": queries, "query_labels": query_labels}
        mapped_query_args = {"query_embeddings": queries, "query_labels": super_labels[query_labels]}
    metrics = retrieval_metrics(gallery, gallery_labels, **query_args, recall_at=recall_at,
                                super_labels=super_labels, nmi=False, chunk_size=16)
    mapped = retrieval_metrics(gallery, super_labels[gallery_labels], **mapped_query_args, recall_at=recall_at,
                               nmi=False, chunk_size=16)
    expected = brute_force_metrics(queries, super_labels[query_labels], gallery, super_labels[gallery_labels],
                                   recall_at, self_retrieval)
    for key in list(expected):
        assert metrics[f"super/{key}"] == mapped[key]
        assert metrics[f"super/{key}"] == pytest.approx(expected[key], abs=1e-12), key
    without_super = retrieval_metrics(gallery, gallery_labels, **query_args, recall_at=recall_at, nmi=False,
                                      chunk_size=16)
    assert {k: v for k, v in metrics.items() if not k.startswith("super/")} == without_super


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_ranking_on_the_device_equals_ranking_on_the_host(self_retrieval):
    # Gaussian vectors (no ties) and sign vectors (many exact ties); super-classes of ~70 items and, on the second
    # data, classes of ~37: both levels are ranked, not counted.
    rng = np.random.default_rng(11)
    for gallery, gallery_labels, num_classes in (
            (rng.normal(size=(500, 24)).astype(np.float32), random_labels(rng, 500, 120), 120),
            (random_signs(rng, 300, 16), random_labels(rng, 300, 8), 8)):
        super_labels = rng.integers(0, 7, size=num_classes)
        query_args = {} if self_retrieval else {"query_embeddings": gallery[:90] + 0.1,
                                                "query_labels": gallery_labels[:90]}
        on = {device: retrieval_metrics(gallery, gallery_labels, **query_args, recall_at=(1, 4, 100),
                                        super_labels=super_labels, nmi=False, chunk_size=64,
                                        rank_on_device=device)
              for device in (True, False)}
        assert on[True].keys() == on[False].keys()
        for key, value in on[False].items():
            if "recall" in key or "precision@1" in key or key.startswith(("num_", "super/num_")):
                assert on[True][key] == value, key  # from exact counts
            else:
                assert on[True][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key  # float32 sums


def test_descending_scores_keep_the_pessimistic_order_and_invert():
    # Ties (every similarity twice, once per kind), both zeros, +-1 and just past it, the smallest subnormals, the
    # float range the scores stay finite in: descending scores order exactly as ascending keys, equal iff equal.
    rng = np.random.default_rng(13)
    similarities = np.concatenate([rng.uniform(-1, 1, 2000), np.arange(-64, 65) / 64, [
        0.0, -0.0, 1.0000001, -1.0000001, 1.49, -1.49, 1e-30, -1e-30, 1e-45, -1e-45]]).astype(np.float32)
    similarities = np.repeat(similarities, 2)
    positive = np.tile([True, False], len(similarities) // 2)
    keys = np.append(np.asarray(metrics._pessimistic_keys(similarities, positive)), np.uint32(metrics._LAST_KEY))
    scores = np.asarray(metrics._descending_scores(keys))
    assert np.all(np.isfinite(scores[:-1])) and scores[-1] == -np.inf
    order = np.argsort(keys, kind="stable")
    key_steps = np.diff(keys[order].astype(np.int64))
    score_steps = np.diff(scores[order].astype(np.float64))
    np.testing.assert_array_equal(key_steps > 0, score_steps < 0)
    np.testing.assert_array_equal(key_steps == 0, score_steps == 0)
    np.testing.assert_array_equal(np.asarray(metrics._keys_of_scores(scores[:-1])), keys[:-1])


@pytest.mark.parametrize("recall_target", [None, 0.9])
def test_device_top_k_ranks_as_the_host(recall_target):
    # Sign vectors (17 similarity values: ties everywhere), each query itself and 5 padding columns given the last
    # key, classes of ~8 and ~50 items: the top-k of the scores reads the same first ranks as np.partition.
    rng = np.random.default_rng(14)
    vectors, labels = random_signs(rng, 120, 16) / 4, random_labels(rng, 120, 3)
    for labels in (labels, random_labels(rng, 120, 15)):
        similarities = (vectors @ vectors.T).astype(np.float32)
        keys = np.array(metrics._pessimistic_keys(similarities, labels[:, None] == labels[None, :]))
        np.fill_diagonal(keys, metrics._LAST_KEY)
        keys = np.pad(keys, ((0, 0), (0, 5)), constant_values=metrics._LAST_KEY)
        r = np.bincount(labels)[labels] - 1
        num_ranked = min(max(int(r.max()), 8), 119)
        device = metrics._ranked_chunk(keys, r.astype(np.int32), num_ranked=num_ranked, recall_target=recall_target)
        _, above_best, r_precision, average_precision = metrics._ranked_scores(keys, r, 8, 119)
        np.testing.assert_array_equal(np.asarray(device[0]), above_best)
        np.testing.assert_allclose(np.asarray(device[1]), r_precision, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(device[2]), average_precision, rtol=1e-6)


def sharded_cases(seed):
    """(name, gallery, gallery labels, extra arguments) of the sharded-vs-single-device comparisons: sign vectors
    (many exact ties) with small classes (counted) and with super-classes, query mode, classes of ~37 (the class
    level ranked), Gaussian vectors; query counts that no device count divides."""
    rng = np.random.default_rng(seed)
    signs, sign_labels = random_signs(rng, 301, 16), random_labels(rng, 301, 70)
    super_labels = rng.integers(0, 5, size=70)
    large, large_labels = random_signs(rng, 299, 16), random_labels(rng, 299, 8)
    gaussian, gaussian_labels = rng.normal(size=(257, 24)), random_labels(rng, 257, 60)
    return [
        ("ties", signs, sign_labels, {}),
        ("ties + super", signs, sign_labels, {"super_labels": super_labels}),
        ("query mode + super", signs, sign_labels, {"query_embeddings": random_signs(rng, 103, 16),
                                                    "query_labels": random_labels(rng, 103, 70),
                                                    "super_labels": super_labels}),
        ("large classes", large, large_labels, {}),
        ("large classes, query mode", large, large_labels, {"query_embeddings": large[:77] + 0.1,
                                                            "query_labels": large_labels[:77]}),
        ("gaussian", gaussian, gaussian_labels, {"super_labels": rng.integers(0, 3, size=60)}),
    ]


def assert_sharded_equals_single(sharded, single, name):
    """The same keys; counts exactly equal, the float means to float32 rounding."""
    assert sharded.keys() == single.keys(), name
    for key, value in single.items():
        if "recall" in key or "precision@1" in key or "num_" in key:
            assert sharded[key] == value, (name, key)
        else:
            assert sharded[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, key)


@pytest.mark.parametrize("num_devices", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sharded_metrics_equal_the_single_device_metrics(num_devices):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("batch",))
    assert mesh.size == num_devices  # tests/conftest.py simulates 2 CPU devices
    for name, gallery, labels, options in sharded_cases(12):
        for chunk_size in (32, 1024):  # several chunks per device (the last padded), and one
            single = retrieval_metrics(gallery, labels, recall_at=(1, 2, 4, 100), nmi=False, chunk_size=chunk_size,
                                       **options)
            sharded = sharded_retrieval_metrics(gallery, labels, mesh=mesh, recall_at=(1, 2, 4, 100), nmi=False,
                                                chunk_size=chunk_size, **options)
            assert_sharded_equals_single(sharded, single, (name, chunk_size))


def test_device_path_equals_host_path_and_brute_force():
    # Every path of the device program against the host path (symmetric blocks, host ranking): exact ties, padding
    # (no case's gallery is a multiple of 128, nor its query count of the chunk), self-retrieval and query mode
    # (In-Shop: a counted class level alone), super-classes, a ranked class level; and against the brute force.
    rng = np.random.default_rng(15)
    gallery, labels = random_signs(rng, 130, 16), random_labels(rng, 130, 30)
    queries, query_labels = random_signs(rng, 71, 16), random_labels(rng, 71, 30)
    cases = sharded_cases(16) + [("query mode", gallery, labels, {"query_embeddings": queries,
                                                                  "query_labels": query_labels})]
    for name, gallery, labels, options in cases:
        for chunk_size in (32, 1024):
            on = {device: retrieval_metrics(gallery, labels, recall_at=(1, 2, 4, 100), nmi=False,
                                            chunk_size=chunk_size, rank_on_device=device, **options)
                  for device in (True, False)}
            assert_sharded_equals_single(on[True], on[False], (name, chunk_size))
        if name == "large classes, query mode":
            continue  # its queries (signs + 0.1) tie within float32 rounding, which float64 decides otherwise
        self_retrieval = "query_embeddings" not in options
        expected = brute_force_metrics(options.get("query_embeddings", gallery), options.get("query_labels", labels),
                                       gallery, labels, (1, 2, 4, 100), self_retrieval)
        for key, value in expected.items():
            assert on[True][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, key)
        if "super_labels" in options:
            super_labels = options["super_labels"]
            expected = brute_force_metrics(options.get("query_embeddings", gallery),
                                           super_labels[options.get("query_labels", labels)], gallery,
                                           super_labels[labels], (1, 2, 4, 100), self_retrieval)
            for key, value in expected.items():
                assert on[True][f"super/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, key)


def test_approximate_top_k_is_reported_and_checked():
    # On a CPU XLA's approx_max_k falls back to the exact top-k: the same metrics, marked as asked for.
    rng = np.random.default_rng(17)
    gallery, labels = random_signs(rng, 150, 16), random_labels(rng, 150, 30)
    options = {"super_labels": rng.integers(0, 4, size=30), "recall_at": (1, 4, 16), "nmi": False}
    exact = retrieval_metrics(gallery, labels, rank_on_device=True, **options)
    approximate = retrieval_metrics(gallery, labels, rank_on_device=True, top_k_recall_target=0.9, **options)
    assert approximate.pop("top_k_recall_target") == 0.9 and approximate == exact
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
    sharded = sharded_retrieval_metrics(gallery, labels, mesh=mesh, top_k_recall_target=0.9, **options)
    assert sharded.pop("top_k_recall_target") == 0.9
    assert_sharded_equals_single(sharded, exact, "approximate, sharded")
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="top_k_recall_target must be"):
            retrieval_metrics(gallery, labels, rank_on_device=True, top_k_recall_target=bad, **options)
    with pytest.raises(ValueError, match="rank_on_device is False"):
        retrieval_metrics(gallery, labels, rank_on_device=False, top_k_recall_target=0.9, **options)


@pytest.mark.slow
def test_sharded_metrics_on_four_devices_equal_the_single_device_metrics():
    # Four simulated devices need a process of their own (the device count is fixed at JAX's start).
    code = (
        "import jax, numpy as np, tests.core.test_metrics as t\n"
        "mesh = jax.sharding.Mesh(np.array(jax.devices()), ('batch',)); assert mesh.size == 4\n"
        "for name, gallery, labels, options in t.sharded_cases(12):\n"
        "    single = t.retrieval_metrics(gallery, labels, recall_at=(1, 2, 4, 100), nmi=True, chunk_size=32,"
        " **options)\n"
        "    sharded = t.sharded_retrieval_metrics(gallery, labels, mesh=mesh, recall_at=(1, 2, 4, 100), nmi=True,"
        " chunk_size=32, **options)\n"
        "    t.assert_sharded_equals_single(sharded, single, name)\n"
        "print('compared', len(t.sharded_cases(12)))\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS=xla.flags(4), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compared 6" in result.stdout, result.stderr[-3000:]


def numpy_nmi(labels, clusters):
    """NMI with the arithmetic-mean normalisation: I(Y; C) / ((H(Y) + H(C)) / 2), from the joint counts."""
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    joint = np.zeros((y.max() + 1, c.max() + 1))
    np.add.at(joint, (y, c), 1.0)
    joint /= joint.sum()
    p_y, p_c = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    mutual_information = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(p_y, p_c)[nonzero]))
    entropy = lambda p: -np.sum(p * np.log(p))
    return mutual_information / ((entropy(p_y) + entropy(p_c)) / 2)


def test_nmi_of_a_known_clustering():
    # Three tight blobs along three axes; the labels follow the blobs except for 4 of the 30 points, so
    # k-means (k = 3 classes) recovers the blobs and the NMI is that of labels vs blobs.
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(5)
    blobs = np.repeat(np.arange(3), 10)
    embeddings = np.eye(8)[blobs] + 0.01 * rng.normal(size=(30, 8))
    labels = blobs.copy()
    labels[[0, 11, 12, 25]] = [1, 2, 0, 0]
    expected = numpy_nmi(labels, blobs)
    assert 0.3 < expected < 0.9
    assert expected == pytest.approx(normalized_mutual_info_score(labels, blobs))
    assert retrieval_metrics(embeddings, labels, seed=3)["nmi"] == pytest.approx(expected)


def test_nmi_in_query_mode_clusters_the_gallery():
    rng = np.random.default_rng(6)
    blobs = np.repeat(np.arange(2), 6)
    gallery = np.eye(4)[blobs] + 0.01 * rng.normal(size=(12, 4))
    labels = blobs.copy()
    labels[0] = 1
    metrics = retrieval_metrics(gallery, labels, query_embeddings=rng.normal(size=(5, 4)),
                                query_labels=np.zeros(5, dtype=int))
    assert metrics["nmi"] == pytest.approx(numpy_nmi(labels, blobs))


def nmi_cases(seed, count):
    """(labels, clusters) pairs: random labelings of 1-300 items into 1-n groups, their ids scaled and shifted
    (non-contiguous, negative, large) half of the time."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        n = int(rng.integers(1, 300))
        labels = rng.integers(0, rng.integers(1, n + 1), n)
        clusters = rng.integers(0, rng.integers(1, n + 1), n)
        if rng.random() < 0.5:
            labels = labels * int(rng.integers(2, 10_000)) - int(rng.integers(0, 100))
        cases.append((labels, clusters))
    return cases


_NMI_EDGE_CASES = {
    "empty": ([], []),
    "one item": ([3], [8]),
    "one cluster each": ([4, 4, 4, 4], [1, 1, 1, 1]),
    "one label, distinct clusters": ([0, 0, 0, 0], [0, 1, 2, 3]),
    "distinct labels, one cluster": ([0, 1, 2, 3], [5, 5, 5, 5]),
    "all distinct": ([0, 1, 2, 3, 4], [4, 2, 0, 1, 3]),
    "permuted ids of the same partition": ([0, 0, 1, 1, 2, 2], [7, 7, 3, 3, 5, 5]),
    "independent (I = 0 up to round-off)": ([0, 0, 1, 1] * 3, [0, 1, 0, 1] * 3),
    "non-contiguous and negative ids": ([10, 500, -3, 10, 500, 10**9], [2, 2, 9, 0, 0, 9]),
    "one group split in two": ([0] * 6 + [1] * 6, [0] * 3 + [1] * 3 + [2] * 6),
}


@pytest.mark.parametrize("case", sorted(_NMI_EDGE_CASES))
def test_numpy_nmi_equals_sklearn_on_edge_cases(case):
    from sklearn.metrics import normalized_mutual_info_score

    labels, clusters = (np.asarray(x, np.int64) for x in _NMI_EDGE_CASES[case])
    ours = normalized_mutual_information(labels, clusters)
    assert isinstance(ours, float)
    assert ours == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)


def test_numpy_nmi_equals_sklearn_on_random_labelings_and_is_invariant_to_renaming():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(8)
    for i, (labels, clusters) in enumerate(nmi_cases(7, 500)):
        expected = normalized_mutual_info_score(labels, clusters)
        assert normalized_mutual_information(labels, clusters) == pytest.approx(expected, abs=1e-12), i
        assert normalized_mutual_information(clusters, labels) == pytest.approx(expected, abs=1e-12), i
        # Renaming the clusters (a permutation of their ids, then a shift) changes nothing.
        ids = np.unique(clusters)
        renamed = dict(zip(ids.tolist(), (rng.permutation(ids.size) * 3 + 11).tolist()))
        relabelled = np.array([renamed[c] for c in clusters.tolist()])
        assert normalized_mutual_information(labels, relabelled) == pytest.approx(expected, abs=1e-12), i
        assert normalized_mutual_information(labels, -labels) == pytest.approx(1.0), i

@pytest.mark.parametrize("kwargs, message", [
    ({"labels": np.zeros(3, dtype=int)}, "one label per row"),
    ({"labels": np.zeros(4)}, "integer"),
    ({"query_labels": np.zeros(2, dtype=int)}, "together"),
    ({"query_embeddings": np.ones((2, 3)), "query_labels": np.zeros(2, dtype=int)}, "dimension"),
    ({"embeddings": np.array([[1.0, 0], [0, 0], [0, 1], [1, 1]])}, "row 1 is all zeros"),
    ({"embeddings": np.array([[1.0, 0], [np.nan, 0], [0, 1], [1, 1]])}, "NaN"),
    ({"recall_at": (0,)}, "recall_at"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"super_labels": np.array([0, 1])}, "super_labels maps"),
    ({"labels": np.array([0, 1, 2, 3])}, "no query has another item"),
])
def test_user_errors_are_value_errors(kwargs, message):
    arguments = {"embeddings": on_circle([0, 10, 20, 30]), "labels": np.array([0, 0, 2, 2]), "nmi": False}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**arguments)


def test_super_labels_per_item_are_refused_not_read_as_a_class_map():
    # 6 classes of 4 items; super-class = class // 2. A per-item array (24 entries) passes the range check of a
    # class map (every class value < 24), so reading it as one would give wrong super/ metrics without a word.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4)
    embeddings = rng.normal(size=(24, 8)) + 3.0 * np.eye(8)[labels // 2]
    per_item = labels // 2
    with pytest.raises(ValueError, match="one entry per item"):
        metrics.retrieval_metrics(embeddings, labels, super_labels=per_item, nmi=False)
    per_class = metrics.class_super_labels(labels, per_item)
    np.testing.assert_array_equal(per_class, [0, 0, 1, 1, 2, 2])
    expected = metrics.retrieval_metrics(embeddings, labels // 2, nmi=False)
    got = metrics.retrieval_metrics(embeddings, labels, super_labels=per_class, nmi=False)
    assert got["super/map@r"] == pytest.approx(expected["map@r"])
    with pytest.raises(ValueError, match="several super-classes"):
        metrics.class_super_labels(labels, np.arange(24) % 3)
