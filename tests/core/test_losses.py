"""Tests of hpl_jax.losses against independent float64 NumPy references (docs/method.md, "The base losses")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpl_jax.core.hierarchy import ProxyHierarchy
from hpl_jax.core.losses import hierarchical_proxy_loss, proxy_anchor_loss, proxy_nca_loss


# ---------------------------------------------------------------------------------------------------------
# NumPy references: plain loops over the sets of the equations, float64.


def _unit_rows(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _np_logsumexp(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


def np_proxy_anchor(embeddings, labels, proxies, alpha=32.0, delta=0.1, mask=None):
    x, p = _unit_rows(embeddings), _unit_rows(proxies)
    labels = np.asarray(labels)
    valid = np.ones(len(x), bool) if mask is None else np.asarray(mask)
    positive, negative = [], []
    for c in range(len(p)):
        in_x_pos = valid & (labels == c)
        in_x_neg = valid & (labels != c)
        s_pos = x[in_x_pos] @ p[c]
        s_neg = x[in_x_neg] @ p[c]
        if in_x_pos.any():
            positive.append(np.log(1.0 + np.sum(np.exp(-alpha * (s_pos - delta)))))
        negative.append(np.log(1.0 + np.sum(np.exp(alpha * (s_neg + delta)))))
    positive_term = np.mean(positive) if positive else 0.0
    return positive_term + np.mean(negative)


def np_proxy_nca(embeddings, labels, proxies, temperature=1.0, exclude_positive=False, mask=None):
    x, p = _unit_rows(embeddings), _unit_rows(proxies)
    labels = np.asarray(labels)
    valid = np.ones(len(x), bool) if mask is None else np.asarray(mask)
    losses = []
    for i in np.flatnonzero(valid):
        logits = -np.sum((x[i] - p) ** 2, axis=1) / temperature
        denominator = np.delete(logits, labels[i]) if exclude_positive else logits
        losses.append(-(logits[labels[i]] - _np_logsumexp(denominator)))
    return np.mean(losses)


def np_lift_labels(labels, parents):
    lifted = [np.asarray(labels)]
    for parent_map in parents:
        lifted.append(np.asarray(parent_map)[lifted[-1]])
    return lifted


def np_numeric_grad(f, arr, eps=1e-6):
    """Central finite differences of scalar f at arr (float64)."""
    arr = np.asarray(arr, np.float64)
    grad = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        plus, minus = arr.copy(), arr.copy()
        plus[idx] += eps
        minus[idx] -= eps
        grad[idx] = (f(plus) - f(minus)) / (2 * eps)
    return grad


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _random_inputs(seed, batch, dim, num_proxies, num_classes_used=None):
    """Unnormalised f32 embeddings and proxies, and i32 labels in 0..num_classes_used-1."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(batch, dim)).astype(np.float32)
    proxies = rng.normal(size=(num_proxies, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes_used or num_proxies, batch).astype(np.int32)
    return embeddings, labels, proxies


def _jit_loss(loss_fn, **kwargs):
    """loss_fn(embeddings, labels, proxies) compiled, with keyword arguments fixed."""
    return jax.jit(functools.partial(loss_fn, **kwargs))


@functools.lru_cache(maxsize=None)
def _compiled_value_and_grads(loss_fn, static_kwargs):
    def loss(embeddings, labels, proxies, mask):
        return loss_fn(embeddings, labels, proxies, mask=mask, **dict(static_kwargs))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))


def _value_and_grads(loss_fn, embeddings, labels, proxies, mask=None, **kwargs):
    """(value, d/d embeddings, d/d proxies) of the compiled loss, as float64 NumPy."""
    fn = _compiled_value_and_grads(loss_fn, tuple(sorted(kwargs.items())))
    value, (embeddings_grad, proxies_grad) = fn(jnp.asarray(embeddings), labels, jnp.asarray(proxies), mask)
    return float(value), np.asarray(embeddings_grad, np.float64), np.asarray(proxies_grad, np.float64)


def _assert_grad_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=2e-4 * max(1.0, np.abs(expected).max()))


