"""The Vision Transformers of hpl_jax.models (issue 32): shapes and parameter counts, the embedding head, bfloat16,
the position-embedding resampling, the config fields, and a ViT training the embedded default end to end. (timm's
features from converted weights: tests/models/test_convert_weights.py.)"""
import functools
import importlib
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from hpl_jax import models
from hpl_jax.models import vit
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import train


def random_images(batch, size=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def random_variables(model, images, seed=0):
    """Variables of `model` filled from NumPy: kernels scaled by fan-in, LayerNorm scales near 1, and class token
    and position embeddings of order 1, so every part of the network moves the output."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / math.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("cls_token", "pos_embed"):
            value = rng.normal(0.0, 0.5, leaf.shape)
        else:  # bias
            value = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def count_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# timm's parameter counts of vit_{tiny,small,base}_patch16_224 minus the 1000-class head.
@pytest.mark.parametrize("backbone, timm_count, head_count", [
    ("vit_tiny", 5_717_416, 193_000), ("vit_small", 22_050_664, 385_000), ("vit_base", 86_567_656, 769_000)])
def test_backbone_parameter_count_equals_timm_without_head(backbone, timm_count, head_count):
    model = models.Embedder(backbone, embedding_dim=384)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert count_params(shapes["params"]["backbone"]) == timm_count - head_count
    assert set(shapes) == {"params"}  # no BatchNorm, no batch_stats
    width = models.VIT_LAYOUTS[backbone][0]
    assert shapes["params"]["embedding"]["kernel"].shape == (width, 384)
    assert shapes["params"]["backbone"]["pos_embed"].shape == (1, 1 + 14 * 14, width)
    assert shapes["params"]["backbone"]["patch_embed"]["kernel"].shape == (16, 16, 3, width)
    assert {f"blocks_{index}" for index in range(12)} <= set(shapes["params"]["backbone"])


def test_patch_size_and_image_size_set_the_patch_kernel_and_the_position_grid():
    model = models.Embedder("vit_tiny", embedding_dim=8, width=0.25, patch_size=4)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), random_images(1, 30))
    backbone = shapes["params"]["backbone"]
    assert backbone["patch_embed"]["kernel"].shape == (4, 4, 3, 48)
    assert backbone["pos_embed"].shape == (1, 1 + 7 * 7, 48)  # 30 px: 7 whole patches a side, 2 pixels left out


def test_patch_embedding_equals_the_strided_convolution_it_stands_for():
    images = random_images(2, size=18)  # 4 whole patches a side, 2 pixels left out as the convolution leaves them
    module = vit.PatchEmbedding(4, 8, jnp.float32)
    variables = module.init(jax.random.key(0), images)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    expected = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                            dimension_numbers=models.NHWC_DIMENSION_NUMBERS) + bias
    np.testing.assert_allclose(module.apply(variables, images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["token", "avg"])
def test_head_is_final_norm_token_then_layer_norm_without_affine_then_linear_then_l2(pooling):
    model = models.Embedder("vit_tiny", embedding_dim=8, width=0.25, patch_size=8, pooling=pooling)
    images = random_images(3)
    variables = random_variables(model, images)
    tokens = np.asarray(models.VisionTransformer("vit_tiny", patch_size=8, width=0.25).apply(
        {"params": variables["params"]["backbone"]}, images))
    assert tokens.shape == (3, 1 + 4 * 4, 48)
    expected_features = tokens[:, 0] if pooling == "token" else tokens[:, 1:].mean(axis=1)
    features = model.apply(variables, images, train=False, method="features")
    np.testing.assert_allclose(features, expected_features, rtol=1e-5, atol=1e-5)
    standardized = (expected_features - expected_features.mean(1, keepdims=True)) / np.sqrt(
        expected_features.var(1, keepdims=True) + 1e-5)
    head = variables["params"]["embedding"]
    projected = standardized @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    expected = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    embeddings = model.apply(variables, images, train=False)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-4, atol=1e-5)
    # No dropout, no BatchNorm: training mode is the same function.
    np.testing.assert_array_equal(model.apply(variables, images, train=True), embeddings)


def test_final_norm_class_token_depends_on_every_patch_and_every_block():
    model = models.Embedder("vit_tiny", embedding_dim=8, width=0.25, patch_size=8)
    images = random_images(1)
    variables = random_variables(model, images)
    features = functools.partial(model.apply, train=False, method="features")
    reference = features(variables, images)
    corner = images.at[:, -8:, -8:].add(1.0)  # the last patch only
    assert np.abs(features(variables, corner) - reference).max() > 1e-3
    last = jax.tree.map(lambda x: x, variables)
    last["params"]["backbone"]["blocks_11"]["mlp"]["fc2"]["kernel"] *= 2.0
    assert np.abs(features(last, images) - reference).max() > 1e-3


def test_embedding_kernel_is_orthogonal_and_bias_zero():
    model = models.Embedder("vit_small", embedding_dim=128)
    params = model.init(jax.random.key(0), jnp.zeros((1, 384)),
                        method=lambda module, x: module.embedding(x))["params"]["embedding"]
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (384, 128)
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(128), atol=1e-5)
    np.testing.assert_array_equal(params["bias"], 0.0)


def test_bfloat16_compute_keeps_float32_params_and_output():
    images = random_images(2)
    model = models.Embedder("vit_tiny", embedding_dim=8, width=0.25, patch_size=8, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = random_variables(model, images)
    embeddings, state = model.apply(
        variables, images, train=False, mutable=["intermediates"],
        capture_intermediates=lambda module, method: module.name in ("fc1", "backbone"))
    assert state["intermediates"]["backbone"]["blocks_0"]["mlp"]["fc1"]["__call__"][0].dtype == jnp.bfloat16
    assert state["intermediates"]["backbone"]["__call__"][0].dtype == jnp.float32  # final norm, residual stream
    assert embeddings.dtype == jnp.float32
    reference = models.Embedder("vit_tiny", embedding_dim=8, width=0.25, patch_size=8).apply(
        variables, images, train=False)
    np.testing.assert_allclose(embeddings, reference, atol=0.05)


def test_resample_keeps_the_class_token_and_an_unchanged_grid():
    pos_embed = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 6)), jnp.float32)
    assert models.resample_pos_embed(pos_embed, (14, 14)) is pos_embed
    resized = models.resample_pos_embed(pos_embed, (10, 10))
    assert resized.shape == (1, 1 + 100, 6)
    np.testing.assert_array_equal(resized[:, 0], pos_embed[:, 0])


@pytest.mark.parametrize("old, new", [(14, 10), (14, 20), (37, 16), (16, 3)])
def test_resample_equals_pytorch_antialiased_bicubic_interpolation(old, new):
    """timm's resample_abs_pos_embed is F.interpolate(mode='bicubic', antialias=True) of the patch rows."""
    torch = pytest.importorskip("torch")
    pos_embed = np.random.default_rng(old).normal(size=(1, 1 + old * old, 5)).astype(np.float32)
    grid = torch.from_numpy(pos_embed[:, 1:]).reshape(1, old, old, 5).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)
    expected = expected.permute(0, 2, 3, 1).reshape(1, new * new, 5).numpy()
    got = np.asarray(models.resample_pos_embed(jnp.asarray(pos_embed), (new, new)))
    np.testing.assert_allclose(got[:, 1:], expected, rtol=0, atol=1e-5)


