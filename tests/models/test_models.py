"""Tests of hpl_jax.models: shapes, parameter counts, the embedding head, BatchNorm modes, dtypes."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from hpl_jax import data
from hpl_jax import models
from hpl_jax.models import onednn
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import optim
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state

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


@pytest.mark.slow
@pytest.mark.parametrize("backbone, feature_dim", [("resnet18", 128), ("resnet50", 512), ("bn_inception", 256)])
def test_embeddings_have_shape_and_unit_norm(backbone, feature_dim):
    model = models.Embedder(backbone, embedding_dim=16, width=TINY)
    images = random_images(3)
    variables = random_variables(model, images)
    assert variables["params"]["embedding"]["kernel"].shape == (feature_dim, 16)
    # Under jit: op by op, BN-Inception's apply took 16 s (a compile for each operation's shapes).
    embeddings = jax.jit(functools.partial(model.apply, train=False))(variables, images)
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


@pytest.mark.slow
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
        dict(backbone="resnet50", width=0.5, embedding_dim=32, bn_frozen=True, dtype="bfloat16", pooling="avg",
             conv_impl="im2col")
    )
    model = models.create_model(config, bn_axis_name="batch")
    assert (model.backbone, model.width, model.embedding_dim, model.bn_frozen, model.dtype, model.bn_axis_name,
            model.pooling, model.conv_impl) == ("resnet50", 0.5, 32, True, jnp.bfloat16, "batch", "avg", "im2col")
    for field, bad in [("backbone", "resnet101"), ("dtype", "float16"), ("width", 0.0), ("embedding_dim", 0),
                       ("pooling", "gem"), ("conv_impl", "winograd")]:
        with pytest.raises(ValueError, match=field):
            models.create_model(ml_collections.ConfigDict({**config.to_dict(), field: bad}))


# ------------------------------------------------------------------ convolution implementations (issue 25)
def lax_conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=models.NHWC_DIMENSION_NUMBERS)


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 9, 7, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 7, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 2, 2, 6), (3, 3), (1, 1), ((1, 1), (1, 1))),  # a map smaller than the kernel
    ((2, 11, 10, 3), (7, 7), (2, 2), ((3, 3), (3, 3))),
    ((2, 8, 8, 4), (1, 1), (2, 2), ((0, 0), (0, 0))),
    ((1, 6, 9, 2), (3, 2), (2, 1), ((0, 1), (2, 0))),  # asymmetric everything
])
def test_im2col_and_cpu_convolutions_equal_lax_convolution_and_its_gradients(shape, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel + (shape[-1], 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=lax_conv(x, w, stride, padding).shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(conv_fn, x, w):
        value, vjp = jax.vjp(lambda x, w: conv_fn(x, w, stride, padding,
                                                  dimension_numbers=models.NHWC_DIMENSION_NUMBERS), x, w)
        return value, vjp(cotangent)

    expected, expected_grads = value_and_grads(jax.lax.conv_general_dilated, x, w)
    for conv_fn in (models.im2col_conv, models.cpu_conv):
        got, got_grads = value_and_grads(conv_fn, x, w)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        for got_grad, expected_grad in zip(got_grads, expected_grads):
            np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-4)


def test_smaller_than_kernel_marks_maps_smaller_than_the_kernel_in_or_out():
    def small(size, kernel, stride, pad):
        return models.smaller_than_kernel((1, size, size, 1), (kernel, kernel, 1, 1), (stride, stride),
                                          ((pad, pad), (pad, pad)))

    assert small(2, 3, 1, 1) and small(1, 3, 1, 1)  # ResNet-18's layer4 at 64 px / 32 px
    assert small(4, 3, 2, 1)  # 4x4 -> 2x2: its input gradient is a convolution of a 2x2 map
    assert not small(3, 3, 1, 1) and not small(8, 3, 2, 1) and not small(2, 1, 2, 0) and not small(64, 7, 2, 3)
    assert models.smaller_than_kernel((1, 16, 2, 1), (3, 3, 1, 1), (1, 1), ((1, 1), (1, 1)))


def test_auto_resolves_to_xla_off_cpu_and_to_the_cpu_choice_on_cpu():
    assert models.resolve_conv_impl("auto", "cpu") == "cpu"
    assert models.resolve_conv_impl("auto", "gpu") == "xla"
    assert models.resolve_conv_impl("auto", "tpu") == "xla"
    assert models.resolve_conv_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    for impl in ("xla", "im2col"):
        assert models.resolve_conv_impl(impl, "gpu") == models.resolve_conv_impl(impl, "cpu") == impl
    config = ml_collections.ConfigDict(dict(backbone="resnet18", width=TINY, embedding_dim=8, bn_frozen=False,
                                            dtype="float32", pooling="avg_max", conv_impl="auto"))
    assert models.create_model(config, platform="gpu").conv_impl == "xla"
    assert models.create_model(config, platform="cpu").conv_impl == "cpu"


def test_xla_conv_impl_lowers_exactly_like_flax_default_convolution():
    """The GPU/TPU path is flax's plain nn.Conv (what every earlier checkpoint trained with), op for op."""
    x = random_images(2, size=16)
    ours = models.conv(8, 3, 2, 1, jnp.float32, "conv", conv_impl="xla")
    plain = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, dtype=jnp.float32,
                    param_dtype=jnp.float32, kernel_init=models.conv_kernel_init, name="conv")
    variables = plain.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(0), x), variables)

    def lowered(module):
        return jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1))).lower(
            variables, x).as_text()

    assert lowered(ours) == lowered(plain)


