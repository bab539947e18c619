"""ResNet-18/34/50 in the torchvision v1.5 layout (stride on the bottleneck's 3x3 convolution), no conv bias.

Written to load torchvision's ImageNet weights without numerical drift (hpl_jax/models/layers.py says how).
Inputs are f32[batch, height, width, 3] NHWC, already normalised as the weights expect.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hpl_jax.models.layers import batch_norm, conv, max_pool_3x3_stride_2, scaled_channels


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions and a projection shortcut where the shape changes."""

    channels: int
    stride: int
    bn_axis_name: Optional[str]
    dtype: Any
    conv_impl: str = "xla"  # a key of CONV_FUNCTIONS

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        def norm(name, y):
            return batch_norm(self.bn_axis_name, self.dtype, name)(y, use_running_average=use_running_average)

        y = conv(self.channels, 3, self.stride, 1, self.dtype, "conv1", conv_impl=self.conv_impl)(x)
        y = nn.relu(norm("bn1", y))
        y = conv(self.channels, 3, 1, 1, self.dtype, "conv2", conv_impl=self.conv_impl)(y)
        y = norm("bn2", y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = conv(self.channels, 1, self.stride, 0, self.dtype, "downsample_conv", conv_impl=self.conv_impl)(x)
            x = norm("downsample_bn", x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck v1.5: 1x1, 3x3 (carrying the stride), 1x1 to 4x channels."""

    channels: int
    stride: int
    bn_axis_name: Optional[str]
    dtype: Any
    conv_impl: str = "xla"  # a key of CONV_FUNCTIONS

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        def norm(name, y):
            return batch_norm(self.bn_axis_name, self.dtype, name)(y, use_running_average=use_running_average)

        out_channels = 4 * self.channels
        y = conv(self.channels, 1, 1, 0, self.dtype, "conv1", conv_impl=self.conv_impl)(x)
        y = nn.relu(norm("bn1", y))
        y = conv(self.channels, 3, self.stride, 1, self.dtype, "conv2", conv_impl=self.conv_impl)(y)
        y = nn.relu(norm("bn2", y))
        y = conv(out_channels, 1, 1, 0, self.dtype, "conv3", conv_impl=self.conv_impl)(y)
        y = norm("bn3", y)
        if self.stride != 1 or x.shape[-1] != out_channels:
            x = conv(out_channels, 1, self.stride, 0, self.dtype, "downsample_conv", conv_impl=self.conv_impl)(x)
            x = norm("downsample_bn", x)
        return nn.relu(x + y)


RESNET_LAYOUTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet without its classifier; module names are torchvision's ('layer1_0' for 'layer1.0').

    Returns the final feature map: dtype[batch, ceil(H/32), ceil(W/32), channels].
    """

    arch: str
    width: float = 1.0
    dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_impl: str = "xla"  # a key of CONV_FUNCTIONS

    @nn.compact
    def __call__(self, images: jax.Array, use_running_average: bool) -> jax.Array:
        block_cls, blocks_per_stage = RESNET_LAYOUTS[self.arch]
        x = images.astype(self.dtype)
        x = conv(scaled_channels(64, self.width), 7, 2, 3, self.dtype, "conv1", conv_impl=self.conv_impl)(x)
        x = batch_norm(self.bn_axis_name, self.dtype, "bn1")(x, use_running_average=use_running_average)
        x = nn.relu(x)
        # PyTorch's MaxPool2d(3, 2, padding=1), padded with -inf. On a CPU (conv_impl 'cpu', i.e. 'auto' there, or
        # 'onednn') its gradient is routed by tap index: XLA:CPU's gradient of reduce_window is 10x slower.
        if self.conv_impl in ("cpu", "onednn"):
            x = max_pool_3x3_stride_2(x)
        else:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(blocks_per_stage):
            for index in range(num_blocks):
                x = block_cls(
                    channels=scaled_channels(64 * 2**stage, self.width),
                    stride=2 if stage > 0 and index == 0 else 1,
                    bn_axis_name=self.bn_axis_name,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"layer{stage + 1}_{index}",
                )(x, use_running_average)
        return x
