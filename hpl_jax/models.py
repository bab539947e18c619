"""Backbones and the embedding head (METHOD.md, "Training recipe": Model).

The backbones are written to load PyTorch ImageNet weights without numerical drift: every padding is
explicit and equal to PyTorch's (never 'SAME', which pads stride-2 layers differently), convolution kernels
are HWIO views of PyTorch's OIHW tensors, and BatchNorm has PyTorch's epsilon and momentum.
- ResNet-18/34/50 in the torchvision v1.5 layout (stride on the bottleneck's 3x3 convolution), no conv bias.
- BN-Inception in the layout of the widely used PyTorch port (Cadene `pretrainedmodels.bninception`, the
  backbone of the official Proxy-Anchor code): conv bias, ceil-mode max pooling, layer names kept verbatim.

Inputs are f32[batch, height, width, 3] NHWC, already normalised as the weights expect.

How a convolution is computed is `conv_impl` (config.model.conv_impl); every implementation has the same
parameters (flax `nn.Conv`'s tree: 'kernel' HWIO, 'bias'), so a checkpoint of one runs on another:
- 'xla': XLA's convolution op (cuDNN on GPUs, the MXU on TPUs).
- 'im2col': every convolution as shifted slices of the padded input, concatenated into patches, times the
  kernel in one matmul (`im2col_conv`).
- 'auto': 'xla' on GPUs and TPUs; on CPUs `cpu_conv`, which takes im2col only where XLA:CPU's convolution
  is slow (a feature map smaller than the kernel) and XLA's convolution elsewhere.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

BACKBONES = ("resnet18", "resnet34", "resnet50", "bn_inception")
POOLINGS = ("avg_max", "avg")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONV_IMPLS = ("auto", "xla", "im2col")

# PyTorch's BatchNorm2d defaults (eps 1e-5, momentum 0.1); Flax's momentum weighs the old running value.
# One difference stays: PyTorch's running variance averages the unbiased batch variance, Flax's the biased.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'), the init torchvision gives its convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_channels(channels: int, width: float) -> int:
    """Channel count of a layer under the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def batch_norm(axis_name: Optional[str], dtype: Any, name: str, momentum: float = BN_MOMENTUM) -> nn.BatchNorm:
    """BatchNorm with PyTorch's epsilon; batch statistics averaged over the pmap axis `axis_name` if set.

    Whether it normalises with batch or running statistics is chosen per call (`use_running_average`).
    """
    return nn.BatchNorm(
        momentum=momentum,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        name=name,
    )


# Flax's nn.Conv calls its conv function with these layouts (NHWC inputs, HWIO kernels, NHWC outputs).
NHWC_DIMENSION_NUMBERS = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                                  out_spec=(0, 3, 1, 2))


def im2col_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count: int = 1, precision=None) -> jax.Array:
    """`lax.conv_general_dilated` as patches + one matmul (im2col), for the convolutions of this module.

    Each of the kh * kw kernel taps reads a strided slice of the zero-padded input; the slices, concatenated
    along channels in (tap row, tap column, channel) order, are the HWIO kernel's rows. XLA:CPU runs the
    matmul (and the matmuls of its gradient) at several times the speed of its convolution kernels on small
    feature maps. The patches hold kh * kw copies of the input, kept for the backward pass.

    Args:
      lhs: dtype[batch, H, W, C_in].
      rhs: dtype[kh, kw, C_in, C_out].
      window_strides: (sh, sw); padding: ((top, bottom), (left, right)), explicit.

    Returns:
      dtype[batch, (H + top + bottom - kh) // sh + 1, (W + left + right - kw) // sw + 1, C_out].
    """
    # Only what the backbones use; anything else is a bug of ours, not a user's setting.
    assert dimension_numbers == NHWC_DIMENSION_NUMBERS, dimension_numbers
    assert feature_group_count == 1 and not isinstance(padding, str), (feature_group_count, padding)
    assert all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
    kh, kw, c_in, c_out = rhs.shape
    (sh, sw), ((top, bottom), (left, right)) = window_strides, padding
    padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    batch, height, width, _ = padded.shape
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    taps = [lax.slice(padded, (0, i, j, 0), (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c_in),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return lax.dot_general(patches, rhs.reshape(kh * kw * c_in, c_out), (((3,), (0,)), ((), ())),
                           precision=precision)


def smaller_than_kernel(lhs_shape, rhs_shape, window_strides, padding) -> bool:
    """Whether the input or output feature map of a convolution is smaller than its kernel in a dimension.

    That is where XLA:CPU's convolution leaves its fast path: a 3x3 convolution of 2x2 or 1x1 maps (ResNet-18's
    layer4 at 64 px, layer3 and layer4 at 32 px), or the input gradient of a stride-2 one onto them, ran at
    0.7-3.5 GFLOP/s on this project's 2-core CPU against 35-100 on maps of 3x3 and up, and im2col at 60-120
    (issue 25; the step's profile: hpl_jax.benchmarks.cpu_vs_torch).
    """
    for axis in range(2):
        kernel = rhs_shape[axis]
        size = lhs_shape[1 + axis]
        out = (size + sum(padding[axis]) - kernel) // window_strides[axis] + 1
        if min(size, out) < kernel:
            return True
    return False


def cpu_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **kwargs) -> jax.Array:
    """conv_impl 'auto' on a CPU: `im2col_conv` where the feature maps are smaller than the kernel,
    XLA's convolution elsewhere (faster there: it does not copy the input kh * kw times)."""
    small = smaller_than_kernel(lhs.shape, rhs.shape, window_strides, padding)
    return (im2col_conv if small else lax.conv_general_dilated)(lhs, rhs, window_strides, padding, **kwargs)


CONV_FUNCTIONS = {"xla": lax.conv_general_dilated, "im2col": im2col_conv, "cpu": cpu_conv}


def resolve_conv_impl(conv_impl: str, platform: Optional[str] = None) -> str:
    """The key of CONV_FUNCTIONS that `conv_impl` means on `platform` (default: JAX's default backend).

    'auto' is 'cpu' on a CPU and 'xla' on anything else (GPU, TPU), where XLA's convolutions are fast.
    """
    if conv_impl != "auto":
        return conv_impl
    return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"


def conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str,
         use_bias: bool = False, conv_impl: str = "xla") -> nn.Conv:
    """A square convolution padded like PyTorch's Conv2d(padding=padding), computed by CONV_FUNCTIONS[conv_impl].

    Always flax's nn.Conv, so its parameters (and checkpoints) are the same under every implementation.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        conv_general_dilated=CONV_FUNCTIONS[conv_impl],
        name=name,
    )


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
        # Flax pads max pooling with -inf, as PyTorch's MaxPool2d(3, 2, padding=1) does.
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