def _check_against_reference(loss_fn, reference, embeddings, labels, proxies, **kwargs):
    value, embeddings_grad, proxies_grad = _value_and_grads(loss_fn, embeddings, labels, proxies, **kwargs)
    np.testing.assert_allclose(value, reference(embeddings, labels, proxies, **kwargs), rtol=2e-5, atol=1e-6)
    _assert_grad_close(
        embeddings_grad, np_numeric_grad(lambda e: reference(e, labels, proxies, **kwargs), embeddings))
    _assert_grad_close(
        proxies_grad, np_numeric_grad(lambda p: reference(embeddings, labels, p, **kwargs), proxies))


# ---------------------------------------------------------------------------------------------------------
# Proxy-Anchor.


def test_proxy_anchor_hand_computed():
    # x = e1 with label 0; p0 = e1 (s = 1), p1 = e2 (s = 0). P+ = {p0}; X_p0- is empty, X_p1- = {x}.
    alpha, delta = 32.0, 0.1
    positive_term = np.log1p(np.exp(-alpha * (1 - delta)))
    negative_term = 0.5 * (np.log1p(0.0) + np.log1p(np.exp(alpha * delta)))
    value = _jit_loss(proxy_anchor_loss)(
        jnp.array([[1.0, 0.0]]), jnp.array([0]), jnp.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(float(value), positive_term + negative_term, rtol=1e-6)


@pytest.mark.parametrize("batch, dim, num_proxies, num_classes_used, alpha, delta", [
    (8, 4, 5, None, 32.0, 0.1),  # most proxies have positives
    (6, 3, 16, 4, 32.0, 0.1),    # most proxies lack positives
    (7, 5, 6, 1, 32.0, 0.1),     # single-class batch: |P+| = 1
    (9, 4, 7, 3, 8.0, 0.3),
])
def test_proxy_anchor_value_and_grads_match_numpy(batch, dim, num_proxies, num_classes_used, alpha, delta):
    embeddings, labels, proxies = _random_inputs(batch, batch, dim, num_proxies, num_classes_used)
    _check_against_reference(proxy_anchor_loss, np_proxy_anchor, embeddings, labels, proxies,
                             alpha=alpha, delta=delta)


def test_proxy_anchor_with_mask_matches_numpy():
    embeddings, labels, proxies = _random_inputs(1, 9, 4, 7)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0], bool)
    _check_against_reference(proxy_anchor_loss, np_proxy_anchor, embeddings, labels, proxies, mask=mask)


def test_proxy_anchor_mask_drops_the_only_positive_of_a_proxy():
    # Proxy 3's only positive is padded: it must leave P+ (and the mean over P+ must not count it).
    embeddings, _, proxies = _random_inputs(2, 6, 4, 5)
    labels = np.array([0, 1, 1, 3, 2, 0], np.int32)
    mask = np.array([1, 1, 1, 0, 1, 1], bool)
    value = _jit_loss(proxy_anchor_loss, mask=mask)(embeddings, labels, proxies)
    np.testing.assert_allclose(
        float(value), np_proxy_anchor(embeddings, labels, proxies, mask=mask), rtol=2e-5)
    np.testing.assert_allclose(
        float(value), np_proxy_anchor(embeddings[mask], labels[mask], proxies), rtol=2e-5)


def test_proxy_anchor_all_rows_masked_is_zero_without_nan():
    embeddings, labels, proxies = _random_inputs(3, 4, 3, 5)
    value, embeddings_grad, proxies_grad = _value_and_grads(
        proxy_anchor_loss, embeddings, labels, proxies, mask=np.zeros(4, bool))
    assert value == 0.0
    assert np.all(embeddings_grad == 0) and np.all(proxies_grad == 0)


