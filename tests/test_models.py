"""Tests of hpl_jax.models: shapes, parameter counts, the embedding head, BatchNorm modes, dtypes."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hpl_jax import models

TINY = 0.25  # width multiplier that keeps the CPU tests fast


def random_images(batch, size=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def random_variables(model, images, seed=0):
    """Variables of `model` filled from NumPy (no init compile): He-scaled kernels, non-trivial BN."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(0.0, math.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def numpy_head(features, kernel, bias):
    """Reference of the embedding layer and L2 normalisation: f32[batch, F] -> f32[batch, d]."""
    projected = features @ kernel + bias
    return projected / np.sqrt(np.sum(projected**2, axis=1, keepdims=True) + 1e-12)


def count_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "backbone, torchvision_count, fc_count",
    [("resnet18", 11_689_512, 513_000), ("resnet34", 21_797_672, 513_000), ("resnet50", 25_557_032, 2_049_000)],
)
def test_backbone_parameter_count_equals_torchvision_without_fc(backbone, torchvision_count, fc_count):
    model = models.Embedder(backbone, embedding_dim=512)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 224, 224, 3))
    )
    assert count_params(shapes["params"]["backbone"]) == torchvision_count - fc_count
    feature_dim = 2048 if backbone == "resnet50" else 512
    assert shapes["params"]["embedding"]["kernel"].shape == (feature_dim, 512)


def test_variable_tree_top_level_keys():
    model = models.Embedder("resnet18", embedding_dim=8, width=TINY)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), random_images(1))
    assert set(shapes) == {"params", "batch_stats"}
    assert set(shapes["params"]) == {"backbone", "embedding"}
    assert set(shapes["params"]["embedding"]) == {"kernel", "bias"}
    assert set(shapes["batch_stats"]) == {"backbone"}
    assert "layer4_1" in shapes["params"]["backbone"]


@pytest.mark.parametrize("backbone, feature_dim", [("resnet18", 128), ("resnet50", 512), ("bn_inception", 256)])
def test_embeddings_have_shape_and_unit_norm(backbone, feature_dim):
    model = models.Embedder(backbone, embedding_dim=16, width=TINY)
    images = random_images(3)
    variables = random_variables(model, images)
    assert variables["params"]["embedding"]["kernel"].shape == (feature_dim, 16)
    embeddings = model.apply(variables, images, train=False)
    assert embeddings.shape == (3, 16) and embeddings.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_head_is_avg_plus_max_pooling_then_linear_then_l2_normalisation():
    model = models.Embedder("resnet18", embedding_dim=8, width=TINY)
    images = random_images(2, size=64)
    variables = random_variables(model, images)
    embeddings, state = model.apply(
        variables, images, train=False,
        capture_intermediates=lambda module, method: module.name == "backbone", mutable=["intermediates"],
    )
    feature_map = np.asarray(state["intermediates"]["backbone"]["__call__"][0])
    assert feature_map.shape == (2, 2, 2, 128)
    expected_features = feature_map.mean(axis=(1, 2)) + feature_map.max(axis=(1, 2))
    features = model.apply(variables, images, train=False, method="features")
    np.testing.assert_allclose(features, expected_features, rtol=1e-6, atol=1e-6)
    head = variables["params"]["embedding"]
    expected = numpy_head(expected_features, np.asarray(head["kernel"]), np.asarray(head["bias"]))
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)


