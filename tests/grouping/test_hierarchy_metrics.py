"""Tests of hpl_jax.grouping.hierarchy_metrics: how well a coarse level matches known super-classes and the previous
grouping, and where its proxies sit."""
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from hpl_jax import grouping


def test_hierarchy_metrics_against_super_classes_and_the_previous_grouping():
    rng = np.random.default_rng(12)
    fine = rng.normal(size=(8, 5)).astype(np.float32)
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    exact = grouping.hierarchy_from_super_labels(fine, truth)
    values = grouping.hierarchy_metrics(exact, super_labels=truth + 7)
    for name in ("level_1_nmi", "level_1_ari", "level_1_purity", "level_1_purity_min", "level_1_child_cosine_min"):
        assert values[name] == pytest.approx(1.0), name
    assert values["level_1_group_size_min"] == values["level_1_group_size_max"] == 4
    np.testing.assert_allclose(values["level_1_norm_mean"], np.mean(np.linalg.norm(exact.proxies[1], axis=1)))

    # Groups {0,1,2,4} and {3,5,6,7}: purities 3/4 and 3/4; contingency [[3, 1], [1, 3]].
    mixed = exact.replace(parents=(jnp.asarray([0, 0, 0, 1, 0, 1, 1, 1], jnp.int32),))
    values = grouping.hierarchy_metrics(mixed, super_labels=truth, previous=exact)
    assert values["level_1_purity"] == pytest.approx(0.75) and values["level_1_purity_min"] == pytest.approx(0.75)
    assert values["level_1_ari"] == pytest.approx(sklearn.metrics.adjusted_rand_score(truth, mixed.parents[0]))
    assert values["level_1_nmi"] < 1.0
    assert values["level_1_stability_ari"] == pytest.approx(values["level_1_ari"])
    assert values["level_1_child_cosine_before_min"] == pytest.approx(1.0)
    assert values["level_1_child_cosine_min"] < 1.0  # the proxies no longer sit on the new groups' centres
    assert "level_1_nmi" not in grouping.hierarchy_metrics(mixed)
