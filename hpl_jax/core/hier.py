"""HIER (Kim et al., CVPR 2023, "HIER: Metric Learning Beyond Class Labels via Hierarchical Regularization").

HIER learns `num_proxies` hierarchical proxies (the "LCAs") in a Poincare ball of curvature -c and regularises
the embeddings with a gHHC-style triplet loss: for a triplet (i, j, k) where j is close to i and k is not, the
lowest common ancestor of the pair, lca(i, j), should lie closer to i and j, and further from k, than the
common ancestor of all three, lca(i, j, k). The LCA is chosen by a straight-through Gumbel-softmax over the
proxies. The loss has two such terms: on triplets of the batch (against the proxies) and on triplets of the
proxies themselves (against the proxies), which is what makes the proxies a hierarchy.

The maths follows the official PyTorch code (github.com/tjddus9597/HIER-CVPR23: hier/losses.py `HIERLoss`,
hier/hyptorch/pmath.py, hier/hyptorch/nn.py `ToPoincare`), with its epsilons, so that values and gradients agree
with it. The official code mines triplets with NumPy loops on the host; here they are mined under jit with a
PRNG key and a fixed number of triplets (`mine_reciprocal_triplets`). Curvature c = 0 is the official "sphere
mode": L2-normalised points and the distance 2 - 2 <x, y>. Arithmetic is float32 (float64 for float64 inputs).
Hyperparameters (curvature, clip_r, margin, temperature, top_k, num_triplets) are static Python numbers.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

# The official code's epsilons (hyptorch/pmath.py, hyptorch/nn.py).
_ARTANH_BOUND = 1.0 - 1e-5  # artanh's argument is clamped to [-bound, bound]
_PROJECT_EPS = 1e-3  # the ball's usable radius is (1 - eps) / sqrt(c)
_MIN_NORM = 1e-5  # norms clamped from below in expmap0 and project
_TANH_CLAMP = 15.0
_CLIP_EPS = 1e-5  # added to the norm in the feature clipping
_MOBIUS_EPS = 1e-5  # added to the Mobius addition's denominator
_NORMALIZE_EPS = 1e-12  # F.normalize's, for the sphere mode
# The official code mines 50 triplets per anchor (HIERLoss.forward, t_per_anchor).
TRIPLETS_PER_ANCHOR = 50

Triplets = Tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _compute_dtype(*arrays: jax.Array):
    """float32 for bf16/f16/f32 inputs, float64 for float64 inputs (under x64)."""
    return jnp.result_type(*[a.dtype for a in arrays], jnp.float32)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt(x) for x >= 0 with gradient 0 (not inf) at 0, as PyTorch's norm has at the zero vector."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _norm(x: jax.Array) -> jax.Array:
    """f[..., 1], the L2 norm of the last axis."""
    return _safe_sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


@jax.custom_jvp
def artanh(x: jax.Array) -> jax.Array:
    """artanh of x clamped to +-(1 - 1e-5); the derivative 1 / (1 - x_clamped^2) passes through the clamp,
    as in the official autograd Function (so a point on the boundary still gets a gradient)."""
    x = jnp.clip(x, -_ARTANH_BOUND, _ARTANH_BOUND)
    return 0.5 * (jnp.log1p(x) - jnp.log1p(-x))


@artanh.defjvp
def _artanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    clamped = jnp.clip(x, -_ARTANH_BOUND, _ARTANH_BOUND)
    return artanh(x), dx / (1.0 - clamped * clamped)


def clip_features(x: jax.Array, clip_r: float) -> jax.Array:
    """f[n, dim], the rows of `x` shrunk to norm <= clip_r (feature clipping, Guo et al. 2022, arXiv 2107.11472):

        x * min(1, clip_r / (||x|| + 1e-5))
    """
    return x * jnp.minimum(1.0, clip_r / (_norm(x) + _CLIP_EPS))


def expmap0(v: jax.Array, c: float) -> jax.Array:
    """f[n, dim], the exponential map at the origin of the Poincare ball, c > 0:

        exp_0(v) = tanh(sqrt(c) ||v||) v / (sqrt(c) ||v||),   so ||exp_0(v)|| < 1 / sqrt(c)
    """
    sqrt_c = c**0.5
    v_norm = jnp.maximum(_norm(v), _MIN_NORM)
    return jnp.tanh(jnp.clip(sqrt_c * v_norm, -_TANH_CLAMP, _TANH_CLAMP)) * v / (sqrt_c * v_norm)


def project(x: jax.Array, c: float) -> jax.Array:
    """f[n, dim], the rows of `x` outside the radius (1 - 1e-3) / sqrt(c) moved onto it (numerical safety)."""
    x_norm = jnp.maximum(_norm(x), _MIN_NORM)
    max_norm = (1.0 - _PROJECT_EPS) / c**0.5
    return jnp.where(x_norm > max_norm, x / x_norm * max_norm, x)


def _riemannian_gradient(x: jax.Array, c: float) -> jax.Array:
    """`x` itself, whose gradient is scaled by (1 - c ||x||^2)^2 / 4, the inverse squared conformal factor:
    the official RiemannianGradient. Written as sg(x) + s (x - sg(x)), exact in value, instead of a custom VJP."""
    scale = jax.lax.stop_gradient((1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True)) ** 2 / 4.0)
    frozen = jax.lax.stop_gradient(x)
    return frozen + scale * (x - frozen)


def to_poincare(x: jax.Array, c: float, clip_r: Optional[float] = 2.3, *, riemannian: bool = True) -> jax.Array:
    """f[n, dim], Euclidean rows mapped into the ball as the official ToPoincare does:

        riemannian(project(exp_0(clip(x))))

    With c = 0 (sphere mode) the rows are L2-normalised instead (the official model's NormLayer); the official
    ToPoincare would give NaN there (exp_0 divides by sqrt(c)), so this is the sphere mode's choice for proxies too.
    """
    if c == 0:
        return x / jnp.maximum(_norm(x), _NORMALIZE_EPS)
    if clip_r is not None:
        x = clip_features(x, clip_r)
    x = project(expmap0(x, c), c)
    return _riemannian_gradient(x, c) if riemannian else x


def mobius_add(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """f[n, dim], the row-wise Mobius addition with the official 1e-5 in the denominator:

        x (+)_c y = ((1 + 2c<x,y> + c||y||^2) x + (1 - c||x||^2) y) / (1 + 2c<x,y> + c^2 ||x||^2 ||y||^2 + 1e-5)
    """
    x2 = jnp.sum(x * x, axis=-1, keepdims=True)
    y2 = jnp.sum(y * y, axis=-1, keepdims=True)
    xy = jnp.sum(x * y, axis=-1, keepdims=True)
    numerator = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    return numerator / (1 + 2 * c * xy + c**2 * x2 * y2 + _MOBIUS_EPS)


def pairwise_distance(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """f[n, m], the Poincare distances of the rows of f[n, dim] `x` and f[m, dim] `y` (points of the ball):

        d_c(x, y) = 2 / sqrt(c) * artanh(sqrt(c) ||(-x) (+)_c y||)

    computed through ||(-x) (+)_c y|| = ||x - y|| sqrt(D) / (D + 1e-5), D = 1 - 2c<x,y> + c^2 ||x||^2 ||y||^2,
    which is the official dist_matrix (with its 1e-5) without its [n, m, dim] Mobius sums. With c = 0 it is the
    official sphere mode's 2 - 2 <x, y> (the squared chord distance of unit rows).
    """
    if c == 0:
        return 2.0 - 2.0 * x @ y.T
    sqrt_c = c**0.5
    x2 = jnp.sum(x * x, axis=-1)[:, None]
    y2 = jnp.sum(y * y, axis=-1)[None, :]
    denominator = 1.0 - 2.0 * c * (x @ y.T) + c**2 * x2 * y2
    # ||x - y||^2 from the differences, not x2 + y2 - 2<x,y>: exact for close pairs and 0 on a diagonal.
    squared_difference = jnp.sum(jnp.square(x[:, None, :] - y[None, :, :]), axis=-1)
    mobius_norm = _safe_sqrt(squared_difference * denominator) / (denominator + _MOBIUS_EPS)
    return 2.0 / sqrt_c * artanh(sqrt_c * mobius_norm)


def init_hier_proxies(rng: jax.Array, num_proxies: int, dim: int, *, clip_r: float = 2.3) -> jax.Array:
    """f32[num_proxies, dim], the official initialisation N(0, 1) / sqrt(dim) * 0.9 clip_r: Euclidean vectors of
    norm about 0.9 clip_r, just inside the clipping radius; `to_poincare` maps them into the ball at every step.
    (The official code uses 512 proxies: --num_hproxies.)"""
    return jax.random.normal(rng, (num_proxies, dim), jnp.float32) / dim**0.5 * clip_r * 0.9


def mining_similarity(distances: jax.Array, labels: Optional[jax.Array] = None) -> jax.Array:
    """f[n, n], the official mining score, without gradient: exp(-d(i, j)) + [y_i == y_j] (labels optional).

    exp(-d) <= 1, so with labels every same-class row ranks above every other row."""
    similarity = jnp.exp(-jax.lax.stop_gradient(distances))
    if labels is not None:
        similarity = similarity + (labels[:, None] == labels[None, :]).astype(similarity.dtype)
    return similarity


def mine_reciprocal_triplets(
    similarity: jax.Array, key: jax.Array, *, top_k: int, num_triplets: int, mask: Optional[jax.Array] = None
) -> Triplets:
    """Triplets (anchor, positive, negative) among the rows of a similarity matrix, jit-able.

    j is a reciprocal neighbour of i if each is among the other's top_k most similar rows (a row counts in its
    own top_k, as in the official code). An anchor needs >= 2 reciprocal neighbours (other than itself) and >= 1
    other row; positives are drawn uniformly from its reciprocal neighbours and negatives from all other rows
    but itself. The official code draws 50 triplets for every anchor; here the num_triplets slots go round-robin
    over the anchors in a random order, so each anchor gets floor or ceil of num_triplets / num_anchors.

    Args:
      similarity: f[n, n], higher is closer (e.g. `mining_similarity`).
      key: PRNG key; the triplets are a deterministic function of it.
      top_k: neighbourhood size (static; at most n is used).
      num_triplets: number of triplets T (static).
      mask: optional bool[n], True for valid rows; invalid rows are never anchor, positive or negative.

    Returns:
      (anchor, positive, negative) i32[T] and valid bool[T]; all False when no row can be an anchor. Invalid
      triplets hold the first valid row in all three places.
    """
    n = similarity.shape[0]
    valid_row = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
    pair_ok = valid_row[:, None] & valid_row[None, :] & ~jnp.eye(n, dtype=bool)
    scores = jnp.where(valid_row[None, :], similarity, -jnp.inf)
    _, top = jax.lax.top_k(scores, min(top_k, n))
    in_top = jnp.zeros((n, n), bool).at[jnp.arange(n)[:, None], top].set(True)
    reciprocal = in_top & in_top.T & pair_ok
    # The official negatives are all rows that are not reciprocal neighbours; the anchor itself is left out here.
    other = ~reciprocal & pair_ok
    num_positive, num_negative = jnp.sum(reciprocal, axis=1), jnp.sum(other, axis=1)
    is_anchor = (num_positive >= 2) & (num_negative >= 1)
    num_anchors = jnp.sum(is_anchor)

    order_key, positive_key, negative_key = jax.random.split(key, 3)
    # The anchors first, in a random order; slot t takes the (t mod num_anchors)-th of them.
    anchor_order = jnp.argsort(jnp.where(is_anchor, jax.random.uniform(order_key, (n,)), 2.0))
    anchor = anchor_order[jnp.arange(num_triplets) % jnp.maximum(num_anchors, 1)]

    def draw(members: jax.Array, count: jax.Array, draw_key: jax.Array) -> jax.Array:
        # The r-th member of the anchor's set, r uniform in [0, count): members come first in a stable argsort.
        listed = jnp.argsort(~members, axis=1, stable=True)
        rank = jnp.floor(jax.random.uniform(draw_key, (num_triplets,)) * count[anchor]).astype(jnp.int32)
        return listed[anchor, jnp.clip(rank, 0, jnp.maximum(count[anchor] - 1, 0))]

    positive = draw(reciprocal, num_positive, positive_key)
    negative = draw(other, num_negative, negative_key)
    valid = is_anchor[anchor]
    fill = jnp.argmax(valid_row).astype(jnp.int32)
    anchor, positive, negative = (jnp.where(valid, idx, fill).astype(jnp.int32) for idx in (anchor, positive, negative))
    return anchor, positive, negative, valid


def _straight_through_gumbel_softmax(logits: jax.Array, gumbel: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(f[T, P] one-hot in value with the softmax's gradient, i32[T] the chosen index): the official
    F.gumbel_softmax(logits, tau=1, hard=True) with its Gumbel noise given."""
    soft = jax.nn.softmax(logits + gumbel, axis=-1)
    index = jnp.argmax(soft, axis=-1)
    hard = jax.nn.one_hot(index, logits.shape[-1], dtype=soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft, index


def ghhc_loss(
    distances: jax.Array, triplets: Triplets, gumbel: jax.Array, *, margin: float = 0.1, temperature: float = 0.1
) -> jax.Array:
    """f[], the official compute_gHHC for given triplets and Gumbel noise.

    With D = `distances` (node to proxy), the LCA of a set is the proxy nearest to its farthest member, chosen by
    a straight-through Gumbel-softmax with temperature tau:

        p_ij  = GumbelSoftmax(-max(D_i, D_j) / tau),   p_ijk = GumbelSoftmax(-max(D_i, D_j, D_k) / tau)
        l = [D_i.p_ij - D_i.p_ijk + m]_+ + [D_j.p_ij - D_j.p_ijk + m]_+ + [D_k.p_ijk - D_k.p_ij + m]_+

    averaged over the valid triplets, each counting only when the two LCAs differ (0 when none is valid).

    Args:
      distances: f[n, P], d(node, proxy).
      triplets: (anchor i, positive j, negative k) i32[T] rows of `distances`, and valid bool[T].
      gumbel: f[2, T, P], standard Gumbel noise of the two choices (lca_ij, lca_ijk).
      margin: m (the official mrg).
      temperature: tau.
    """
    anchor, positive, negative, valid = triplets
    d_i, d_j, d_k = distances[anchor], distances[positive], distances[negative]
    max_ij = jnp.maximum(d_i, d_j)
    p_ij, lca_ij = _straight_through_gumbel_softmax(-max_ij / temperature, gumbel[0])
    max_ijk = jnp.maximum(d_k, max_ij)
    p_ijk, lca_ijk = _straight_through_gumbel_softmax(-max_ijk / temperature, gumbel[1])

    def to_lca(d, p):  # d(node, chosen LCA), with the straight-through gradient into the choice
        return jnp.sum(d * p, axis=-1)

    per_triplet = (jax.nn.relu(to_lca(d_i, p_ij) - to_lca(d_i, p_ijk) + margin)
                   + jax.nn.relu(to_lca(d_j, p_ij) - to_lca(d_j, p_ijk) + margin)
                   + jax.nn.relu(to_lca(d_k, p_ijk) - to_lca(d_k, p_ij) + margin))
    counted = valid & (lca_ij != lca_ijk)
    return jnp.sum(jnp.where(counted, per_triplet, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _ball_points(embeddings, hier_proxies, curvature, clip_r, mask, embeddings_on_ball):
    """(z f[B, dim], lcas f[P, dim]): the embeddings (padded rows zeroed) and proxies in the ball."""
    dtype = _compute_dtype(embeddings, hier_proxies)
    embeddings = embeddings.astype(dtype)
    if mask is not None:  # A padded row may hold NaN: zeroed, it reaches neither value nor gradient.
        embeddings = jnp.where(mask[:, None], embeddings, 0)
    z = embeddings if embeddings_on_ball else to_poincare(embeddings, curvature, clip_r)
    return z, to_poincare(hier_proxies.astype(dtype), curvature, clip_r)


def hier_loss_from_triplets(
    embeddings: jax.Array,
    hier_proxies: jax.Array,
    batch_triplets: Triplets,
    proxy_triplets: Triplets,
    batch_gumbel: jax.Array,
    proxy_gumbel: jax.Array,
    *,
    curvature: float = 0.1,
    clip_r: float = 2.3,
    margin: float = 0.1,
    temperature: float = 0.1,
    mask: Optional[jax.Array] = None,
    embeddings_on_ball: bool = False,
) -> jax.Array:
    """f[], the HIER loss for given triplets and Gumbel noise (deterministic; `hier_loss` draws them):

        L = gHHC(D(z, lcas); batch triplets) + gHHC(D(lcas, lcas); proxy triplets)

    with z = to_poincare(embeddings), lcas = to_poincare(hier_proxies).

    Args:
      embeddings: f[B, dim], Euclidean (the head's output before the official model's ToPoincare).
      hier_proxies: f[P, dim], Euclidean (as `init_hier_proxies`).
      batch_triplets, proxy_triplets: (anchor, positive, negative) i32[T_b] / i32[T_p] and valid bool[T_b] /
        bool[T_p], rows of the batch / of the proxies.
      batch_gumbel, proxy_gumbel: f[2, T_b, P] / f[2, T_p, P], standard Gumbel noise.
      mask: optional bool[B], True for valid rows.
      embeddings_on_ball: the embeddings are points of the ball already (see `hier_loss`).
    """
    z, lcas = _ball_points(embeddings, hier_proxies, curvature, clip_r, mask, embeddings_on_ball)
    loss = ghhc_loss(pairwise_distance(z, lcas, curvature), batch_triplets, batch_gumbel,
                     margin=margin, temperature=temperature)
    return loss + ghhc_loss(pairwise_distance(lcas, lcas, curvature), proxy_triplets, proxy_gumbel,
                            margin=margin, temperature=temperature)


def hier_loss(
    embeddings: jax.Array,
    labels: Optional[jax.Array],
    hier_proxies: jax.Array,
    key: jax.Array,
    *,
    curvature: float = 0.1,
    clip_r: float = 2.3,
    margin: float = 0.1,
    temperature: float = 0.1,
    top_k: int = 30,
    num_triplets: Optional[int] = None,
    mask: Optional[jax.Array] = None,
    embeddings_on_ball: bool = False,
) -> jax.Array:
    """f[], the HIER loss of the official HIERLoss.forward: triplets mined among the batch (by
    exp(-d) + same label) and among the proxies (by exp(-d)), each by reciprocal top_k, then
    `hier_loss_from_triplets`. The defaults are the official ones (hyp_c, clip_r, mrg, tau, topk).

    The official model's head maps the embeddings into the ball (ToPoincare, whose Riemannian gradient scaling
    then also scales the metric loss's gradient) and both losses take the mapped points. Here the embeddings are
    mapped by default; with embeddings_on_ball=True they are taken as `to_poincare` outputs, so that a caller can
    map once and feed the same points to both losses, as the official code does.

    Args:
      embeddings: f or bf16[B, dim], Euclidean.
      labels: i32[B] class labels, or None to mine by distance only.
      hier_proxies: f32[P, dim], Euclidean (as `init_hier_proxies`).
      key: PRNG key for the mining and the Gumbel noise.
      num_triplets: triplets mined for each of the two terms (static); None: 50 per row (50 B and 50 P), the
        official count when every row is an anchor.
      mask: optional bool[B], True for valid rows; padded rows never enter a triplet.
      embeddings_on_ball: the embeddings are `to_poincare` outputs already (static).
    """
    num_rows, num_proxies = embeddings.shape[0], hier_proxies.shape[0]
    z, lcas = _ball_points(embeddings, hier_proxies, curvature, clip_r, mask, embeddings_on_ball)
    batch_to_proxy = pairwise_distance(z, lcas, curvature)
    proxy_to_proxy = pairwise_distance(lcas, lcas, curvature)
    batch_similarity = mining_similarity(pairwise_distance(z, z, curvature), labels)
    mine_key, proxy_mine_key, noise_key, proxy_noise_key = jax.random.split(key, 4)

    def term(distances, similarity, num_candidates, row_mask, term_mine_key, term_noise_key):
        count = TRIPLETS_PER_ANCHOR * num_candidates if num_triplets is None else num_triplets
        triplets = mine_reciprocal_triplets(similarity, term_mine_key, top_k=top_k, num_triplets=count, mask=row_mask)
        gumbel = jax.random.gumbel(term_noise_key, (2, count, num_proxies), distances.dtype)
        return ghhc_loss(distances, triplets, gumbel, margin=margin, temperature=temperature)

    return (term(batch_to_proxy, batch_similarity, num_rows, mask, mine_key, noise_key)
            + term(proxy_to_proxy, mining_similarity(proxy_to_proxy), num_proxies, None, proxy_mine_key,
                   proxy_noise_key))


def hier_regularised_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    hierarchy,
    key: jax.Array,
    *,
    proxy_loss: Callable[..., Tuple[jax.Array, jax.Array]],
    hier_weight: float,
    curvature: float = 0.1,
    clip_r: float = 2.3,
    margin: float = 0.1,
    temperature: float = 0.1,
    top_k: int = 30,
    mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The objective of HIER's training (the official hier/train.py with lambda1 = 1), over a proxy loss:

        z = ToPoincare(x),   L = L_proxy(z, y, P) + lambda * L_HIER(z, y, H)

    The embeddings x are the network's before any normalisation; the map into the ball keeps their direction, so a
    cosine proxy loss (Proxy-Anchor, Proxy-NCA, HPL over either) sees the same similarities as on x, but its
    gradient passes the map's Riemannian scaling, as in the official model, whose head ends in ToPoincare.

    Args:
      embeddings: f or bf16[B, dim], un-normalised.
      labels: i32[B] class labels.
      hierarchy: a ProxyHierarchy (core/hierarchy.py) whose `hier_proxies` f32[P, dim] are set.
      key: PRNG key of this step's mining and Gumbel noise.
      proxy_loss: (z, labels, hierarchy, mask=mask) -> (total f32[], per-level f32[L + 1]), e.g. HPL's
        `hierarchical_proxy_loss` with its base loss and weights bound (flat Proxy-Anchor: one level).
      hier_weight: lambda (the official --lambda2), static.
      mask: optional bool[B], True for valid rows; passed on to both terms.

    Returns:
      (L f32[], the proxy loss's per-level terms f32[L + 1], L_HIER f32[] unweighted).
    """
    z = to_poincare(embeddings, curvature, clip_r)
    total, per_level = proxy_loss(z, labels, hierarchy, mask=mask)
    regulariser = hier_loss(z, labels, hierarchy.hier_proxies, key, curvature=curvature, clip_r=clip_r,
                            margin=margin, temperature=temperature, top_k=top_k, mask=mask, embeddings_on_ball=True)
    return total + hier_weight * regulariser, per_level, regulariser