def test_proxy_anchor_alpha_64_is_finite_and_exact():
    # Saturated similarities: every row sits on its own proxy (s = 1) and opposite another one (s = -1).
    rng = np.random.default_rng(4)
    proxies = rng.normal(size=(6, 8)).astype(np.float32)
    proxies[3] = -proxies[0]
    labels = np.array([0, 0, 1, 2, 0], np.int32)
    embeddings = proxies[labels] * np.float32(5.0)
    for dtype in (jnp.float32, jnp.bfloat16):
        value, embeddings_grad, proxies_grad = _value_and_grads(
            proxy_anchor_loss, jnp.asarray(embeddings, dtype), labels, proxies, alpha=64.0)
        assert np.isfinite(value)
        assert np.all(np.isfinite(embeddings_grad)) and np.all(np.isfinite(proxies_grad))
    value, embeddings_grad, _ = _value_and_grads(proxy_anchor_loss, embeddings, labels, proxies, alpha=64.0)
    reference = functools.partial(np_proxy_anchor, labels=labels, proxies=proxies, alpha=64.0)
    np.testing.assert_allclose(value, reference(embeddings), rtol=1e-5)
    _assert_grad_close(embeddings_grad, np_numeric_grad(reference, embeddings))


# ---------------------------------------------------------------------------------------------------------
# Proxy-NCA.


@pytest.mark.parametrize("exclude_positive", [False, True])
@pytest.mark.parametrize("batch, dim, num_proxies, temperature", [
    (8, 4, 5, 1.0), (6, 3, 12, 1 / 9), (5, 6, 3, 1 / 32)])
def test_proxy_nca_value_and_grads_match_numpy(batch, dim, num_proxies, temperature, exclude_positive):
    embeddings, labels, proxies = _random_inputs(batch + num_proxies, batch, dim, num_proxies)
    _check_against_reference(proxy_nca_loss, np_proxy_nca, embeddings, labels, proxies,
                             temperature=temperature, exclude_positive=exclude_positive)


@pytest.mark.parametrize("exclude_positive", [False, True])
def test_proxy_nca_with_mask_matches_numpy(exclude_positive):
    embeddings, labels, proxies = _random_inputs(5, 7, 4, 6)
    mask = np.array([0, 1, 1, 0, 1, 1, 0], bool)
    _check_against_reference(proxy_nca_loss, np_proxy_nca, embeddings, labels, proxies,
                             temperature=0.5, exclude_positive=exclude_positive, mask=mask)


def test_proxy_nca_exclude_positive_changes_the_value():
    embeddings, labels, proxies = _random_inputs(6, 8, 4, 5)
    with_positive = float(_jit_loss(proxy_nca_loss)(embeddings, labels, proxies))
    without_positive = float(_jit_loss(proxy_nca_loss, exclude_positive=True)(embeddings, labels, proxies))
    # Dropping a positive term from the denominator lowers -log softmax.
    assert without_positive < with_positive


# ---------------------------------------------------------------------------------------------------------
# Properties shared by both losses.

