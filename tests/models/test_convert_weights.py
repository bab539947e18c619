"""Converted PyTorch weights give the Flax backbones PyTorch's features (issues 6 and 32).

The CNN references are forward passes written here with torch.nn.functional (torchvision is not
importable beside the pinned torch build), over state dicts with the torchvision / BN-Inception-port key
names, random weights and random BatchNorm running statistics. The ViT references are timm's own models
(`pip install --no-deps timm`; skipped without it) with random weights.
"""
import importlib.util
import json
import math
import os
import re
import sys
from unittest import mock

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from hpl_jax import models  # noqa: E402
from hpl_jax.models import convert as convert_weights

TOLERANCE = 1e-4
IMAGE_SIZES = (224, 227)


def add_conv(state_dict, rng, name, in_channels, out_channels, kernel, bias=False):
    fan_in = in_channels * kernel * kernel
    state_dict[name + ".weight"] = rng.normal(0, math.sqrt(2.0 / fan_in), (out_channels, in_channels, kernel, kernel))
    if bias:
        state_dict[name + ".bias"] = rng.normal(0, 0.1, out_channels)


def add_batch_norm(state_dict, rng, name, channels, scale=(0.5, 1.0), counter=True):
    state_dict[name + ".weight"] = rng.uniform(*scale, channels)
    state_dict[name + ".bias"] = rng.normal(0, 0.1, channels)
    state_dict[name + ".running_mean"] = rng.normal(0, 0.2, channels)
    state_dict[name + ".running_var"] = rng.uniform(0.5, 2.0, channels)
    if counter:
        state_dict[name + ".num_batches_tracked"] = np.array(7, np.int64)


RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def resnet_state_dict(arch, seed=0):
    """torchvision's ResNet key names and OIHW shapes, random values; float32 NumPy arrays."""
    kind, blocks_per_stage = RESNETS[arch]
    expansion = 4 if kind == "bottleneck" else 1
    rng = np.random.default_rng(seed)
    state_dict = {}
    add_conv(state_dict, rng, "conv1", 3, 64, 7)
    add_batch_norm(state_dict, rng, "bn1", 64)
    in_channels = 64
    for stage, num_blocks in enumerate(blocks_per_stage):
        channels = 64 * 2**stage
        for index in range(num_blocks):
            prefix = f"layer{stage + 1}.{index}"
            if kind == "basic":
                add_conv(state_dict, rng, prefix + ".conv1", in_channels, channels, 3)
                add_conv(state_dict, rng, prefix + ".conv2", channels, channels, 3)
            else:
                add_conv(state_dict, rng, prefix + ".conv1", in_channels, channels, 1)
                add_conv(state_dict, rng, prefix + ".conv2", channels, channels, 3)
                add_conv(state_dict, rng, prefix + ".conv3", channels, channels * expansion, 1)
            for bn_index in range(1, 3 if kind == "basic" else 4):
                # The residual branch's last BatchNorm small, so the sum stays O(1) over 16 blocks.
                last = bn_index == (2 if kind == "basic" else 3)
                add_batch_norm(state_dict, rng, f"{prefix}.bn{bn_index}", channels * (expansion if last else 1),
                               scale=(0.1, 0.3) if last else (0.5, 1.0))
            stride = 2 if stage > 0 and index == 0 else 1
            if stride != 1 or in_channels != channels * expansion:
                add_conv(state_dict, rng, prefix + ".downsample.0", in_channels, channels * expansion, 1)
                add_batch_norm(state_dict, rng, prefix + ".downsample.1", channels * expansion)
            in_channels = channels * expansion
    state_dict["fc.weight"] = rng.normal(0, 0.01, (1000, in_channels))
    state_dict["fc.bias"] = np.zeros(1000)
    return {key: np.asarray(value, np.int64 if value.dtype == np.int64 else np.float32)
            for key, value in state_dict.items()}


def torch_batch_norm(x, state_dict, name):
    def vector(suffix):
        return torch.from_numpy(state_dict[f"{name}.{suffix}"]).flatten()
    return F.batch_norm(x, vector("running_mean"), vector("running_var"), vector("weight"), vector("bias"),
                        training=False, eps=1e-5)


def torch_conv(x, state_dict, name, stride=1, padding=0):
    bias = state_dict.get(name + ".bias")
    return F.conv2d(x, torch.from_numpy(state_dict[name + ".weight"]),
                    None if bias is None else torch.from_numpy(bias).flatten(), stride=stride, padding=padding)


