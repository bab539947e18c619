"""Tests of hpl_jax.core.hier: the Poincare maths against closed forms, the jit-able reciprocal mining against a
NumPy reference, and the HIER loss and its gradients against a float64 PyTorch transcription of the official code
(github.com/tjddus9597/HIER-CVPR23: hier/losses.py HIERLoss, hier/hyptorch/pmath.py, hier/hyptorch/nn.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpl_jax.core import hier

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# The official maths in PyTorch, float64, with the triplets and the Gumbel noise given.


class _TorchArtanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clamp(-1 + 1e-5, 1 - 1e-5)
        ctx.save_for_backward(x)
        return 0.5 * (torch.log(1 + x) - torch.log(1 - x))

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output / (1 - x**2)


class _TorchRiemannianGradient(torch.autograd.Function):
    c = 1.0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (1 - _TorchRiemannianGradient.c * x.pow(2).sum(-1, keepdim=True)).pow(2) / 4


def torch_to_poincare(x, c, clip_r):
    if c == 0:  # the official model's NormLayer (the sphere mode; the official LCAs would be NaN here)
        return F.normalize(x, p=2, dim=1)
    x_norm = torch.norm(x, dim=-1, keepdim=True) + 1e-5
    x = x * torch.minimum(torch.ones_like(x_norm), clip_r / x_norm)
    sqrt_c = c**0.5
    u_norm = torch.clamp_min(x.norm(dim=-1, p=2, keepdim=True), 1e-5)
    x = (sqrt_c * u_norm).clamp(-15, 15).tanh() * x / (sqrt_c * u_norm)
    norm = torch.clamp_min(x.norm(dim=-1, keepdim=True, p=2), 1e-5)
    max_norm = (1 - 1e-3) / sqrt_c
    x = torch.where(norm > max_norm, x / norm * max_norm, x)
    _TorchRiemannianGradient.c = c
    return _TorchRiemannianGradient.apply(x)


def torch_dist_matrix(x, y, c):
    if c == 0:
        return 2 - 2 * F.linear(x, y)
    mx = -x
    xy = torch.einsum("ij,kj->ik", (mx, y))
    x2 = mx.pow(2).sum(-1, keepdim=True)
    y2 = y.pow(2).sum(-1, keepdim=True)
    num = (1 + 2 * c * xy + c * y2.permute(1, 0)).unsqueeze(2) * mx.unsqueeze(1)
    num = num + (1 - c * x2).unsqueeze(2) * y
    denom = 1 + 2 * c * xy + c**2 * x2 * y2.permute(1, 0)
    res = num / (denom.unsqueeze(2) + 1e-5)
    sqrt_c = c**0.5
    return 2 / sqrt_c * _TorchArtanh.apply(sqrt_c * torch.norm(res, dim=-1))


def torch_gumbel_softmax_hard(logits, gumbel):
    y_soft = (logits + gumbel).softmax(1)  # F.gumbel_softmax with tau=1 and its noise given
    index = y_soft.max(1, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def torch_ghhc(cp_dist, i, j, k, gumbel, mrg, tau):
    max_dists_ij = torch.maximum(cp_dist[i], cp_dist[j])
    lca_ij_prob = torch_gumbel_softmax_hard(-max_dists_ij / tau, gumbel[0])
    lca_ij_idx = lca_ij_prob.argmax(-1)
    max_dists_ijk = torch.maximum(cp_dist[k], max_dists_ij)
    lca_ijk_prob = torch_gumbel_softmax_hard(-max_dists_ijk / tau, gumbel[1])
    lca_ijk_idx = lca_ijk_prob.argmax(-1)
    dist_i_lca_ij, dist_i_lca_ijk = (cp_dist[i] * lca_ij_prob).sum(1), (cp_dist[i] * lca_ijk_prob).sum(1)
    dist_j_lca_ij, dist_j_lca_ijk = (cp_dist[j] * lca_ij_prob).sum(1), (cp_dist[j] * lca_ijk_prob).sum(1)
    dist_k_lca_ij, dist_k_lca_ijk = (cp_dist[k] * lca_ij_prob).sum(1), (cp_dist[k] * lca_ijk_prob).sum(1)
    hc_loss = (torch.relu(dist_i_lca_ij - dist_i_lca_ijk + mrg) + torch.relu(dist_j_lca_ij - dist_j_lca_ijk + mrg)
               + torch.relu(dist_k_lca_ijk - dist_k_lca_ij + mrg))
    return (hc_loss * (lca_ij_idx != lca_ijk_idx).double()).mean()


def torch_hier(z_raw, lcas_raw, batch_triplets, proxy_triplets, batch_gumbel, proxy_gumbel, c, clip_r, mrg, tau):
    """Loss, d/d z_raw, d/d lcas_raw; the triplets are (i, j, k) index arrays (the valid ones only)."""
    z_raw = torch.tensor(z_raw, dtype=torch.float64, requires_grad=True)
    lcas_raw = torch.tensor(lcas_raw, dtype=torch.float64, requires_grad=True)
    bs = len(z_raw)
    z, lcas = torch_to_poincare(z_raw, c, clip_r), torch_to_poincare(lcas_raw, c, clip_r)
    all_nodes = torch.cat([z, lcas])
    all_dist = torch_dist_matrix(all_nodes, all_nodes, c)
    as_index = lambda t: [torch.tensor(np.asarray(a), dtype=torch.long) for a in t]  # noqa: E731
    loss = torch_ghhc(all_dist[:bs, bs:], *as_index(batch_triplets), torch.as_tensor(batch_gumbel), mrg, tau)
    loss = loss + torch_ghhc(all_dist[bs:, bs:], *as_index(proxy_triplets), torch.as_tensor(proxy_gumbel), mrg, tau)
    loss.backward()
    return loss.item(), z_raw.grad.numpy(), lcas_raw.grad.numpy()


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _random_raw_embeddings(rng, batch, dim):
    # Row norms from well inside to well outside clip_r, so that the clipping is both active and not.
    return rng.normal(size=(batch, dim)) * rng.uniform(0.1, 1.5, size=(batch, 1))


def _np_reciprocal(similarity, top_k, valid):
    n = len(similarity)
    scores = np.where(valid[None, :], similarity, -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :min(top_k, n)]
    in_top = np.zeros((n, n), bool)
    in_top[np.arange(n)[:, None], top] = True
    pair_ok = valid[:, None] & valid[None, :] & ~np.eye(n, dtype=bool)
    return in_top & in_top.T & pair_ok, pair_ok


def _assert_close(actual, expected, rtol=1e-5):
    """Equal within rtol of the larger of |expected| entrywise and rtol * max|expected| overall."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))