def test_create_model_reads_the_vit_fields_and_rejects_what_a_vit_has_not():
    config = ml_collections.ConfigDict(dict(backbone="vit_small", width=0.5, embedding_dim=32, bn_frozen=True,
                                            dtype="bfloat16", pooling="token", conv_impl="auto", patch_size=14))
    model = models.create_model(config)
    assert (model.backbone, model.width, model.patch_size, model.pooling) == ("vit_small", 0.5, 14, "token")
    for field, bad in [("pooling", "avg_max"), ("width", 0.3), ("patch_size", 0)]:
        with pytest.raises(ValueError, match=field):
            models.create_model(ml_collections.ConfigDict({**config.to_dict(), field: bad}))
    resnet = ml_collections.ConfigDict({**config.to_dict(), "backbone": "resnet18", "pooling": "token"})
    with pytest.raises(ValueError, match="pooling"):
        models.create_model(resnet)
    assert models.backbone_poolings("resnet18") == ("avg_max", "avg")
    assert models.backbone_poolings("vit_base") == ("token", "avg")


def vit_config(**overrides):
    config = default.get_config()
    config.model.backbone = "vit_tiny"
    config.model.pooling = "token"
    config.model.patch_size = 4
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize("overrides, field", [
    ({"model.pooling": "avg_max"}, "model.pooling"),
    ({"model.width": 0.3}, "model.width"),
    ({"model.patch_size": 64}, "model.patch_size"),
])
def test_config_checks_refuse_what_a_vit_has_not(overrides, field):
    config = vit_config(**overrides)
    with pytest.raises(config_checks.ConfigError, match=rf"^config\.{re.escape(field)}: "):
        config_checks.check_model(config)


def test_config_checks_pass_a_vit_and_still_check_the_fields_it_does_not_use():
    config_checks.validate_config(vit_config(), device_count=2, process_count=1)
    config_checks.check_model(vit_config(**{"model.patch_size": 5}))  # 32 px: 6 patches a side, 2 pixels left out
    for field, bad in [("model.conv_impl", "winograd"), ("model.bn_frozen", None)]:
        with pytest.raises(config_checks.ConfigError, match=rf"^config\.{re.escape(field)}: "):
            config_checks.check_model(vit_config(**{field: bad}))
    resnet = default.get_config()
    resnet.model.pooling = "token"
    with pytest.raises(config_checks.ConfigError, match=r"^config\.model\.pooling: 'token' is not a pooling of"):
        config_checks.check_model(resnet)