def torch_pooled(x):
    """The Proxy-Anchor head's pooling: adaptive average + adaptive max pooling, summed, flattened."""
    return (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)


def torch_resnet_features(state_dict, arch, images):
    """torchvision ResNet forward (eval mode) up to the pooled features: NCHW -> [batch, channels]."""
    kind, blocks_per_stage = RESNETS[arch]
    x = F.relu(torch_batch_norm(torch_conv(images, state_dict, "conv1", 2, 3), state_dict, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, num_blocks in enumerate(blocks_per_stage):
        for index in range(num_blocks):
            prefix = f"layer{stage + 1}.{index}"
            stride = 2 if stage > 0 and index == 0 else 1

            def conv_bn(y, number, stride=1, padding=0):
                y = torch_conv(y, state_dict, f"{prefix}.conv{number}", stride, padding)
                return torch_batch_norm(y, state_dict, f"{prefix}.bn{number}")

            if kind == "basic":
                y = conv_bn(F.relu(conv_bn(x, 1, stride, 1)), 2, 1, 1)
            else:
                y = conv_bn(F.relu(conv_bn(F.relu(conv_bn(x, 1)), 2, stride, 1)), 3)
            if prefix + ".downsample.0.weight" in state_dict:
                x = torch_batch_norm(torch_conv(x, state_dict, prefix + ".downsample.0", stride),
                                     state_dict, prefix + ".downsample.1")
            x = F.relu(x + y)
    return torch_pooled(x)


# name, 1x1, 3x3 reduce, 3x3, double reduce, double 3x3, pool ('avg', 'max', 'max_s2'), pool proj, stride;
# the module definitions of pretrainedmodels/models/bninception.py.
INCEPTION = [
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1), ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max_s2", 0, 2), ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1), ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 96, 128, 192, 160, 192, "avg", 128, 1), ("4e", 0, 128, 192, 192, 256, "max_s2", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1), ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
]


def inception_layers():
    """(layer name, in channels, out channels, kernel, stride, padding) in forward order."""
    layers = [("conv1_7x7_s2", 3, 64, 7, 2, 3), ("conv2_3x3_reduce", 64, 64, 1, 1, 0),
              ("conv2_3x3", 64, 192, 3, 1, 1)]
    channels = 192
    for name, c1, c3r, c3, cdr, cd, pool, cp, stride in INCEPTION:
        p = f"inception_{name}_"
        if c1:
            layers.append((p + "1x1", channels, c1, 1, 1, 0))
        layers += [(p + "3x3_reduce", channels, c3r, 1, 1, 0), (p + "3x3", c3r, c3, 3, stride, 1),
                   (p + "double_3x3_reduce", channels, cdr, 1, 1, 0), (p + "double_3x3_1", cdr, cd, 3, 1, 1),
                   (p + "double_3x3_2", cd, cd, 3, stride, 1)]
        if cp:
            layers.append((p + "pool_proj", channels, cp, 1, 1, 0))
        channels = c1 + c3 + cd + (cp if cp else channels)
    return layers


def bn_inception_state_dict(seed=0):
    """The PyTorch port's key names; BatchNorm vectors stored [1, C] as in bn_inception-52deb4733.pth."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for name, in_channels, out_channels, kernel, _, _ in inception_layers():
        add_conv(state_dict, rng, name, in_channels, out_channels, kernel, bias=True)
        add_batch_norm(state_dict, rng, name + "_bn", out_channels, counter=False)
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            state_dict[f"{name}_bn.{suffix}"] = state_dict[f"{name}_bn.{suffix}"][None, :]
    state_dict["last_linear.weight"] = rng.normal(0, 0.01, (1000, 1024))
    state_dict["last_linear.bias"] = np.zeros(1000)
    return {key: np.asarray(value, np.float32) for key, value in state_dict.items()}


def torch_bn_inception_features(state_dict, images):
    """The PyTorch port's forward (eval mode; its in-place ReLUs make every block conv-BN-ReLU)."""
    layers = {name: (stride, padding) for name, _, _, _, stride, padding in inception_layers()}

    def conv_bn_relu(x, name):
        x = torch_conv(x, state_dict, name, *layers[name])
        return F.relu(torch_batch_norm(x, state_dict, name + "_bn"))

    x = F.max_pool2d(conv_bn_relu(images, "conv1_7x7_s2"), (3, 3), stride=(2, 2), ceil_mode=True)
    x = conv_bn_relu(conv_bn_relu(x, "conv2_3x3_reduce"), "conv2_3x3")
    x = F.max_pool2d(x, (3, 3), stride=(2, 2), ceil_mode=True)
    for name, c1, _, _, _, _, pool, cp, _ in INCEPTION:
        p = f"inception_{name}_"
        branches = [conv_bn_relu(x, p + "1x1")] if c1 else []
        branches.append(conv_bn_relu(conv_bn_relu(x, p + "3x3_reduce"), p + "3x3"))
        y = conv_bn_relu(conv_bn_relu(x, p + "double_3x3_reduce"), p + "double_3x3_1")
        branches.append(conv_bn_relu(y, p + "double_3x3_2"))
        if pool == "avg":
            y = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        elif pool == "max":
            y = F.max_pool2d(x, (3, 3), stride=(1, 1), padding=(1, 1), ceil_mode=True)
        else:
            y = F.max_pool2d(x, (3, 3), stride=(2, 2), ceil_mode=True)
        branches.append(conv_bn_relu(y, p + "pool_proj") if cp else y)
        x = torch.cat(branches, 1)
    return torch_pooled(x)


STATE_DICTS = {
    "resnet18": lambda: resnet_state_dict("resnet18"),
    "resnet50": lambda: resnet_state_dict("resnet50"),
    "bn_inception": bn_inception_state_dict,
}


def torch_features(arch, state_dict, images):
    with torch.no_grad():
        images = torch.from_numpy(images.transpose(0, 3, 1, 2))
        if arch == "bn_inception":
            return torch_bn_inception_features(state_dict, images).numpy()
        return torch_resnet_features(state_dict, arch, images).numpy()


def flax_features(arch, params, batch_stats, images, conv_impl="auto"):
    model = models.Embedder(arch, embedding_dim=8, conv_impl=conv_impl)
    variables = {"params": {"backbone": params}, "batch_stats": {"backbone": batch_stats}}
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False, method="features"))(variables, images))


