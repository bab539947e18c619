"""The proxy losses of docs/method.md: Proxy-Anchor, Proxy-NCA, and HPL built on either.

One pure, jit-able function per equation, differentiable in the embeddings and the proxies. Embeddings
and proxies are L2-normalised here, so callers may pass raw vectors; all arithmetic is float32, also for
bfloat16 embeddings. `mask` marks the valid rows of a padded batch: a padded row changes neither the value
nor any gradient, whatever it holds.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from hpl_jax.core.hierarchy import ProxyHierarchy, lift_labels

# A zero vector (e.g. a padded row) normalises to zero instead of NaN.
_MIN_SQUARED_NORM = 1e-12
# Shift of a log-sum-exp over nothing: finite, so that the empty sum gives -inf and no NaN.
_EMPTY_SHIFT = float(jnp.finfo(jnp.float32).min)


def _inverse_norm(vectors: jax.Array) -> jax.Array:
    """f32[n], 1 / ||v|| of each row of f32[n, dim] `vectors`."""
    return jax.lax.rsqrt(jnp.maximum(jnp.sum(vectors * vectors, axis=-1), _MIN_SQUARED_NORM))


def _l2_normalize(vectors: jax.Array) -> jax.Array:
    """f32[n, dim], the unit rows of `vectors` (any float dtype)."""
    vectors = vectors.astype(jnp.float32)
    return vectors * _inverse_norm(vectors)[:, None]


@jax.custom_vjp
def _cosine_similarity(unit_embeddings: jax.Array, proxies: jax.Array) -> jax.Array:
    """f32[batch, num_proxies], s(x, p) of f32[batch, dim] unit embeddings and f32[num_proxies, dim] proxies.

    The proxies are normalised by scaling the product's columns, which spares a normalised copy of the
    [num_proxies, dim] matrix, the largest in the loss, and its gradient.
    """
    return (unit_embeddings @ proxies.T) * _inverse_norm(proxies)


def _cosine_similarity_fwd(unit_embeddings, proxies):
    inverse_norm = _inverse_norm(proxies)
    product = unit_embeddings @ proxies.T
    return product * inverse_norm, (unit_embeddings, proxies, inverse_norm, product)


def _cosine_similarity_bwd(residuals, similarity_grad):
    # s = (x.p) / |p| for unit x: d/dx = p / |p|, d/dp = x / |p| - (x.p) p / |p|^3. Written out so that
    # the proxies' gradient is the product G^T.x plus a single pass over the proxies.
    unit_embeddings, proxies, inverse_norm, product = residuals
    product_grad = similarity_grad * inverse_norm
    radial = jnp.sum(product_grad * product, axis=0) * inverse_norm**2
    embeddings_grad = product_grad @ proxies
    proxies_grad = product_grad.T @ unit_embeddings - radial[:, None] * proxies
    return _like_primal(embeddings_grad, unit_embeddings), _like_primal(proxies_grad, proxies)


def _like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """`cotangent` summed over the mesh axes along which it varies and `primal` does not (inside jax.shard_map
    with its default check_vma): the transpose of the implicit broadcast of a replicated input, which JAX inserts
    for its own operations but not into a custom VJP. Elsewhere, `cotangent` itself."""
    extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes along which `x` varies inside jax.shard_map (frozenset() outside it). JAX 0.10 keeps them in
    the type's manual_axis_type, earlier releases in its vma."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


_cosine_similarity.defvjp(_cosine_similarity_fwd, _cosine_similarity_bwd)


def _own_proxy_similarity(unit_embeddings: jax.Array, proxies: jax.Array, labels: jax.Array) -> jax.Array:
    """f32[batch], s(x_i, p_{y_i}) of each f32[batch, dim] unit embedding with its own class's proxy."""
    return jnp.sum(unit_embeddings * _l2_normalize(proxies[labels]), axis=-1)


