"""The models layer: backbones, the embedding head, and the conversion of published weights.

  layers.py        convolutions (XLA, im2col or oneDNN: `model.conv_impl`), BatchNorm with PyTorch's constants,
                   width
  onednn.py        oneDNN's convolutions as XLA FFI custom calls on CPUs (built on first use)
  resnet.py        ResNet-18/34/50 (torchvision v1.5 layout)
  bn_inception.py  BN-Inception (the PyTorch port the official Proxy-Anchor code trains)
  vit.py           ViT-Ti/S/B (timm's vit_*_patch16_224 layout, any patch size), position embeddings resampled
                   as timm resamples them
  embedder.py      Embedder: backbone -> pooling -> linear -> L2 normalisation; `create_model(config.model)`
  convert.py       PyTorch and timm state dicts -> the orbax format `model.pretrained` loads (`python -m
                   hpl_jax.convert_weights`)

`from hpl_jax import models` gives the names below.
"""
from hpl_jax.models.bn_inception import BNInception, max_pool_ceil_mode
from hpl_jax.models.embedder import (BACKBONES, DTYPES, POOLINGS, VIT_BACKBONES, Embedder, backbone_poolings,
                                     create_model, l2_normalize, pooled_features, pooled_tokens, standardize)
from hpl_jax.models.layers import (CONV_FUNCTIONS, CONV_IMPLS, NHWC_DIMENSION_NUMBERS, batch_norm, conv,
                                   conv_kernel_init, cpu_conv, describe_conv_impl, im2col_conv, max_pool_3x3_stride_2,
                                   onednn_conv, resolve_conv_impl, scaled_channels, smaller_than_kernel)
from hpl_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from hpl_jax.models.vit import VIT_LAYOUTS, VisionTransformer, resample_pos_embed, vit_width

__all__ = [
    "BACKBONES", "BNInception", "BasicBlock", "Bottleneck", "CONV_FUNCTIONS", "CONV_IMPLS", "DTYPES", "Embedder",
    "NHWC_DIMENSION_NUMBERS", "POOLINGS", "ResNet", "VIT_BACKBONES", "VIT_LAYOUTS", "VisionTransformer",
    "backbone_poolings", "batch_norm", "conv", "conv_kernel_init", "cpu_conv", "create_model", "describe_conv_impl",
    "im2col_conv", "l2_normalize", "max_pool_3x3_stride_2", "max_pool_ceil_mode",
    "onednn_conv", "pooled_features", "pooled_tokens",
    "resample_pos_embed", "resolve_conv_impl", "scaled_channels", "smaller_than_kernel", "standardize", "vit_width",
]