# At 224 and 227 px no ResNet map is smaller than 3x3, so 'auto' there is XLA's convolution throughout; at 64 px
# ResNet's layer4 maps are 2x2, where 'auto' takes im2col on a CPU (BN-Inception's branches need 224 or 227).
@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", models.CONV_IMPLS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "bn_inception"])
def test_converted_backbone_reproduces_pytorch_features(arch, conv_impl):
    state_dict = STATE_DICTS[arch]()
    params, batch_stats, report = convert_weights.convert_state_dict(state_dict, arch)
    sizes = IMAGE_SIZES if conv_impl != "auto" or arch == "bn_inception" else IMAGE_SIZES[:1] + (64,)
    for size in sizes:
        images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
        expected = torch_features(arch, state_dict, images)
        got = flax_features(arch, params, batch_stats, images, conv_impl)
        assert got.shape == expected.shape
        assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero features
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE,
                                   err_msg=f"{arch} at {size}x{size}, conv_impl {conv_impl}")
    num_counters = len(report["ignored"])
    assert len(report["converted"]) + len(report["unused_by_design"]) + num_counters == len(state_dict)


def test_report_names_classifier_as_unused_and_counters_as_ignored():
    _, _, report = convert_weights.convert_state_dict(resnet_state_dict("resnet18"), "resnet18")
    assert report["unused_by_design"] == ["fc.bias", "fc.weight"]
    assert len(report["ignored"]) == 20 and all(k.endswith(".num_batches_tracked") for k in report["ignored"])
    assert "layer2.0.downsample.0.weight" in report["converted"]
    _, _, report = convert_weights.convert_state_dict(bn_inception_state_dict(), "bn_inception")
    assert report["unused_by_design"] == ["last_linear.bias", "last_linear.weight"]