LOSSES = {
    "proxy_anchor": proxy_anchor_loss,
    "proxy_anchor_alpha_64": functools.partial(proxy_anchor_loss, alpha=64.0),
    "proxy_nca": functools.partial(proxy_nca_loss, temperature=1 / 9),
    "proxy_nca_exclude_positive": functools.partial(proxy_nca_loss, temperature=1 / 9, exclude_positive=True),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padded_rows_have_no_effect(name):
    loss_fn = LOSSES[name]
    embeddings, labels, proxies = _random_inputs(7, 10, 4, 6)
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    other = embeddings.copy()
    other_labels = labels.copy()
    other[~mask] = 100.0 * np.random.default_rng(8).normal(size=(int((~mask).sum()), 4))
    other[1, 2] = np.nan
    other[4, 0] = np.inf
    other_labels[~mask] = [0, 5, 12345]  # any label, even out of range
    value, embeddings_grad, proxies_grad = _value_and_grads(loss_fn, embeddings, labels, proxies, mask=mask)
    value_2, embeddings_grad_2, proxies_grad_2 = _value_and_grads(
        loss_fn, other, other_labels, proxies, mask=mask)
    assert value == value_2
    np.testing.assert_array_equal(embeddings_grad, embeddings_grad_2)
    np.testing.assert_array_equal(proxies_grad, proxies_grad_2)
    assert np.all(embeddings_grad[~mask] == 0)
    # Same as the batch without its padded rows.
    value_3, embeddings_grad_3, proxies_grad_3 = _value_and_grads(
        loss_fn, embeddings[mask], labels[mask], proxies)
    np.testing.assert_allclose(value, value_3, rtol=1e-5)
    np.testing.assert_allclose(embeddings_grad[mask], embeddings_grad_3, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(proxies_grad, proxies_grad_3, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unnormalised_inputs_give_the_normalised_loss(name):
    loss_fn = jax.jit(LOSSES[name])
    embeddings, labels, proxies = _random_inputs(9, 8, 5, 7)
    rng = np.random.default_rng(10)
    row_scale = rng.uniform(0.01, 50.0, size=(8, 1)).astype(np.float32)
    proxy_scale = rng.uniform(0.01, 50.0, size=(7, 1)).astype(np.float32)
    unit_embeddings = _unit_rows(embeddings).astype(np.float32)
    unit = float(loss_fn(unit_embeddings, labels, _unit_rows(proxies).astype(np.float32)))
    scaled = float(loss_fn(embeddings * row_scale, labels, proxies * proxy_scale))
    np.testing.assert_allclose(scaled, unit, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bfloat16_embeddings_close_to_float32(name):
    loss_fn = jax.jit(LOSSES[name])
    embeddings, labels, proxies = _random_inputs(11, 16, 32, 10)
    embeddings_bf16 = jnp.asarray(embeddings, jnp.bfloat16)
    value_bf16 = loss_fn(embeddings_bf16, labels, proxies)
    assert value_bf16.dtype == jnp.float32
    # Computed in float32: exact for the bfloat16-rounded input, and close to the unrounded one.
    np.testing.assert_allclose(
        float(value_bf16), float(loss_fn(embeddings_bf16.astype(jnp.float32), labels, proxies)), rtol=1e-6)
    np.testing.assert_allclose(float(value_bf16), float(loss_fn(embeddings, labels, proxies)), rtol=2e-2)
    grad = jax.jit(jax.grad(lambda e: loss_fn(e, labels, proxies)))(embeddings_bf16)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))


# ---------------------------------------------------------------------------------------------------------
# HPL.


def _three_level_hierarchy(seed, sizes=(12, 5, 2), dim=6):
    rng = np.random.default_rng(seed)
    proxies = tuple(rng.normal(size=(k, dim)).astype(np.float32) for k in sizes)
    parents = tuple(rng.integers(0, above, below).astype(np.int32)
                    for below, above in zip(sizes[:-1], sizes[1:]))
    return proxies, parents


def _as_hierarchy(proxies, parents):
    return ProxyHierarchy(proxies=tuple(map(jnp.asarray, proxies)), parents=tuple(map(jnp.asarray, parents)))


@pytest.mark.parametrize("base_name", ["proxy_anchor", "proxy_nca"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_hpl_is_weighted_sum_of_base_losses_on_lifted_labels(base_name, with_mask):
    base_loss, reference = {
        "proxy_anchor": (functools.partial(proxy_anchor_loss, alpha=16.0),
                         functools.partial(np_proxy_anchor, alpha=16.0)),
        "proxy_nca": (functools.partial(proxy_nca_loss, temperature=0.25),
                      functools.partial(np_proxy_nca, temperature=0.25)),
    }[base_name]
    proxies, parents = _three_level_hierarchy(12)
    embeddings, labels, _ = _random_inputs(13, 9, 6, 12)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool) if with_mask else None
    weights = (1.0, 0.3, 0.05)
    hierarchy = _as_hierarchy(proxies, parents)

    hpl = jax.jit(functools.partial(hierarchical_proxy_loss, base_loss=base_loss, weights=weights))
    total, per_level = hpl(embeddings, labels, hierarchy, mask=mask)

    expected_per_level = [reference(embeddings, level_labels, level_proxies, mask=mask)
                          for level_labels, level_proxies in zip(np_lift_labels(labels, parents), proxies)]
    assert per_level.shape == (3,)
    np.testing.assert_allclose(np.asarray(per_level), expected_per_level, rtol=2e-5)
    np.testing.assert_allclose(float(total), np.dot(weights, expected_per_level), rtol=2e-5)

    def np_total(e):
        lifted = np_lift_labels(labels, parents)
        return sum(w * reference(e, level_labels, level_proxies, mask=mask)
                   for w, level_labels, level_proxies in zip(weights, lifted, proxies))

    embeddings_grad = jax.jit(jax.grad(lambda e: hierarchical_proxy_loss(
        e, labels, hierarchy, base_loss=base_loss, weights=weights, mask=mask)[0]))(jnp.asarray(embeddings))
    _assert_grad_close(np.asarray(embeddings_grad, np.float64), np_numeric_grad(np_total, embeddings))


def test_hpl_gradient_reaches_every_level_proxies():
    proxies, parents = _three_level_hierarchy(14)
    embeddings, labels, _ = _random_inputs(15, 8, 6, 12)
    grads = jax.jit(jax.grad(lambda p: hierarchical_proxy_loss(
        embeddings, labels, ProxyHierarchy(proxies=p, parents=parents), base_loss=proxy_anchor_loss,
        weights=(1.0, 0.1, 0.1))[0]))(tuple(map(jnp.asarray, proxies)))
    for level, (grad, level_proxies) in enumerate(zip(grads, proxies)):
        reference = np_numeric_grad(lambda p: (1.0 if level == 0 else 0.1) * np_proxy_anchor(
            embeddings, np_lift_labels(labels, parents)[level], p), level_proxies)
        _assert_grad_close(np.asarray(grad, np.float64), reference)


def test_hpl_single_level_is_the_base_loss():
    embeddings, labels, proxies = _random_inputs(16, 6, 4, 5)
    total, per_level = jax.jit(functools.partial(
        hierarchical_proxy_loss, base_loss=proxy_anchor_loss, weights=(2.0,)))(
        embeddings, labels, ProxyHierarchy(proxies=(jnp.asarray(proxies),), parents=()))
    np.testing.assert_allclose(float(total), 2.0 * np_proxy_anchor(embeddings, labels, proxies), rtol=2e-5)
    assert per_level.shape == (1,)


def test_hpl_weights_of_wrong_length_raise():
    proxies, parents = _three_level_hierarchy(17)
    embeddings, labels, _ = _random_inputs(18, 4, 6, 12)
    with pytest.raises(ValueError, match="weights"):
        hierarchical_proxy_loss(embeddings, labels, _as_hierarchy(proxies, parents),
                                base_loss=proxy_anchor_loss, weights=(1.0, 0.1))


@pytest.mark.parametrize("loss_fn", [proxy_anchor_loss, proxy_nca_loss])
def test_losses_differentiate_inside_shard_map_with_replicated_proxies(loss_fn):
    # jax.shard_map's default check_vma types a replicated input as invariant; the cosine similarity's custom VJP
    # must sum its proxies' cotangent over the devices (the transpose of the implicit broadcast), as JAX does for
    # its own operations, or the step does not trace. The result: the sum of each device's gradient.
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((2,), ("data",))
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(8, 6)).astype(np.float32)
    labels = rng.integers(0, 5, size=8).astype(np.int32)
    proxies = rng.normal(size=(5, 6)).astype(np.float32)

    def per_device(embeddings, labels, proxies):
        value, grad = jax.value_and_grad(loss_fn, argnums=2)(embeddings, labels, proxies)
        return jax.lax.psum(value, "data"), grad

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                                 out_specs=(P(), P())))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    value, grad = step(put(embeddings, P("data")), put(labels, P("data")), put(proxies, P()))
    halves = [(embeddings[i:i + 4], labels[i:i + 4]) for i in (0, 4)]
    np.testing.assert_allclose(value, sum(loss_fn(e, y, proxies) for e, y in halves), rtol=1e-5)
    np.testing.assert_allclose(grad, sum(jax.grad(loss_fn, argnums=2)(e, y, proxies) for e, y in halves),
                               rtol=1e-4, atol=1e-6)
