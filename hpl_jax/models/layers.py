"""The layers the backbones share: convolutions (and how they are computed), BatchNorm, the width multiplier.

The backbones (resnet.py, bn_inception.py) are written to load PyTorch ImageNet weights without numerical drift: every padding is
explicit and equal to PyTorch's (never 'SAME', which pads stride-2 layers differently), convolution kernels
are HWIO views of PyTorch's OIHW tensors, and BatchNorm has PyTorch's epsilon and momentum.

How a convolution is computed is `conv_impl` (config.model.conv_impl); every implementation has the same
parameters (flax `nn.Conv`'s tree: 'kernel' HWIO, 'bias'), so a checkpoint of one runs on another:
- 'xla': XLA's convolution op (cuDNN on GPUs, the MXU on TPUs).
- 'im2col': every convolution as shifted slices of the padded input, concatenated into patches, times the
  kernel in one matmul (`im2col_conv`).
- 'onednn': every convolution and its gradients computed by oneDNN, through XLA FFI custom calls (CPU only;
  onednn.py, which compiles the library on first use).
- 'auto': 'xla' on GPUs and TPUs; on CPUs `cpu_conv`, which picks per convolution what was measured fastest
  there (`cpu_conv_choice`): im2col where a feature map is smaller than the kernel and for 1x1 kernels, oneDNN for
  the stem's 7x7 kernel and 3x3 kernels of 64 channels or more, XLA's op elsewhere (and where oneDNN is
  unavailable; `onednn.status()` says why).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hpl_jax.models import onednn


CONV_IMPLS = ("auto", "xla", "im2col", "onednn")

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


def _check_backbone_conv(padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> None:
    # Only what the backbones use; anything else is a bug of ours, not a user's setting.
    assert dimension_numbers == NHWC_DIMENSION_NUMBERS, dimension_numbers
    assert feature_group_count == 1 and not isinstance(padding, str), (feature_group_count, padding)
    assert all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))


def im2col_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count: int = 1, precision=None) -> jax.Array:
    """`lax.conv_general_dilated` as patches + one matmul (im2col), for the convolutions of this module.

    Each of the kh * kw kernel taps reads a strided slice of the zero-padded input; the slices, concatenated
    along channels in (tap row, tap column, channel) order, are the HWIO kernel's rows. XLA:CPU runs the
    matmul (and the matmuls of its gradient) at several times the speed of its convolution kernels on small
    feature maps (docs/benchmarks.md, section "CPU convolutions"). The patches hold kh * kw copies of the input,
    kept for the backward pass.

    Args:
      lhs: dtype[batch, H, W, C_in].
      rhs: dtype[kh, kw, C_in, C_out].
      window_strides: (sh, sw); padding: ((top, bottom), (left, right)), explicit.

    Returns:
      dtype[batch, (H + top + bottom - kh) // sh + 1, (W + left + right - kw) // sw + 1, C_out].
    """
    _check_backbone_conv(padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
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
    layer4 at 64 px, layer3 and layer4 at 32 px), or the input gradient of a stride-2 one onto them (issue 25;
    measured in docs/benchmarks.md, section "CPU convolutions"; the step's profile: hpl_jax.benchmarks.cpu_vs_torch).
    """
    for axis in range(2):
        kernel = rhs_shape[axis]
        size = lhs_shape[1 + axis]
        out = (size + sum(padding[axis]) - kernel) // window_strides[axis] + 1
        if min(size, out) < kernel:
            return True
    return False


def onednn_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count: int = 1, precision=None) -> jax.Array:
    """`lax.conv_general_dilated` computed by oneDNN (`onednn.onednn_conv`), for the convolutions of this module:
    lhs f32[batch, H, W, C_in], rhs f32[kh, kw, C_in, C_out], explicit padding, as `im2col_conv`."""
    _check_backbone_conv(padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    return onednn.onednn_conv(lhs, rhs, window_strides, padding)


def cpu_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **kwargs) -> jax.Array:
    """conv_impl 'auto' on a CPU: per convolution, what `cpu_conv_choice` says is fastest there."""
    choice = cpu_conv_choice(lhs.shape, rhs.shape, window_strides, padding, lhs.dtype, rhs.dtype)
    if choice == "im2col":
        return im2col_conv(lhs, rhs, window_strides, padding, **kwargs)
    if choice == "onednn":
        return onednn_conv(lhs, rhs, window_strides, padding, **kwargs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def cpu_conv_choice(lhs_shape, rhs_shape, window_strides, padding, lhs_dtype=jnp.float32,
                    rhs_dtype=jnp.float32) -> str:
    """Which of 'im2col', 'onednn' and 'xla' computes a convolution under conv_impl 'auto' on a CPU, by what was
    measured fastest there (`python -m hpl_jax.benchmarks.cpu_convolutions`; docs/benchmarks.md, "CPU
    convolutions"; two 2-core machines, an earlier one and an AMD EPYC with AVX2): im2col where a feature map is
    smaller than the kernel and for 1x1 kernels (a strided slice and one matmul: 0.46-0.96x XLA's time on every 1x1
    of ResNet-18 at widths 1 and 0.25 on the EPYC, 0.73x on the earlier machine's one figure); oneDNN where
    `onednn_is_faster` (float32 only, and where oneDNN is available); XLA's op elsewhere."""
    if smaller_than_kernel(lhs_shape, rhs_shape, window_strides, padding) or tuple(rhs_shape[:2]) == (1, 1):
        return "im2col"
    if (onednn_is_faster(rhs_shape) and jnp.dtype(lhs_dtype) == jnp.dtype(rhs_dtype) == jnp.float32
            and onednn.status().available):
        return "onednn"
    return "xla"


def onednn_is_faster(kernel_shape) -> bool:
    """Whether oneDNN's convolution (forward and both gradients) beat XLA:CPU's on a kernel of this shape
    [kh, kw, C_in, C_out], measured on ResNet-18's convolutions at widths 1 and 0.25, batch 64
    (`python -m hpl_jax.benchmarks.cpu_convolutions`; docs/benchmarks.md, "CPU convolutions"), on the earlier machine
    and the EPYC: kernels larger than 3x3 (the stem: 0.51-0.56x XLA's time; 0.27-0.62x) and 3x3 kernels with 64
    channels or more in and out (0.36-0.93x; 0.40-1.18x); not 3x3 kernels with 16-32 channels (1.03-1.13x;
    0.95-1.44x) nor 1x1 kernels (1.5-2.8x; 0.77-6.7x), which `cpu_conv_choice` gives to im2col."""
    kh, kw, c_in, c_out = kernel_shape
    if kh == kw == 1:
        return False
    return max(kh, kw) > 3 or min(c_in, c_out) >= 64


CONV_FUNCTIONS = {"xla": lax.conv_general_dilated, "im2col": im2col_conv, "onednn": onednn_conv, "cpu": cpu_conv}


def resolve_conv_impl(conv_impl: str, platform: Optional[str] = None) -> str:
    """The key of CONV_FUNCTIONS that `conv_impl` means on `platform` (default: JAX's default backend).

    'auto' is 'cpu' on a CPU and 'xla' on anything else (GPU, TPU), where XLA's convolutions are fast.
    """
    if conv_impl != "auto":
        return conv_impl
    return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"


def describe_conv_impl(conv_impl: str) -> str:
    """What a resolved conv_impl (a key of CONV_FUNCTIONS) computes the convolutions with, for the run's log; on a
    CPU it builds and loads oneDNN if that has not happened yet."""
    if conv_impl == "xla":
        return "XLA's convolution op"
    if conv_impl == "im2col":
        return "patches + one matmul (im2col)"
    state = onednn.status()
    if conv_impl == "onednn":
        return f"oneDNN: {state.detail}"
    onednn_part = (f"oneDNN for kernels larger than 3x3 and 3x3 kernels of >= 64 channels ({state.detail})"
                   if state.available else f"XLA's op for the others (oneDNN unavailable: {state.detail})")
    xla_part = ", XLA's op for the others" if state.available else ""
    return f"im2col where a feature map is smaller than the kernel and for 1x1 kernels, {onednn_part}{xla_part}"


def _pool_taps(x: jax.Array) -> list:
    """The 9 taps of a 3x3, stride-2 window over x padded by one with -inf (PyTorch's MaxPool2d(3, 2, 1)), in
    (row, column) order: 9 x dtype[batch, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    batch, height, width, channels = x.shape
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    return [lax.slice(padded, (0, i, j, 0), (batch, i + 2 * out_h - 1, j + 2 * out_w - 1, channels), (1, 2, 2, 1))
            for i in range(3) for j in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_3x3_s2(x: jax.Array, shape) -> jax.Array:
    return _max_pool_with_taps(x, shape)[0]


def _max_pool_with_taps(x, shape):
    taps = _pool_taps(x)
    best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
    for tap_index, tap in enumerate(taps[1:], 1):
        better = tap > best  # on a tie the first tap in (row, column) order wins, as in PyTorch
        best, index = jnp.where(better, tap, best), jnp.where(better, jnp.int8(tap_index), index)
    return best, index


def _max_pool_backward(shape, index, dy):
    # Padded input row r = 2 * out_row + i for tap row i: even rows receive taps 0 (same out_row) and 2 (the
    # previous), odd rows tap 1; columns alike. Each of the 4 (row, column) parities is a sum of shifted, masked
    # dy, and the 4 interleave into the padded input's gradient. XLA's own gradient of reduce_window
    # (select-and-scatter) took 96 of this pooling's 102 ms on a CPU (ResNet-18's stem, 64 px, batch 64).
    _, height, width, _ = shape
    routed = [jnp.where(index == t, dy, jnp.zeros((), dy.dtype)) for t in range(9)]
    shift = {0: (0, 1), 1: (0, 1), 2: (1, 0)}  # (before, after) padding: tap 2 lands one row/column further

    def plane(rows, columns):
        return sum(jnp.pad(routed[3 * i + j], ((0, 0), shift[i], shift[j], (0, 0))) for i in rows for j in columns)
    even, odd = (0, 2), (1,)
    planes = jnp.stack([jnp.stack([plane(even, even), plane(even, odd)], axis=3),
                        jnp.stack([plane(odd, even), plane(odd, odd)], axis=3)], axis=2)
    batch, rows, _, columns, _, channels = planes.shape
    padded = planes.reshape(batch, 2 * rows, 2 * columns, channels)
    return (padded[:, 1:1 + height, 1:1 + width, :],)


def _max_pool_forward(x, shape):
    best, index = _max_pool_with_taps(x, shape)
    # The index goes through a reduction (index | 0), whose result XLA writes to memory: otherwise XLA fuses the
    # 9-tap comparison (and the BatchNorm and ReLU before it) into the gradient's fusion, recomputed for every tap
    # that reads it (ResNet-18's stem on a CPU: 35-38 ms, the step's largest fusion; 8.3 ms now). Not
    # `lax.optimization_barrier`, which XLA:CPU's passes remove, nor a max-reduction, which XLA:CPU hands to
    # YNNPACK (48 ms over int8).
    return best, lax.reduce(jnp.stack([index, jnp.zeros_like(index)]), jnp.int8(0), lax.bitwise_or, (0,))


_max_pool_3x3_s2.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    """PyTorch's MaxPool2d(3, stride=2, padding=1) (ResNet's stem): dtype[batch, H, W, C] ->
    dtype[batch, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]; the same values as flax's nn.max_pool with that window,
    its gradient routed by the index of each window's maximum (the first on a tie) as PyTorch's is. For CPUs,
    where it runs at several times the speed of XLA's gradient of nn.max_pool."""
    return _max_pool_3x3_s2(x, x.shape)


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


