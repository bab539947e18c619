"""The embedding network (docs/method.md, "Training recipe": Model): backbone, pooling, linear layer, L2 normalisation.

`create_model(config.model)` builds it; `Embedder.features` gives the pooled backbone features (what
pretraining and `method='features'` read).

The CNNs (ResNets, BN-Inception) follow the official Proxy-Anchor head: average + max pooling (or average), a
linear layer, L2 normalisation. The ViTs follow the head of HIER's official code (hier/models/model.py, the
`use_lastnorm` head every ViT script of theirs turns on): the class token after the final LayerNorm, a LayerNorm
without scale and bias, a linear layer (orthogonal init, as HIER's and Hyp-ViT's), L2 normalisation.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hpl_jax.models.bn_inception import BNInception
from hpl_jax.models.layers import CONV_IMPLS, resolve_conv_impl
from hpl_jax.models.resnet import ResNet
from hpl_jax.models.vit import VIT_LAYOUTS, VisionTransformer, vit_width


VIT_BACKBONES = tuple(VIT_LAYOUTS)
BACKBONES = ("resnet18", "resnet34", "resnet50", "bn_inception") + VIT_BACKBONES


POOLINGS = ("avg_max", "avg", "token")


def backbone_poolings(backbone: str) -> tuple:
    """The poolings `backbone` has: a CNN pools its feature map ('avg_max', 'avg'), a ViT its tokens ('token': the
    class token; 'avg': the mean of the patch tokens, timm's global_pool='avg' as HIER's --pool avg gives it)."""
    return ("token", "avg") if backbone in VIT_BACKBONES else ("avg_max", "avg")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def pooled_features(feature_map: jax.Array, pooling: str = "avg_max") -> jax.Array:
    """'avg_max': global average pooling + global max pooling, summed (the official Proxy-Anchor head);
    'avg': global average pooling alone (the BN-Inception trunk of "A Metric Learning Reality Check").

    Args:
      feature_map: dtype[batch, h, w, channels].

    Returns:
      f32[batch, channels].
    """
    feature_map = feature_map.astype(jnp.float32)
    pooled = jnp.mean(feature_map, axis=(1, 2))
    return pooled + jnp.max(feature_map, axis=(1, 2)) if pooling == "avg_max" else pooled


def pooled_tokens(tokens: jax.Array, pooling: str = "token") -> jax.Array:
    """'token': the class token; 'avg': the mean of the patch tokens.

    Args:
      tokens: f32[batch, 1 + patches, dim], the class token first.

    Returns:
      f32[batch, dim].
    """
    return tokens[:, 0] if pooling == "token" else jnp.mean(tokens[:, 1:], axis=1)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of f32[batch, dim] scaled to unit norm (1e-12 inside the root, as the official code)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def standardize(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis: PyTorch's LayerNorm(elementwise_affine=False), eps 1e-5."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + epsilon)


class Embedder(nn.Module):
    """Image -> L2-normalised embedding: backbone, avg+max (or avg) pooling, linear layer (docs/method.md, Model); for a
    ViT: class token (or mean patch token), LayerNorm without affine, linear layer (HIER's head).

    Params tree: {'backbone': {...}, 'embedding': {'kernel', 'bias'}}; batch_stats: {'backbone': {...}} (none for a
    ViT). BatchNorm uses running statistics when `not train or bn_frozen` (frozen BN still has trainable
    scale/bias; whether they train is the optimiser's choice). With `bn_axis_name`, training-mode batch
    statistics are averaged over that pmap axis (synchronised BN). A ViT has no BatchNorm and no dropout: `train`,
    `bn_frozen`, `bn_axis_name` and `conv_impl` do not change it.
    """

    backbone: str
    embedding_dim: int
    width: float = 1.0
    dtype: Any = jnp.float32
    bn_frozen: bool = False
    bn_axis_name: Optional[str] = None
    # One of backbone_poolings(backbone); None = its first ('avg_max' for a CNN, 'token' for a ViT).
    pooling: Optional[str] = None
    # One of CONV_IMPLS or a key of CONV_FUNCTIONS; 'auto' is resolved on JAX's default backend.
    conv_impl: str = "auto"
    # Side of a ViT's square patches (pixels).
    patch_size: int = 16

    @property
    def is_vit(self) -> bool:
        return self.backbone in VIT_BACKBONES

    def setup(self):
        conv_impl = resolve_conv_impl(self.conv_impl)
        if self.is_vit:
            self.backbone_net = VisionTransformer(arch=self.backbone, patch_size=self.patch_size, width=self.width,
                                                  dtype=self.dtype, name="backbone")
        elif self.backbone == "bn_inception":
            self.backbone_net = BNInception(width=self.width, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                                            conv_impl=conv_impl, name="backbone")
        else:
            self.backbone_net = ResNet(arch=self.backbone, width=self.width, dtype=self.dtype,
                                       bn_axis_name=self.bn_axis_name, conv_impl=conv_impl, name="backbone")
        # CNNs: PyTorch's kaiming_normal_(mode='fan_out') on the d x F weight, std sqrt(2 / d) (Proxy-Anchor's);
        # ViTs: orthogonal (HIER's and Hyp-ViT's). Bias 0.
        kernel_init = (nn.initializers.orthogonal() if self.is_vit
                       else nn.initializers.normal(stddev=math.sqrt(2.0 / self.embedding_dim)))
        self.embedding = nn.Dense(
            self.embedding_dim,
            kernel_init=kernel_init,
            bias_init=nn.initializers.zeros,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
        )

    def features(self, images: jax.Array, train: bool) -> jax.Array:
        """Pooled backbone features: f32[batch, H, W, 3] -> f32[batch, channels]; for a ViT the final-norm class
        token (or mean patch token)."""
        pooling = self.pooling or backbone_poolings(self.backbone)[0]
        if self.is_vit:
            return pooled_tokens(self.backbone_net(images), pooling)
        return pooled_features(self.backbone_net(images, use_running_average=not train or self.bn_frozen), pooling)

    def __call__(self, images: jax.Array, train: bool, normalize: bool = True) -> jax.Array:
        """Embeddings: f32[batch, H, W, 3] -> f32[batch, embedding_dim], unit norm; with normalize=False the linear
        layer's output as it is (what HIER maps into its Poincare ball: core/hier.py)."""
        features = self.features(images, train)
        if self.is_vit:
            features = standardize(features)
        embeddings = self.embedding(features)
        return l2_normalize(embeddings) if normalize else embeddings


def create_model(config_model: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None,
                 platform: Optional[str] = None) -> Embedder:
    """The Embedder of `config.model` (fields: backbone, width, embedding_dim, bn_frozen, dtype, pooling,
    conv_impl, patch_size; a config without patch_size gets 16).

    `bn_axis_name` is the pmap axis to synchronise training-mode BatchNorm over (None outside pmap).
    `platform` ('cpu', 'gpu', 'tpu') is where the model will run, which resolves conv_impl 'auto'; None = JAX's
    default backend, where jit and pmap place it.
    """
    if config_model.backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone is {config_model.backbone!r}; use one of {BACKBONES}.")
    if config_model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype is {config_model.dtype!r}; use one of {tuple(DTYPES)}.")
    if not config_model.width > 0:
        raise ValueError(f"config.model.width is {config_model.width}; use a positive multiplier (1.0 = published).")
    poolings = backbone_poolings(config_model.backbone)
    if config_model.pooling not in poolings:
        raise ValueError(f"config.model.pooling is {config_model.pooling!r}, which {config_model.backbone} does not "
                         f"have; use one of {poolings}.")
    if not config_model.embedding_dim > 0:
        raise ValueError(f"config.model.embedding_dim is {config_model.embedding_dim}; use a positive size.")
    if config_model.conv_impl not in CONV_IMPLS:
        raise ValueError(f"config.model.conv_impl is {config_model.conv_impl!r}; use one of {CONV_IMPLS}.")
    patch_size = config_model.get("patch_size", 16)
    if not (isinstance(patch_size, int) and patch_size >= 1):
        raise ValueError(f"config.model.patch_size is {patch_size!r}; use an integer >= 1 (16 = published).")
    if config_model.backbone in VIT_BACKBONES:
        heads = VIT_LAYOUTS[config_model.backbone][2]
        if vit_width(config_model.backbone, config_model.width) % heads:
            raise ValueError(f"config.model.width {config_model.width} gives {config_model.backbone} "
                             f"{vit_width(config_model.backbone, config_model.width)} channels, not a multiple of "
                             f"its {heads} heads; choose another width.")
    return Embedder(
        backbone=config_model.backbone,
        embedding_dim=config_model.embedding_dim,
        width=config_model.width,
        dtype=DTYPES[config_model.dtype],
        bn_frozen=config_model.bn_frozen,
        bn_axis_name=bn_axis_name,
        pooling=config_model.pooling,
        conv_impl=resolve_conv_impl(config_model.conv_impl, platform),
        patch_size=patch_size,
    )
