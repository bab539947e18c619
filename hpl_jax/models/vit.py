"""Vision Transformers ViT-Ti/16, ViT-S/16, ViT-B/16 in timm's layout (`vit_{tiny,small,base}_patch16_224`).

Written to load timm's weights (hpl_jax/models/convert.py) and give timm's features: non-overlapping p x p
patches projected linearly, a class token prepended, learned absolute position embeddings added, pre-norm blocks
(LayerNorm eps 1e-6; multi-head self-attention with a qkv bias; an MLP of 4 x width with the exact, erf GELU), a
final LayerNorm. No dropout and no drop-path (timm's defaults, which HIER's and Hyp-ViT's fine-tuning keep), so
training and evaluation run the same function. Module names are timm's ('blocks_3' for 'blocks.3').

Position embeddings are learned for one grid of patches (the image side over the patch size at init). Weights
learned at another size are resampled to the configured grid by `resample_pos_embed`, as timm does when it loads
them into a model of another image size, so converted weights give timm's features at any size.

Under `dtype` bfloat16 the matmuls run in bfloat16 while the parameters, the residual stream, the LayerNorm
statistics and the attention softmax stay float32 (what PyTorch's autocast gives timm's ViT).
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hpl_jax.models.layers import scaled_channels

# Width (channels), depth (blocks), attention heads; timm's vit_{tiny,small,base}_patch16_224.
VIT_LAYOUTS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
MLP_RATIO = 4
LAYER_NORM_EPSILON = 1e-6

# timm's init: Linear kernels truncated normal (std 0.02), biases 0; the patch projection PyTorch's Conv2d default,
# uniform within 1 / sqrt(fan_in); the class token normal (std 1e-6); position embeddings truncated normal (0.02).
dense_kernel_init = nn.initializers.truncated_normal(0.02)
patch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def vit_width(arch: str, width: float = 1.0) -> int:
    """Channels of the token features of `arch` under the width multiplier (the heads stay as published)."""
    return scaled_channels(VIT_LAYOUTS[arch][0], width)


def resample_pos_embed(pos_embed: jax.Array, grid: Tuple[int, int]) -> jax.Array:
    """Position embeddings of a square grid of patches resampled to `grid`, as timm's `resample_abs_pos_embed`:
    the class token's row kept, the patch rows resized bicubically with antialiasing (PyTorch's
    `interpolate(mode='bicubic', antialias=True)`: the Keys cubic with a = -0.5, widened when shrinking).

    Args:
      pos_embed: f32[1, 1 + side * side, dim].
      grid: (rows, columns) of the new grid.

    Returns:
      f32[1, 1 + rows * columns, dim]; `pos_embed` itself where the grid is unchanged.
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if (side, side) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, side, side, dim)
    resized = jax.image.resize(patches, (1, *grid, dim), method="bicubic", antialias=True)
    return jnp.concatenate([pos_embed[:, :1], resized.reshape(1, -1, dim)], axis=1)


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_kernel_init,
                    bias_init=nn.initializers.zeros, name=name)


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    """timm's LayerNorm (eps 1e-6); flax computes its statistics in float32 whatever `dtype` is."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


class PatchEmbedding(nn.Module):
    """timm's patch projection, a p x p convolution of stride p, as what it is: non-overlapping patches times the
    kernel in one matmul (on every platform; `model.conv_impl` does not apply).

    Params: kernel f32[p, p, 3, dim] (the convolution's HWIO kernel), bias f32[dim].
    """

    patch_size: int
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """dtype[batch, H, W, C] -> dtype[batch, H // p, W // p, dim]."""
        p = self.patch_size
        batch, height, width, channels = images.shape
        kernel = self.param("kernel", patch_kernel_init, (p, p, channels, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        rows, cols = height // p, width // p
        # The convolution leaves out the last H mod p rows and W mod p columns; patch features in the kernel's
        # (row, column, channel) order.
        patches = images[:, :rows * p, :cols * p].reshape(batch, rows, p, cols, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, p * p * channels)
        projected = patches.astype(self.dtype) @ kernel.reshape(p * p * channels, self.features).astype(self.dtype)
        return projected + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(head_dim)) v per head, heads concatenated, projected."""

    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, tokens, dim] -> dtype[batch, tokens, dim]."""
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        # timm's qkv output is laid out (q|k|v, head, head_dim).
        qkv = dense(3 * dim, self.dtype, "qkv")(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
        return dense(dim, self.dtype, "proj")(attended)


class Mlp(nn.Module):
    """fc1 (to 4 x dim), exact GELU, fc2."""

    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        hidden = nn.gelu(dense(MLP_RATIO * dim, self.dtype, "fc1")(x), approximate=False)
        return dense(dim, self.dtype, "fc2")(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)); the sums in float32."""

    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.num_heads, self.dtype, name="attn")(layer_norm(self.dtype, "norm1")(x))
        return x + Mlp(self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x))


class VisionTransformer(nn.Module):
    """ViT without its classifier: images f32[batch, H, W, 3] (normalised as the weights expect) -> the tokens
    after the final LayerNorm, f32[batch, 1 + (H // p) * (W // p), dim], the class token first.

    Params: patch_embed, cls_token f32[1, 1, dim], pos_embed f32[1, 1 + rows * cols, dim] (the grid of the image
    it was initialised with), blocks_0 .. blocks_11, norm.
    """

    arch: str
    patch_size: int = 16
    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _, depth, num_heads = VIT_LAYOUTS[self.arch]
        dim = vit_width(self.arch, self.width)
        patches = PatchEmbedding(self.patch_size, dim, self.dtype, name="patch_embed")(images.astype(self.dtype))
        batch, rows, cols, _ = patches.shape
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), jnp.float32)
        pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + rows * cols, dim),
                               jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, dim)),
                             patches.reshape(batch, rows * cols, dim).astype(jnp.float32)], axis=1)
        x = x + pos_embed
        for index in range(depth):
            x = Block(num_heads, self.dtype, name=f"blocks_{index}")(x)
        return layer_norm(jnp.float32, "norm")(x)