def test_missing_tensor_fails_naming_it():
    state_dict = resnet_state_dict("resnet18")
    del state_dict["layer3.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match=r"'layer3\.0\.downsample\.1\.running_var'"):
        convert_weights.convert_state_dict(state_dict, "resnet18")


def test_unused_tensor_fails_naming_it():
    state_dict = resnet_state_dict("resnet18")
    state_dict["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"'layer5\.0\.conv1\.weight'"):
        convert_weights.convert_state_dict(state_dict, "resnet18")


def test_wrong_architecture_fails_naming_a_key():
    with pytest.raises(ValueError, match=r"no tensor 'layer1\.0\.(bn3|conv3)\."):
        convert_weights.convert_state_dict(resnet_state_dict("resnet18"), "resnet50")
    with pytest.raises(ValueError, match="shape"):
        convert_weights.convert_state_dict(resnet_state_dict("resnet50"), "resnet18")


def write_safetensors(path, state_dict):
    """The safetensors layout, written out: u64 header size, JSON header, contiguous little-endian data."""
    names = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for key, value in state_dict.items():
        blob = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_command_line_writes_checkpoint_and_metadata_that_load_pretrained_reads(tmp_path, suffix):
    state_dict = resnet_state_dict("resnet18", seed=1)
    weights = tmp_path / ("resnet18" + suffix)
    if suffix == ".pth":
        torch.save({key: torch.from_numpy(value) for key, value in state_dict.items()}, weights)
    else:
        write_safetensors(weights, state_dict)
    output = tmp_path / "converted"
    convert_weights.main(["--arch", "resnet18", "--input", str(weights), "--output", str(output)])

    params, batch_stats, metadata = convert_weights.load_pretrained(str(output), "resnet18")
    assert metadata["architecture"] == "resnet18"
    assert metadata["source"] == str(weights)
    assert metadata["preprocessing"] == {"input_space": "RGB", "input_range": [0, 1],
                                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    np.testing.assert_array_equal(params["layer2_0"]["downsample_conv"]["kernel"],
                                  state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(batch_stats["layer4_1"]["bn2"]["var"], state_dict["layer4.1.bn2.running_var"])
    np.testing.assert_array_equal(params["bn1"]["scale"], state_dict["bn1.weight"])


def test_bn_inception_metadata_names_bgr_0_255_caffe_means():
    assert convert_weights.PREPROCESSING["bn_inception"] == {
        "input_space": "BGR", "input_range": [0, 255], "mean": [104, 117, 128], "std": [1, 1, 1]}


def test_load_pretrained_rejects_missing_path_and_other_architecture(tmp_path):
    with pytest.raises(ValueError, match="not a converted weights directory"):
        convert_weights.load_pretrained(str(tmp_path / "nowhere"), "resnet50")
    weights = tmp_path / "r18.safetensors"
    write_safetensors(weights, resnet_state_dict("resnet18"))
    convert_weights.main(["--arch", "resnet18", "--input", str(weights), "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="holds resnet18 weights but config.model.backbone is 'resnet50'"):
        convert_weights.load_pretrained(str(tmp_path / "out"), "resnet50")


def test_command_line_reports_a_missing_tensor_and_exits(tmp_path, capsys):
    state_dict = resnet_state_dict("resnet18")
    del state_dict["bn1.bias"]
    weights = tmp_path / "broken.safetensors"
    write_safetensors(weights, state_dict)
    with pytest.raises(SystemExit, match=r"'bn1\.bias'"):
        convert_weights.main(["--arch", "resnet18", "--input", str(weights), "--output", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------- Vision Transformers (issue 32)
# The module names timm imports from torchvision when it is imported; its ViTs run none of their code.
TORCHVISION_MODULES = ("torchvision", "torchvision.datasets", "torchvision.models",
                       "torchvision.models.feature_extraction", "torchvision.ops", "torchvision.ops.misc",
                       "torchvision.transforms", "torchvision.transforms.functional", "torchvision.utils")


def import_timm():
    """timm, or a skip where it is not installed. timm imports torchvision (its data transforms, a frozen BatchNorm);
    where torchvision cannot be imported (PyPI's wheels are CUDA builds, which do not load beside the CPU build of
    torch) stand-ins take its module names, which is all timm's ViTs need of it."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        for name in TORCHVISION_MODULES:
            sys.modules[name] = mock.MagicMock(name=name)
    import timm
    return timm


def vit_state_dict(arch="vit_tiny", patch_size=16, image_size=224, seed=0, head=True):
    """timm's ViT key names and PyTorch shapes (Linear [out, in], Conv2d OIHW), random values; float32 NumPy."""
    width, depth, _ = models.VIT_LAYOUTS[arch]
    grid = image_size // patch_size
    rng = np.random.default_rng(seed)
    state_dict = {"cls_token": rng.normal(0, 0.5, (1, 1, width)),
                  "pos_embed": rng.normal(0, 0.5, (1, 1 + grid * grid, width)),
                  "patch_embed.proj.weight": rng.normal(0, 0.05, (width, 3, patch_size, patch_size)),
                  "patch_embed.proj.bias": rng.normal(0, 0.1, width)}

    def linear(name, in_features, out_features):
        state_dict[name + ".weight"] = rng.normal(0, 1 / math.sqrt(in_features), (out_features, in_features))
        state_dict[name + ".bias"] = rng.normal(0, 0.1, out_features)

    def norm(name):
        state_dict[name + ".weight"] = rng.uniform(0.5, 1.5, width)
        state_dict[name + ".bias"] = rng.normal(0, 0.1, width)

    for index in range(depth):
        prefix = f"blocks.{index}"
        norm(prefix + ".norm1")
        linear(prefix + ".attn.qkv", width, 3 * width)
        linear(prefix + ".attn.proj", width, width)
        norm(prefix + ".norm2")
        linear(prefix + ".mlp.fc1", width, 4 * width)
        linear(prefix + ".mlp.fc2", 4 * width, width)
    norm("norm")
    if head:
        linear("head", width, 1000)
    return {key: np.asarray(value, np.float32) for key, value in state_dict.items()}


def randomize_timm(model, seed):
    """timm's parameters redrawn at the scale of `vit_state_dict`: timm's own init (std 0.02) leaves the blocks'
    contributions too small for the comparison to see each one."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                value = rng.normal(0, 0.5, parameter.shape)
            elif name.endswith(".bias"):
                value = rng.normal(0, 0.1, parameter.shape)
            elif parameter.ndim == 1:  # LayerNorm scales
                value = rng.uniform(0.5, 1.5, parameter.shape)
            elif parameter.ndim == 4:  # the patch projection
                value = rng.normal(0, 0.05, parameter.shape)
            else:  # Linear [out, in]
                value = rng.normal(0, 1 / math.sqrt(parameter.shape[1]), parameter.shape)
            parameter.copy_(torch.from_numpy(value.astype(np.float32)))


def vit_features(arch, patch_size, params, images, pooling="token"):
    model = models.Embedder(arch, embedding_dim=8, patch_size=patch_size, pooling=pooling)
    return np.asarray(model.apply({"params": {"backbone": params}}, images, train=False, method="features"))


def timm_tokens(model, images):
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def assert_relative_close(got, expected, message):
    """Within 1e-4 of the features' largest magnitude (which is of order 1)."""
    assert got.shape == expected.shape, message
    assert np.abs(expected).max() > 0.1, message
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE * np.abs(expected).max(), err_msg=message)


# (arch, patch size, another image size: the position embeddings resampled to its grid, up or down)
SLOW = pytest.mark.slow
TIMM_CASES = [
    ("vit_tiny", 16, 160), ("vit_tiny", 14, 280),
    pytest.param("vit_small", 16, 112, marks=SLOW), pytest.param("vit_small", 14, 154, marks=SLOW),
    pytest.param("vit_base", 16, 288, marks=SLOW), pytest.param("vit_base", 14, 126, marks=SLOW),
]


@pytest.mark.parametrize("arch, patch_size, other_size", TIMM_CASES)
def test_converted_vit_gives_timm_features_at_224_and_resampled_at_another_size(arch, patch_size, other_size,
                                                                               tmp_path):
    """timm's `forward_features(x)[:, 0]` (and the mean patch token) of `{arch}_patch16_224` with `patch_size`, its
    random weights converted by the command line and read by load_pretrained as the trainer reads them; at another
    size timm's model of that size loads the same weights through its own checkpoint filter (which resamples the
    position embeddings)."""
    timm = import_timm()
    from timm.models.vision_transformer import checkpoint_filter_fn
    reference = timm.create_model(f"{arch}_patch16_224", pretrained=False, patch_size=patch_size).eval()
    randomize_timm(reference, seed=patch_size)
    weights = tmp_path / "model.safetensors"
    write_safetensors(weights, {key: value.numpy() for key, value in reference.state_dict().items()})
    output = tmp_path / "converted"
    convert_weights.main(["--arch", arch, "--input", str(weights), "--output", str(output),
                          "--preprocessing", "inception"])
    for size in (224, other_size):
        if size != 224:
            resized = timm.create_model(f"{arch}_patch16_224", pretrained=False, patch_size=patch_size,
                                        img_size=size).eval()
            resized.load_state_dict(checkpoint_filter_fn(reference.state_dict(), resized))
        params, batch_stats, metadata = convert_weights.load_pretrained(str(output), arch, patch_size=patch_size,
                                                                        image_size=size)
        assert batch_stats == {} and (metadata["patch_size"], metadata["image_size"]) == (patch_size, 224)
        images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
        expected = timm_tokens(reference if size == 224 else resized, images)
        message = f"{arch}, {patch_size}-pixel patches, {size} px"
        assert_relative_close(vit_features(arch, patch_size, params, images), expected[:, 0], message)
        if size == 224:
            assert_relative_close(vit_features(arch, patch_size, params, images, "avg"), expected[:, 1:].mean(1),
                                  message + ", mean patch token")


def test_vit_report_drops_the_head_and_reads_patch_and_image_size():
    params, batch_stats, report = convert_weights.convert_state_dict(vit_state_dict(patch_size=14, image_size=518),
                                                                     "vit_tiny")
    assert (report["patch_size"], report["image_size"]) == (14, 518)
    assert report["unused_by_design"] == ["head.bias", "head.weight"] and report["ignored"] == [] and batch_stats == {}
    assert params["pos_embed"].shape == (1, 1 + 37 * 37, 192)
    state_dict = vit_state_dict()
    params, _, _ = convert_weights.convert_state_dict(state_dict, "vit_tiny")
    np.testing.assert_array_equal(params["blocks_3"]["attn"]["qkv"]["kernel"], state_dict["blocks.3.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                  state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["norm"]["scale"], state_dict["norm.weight"])
    np.testing.assert_array_equal(params["cls_token"], state_dict["cls_token"])


@pytest.mark.parametrize("extra", ["blocks.0.ls1.gamma", "dist_token"])
def test_vit_weights_with_parts_the_backbone_has_not_fail_naming_them(extra):
    """LayerScale (DINOv2, CaiT) and DeiT's distillation token are not part of these ViTs."""
    state_dict = vit_state_dict(head=False)
    state_dict[extra] = np.ones((1, 1, 192) if extra == "dist_token" else 192, np.float32)
    with pytest.raises(ValueError, match=re.escape(repr(extra))):
        convert_weights.convert_state_dict(state_dict, "vit_tiny")
    with pytest.raises(ValueError, match=r"no tensor 'blocks\.11\.norm1\.weight'|shape"):
        convert_weights.convert_state_dict(vit_state_dict(head=False), "vit_small")


def test_vit_conversion_needs_the_preprocessing_and_records_it(tmp_path, capsys):
    weights = tmp_path / "vit.safetensors"
    write_safetensors(weights, vit_state_dict(seed=1))
    with pytest.raises(SystemExit, match="--preprocessing is needed for vit_tiny"):
        convert_weights.main(["--arch", "vit_tiny", "--input", str(weights), "--output", str(tmp_path / "no")])
    assert not os.path.exists(tmp_path / "no")
    for name, mean in (("inception", [0.5, 0.5, 0.5]), ("imagenet", [0.485, 0.456, 0.406])):
        convert_weights.main(["--arch", "vit_tiny", "--input", str(weights), "--output", str(tmp_path / name),
                              "--preprocessing", name])
        assert convert_weights.read_metadata(str(tmp_path / name))["preprocessing"]["mean"] == mean
    assert "16-pixel patches, position embeddings learned at 224 px" in capsys.readouterr().out


def test_load_pretrained_resamples_vit_position_embeddings_and_checks_the_patch_size(tmp_path):
    state_dict = vit_state_dict(seed=2)
    weights = tmp_path / "vit.pth"
    torch.save({"model": {key: torch.from_numpy(value) for key, value in state_dict.items()}}, weights)
    convert_weights.main(["--arch", "vit_tiny", "--input", str(weights), "--output", str(tmp_path / "out"),
                          "--preprocessing", "imagenet"])
    native, _, _ = convert_weights.load_pretrained(str(tmp_path / "out"), "vit_tiny")
    np.testing.assert_array_equal(native["pos_embed"], state_dict["pos_embed"])
    resized, _, _ = convert_weights.load_pretrained(str(tmp_path / "out"), "vit_tiny", patch_size=16, image_size=96)
    np.testing.assert_allclose(resized["pos_embed"],
                               models.resample_pos_embed(state_dict["pos_embed"], (6, 6)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(resized["blocks_0"]["mlp"]["fc1"]["kernel"],
                                  native["blocks_0"]["mlp"]["fc1"]["kernel"])
    with pytest.raises(ValueError, match="16-pixel patches but config.model.patch_size is 14"):
        convert_weights.load_pretrained(str(tmp_path / "out"), "vit_tiny", patch_size=14)