@pytest.mark.slow
def test_conv_impls_share_parameters_and_give_the_same_embeddings_and_gradients():
    """One checkpoint for every implementation: the same variable tree, the same embeddings and gradients.
    (The torchvision-equivalence tests of test_convert_weights.py check every backbone under every one.)"""
    images = random_images(4, size=32)  # layer3 and layer4 maps are smaller than 3x3: 'auto' mixes both ways
    models_by_impl = {impl: models.Embedder("resnet18", embedding_dim=8, width=0.125, conv_impl=impl)
                      for impl in models.CONV_IMPLS}
    variables = random_variables(models_by_impl["xla"], images)
    expected_grads = expected = None
    for impl, model in models_by_impl.items():
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
        assert jax.tree.structure(shapes) == jax.tree.structure(variables)
        # Running statistics: train-mode BatchNorm of 1x1 maps over 4 images would amplify rounding.
        grads, embeddings = jax.jit(jax.grad(
            lambda params: (lambda e: (jnp.sum(e[:, 0]), e))(
                model.apply({**variables, "params": params}, images, train=False)), has_aux=True))(variables["params"])
        if expected is None:
            expected_grads, expected = grads, embeddings
            continue
        np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-5, err_msg=impl)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max(), err_msg=impl)


@functools.lru_cache(maxsize=1)
def lowering_setup():
    """The default config at width 0.125 and 32 px, its train state (the same under every conv_impl) as
    per-device shapes, and a per-device batch's shapes."""
    config = default.get_config()
    config.model.width = 0.125
    config.hpl.num_coarse = (4,)
    config.hpl.kmeans_restarts = 1
    info = data.DatasetInfo(name="synthetic", num_train_classes=12, num_train_examples=64, image_shape=(32, 32, 3),
                            eval_splits=("test",), num_eval_examples={"test": 64})
    state = train_state.create_train_state(jax.random.PRNGKey(0), config, models.create_model(config.model), info)
    devices = jax.local_device_count()

    def per_device(tree):
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((devices,) + leaf.shape, leaf.dtype), tree)

    batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32), "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
    return config, state, per_device(state), per_device(batch)