# ---------------------------------------------------------------------------------------------------------
# The loss and its gradients against the official maths.


def _random_triplets(rng, num_rows, num_triplets):
    """(anchor, positive, negative, valid) with anchor != positive and a few invalid triplets."""
    anchor = rng.integers(0, num_rows, num_triplets)
    positive = (anchor + rng.integers(1, num_rows, num_triplets)) % num_rows
    negative = rng.integers(0, num_rows, num_triplets)
    valid = rng.uniform(size=num_triplets) < 0.85
    return tuple(jnp.asarray(a, jnp.int32) for a in (anchor, positive, negative)) + (jnp.asarray(valid),)


@pytest.mark.parametrize("seed, batch, num_proxies, dim, curvature, clip_r, margin", [
    (0, 12, 10, 8, 0.1, 2.3, 0.1),  # the official defaults
    (1, 20, 16, 16, 1.0, 1.0, 0.3),
    (2, 10, 8, 6, 0.0, 2.3, 0.2),  # the sphere mode
])
def test_loss_and_gradients_match_official_maths(seed, batch, num_proxies, dim, curvature, clip_r, margin):
    rng = np.random.default_rng(seed)
    temperature = 0.1
    embeddings = _random_raw_embeddings(rng, batch, dim)
    # Proxies from the official initialisation, some scaled beyond clip_r.
    proxies = rng.normal(size=(num_proxies, dim)) / dim**0.5 * clip_r * 0.9 * rng.uniform(0.5, 1.6, (num_proxies, 1))
    batch_triplets, proxy_triplets = _random_triplets(rng, batch, 60), _random_triplets(rng, num_proxies, 50)
    batch_gumbel = rng.gumbel(size=(2, 60, num_proxies))
    proxy_gumbel = rng.gumbel(size=(2, 50, num_proxies))
    with jax.enable_x64(True):
        loss_fn = functools.partial(hier.hier_loss_from_triplets, curvature=curvature, clip_r=clip_r,
                                    margin=margin, temperature=temperature)

        def mapped_by_caller(e, *args):  # the official split: the head maps, the loss takes ball points
            return loss_fn(hier.to_poincare(e, curvature, clip_r), *args, embeddings_on_ball=True)

        @jax.jit
        def both(*args):
            return (jax.value_and_grad(loss_fn, argnums=(0, 1))(*args),
                    jax.value_and_grad(mapped_by_caller, argnums=(0, 1))(*args))

        (loss, (embeddings_grad, proxies_grad)), on_ball = both(
            jnp.asarray(embeddings), jnp.asarray(proxies), batch_triplets, proxy_triplets,
            jnp.asarray(batch_gumbel), jnp.asarray(proxy_gumbel))
        assert loss.dtype == jnp.float64
    np.testing.assert_allclose(on_ball[0], loss, rtol=1e-12)
    for grad, grad_on_ball in zip((embeddings_grad, proxies_grad), on_ball[1]):
        np.testing.assert_allclose(grad_on_ball, grad, rtol=1e-12, atol=1e-15)

    def official_triplets(triplets):  # the official code has no invalid triplets: pass the valid ones
        valid = np.asarray(triplets[3])
        return [np.asarray(a)[valid] for a in triplets[:3]], valid

    (batch_indices, batch_valid), (proxy_indices, proxy_valid) = (
        official_triplets(batch_triplets), official_triplets(proxy_triplets))
    expected, expected_embeddings_grad, expected_proxies_grad = torch_hier(
        embeddings, proxies, batch_indices, proxy_indices, batch_gumbel[:, batch_valid], proxy_gumbel[:, proxy_valid],
        curvature, clip_r, margin, temperature)
    assert expected > 0
    assert np.max(np.abs(expected_embeddings_grad)) > 0 and np.max(np.abs(expected_proxies_grad)) > 0
    _assert_close(loss, expected)
    _assert_close(embeddings_grad, expected_embeddings_grad)
    _assert_close(proxies_grad, expected_proxies_grad)