def test_frozen_batch_norm_keeps_running_statistics_and_matches_eval_mode():
    images = random_images(4)
    frozen = models.Embedder("resnet18", embedding_dim=8, width=TINY, bn_frozen=True)
    variables = random_variables(frozen, images)
    train_out, updates = frozen.apply(variables, images, train=True, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    np.testing.assert_allclose(train_out, frozen.apply(variables, images, train=False), rtol=1e-6, atol=1e-6)

    unfrozen = models.Embedder("resnet18", embedding_dim=8, width=TINY)
    _, updates = unfrozen.apply(variables, images, train=True, mutable=["batch_stats"])
    old_mean = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    new_mean = updates["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(new_mean, old_mean)


def test_running_statistics_update_with_pytorch_momentum():
    """PyTorch: running = 0.9 * running + 0.1 * batch mean (biased variance differs; mean is exact)."""
    images = random_images(4)
    model = models.Embedder("resnet18", embedding_dim=8, width=TINY)
    variables = random_variables(model, images)
    _, state = model.apply(
        variables, images, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda module, method: module.name == "conv1" and module.parent.name == "backbone",
    )
    conv1_out = np.asarray(state["intermediates"]["backbone"]["conv1"]["__call__"][0])
    old_mean = np.asarray(variables["batch_stats"]["backbone"]["bn1"]["mean"])
    expected = 0.9 * old_mean + 0.1 * conv1_out.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(state["batch_stats"]["backbone"]["bn1"]["mean"], expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_output():
    images = random_images(2)
    model = models.Embedder("resnet18", embedding_dim=8, width=TINY, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = random_variables(model, images)
    embeddings, state = model.apply(
        variables, images, train=False,
        capture_intermediates=lambda module, method: module.name == "backbone", mutable=["intermediates"],
    )
    assert state["intermediates"]["backbone"]["__call__"][0].dtype == jnp.bfloat16
    assert embeddings.dtype == jnp.float32
    reference = models.Embedder("resnet18", embedding_dim=8, width=TINY).apply(variables, images, train=False)
    np.testing.assert_allclose(embeddings, reference, atol=0.05)


def test_synchronised_batch_norm_over_two_devices_equals_one_device_on_whole_batch():
    assert jax.local_device_count() >= 2
    images = random_images(8)
    single = models.Embedder("resnet18", embedding_dim=8, width=TINY)
    synced = models.Embedder("resnet18", embedding_dim=8, width=TINY, bn_axis_name="batch")
    variables = random_variables(single, images)
    expected, expected_updates = single.apply(variables, images, train=True, mutable=["batch_stats"])

    replicated = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), variables)
    apply = jax.pmap(
        lambda v, x: synced.apply(v, x, train=True, mutable=["batch_stats"]), axis_name="batch"
    )
    embeddings, updates = apply(replicated, images.reshape(2, 4, *images.shape[1:]))
    np.testing.assert_allclose(embeddings.reshape(8, -1), expected, rtol=1e-4, atol=1e-5)
    for device in range(2):
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
            jax.tree.map(lambda leaf: leaf[device], updates["batch_stats"]),
            expected_updates["batch_stats"],
        )


def test_embedding_kernel_init_is_kaiming_normal_fan_out_and_bias_zero():
    dim, feature_dim = 64, 512
    model = models.Embedder("resnet18", embedding_dim=dim, width=TINY)
    params = model.init(
        jax.random.key(0), jnp.zeros((1, feature_dim)), method=lambda module, x: module.embedding(x)
    )["params"]["embedding"]
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (feature_dim, dim)
    np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / dim), rtol=0.03)
    assert abs(kernel.mean()) < 0.01
    # Untruncated normal: about 0.27% of draws lie beyond 3 std.
    assert np.mean(np.abs(kernel) > 3 * math.sqrt(2.0 / dim)) > 0.0005
    np.testing.assert_array_equal(params["bias"], 0.0)


def numpy_max_pool_ceil_mode(x, window, stride):
    """PyTorch MaxPool2d(window, stride, ceil_mode=True) on a 2-D array, written out."""
    outputs = [-(-(size - window) // stride) + 1 for size in x.shape]
    result = np.empty(outputs)
    for i in range(outputs[0]):
        for j in range(outputs[1]):
            result[i, j] = x[i * stride:i * stride + window, j * stride:j * stride + window].max()
    return result


@pytest.mark.parametrize("size", [7, 8, 112, 113])
def test_ceil_mode_max_pool_matches_written_out_reference(size):
    # All negative, so padding with zeros instead of -inf would show.
    x = -np.random.default_rng(size).uniform(1.0, 2.0, size=(size, size + 3)).astype(np.float32)
    pooled = models.max_pool_ceil_mode(jnp.asarray(x)[None, :, :, None], 3, 2)[0, :, :, 0]
    np.testing.assert_array_equal(pooled, numpy_max_pool_ceil_mode(x, 3, 2))


def test_create_model_reads_config_and_rejects_bad_fields():
    config = ml_collections.ConfigDict(
        dict(backbone="resnet50", width=0.5, embedding_dim=32, bn_frozen=True, dtype="bfloat16", pooling="avg")
    )
    model = models.create_model(config, bn_axis_name="batch")
    assert (model.backbone, model.width, model.embedding_dim, model.bn_frozen, model.dtype, model.bn_axis_name,
            model.pooling) == ("resnet50", 0.5, 32, True, jnp.bfloat16, "batch", "avg")
    for field, bad in [("backbone", "resnet101"), ("dtype", "float16"), ("width", 0.0), ("embedding_dim", 0),
                       ("pooling", "gem")]:
        with pytest.raises(ValueError, match=field):
            models.create_model(ml_collections.ConfigDict({**config.to_dict(), field: bad}))