def convolutions_in_lowered_steps(conv_impl, platform, op="stablehlo.convolution"):
    """Number of `op`s (XLA's convolution, or a custom call's target name) in the StableHLO of the pmapped train
    step and eval (embed) step of the default config (ResNet-18, 32 px), with conv_impl resolved as on `platform`;
    lowered, never compiled."""
    config, state, state_shapes, batch_shapes = lowering_setup()
    config = config.copy_and_resolve_references()
    config.model.conv_impl = conv_impl
    model = models.create_model(config.model, bn_axis_name=train.AXIS, platform=platform)
    labels, groups = optim.parameter_groups(train_state.trainable(state.params, state.hierarchy), config.optim)
    train_step = jax.pmap(train.create_train_step(config, model, labels, groups, in_warmup=False),
                          axis_name=train.AXIS)
    embed_step = jax.pmap(functools.partial(evaluation.embed_step, model=model, dataset_config=config.dataset),
                          axis_name=train.AXIS)
    return tuple(step.lower(state_shapes, batch_shapes).as_text().count(op) for step in (train_step, embed_step))


@pytest.mark.slow
def test_lowered_steps_keep_xla_convolutions_off_cpu_and_im2col_has_none():
    # ResNet-18 has 20 convolutions: each runs forward and has a kernel gradient; all but the first (whose
    # input is the image) have an input gradient. (conv_impl 'auto' is 'xla' on TPUs too: see the test above.)
    assert convolutions_in_lowered_steps("auto", "gpu") == (3 * 20 - 1, 20)
    assert convolutions_in_lowered_steps("im2col", "gpu") == (0, 0)
    # On a CPU, the default's ResNet-18 x0.25 at 32 px: layer3 (2x2 maps) and layer4 (1x1) leave their 3x3
    # convolutions to im2col, and so do the three 1x1 downsampling convolutions; oneDNN computes the stem's 7x7 (its
    # input gradient is never taken); XLA keeps layer1 and layer2's 3x3 convolutions (16 and 32 channels, 4 each).
    assert convolutions_in_lowered_steps("auto", "cpu") == (3 * 8, 8)
    calls = {target: convolutions_in_lowered_steps("auto", "cpu", f"@{target}(") for target in onednn.TARGETS}
    assert calls == {"hpl_onednn_conv_forward": (1, 1), "hpl_onednn_conv_input_grad": (0, 0),
                     "hpl_onednn_conv_kernel_grad": (1, 0)}


def test_conv_impl_is_checked_and_may_change_on_resume():
    config = default.get_config()
    config.model.conv_impl = "winograd"
    with pytest.raises(config_checks.ConfigError, match=r"config\.model\.conv_impl: 'winograd'; use one of"):
        config_checks.validate_config(config, device_count=1, process_count=1)
    saved = default.get_config().to_dict()
    for impl in ("xla", "im2col"):
        config.model.conv_impl = impl
        checkpointing.check_resumed_config(saved, config, "config.json")


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 8, 7, 3), (1, 2, 2, 4), (1, 1, 1, 2)])
def test_max_pool_with_tap_gradients_equals_flax_max_pool(shape):
    # The CPU path of ResNet's stem pooling: the same values as nn.max_pool, and the same gradient, also after a
    # ReLU, whose zeros tie within a window.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    reference = lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    weights = jnp.asarray(rng.normal(size=reference(x).shape), jnp.float32)
    assert jnp.array_equal(models.max_pool_3x3_stride_2(x), reference(x))
    for before in (lambda v: v, jax.nn.relu):
        grads = [jax.grad(lambda v: jnp.sum(pool(before(v)) * weights))(x)
                 for pool in (models.max_pool_3x3_stride_2, reference)]
        np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_resnet_pools_with_tap_gradients_on_a_cpu_only():
    images = jnp.zeros((1, 32, 32, 3))
    for conv_impl, tap_pooling in (("cpu", True), ("onednn", True), ("xla", False), ("im2col", False)):
        model = models.ResNet("resnet18", width=0.125, conv_impl=conv_impl)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, use_running_average=True))
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(model.apply(v, images, use_running_average=True))))(
            variables))
        assert ("reduce_window_max" not in jaxpr) == tap_pooling, conv_impl