def test_ghhc_ignores_invalid_triplets_and_averages_over_valid_ones():
    rng = np.random.default_rng(0)
    distances = jnp.asarray(rng.uniform(0.5, 3.0, size=(6, 5)), jnp.float32)
    gumbel = jax.random.gumbel(jax.random.key(0), (2, 4, 5))
    anchor, positive, negative = (jnp.asarray(a, jnp.int32) for a in ([0, 1, 2, 3], [1, 2, 3, 4], [5, 5, 0, 1]))
    other_negative = jnp.asarray([5, 5, 4, 0], jnp.int32)  # differs in the invalid triplets only

    @jax.jit
    def losses(negatives, valid):
        return jax.vmap(lambda n, v: hier.ghhc_loss(distances, (anchor, positive, n, v), gumbel))(negatives, valid)

    valid = jnp.asarray([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    negatives = jnp.stack([negative, other_negative] + [negative] * 3)
    both, changed, first, second, none = np.asarray(losses(negatives, valid))
    assert both > 0 and changed == both and none == 0
    np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# hier_loss end to end.


_hier_value_and_grad = jax.jit(jax.value_and_grad(functools.partial(hier.hier_loss, top_k=5, num_triplets=64),
                                                  argnums=(0, 2)))


def test_hier_loss_jit_determinism_gradients_and_padding():
    rng = np.random.default_rng(1)
    embeddings = np.asarray(_random_raw_embeddings(rng, 12, 8), np.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=12), jnp.int32)
    mask = jnp.asarray(np.arange(12) < 9)
    proxies = hier.init_hier_proxies(jax.random.key(1), 10, 8)
    zero_padded, nan_padded = embeddings.copy(), embeddings.copy()
    zero_padded[9:], nan_padded[9:] = 0, np.nan
    loss, (grad, proxies_grad) = _hier_value_and_grad(jnp.asarray(nan_padded), labels, proxies, jax.random.key(0),
                                                      mask=mask)
    assert loss.shape == () and loss.dtype == jnp.float32 and float(loss) > 0
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.all(jnp.isfinite(proxies_grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0 and float(jnp.max(jnp.abs(proxies_grad))) > 0
    # Padded rows reach neither the value nor any gradient, whatever they hold.
    expected, (expected_grad, expected_proxies_grad) = _hier_value_and_grad(
        jnp.asarray(zero_padded), labels, proxies, jax.random.key(0), mask=mask)
    assert float(loss) == float(expected)
    np.testing.assert_array_equal(grad, expected_grad)
    np.testing.assert_array_equal(proxies_grad, expected_proxies_grad)
    np.testing.assert_array_equal(grad[9:], 0)
    # Deterministic for a key, different for another.
    other, _ = _hier_value_and_grad(jnp.asarray(zero_padded), labels, proxies, jax.random.key(3), mask=mask)
    assert float(other) != float(loss)


# ---------------------------------------------------------------------------------------------------------
# Mining.


_mine = jax.jit(hier.mine_reciprocal_triplets, static_argnames=("top_k", "num_triplets"))


def _mining_inputs(seed=0, n=24, dim=6):
    points = np.random.default_rng(seed).normal(size=(n, dim))
    return jnp.asarray(-np.sum((points[:, None] - points[None]) ** 2, axis=-1), jnp.float32)


@pytest.mark.parametrize("top_k, num_triplets, masked", [(5, 200, False), (8, 37, True), (3, 100, True)])
def test_mined_triplets_are_reciprocal_positives_and_other_negatives(top_k, num_triplets, masked):
    similarity = _mining_inputs()
    n = similarity.shape[0]
    valid_row = np.arange(n) % 5 != 3 if masked else np.ones(n, bool)
    anchor, positive, negative, valid = (np.asarray(a) for a in _mine(
        similarity, jax.random.key(0), top_k=top_k, num_triplets=num_triplets, mask=jnp.asarray(valid_row)))
    assert all(a.shape == (num_triplets,) for a in (anchor, positive, negative, valid))
    assert anchor.dtype == np.int32 and valid.dtype == bool
    reciprocal, pair_ok = _np_reciprocal(np.asarray(similarity), top_k, valid_row)
    is_anchor = (reciprocal.sum(1) >= 2) & ((pair_ok & ~reciprocal).sum(1) >= 1)
    assert is_anchor.any() and valid.all()
    assert np.all(reciprocal[anchor, positive]) and np.all(anchor != positive)
    assert not np.any(reciprocal[anchor, negative]) and np.all(anchor != negative)
    for indices in (anchor, positive, negative):  # padded rows appear nowhere
        assert np.all(valid_row[indices])
    # Every anchor gets floor or ceil of num_triplets / num_anchors triplets, as the official 50 per anchor.
    counts = np.bincount(anchor, minlength=n)[is_anchor]
    assert np.all(counts >= num_triplets // is_anchor.sum()) and counts.max() - counts.min() <= 1
    assert np.all(np.bincount(anchor, minlength=n)[~is_anchor] == 0)


def test_mining_is_deterministic_for_a_key_and_varies_with_it():
    similarity = _mining_inputs(seed=1)
    mask = jnp.ones(similarity.shape[0], bool)
    first, again, other = (_mine(similarity, jax.random.key(k), top_k=5, num_triplets=200, mask=mask)
                           for k in (7, 7, 8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(first[:3], other[:3]))


def test_mining_without_anchors_gives_no_valid_triplet():
    # top_k = 1: every row's only neighbour is itself, so nobody has a reciprocal neighbour; all rows masked
    # leaves nobody at all.
    for top_k, mask in ((1, np.ones(24, bool)), (8, np.zeros(24, bool))):
        anchor, _, _, valid = _mine(_mining_inputs(), jax.random.key(0), top_k=top_k, num_triplets=37,
                                    mask=jnp.asarray(mask))
        assert not np.any(valid) and anchor.shape == (37,)


def test_mining_similarity_ranks_same_class_rows_first():
    points = np.random.default_rng(2).normal(size=(24, 4)) * 0.3
    labels = np.repeat(np.arange(3), 8)
    sq = np.sum((points[:, None] - points[None]) ** 2, -1)
    similarity = jax.jit(hier.mining_similarity)(jnp.asarray(sq, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(similarity, np.exp(-sq) + (labels[:, None] == labels[None]), rtol=1e-6)
    anchor, positive, negative, valid = _mine(similarity, jax.random.key(0), top_k=8, num_triplets=37,
                                              mask=jnp.ones(24, bool))
    assert np.all(valid)
    np.testing.assert_array_equal(labels[anchor], labels[positive])


# ---------------------------------------------------------------------------------------------------------
# Poincare maths against closed forms (float64).


def _ball_points(rng, n, dim, c, max_radius=0.9):
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0, max_radius, (n, 1)) / c**0.5


@functools.partial(jax.jit, static_argnums=2)
def _distance_quantities(x, y, c):
    n, m = x.shape[0], y.shape[0]
    mobius = hier.mobius_add(-jnp.repeat(x, m, axis=0), jnp.tile(y, (n, 1)), c)
    return dict(
        d=hier.pairwise_distance(x, y, c),
        origin=hier.pairwise_distance(jnp.zeros((1, x.shape[1]), x.dtype), x, c)[0],
        via_mobius=2 / c**0.5 * hier.artanh(c**0.5 * jnp.linalg.norm(mobius, axis=1)).reshape(n, m),
        dxx=hier.pairwise_distance(x, x, c),
        diagonal_grad=jax.grad(lambda p: jnp.sum(hier.pairwise_distance(p, p, c)))(x),
        zero_plus_x=hier.mobius_add(jnp.zeros_like(x), x, c),
        cancelled=hier.mobius_add(-x[:m], hier.mobius_add(x[:m], y, c), c),
    )


@pytest.mark.parametrize("c", [0.1, 1.0, 2.5])
def test_pairwise_distance_and_mobius_add_closed_forms(c):
    rng = np.random.default_rng(0)
    x, y = _ball_points(rng, 7, 5, c), _ball_points(rng, 6, 5, c, max_radius=0.6)
    with jax.enable_x64(True):
        q = {k: np.asarray(v) for k, v in _distance_quantities(jnp.asarray(x), jnp.asarray(y), c).items()}
    # From the origin: 2 / sqrt(c) artanh(sqrt(c) ||x||) (up to the official 1e-5 in the Mobius denominator).
    np.testing.assert_allclose(q["origin"], 2 / c**0.5 * np.arctanh(c**0.5 * np.linalg.norm(x, axis=1)), rtol=1e-4)
    # arcosh form: d = arcosh(1 + 2c ||x - y||^2 / ((1 - c||x||^2)(1 - c||y||^2))) / sqrt(c).
    ratio = 2 * c * np.sum((x[:, None] - y[None]) ** 2, -1) / np.outer(1 - c * np.sum(x**2, 1), 1 - c * np.sum(y**2, 1))
    np.testing.assert_allclose(q["d"], np.arccosh(1 + ratio) / c**0.5, rtol=1e-4)
    # Exactly the official Mobius form with its epsilons: d = 2 / sqrt(c) artanh(sqrt(c) ||(-x) (+) y||).
    np.testing.assert_allclose(q["d"], q["via_mobius"], rtol=1e-10)
    # Symmetric, zero on the diagonal, positive elsewhere, with a finite gradient on the diagonal.
    np.testing.assert_allclose(q["dxx"], q["dxx"].T, rtol=1e-12)
    np.testing.assert_array_equal(np.diag(q["dxx"]), 0)
    assert np.all(q["dxx"][~np.eye(7, dtype=bool)] > 0) and np.all(np.isfinite(q["diagonal_grad"]))
    # Mobius addition: 0 (+) x = x and the left cancellation (-x) (+) (x (+) y) = y, up to the official 1e-5.
    np.testing.assert_allclose(q["zero_plus_x"], x, rtol=1e-4)
    np.testing.assert_allclose(q["cancelled"], y, atol=1e-3 / c**0.5)


@functools.partial(jax.jit, static_argnums=2)
def _map_quantities(v, w, c):
    ball = hier.to_poincare(v, c, 2.3)
    _, vjp_plain = jax.vjp(lambda u: hier.to_poincare(u, c, 2.3, riemannian=False), v)
    _, vjp_riemannian = jax.vjp(lambda u: hier.to_poincare(u, c, 2.3), v)
    scale = (1 - c * jnp.sum(ball**2, axis=1, keepdims=True)) ** 2 / 4
    return dict(mapped=hier.expmap0(v, c), projected=hier.project(v, c), clipped=hier.clip_features(v, 2.3),
                ball=ball, clipped_then_mapped=hier.expmap0(hier.clip_features(v, 2.3), c),
                riemannian=vjp_riemannian(w)[0], scaled_plain=vjp_plain(w * scale)[0])


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_expmap0_project_clip_and_to_poincare(c):
    rng = np.random.default_rng(4)
    v = rng.normal(size=(9, 6)) * rng.uniform(0.01, 20, (9, 1))
    v_norm = np.linalg.norm(v, axis=1)
    with jax.enable_x64(True):
        q = {k: np.asarray(a) for k, a in _map_quantities(jnp.asarray(v), jnp.asarray(rng.normal(size=(9, 6))),
                                                           c).items()}
    norm = lambda a: np.linalg.norm(a, axis=1)  # noqa: E731
    # ||exp_0(v)|| = tanh(sqrt(c) ||v||) / sqrt(c) < 1 / sqrt(c), in the direction of v.
    np.testing.assert_allclose(norm(q["mapped"]), np.tanh(c**0.5 * v_norm) / c**0.5, rtol=1e-12)
    assert np.all(norm(q["mapped"]) < 1 / c**0.5)
    np.testing.assert_allclose(q["mapped"] / norm(q["mapped"])[:, None], v / v_norm[:, None], rtol=1e-9)
    radius = (1 - 1e-3) / c**0.5
    outside = v_norm > radius
    np.testing.assert_allclose(norm(q["projected"][outside]), radius, rtol=1e-12)
    np.testing.assert_array_equal(q["projected"][~outside], v[~outside])
    np.testing.assert_allclose(norm(q["clipped"]), np.minimum(v_norm, 2.3 * v_norm / (v_norm + 1e-5)), rtol=1e-12)
    assert np.all(norm(q["ball"]) <= radius * (1 + 1e-12))
    np.testing.assert_allclose(q["ball"], q["clipped_then_mapped"], rtol=1e-12)
    # The official RiemannianGradient: the cotangent at the ball point is scaled by (1 - c||x||^2)^2 / 4.
    np.testing.assert_allclose(q["riemannian"], q["scaled_plain"], rtol=1e-12)


def test_sphere_mode_and_artanh_boundary():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    unit, d, grad = jax.jit(lambda v: (hier.to_poincare(v, 0.0),
                                       hier.pairwise_distance(hier.to_poincare(v, 0.0), hier.to_poincare(v, 0.0), 0.0),
                                       jax.grad(hier.artanh)(jnp.float32(1.5))))(x)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(d, np.sum((np.asarray(unit)[:, None] - np.asarray(unit)[None]) ** 2, -1), atol=1e-6)
    # artanh's gradient passes the clamp, finite at and beyond 1, as in the official autograd Function.
    np.testing.assert_allclose(grad, 1 / (1 - (1 - 1e-5) ** 2), rtol=1e-2)


def test_init_hier_proxies():
    proxies = hier.init_hier_proxies(jax.random.key(0), 512, 128)
    assert proxies.shape == (512, 128) and proxies.dtype == jnp.float32
    np.testing.assert_allclose(np.mean(np.linalg.norm(proxies, axis=1)), 0.9 * 2.3, rtol=0.02)
    np.testing.assert_array_equal(proxies, hier.init_hier_proxies(jax.random.key(0), 512, 128))
