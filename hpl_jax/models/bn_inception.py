"""BN-Inception in the layout of the widely used PyTorch port (Cadene `pretrainedmodels.bninception`, the
backbone of the official Proxy-Anchor code): conv bias, ceil-mode max pooling, layer names kept verbatim.

Inputs are f32[batch, height, width, 3] NHWC, already normalised as the weights expect.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hpl_jax.models.layers import batch_norm, conv, scaled_channels


def max_pool_ceil_mode(x: jax.Array, window: int, stride: int) -> jax.Array:
    """PyTorch's MaxPool2d(window, stride, padding=0, ceil_mode=True) on dtype[batch, H, W, C].

    Ceil mode adds one more output where a last, partial window still starts inside the input; the
    window's missing part is padded with -inf at the bottom/right only.
    """
    padding = []
    for size in x.shape[1:3]:
        outputs = -(-(size - window) // stride) + 1
        if (outputs - 1) * stride >= size:
            outputs -= 1
        padding.append((0, max(0, (outputs - 1) * stride + window - size)))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


# Inception modules of BN-Inception: (name, 1x1, 3x3 reduce, 3x3, double-3x3 reduce, double-3x3,
# pool branch, pool projection, stride). 'avg' = 3x3 average pool stride 1 pad 1 (zeros counted);
# 'max' = 3x3 max pool stride 1 pad 1; 'max_s2' = 3x3 ceil-mode max pool stride 2, not projected.
INCEPTION_MODULES = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max_s2", 0, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 0, 128, 192, 192, 256, "max_s2", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)


# The PyTorch port declares BatchNorm2d(momentum=0.9): the running statistics keep 10% of the old value.
BN_INCEPTION_MOMENTUM = 0.1


class BNInception(nn.Module):
    """BN-Inception (Ioffe & Szegedy 2015) without its classifier, named like the PyTorch port.

    Every convolution has a bias and is followed by BatchNorm and ReLU. Returns the final feature map
    dtype[batch, h, w, 1024 * width] (7 x 7 for 224 x 224 images).
    """

    width: float = 1.0
    dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_impl: str = "xla"  # a key of CONV_FUNCTIONS

    def conv_bn_relu(self, x: jax.Array, use_running_average: bool, name: str, channels: int,
                     kernel: int = 1, stride: int = 1, padding: int = 0) -> jax.Array:
        x = conv(scaled_channels(channels, self.width), kernel, stride, padding, self.dtype, name,
                 use_bias=True, conv_impl=self.conv_impl)(x)
        x = batch_norm(self.bn_axis_name, self.dtype, name + "_bn", momentum=BN_INCEPTION_MOMENTUM)(
            x, use_running_average=use_running_average)
        return nn.relu(x)

    def inception(self, x: jax.Array, use_running_average: bool, name: str, c1x1: int, c3x3_reduce: int,
                  c3x3: int, cdouble_reduce: int, cdouble: int, pool: str, cpool_proj: int,
                  stride: int) -> jax.Array:
        def conv_bn_relu(y, suffix, *args):
            return self.conv_bn_relu(y, use_running_average, f"inception_{name}_{suffix}", *args)

        branches = []
        if c1x1:
            branches.append(conv_bn_relu(x, "1x1", c1x1))
        y = conv_bn_relu(x, "3x3_reduce", c3x3_reduce)
        branches.append(conv_bn_relu(y, "3x3", c3x3, 3, stride, 1))
        y = conv_bn_relu(x, "double_3x3_reduce", cdouble_reduce)
        y = conv_bn_relu(y, "double_3x3_1", cdouble, 3, 1, 1)
        branches.append(conv_bn_relu(y, "double_3x3_2", cdouble, 3, stride, 1))
        if pool == "avg":
            y = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
        elif pool == "max":
            y = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            y = max_pool_ceil_mode(x, 3, 2)
        branches.append(conv_bn_relu(y, "pool_proj", cpool_proj) if cpool_proj else y)
        spatial_shapes = {branch.shape[1:3] for branch in branches}
        if len(spatial_shapes) != 1:
            raise ValueError(
                f"BN-Inception's branches at inception_{name} disagree in size ({sorted(spatial_shapes)}) "
                "for this image size; use an image_size whose feature maps are even before each stride-2 "
                "module, such as 224 or 227 (as in the PyTorch port)."
            )
        return jnp.concatenate(branches, axis=-1)

    @nn.compact
    def __call__(self, images: jax.Array, use_running_average: bool) -> jax.Array:
        x = images.astype(self.dtype)
        x = self.conv_bn_relu(x, use_running_average, "conv1_7x7_s2", 64, 7, 2, 3)
        x = max_pool_ceil_mode(x, 3, 2)
        x = self.conv_bn_relu(x, use_running_average, "conv2_3x3_reduce", 64)
        x = self.conv_bn_relu(x, use_running_average, "conv2_3x3", 192, 3, 1, 1)
        x = max_pool_ceil_mode(x, 3, 2)
        for module in INCEPTION_MODULES:
            x = self.inception(x, use_running_average, *module)
        return x
