"""The embedding network (METHOD.md, "Training recipe": Model): backbone, pooling, linear layer, L2 normalisation.

`create_model(config.model)` builds it; `Embedder.features` gives the pooled backbone features (what
pretraining and `method='features'` read).
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


BACKBONES = ("resnet18", "resnet34", "resnet50", "bn_inception")


POOLINGS = ("avg_max", "avg")


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


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of f32[batch, dim] scaled to unit norm (1e-12 inside the root, as the official code)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


class Embedder(nn.Module):
    """Image -> L2-normalised embedding: backbone, avg+max (or avg) pooling, linear layer (METHOD.md, Model).

    Params tree: {'backbone': {...}, 'embedding': {'kernel', 'bias'}}; batch_stats: {'backbone': {...}}.
    BatchNorm uses running statistics when `not train or bn_frozen` (frozen BN still has trainable
    scale/bias; whether they train is the optimiser's choice). With `bn_axis_name`, training-mode batch
    statistics are averaged over that pmap axis (synchronised BN).
    """

    backbone: str
    embedding_dim: int
    width: float = 1.0
    dtype: Any = jnp.float32
    bn_frozen: bool = False
    bn_axis_name: Optional[str] = None
    pooling: str = "avg_max"
    # One of CONV_IMPLS or a key of CONV_FUNCTIONS; 'auto' is resolved on JAX's default backend.
    conv_impl: str = "auto"

    def setup(self):
        conv_impl = resolve_conv_impl(self.conv_impl)
        if self.backbone == "bn_inception":
            self.backbone_net = BNInception(width=self.width, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                                            conv_impl=conv_impl, name="backbone")
        else:
            self.backbone_net = ResNet(arch=self.backbone, width=self.width, dtype=self.dtype,
                                       bn_axis_name=self.bn_axis_name, conv_impl=conv_impl, name="backbone")
        # PyTorch's kaiming_normal_(mode='fan_out') on the d x F weight: std sqrt(2 / d); bias 0.
        self.embedding = nn.Dense(
            self.embedding_dim,
            kernel_init=nn.initializers.normal(stddev=math.sqrt(2.0 / self.embedding_dim)),
            bias_init=nn.initializers.zeros,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
        )

    def features(self, images: jax.Array, train: bool) -> jax.Array:
        """Pooled backbone features: f32[batch, H, W, 3] -> f32[batch, channels]."""
        return pooled_features(self.backbone_net(images, use_running_average=not train or self.bn_frozen),
                               self.pooling)

    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """Embeddings: f32[batch, H, W, 3] -> f32[batch, embedding_dim], unit norm."""
        return l2_normalize(self.embedding(self.features(images, train)))


def create_model(config_model: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None,
                 platform: Optional[str] = None) -> Embedder:
    """The Embedder of `config.model` (fields: backbone, width, embedding_dim, bn_frozen, dtype, pooling,
    conv_impl).

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
    if config_model.pooling not in POOLINGS:
        raise ValueError(f"config.model.pooling is {config_model.pooling!r}; use one of {POOLINGS}.")
    if not config_model.embedding_dim > 0:
        raise ValueError(f"config.model.embedding_dim is {config_model.embedding_dim}; use a positive size.")
    if config_model.conv_impl not in CONV_IMPLS:
        raise ValueError(f"config.model.conv_impl is {config_model.conv_impl!r}; use one of {CONV_IMPLS}.")
    return Embedder(
        backbone=config_model.backbone,
        embedding_dim=config_model.embedding_dim,
        width=config_model.width,
        dtype=DTYPES[config_model.dtype],
        bn_frozen=config_model.bn_frozen,
        bn_axis_name=bn_axis_name,
        pooling=config_model.pooling,
        conv_impl=resolve_conv_impl(config_model.conv_impl, platform),
    )