@pytest.mark.parametrize("name", ["vit_recipe", "vit_cub", "vit_cars", "vit_sop", "vit_inshop"])
def test_vit_configs_load_and_pass_the_checks(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config_checks.validate_config(config, device_count=2, process_count=1)
    assert (config.model.backbone, config.model.patch_size, config.model.pooling) == ("vit_small", 16, "token")
    assert config.optim.frozen == ("model/backbone/patch_embed/.*",) and config.optim.decay_gamma == 1.0
    large = name in ("vit_sop", "vit_inshop")
    assert config.num_epochs == (150 if large else 100)
    assert config.optim.weight_decay == (1e-4 if large else 1e-2)
    assert dict(config.optim.lr_mults).get("model/embedding/.*", 1.0) == (100.0 if large else 1.0)


@pytest.mark.parametrize("name", ["cub", "cars", "sop", "synthetic", "synthetic_sop"])
def test_mlrc_configs_pass_the_checks_with_a_vit(name):
    config = importlib.import_module(f"configs.mlrc.{name}").get_config()
    config.model.backbone = "vit_small"
    config_checks.validate_config(config, device_count=2, process_count=1)


@pytest.mark.slow
def test_a_vit_tiny_trains_the_embedded_default_end_to_end(tmp_path):
    config = vit_config(**{"model.width": 0.25, "model.embedding_dim": 16, "dataset.image_size": 16,
                           "dataset.resize_size": 18, "dataset.synthetic.num_families": 3,
                           "dataset.synthetic.classes_per_family": 4, "dataset.synthetic.images_per_class": 7,
                           "dataset.num_val_classes": 0, "hpl.num_coarse": (3,), "batch_size": 16,
                           "eval.batch_size": 16, "eval.nmi": False, "num_epochs": 2, "log_every_steps": 1})
    result = train.train_and_evaluate(config, str(tmp_path))
    assert set(result["history"]) == {0, 1, 2}
    assert all(np.isfinite(values["map@r"]) for values in result["history"].values())


@pytest.mark.slow
def test_a_vit_backbone_exported_here_fine_tunes_from_its_weights(tmp_path):
    """The pretraining pipeline with a ViT: a run exports its backbone (no BatchNorm statistics), and a fine-tuning
    run on other data starts from exactly those weights (the backbone waits out the warm-up's first step)."""
    from configs import finetune_synthetic_sop
    from hpl_jax.models import convert
    from hpl_jax.trainer import restore

    source = vit_config(**{"model.width": 0.25, "model.embedding_dim": 16, "dataset.image_size": 16,
                           "dataset.resize_size": 18, "dataset.synthetic.num_families": 3,
                           "dataset.synthetic.classes_per_family": 4, "dataset.synthetic.images_per_class": 7,
                           "dataset.num_val_classes": 0, "hpl.weights": (1.0,), "batch_size": 16,
                           "eval.batch_size": 16, "eval.nmi": False, "num_epochs": 1, "steps_per_epoch": 1,
                           "export_backbone": True})
    train.train_and_evaluate(source, str(tmp_path / "source"))
    exported = str(tmp_path / "source" / "backbone")
    params, batch_stats, metadata = convert.load_pretrained(exported, "vit_tiny", 0.25, patch_size=4, image_size=16)
    assert batch_stats == {} and metadata["architecture"] == "vit_tiny"

    config = finetune_synthetic_sop.get_config()
    config.update_from_flattened_dict({
        "model.pretrained": exported, "model.backbone": "vit_tiny", "model.pooling": "token", "model.patch_size": 4,
        "model.width": 0.25, "model.embedding_dim": 16, "dataset.image_size": 16, "dataset.resize_size": 18,
        "dataset.synthetic_sop.num_super_classes": 2, "dataset.synthetic_sop.sub_families_per_super_class": 2,
        "dataset.synthetic_sop.classes_per_sub_family": 4, "dataset.synthetic_sop.images_per_class": (2, 4),
        "dataset.num_val_classes": 0, "hpl.num_coarse": (3,), "batch_size": 16, "eval.batch_size": 16,
        "num_epochs": 1, "steps_per_epoch": 1})
    assert config.optim.warmup_epochs >= 1
    result = train.train_and_evaluate(config, str(tmp_path / "target"))
    assert np.isfinite(result["last"]["map@r"])
    tuned = restore.restore_run(str(tmp_path / "target")).state
    assert int(tuned.step) == 1
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(tuned.params["backbone"])[0],
                                 jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