def _zero_padded_rows(
    embeddings: jax.Array, labels: jax.Array, mask: Optional[jax.Array]
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(embeddings, labels, valid) with the padded rows' embedding and label set to 0, and bool[batch] valid.

    A padded row may hold anything, even NaN or a label outside 0..num_proxies-1; zeroed, it cannot reach
    the value or any gradient.
    """
    if mask is None:
        return embeddings, labels, jnp.ones(labels.shape, bool)
    return jnp.where(mask[:, None], embeddings, 0), jnp.where(mask, labels, 0), mask


@jax.custom_vjp
def _log_one_plus_sum_exp_over_batch(logits: jax.Array, where: jax.Array) -> jax.Array:
    """f32[n], log(1 + sum_b exp(logits[b, k])) over the rows b selected by `where`; 0 where none is.

    Args:
      logits: f32[batch, n].
      where: bool[batch, n].
    """
    return _log_one_plus_sum_exp_fwd(logits, where)[0]


def _log_one_plus_sum_exp_fwd(logits, where):
    masked = jnp.where(where, logits, -jnp.inf)
    # Stable form: log(1 + sum exp) = softplus(logsumexp), with unselected entries at -inf.
    shift = jnp.max(masked, axis=0, initial=_EMPTY_SHIFT)
    logsumexp = jnp.log(jnp.sum(jnp.exp(masked - shift), axis=0)) + shift
    value = jax.nn.softplus(logsumexp)
    return value, (masked, value)


def _log_one_plus_sum_exp_bwd(residuals, value_grad):
    # d/dz_b log(1 + sum exp z) = exp(z_b - value): one pass, exactly 0 for unselected entries.
    masked, value = residuals
    return jnp.exp(masked - value) * value_grad, None


_log_one_plus_sum_exp_over_batch.defvjp(_log_one_plus_sum_exp_fwd, _log_one_plus_sum_exp_bwd)


def _segment_log_one_plus_sum_exp(
    logits: jax.Array, segment_ids: jax.Array, where: jax.Array, num_segments: int
) -> jax.Array:
    """f32[num_segments], log(1 + sum_i exp(logits_i)) over the selected i of each segment; 0 where none is.

    Args:
      logits: f32[n].
      segment_ids: i32[n], the segment of each entry.
      where: bool[n], the entries to include.
      num_segments: number of segments.
    """
    masked = jnp.where(where, logits, -jnp.inf)
    # Stable form: log(1 + sum exp) = softplus(logsumexp), with unselected entries at -inf.
    shift = jax.lax.stop_gradient(
        jnp.maximum(jax.ops.segment_max(masked, segment_ids, num_segments), _EMPTY_SHIFT))
    sum_exp = jax.ops.segment_sum(jnp.exp(masked - shift[segment_ids]), segment_ids, num_segments)
    # The inner where keeps log's gradient finite for empty segments (sum_exp = 0).
    nonempty = sum_exp > 0
    logsumexp = jnp.where(nonempty, jnp.log(jnp.where(nonempty, sum_exp, 1.0)) + shift, -jnp.inf)
    return jax.nn.softplus(logsumexp)


def proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    alpha: float = 32.0,
    delta: float = 0.1,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Proxy-Anchor loss (Kim et al., CVPR 2020), docs/method.md "The base losses":

        L_PA = 1/|P+| * sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
             + 1/|P|  * sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + delta)))

    Args:
      embeddings: f32 or bf16[batch, dim].
      labels: i32[batch], proxy index of each row's class.
      proxies: f32[num_proxies, dim].
      alpha: scale of the similarities.
      delta: margin.
      mask: optional bool[batch], True for valid rows; padded rows are neither positives nor negatives.

    Returns:
      f32[], the loss. P+ holds the proxies with a valid positive in the batch; the positive term is 0
      when P+ is empty.
    """
    embeddings, labels, valid = _zero_padded_rows(embeddings, labels, mask)
    num_proxies = proxies.shape[0]
    proxies = proxies.astype(jnp.float32)
    x = _l2_normalize(embeddings)
    s = _cosine_similarity(x, proxies)
    # A row is in X_p+ of one proxy only, its class's: the positive sums run over the batch, grouped by label.
    s_own = _own_proxy_similarity(x, proxies, labels)
    in_x_negative = (labels[:, None] != jnp.arange(num_proxies)[None, :]) & valid[:, None]
    num_in_p_positive = jnp.sum(jnp.bincount(labels, weights=valid.astype(jnp.int32), length=num_proxies) > 0)

    # A proxy outside P+ has an empty positive sum, log(1 + 0) = 0: summing over all proxies sums over P+.
    positive_per_proxy = _segment_log_one_plus_sum_exp(-alpha * (s_own - delta), labels, valid, num_proxies)
    negative_per_proxy = _log_one_plus_sum_exp_over_batch(alpha * (s + delta), in_x_negative)
    positive_term = jnp.sum(positive_per_proxy) / jnp.maximum(num_in_p_positive, 1)
    negative_term = jnp.sum(negative_per_proxy) / num_proxies
    return positive_term + negative_term


def proxy_nca_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    temperature: float = 1.0 / 32.0,
    exclude_positive: bool = False,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Proxy-NCA loss, softmax form of Proxy-NCA++ (Teh et al., ECCV 2020), docs/method.md "The base losses":

        L_NCA = mean_i -log( exp(-d(x_i, p_{y_i}) / T) / sum_{z in P} exp(-d(x_i, z) / T) )

    with d(x, p) = ||x - p||^2 of the normalised vectors.

    Args:
      embeddings: f32 or bf16[batch, dim].
      labels: i32[batch], proxy index of each row's class.
      proxies: f32[num_proxies, dim].
      temperature: T; 1/32 is the softmax scale 32 of the Proxy-Anchor code's Proxy-NCA (the trainer's default).
      exclude_positive: if True, the denominator sums over z in P without p_{y_i}, as in the original
        Proxy-NCA (Movshovitz-Attias et al., ICCV 2017).
      mask: optional bool[batch], True for valid rows; the mean runs over valid rows only.

    Returns:
      f32[], the loss.
    """
    embeddings, labels, valid = _zero_padded_rows(embeddings, labels, mask)
    num_proxies = proxies.shape[0]
    proxies = proxies.astype(jnp.float32)
    x = _l2_normalize(embeddings)
    # d(x, p) = ||x - p||^2 = 2 - 2 s(x, p) for unit vectors.
    logits = -(2.0 - 2.0 * _cosine_similarity(x, proxies)) / temperature
    positive_logit = -(2.0 - 2.0 * _own_proxy_similarity(x, proxies, labels)) / temperature
    in_denominator = (labels[:, None] != jnp.arange(num_proxies)[None, :]) if exclude_positive else None

    # -log softmax, with the log-sum-exp of the denominator in its stable form.
    loss_per_row = jax.nn.logsumexp(logits, axis=1, where=in_denominator) - positive_logit
    return jnp.sum(jnp.where(valid, loss_per_row, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# The base losses a config may name (config.loss.base), each with the hyperparameters it takes from config.loss.
BASE_LOSSES: Dict[str, Tuple[Callable[..., jax.Array], Tuple[str, ...]]] = {
    "proxy_anchor": (proxy_anchor_loss, ("alpha", "delta")),
    "proxy_nca": (proxy_nca_loss, ("temperature", "exclude_positive")),
}


def get_base_loss(name: str, **hyperparameters) -> Callable[..., jax.Array]:
    """The base loss `name` of BASE_LOSSES with its hyperparameters bound: `base_loss(embeddings, labels, proxies,
    mask=None) -> f32[]`, what `hierarchical_proxy_loss` takes.

    Hyperparameters the loss does not take are ignored, so a whole config section can be passed
    (`get_base_loss(config.loss.base, **config.loss)`); an unknown name raises ValueError.
    """
    if name not in BASE_LOSSES:
        raise ValueError(f"{name!r} is not a base loss; use one of {tuple(BASE_LOSSES)}.")
    loss_fn, accepted = BASE_LOSSES[name]
    return functools.partial(loss_fn, **{key: value for key, value in hyperparameters.items() if key in accepted})


def hierarchical_proxy_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    hierarchy: ProxyHierarchy,
    *,
    base_loss: Callable[..., jax.Array],
    weights: Sequence[float],
    mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
    """Hierarchical Proxy-based Loss (Yang et al., WACV 2022), docs/method.md "The hierarchy":

        L_HPL = sum_{l=0..L} w_l * L_base(X, Y^l, P^l),   y^0 = y, y^l = a^l(y^{l-1})

    Args:
      embeddings: f32 or bf16[batch, dim].
      labels: i32[batch], class labels (level 0).
      hierarchy: proxies P^l of every level and the parent maps a^l.
      base_loss: `base_loss(embeddings, labels, proxies, mask=mask) -> f32[]`, the same at every level,
        e.g. `functools.partial(proxy_anchor_loss, alpha=32.0)`.
      weights: w_l, one per level (L + 1 floats).
      mask: optional bool[batch], True for valid rows; passed on to `base_loss`.

    Returns:
      (total, per_level): f32[] the weighted sum, and f32[L + 1] the unweighted L_base of each level.
    """
    if len(weights) != hierarchy.num_levels:
        raise ValueError(
            f"weights has {len(weights)} entries but the hierarchy has {hierarchy.num_levels} levels; "
            "give one weight per level.")
    labels_per_level = lift_labels(labels, hierarchy.parents)
    per_level = jnp.stack([
        base_loss(embeddings, level_labels, level_proxies, mask=mask)
        for level_labels, level_proxies in zip(labels_per_level, hierarchy.proxies)
    ])
    total = jnp.sum(jnp.asarray(weights, jnp.float32) * per_level)
    return total, per_level
