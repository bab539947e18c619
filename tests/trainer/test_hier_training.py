"""HIER in the trainer (config.hier): its proxies in the train state with their own optimiser group, a key per step for
its mining, HIER alone on flat Proxy-Anchor and HPL + HIER, 1 device against 2, resume, the recipe configs."""
import importlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import hier_recipe
from hpl_jax.core import hier as hier_lib
from hpl_jax.core import hierarchy as hierarchy_lib
from hpl_jax.core import losses
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import optim
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state
from tests.trainer.test_train import _final_state, _main, _run_steps, _setup, tiny_config

HIER_RATE = (("proxies/.*", 100.0), ("hier_proxies", 50.0))
WITH_HIER = {"hier.weight": 1.0, "hier.num_proxies": 8, "hier.top_k": 5, "optim.lr_mults": HIER_RATE}
HIER_FLAGS = ["--config.hier.weight=1.0", "--config.hier.num_proxies=8", "--config.hier.top_k=5",
              "--config.optim.lr_mults=((\"proxies/.*\",100.0),(\"hier_proxies\",50.0))"]


def test_without_hier_the_state_and_its_optimiser_tree_are_those_of_earlier_versions():
    _, _, state, labels, groups = _setup(tiny_config())
    assert state.hierarchy.hier_proxies is None
    assert set(train_state.trainable(state.params, state.hierarchy)) == {"model", "proxies"}
    assert not any("hier" in group for group in groups)


def test_hier_proxies_are_a_level_of_the_proxy_pytree_with_their_own_group_and_rate():
    config = tiny_config(**WITH_HIER)
    _, _, state, labels, groups = _setup(config)
    assert state.hierarchy.hier_proxies.shape == (8, config.model.embedding_dim)
    assert labels["hier_proxies"] not in {labels["proxies"][0], labels["proxies"][1]}
    multiplier, trains_in_warmup = groups[labels["hier_proxies"]]
    assert multiplier == 50.0 and not trains_in_warmup  # the default warm-up list names no 'hier_proxies'
    # The other draws are those of the run without HIER: HIER's proxies come from a key of their own.
    _, _, plain, _, _ = _setup(tiny_config())
    for a, b in zip(jax.tree_util.tree_leaves((plain.params, plain.hierarchy.proxies)),
                    jax.tree_util.tree_leaves((state.params, state.hierarchy.proxies))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_loss_is_the_proxy_loss_on_the_ball_plus_the_weighted_hier_term():
    config = tiny_config(**WITH_HIER)
    rng = np.random.default_rng(0)
    dim = config.model.embedding_dim
    hierarchy = hierarchy_lib.ProxyHierarchy(
        proxies=(jnp.asarray(rng.normal(size=(8, dim)), jnp.float32), jnp.asarray(rng.normal(size=(3, dim)), jnp.float32)),
        parents=(jnp.asarray(np.arange(8) % 3, jnp.int32),),
        hier_proxies=hier_lib.init_hier_proxies(jax.random.PRNGKey(1), 8, dim))
    embeddings = jnp.asarray(rng.normal(size=(16, dim)), jnp.float32)
    labels = jnp.asarray(np.repeat(np.arange(8), 2), jnp.int32)
    key = jax.random.PRNGKey(3)
    total, terms = train.create_loss_fn(config)(embeddings, labels, hierarchy, key)
    z = hier_lib.to_poincare(embeddings, 0.1, 2.3)
    base_loss = train.create_base_loss(config.loss)
    proxy_total, per_level = losses.hierarchical_proxy_loss(z, labels, hierarchy, base_loss=base_loss,
                                                            weights=(1.0, 0.1))
    regulariser = hier_lib.hier_loss(z, labels, hierarchy.hier_proxies, key, top_k=5, embeddings_on_ball=True)
    np.testing.assert_allclose(float(terms["loss/hier"]), float(regulariser), rtol=1e-6)
    np.testing.assert_allclose(float(total), float(proxy_total + regulariser), rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss/level_1"]), float(per_level[1]), rtol=1e-6)
    # The map into the ball keeps directions: the cosine proxy loss is the one of the embeddings themselves.
    on_x, _ = losses.hierarchical_proxy_loss(embeddings, labels, hierarchy, base_loss=base_loss, weights=(1.0, 0.1))
    np.testing.assert_allclose(float(proxy_total), float(on_x), rtol=1e-5)
    assert float(regulariser) > 0
    # Without HIER the loss takes no key and names no HIER term.
    _, plain_terms = train.create_loss_fn(tiny_config())(embeddings, labels, hierarchy.replace(hier_proxies=None), key)
    assert set(plain_terms) == {"loss/level_0", "loss/level_1"}


def test_the_step_key_depends_on_the_run_and_the_step_only():
    state = types.SimpleNamespace(rng=jax.random.PRNGKey(5), step=jnp.asarray(7, jnp.int32))
    again = types.SimpleNamespace(rng=jax.random.PRNGKey(5), step=jnp.asarray(7, jnp.int32))
    later = types.SimpleNamespace(rng=jax.random.PRNGKey(5), step=jnp.asarray(8, jnp.int32))
    other_run = types.SimpleNamespace(rng=jax.random.PRNGKey(6), step=jnp.asarray(7, jnp.int32))
    key = jax.random.key_data(train.step_key(state))
    assert np.array_equal(key, jax.random.key_data(train.step_key(again)))
    assert not np.array_equal(key, jax.random.key_data(train.step_key(later)))
    assert not np.array_equal(key, jax.random.key_data(train.step_key(other_run)))


@pytest.mark.slow
def test_two_devices_take_the_same_hier_step_as_one():
    """Every device mines the same triplets of the gathered batch with the same key: 2 devices step as 1 (HPL + HIER,
    the path with every term)."""
    # XLA's convolutions: with oneDNN's (conv_impl 'auto' on a CPU) the kernel gradients' rounding differs by device
    # count, and AdamW's first steps move each parameter by about +-lr whatever its gradient's size, so an entry
    # near zero takes the sign of its rounding (on an AVX2 CPU: the second loss 4.6e-5 apart, one layer4 kernel
    # entry 1.8e-4). What this test checks, the batch split and the mining, is independent of the convolutions.
    config = tiny_config(**WITH_HIER, **{"optim.warmup_epochs": 0, "model.conv_impl": "xla"})
    one, one_losses = _run_steps(config, 1, 2, wrapper="shard_map")
    two, two_losses = _run_steps(config, 2, 2, wrapper="shard_map")
    np.testing.assert_allclose(one_losses, two_losses, rtol=1e-5)
    assert one.hierarchy.hier_proxies is not None
    for a, b in zip(jax.tree_util.tree_leaves((one.params, one.hierarchy, one.batch_stats)),
                    jax.tree_util.tree_leaves((two.params, two.hierarchy, two.batch_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_a_refresh_keeps_hiers_proxies_and_their_optimiser_state():
    config = tiny_config(**WITH_HIER, **{"optim.warmup_epochs": 0})
    after, _ = _run_steps(config, 1, 2)
    refreshed = train.refresh_groupings(after, config)
    np.testing.assert_array_equal(np.asarray(refreshed.hierarchy.hier_proxies),
                                  np.asarray(after.hierarchy.hier_proxies))
    tree = train_state.trainable(refreshed.params, refreshed.hierarchy)
    labels, _ = optim.parameter_groups(tree, config.optim)
    before = optax.tree_utils.tree_get(after.opt_state, labels["hier_proxies"])
    kept = optax.tree_utils.tree_get(refreshed.opt_state, labels["hier_proxies"])
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("levels", ["(1.0,)", "(1.0,0.1)"], ids=["hier_on_flat_pa", "hpl_plus_hier"])
def test_hier_runs_train_and_resume_to_the_state_of_an_uninterrupted_run(tmp_path, levels):
    """`python -m hpl_jax.main` with HIER trains (its term is logged, its proxies move in the ball); HPL + HIER, the
    path with every term, also stops after epoch 1, starts again and ends where the straight run ends: the mining
    keys follow the step."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    flags = [*HIER_FLAGS, f"--config.hpl.weights={levels}", "--config.optim.warmup_epochs=0"]
    done = _main(straight, *flags, "--config.num_epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    hier_lines = [line for line in done.stderr.splitlines() if " hier " in line and "loss" in line]
    assert len(hier_lines) >= 2, done.stderr[-2000:]
    with open(os.path.join(straight, "metrics.json")) as f:
        metrics = json.load(f)
    radii = [refresh["hierarchy/hier_radius_mean"] for refresh in metrics["refreshes"]]
    assert len(radii) == 3 and radii[0] != radii[-1] and all(0 < r < 1 for r in radii)
    assert np.isfinite(metrics["history"]["2"]["map@r"])
    if levels == "(1.0,)":
        return
    first = _main(resumed, *flags, "--config.num_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    second = _main(resumed, *flags, "--config.num_epochs=2")
    assert second.returncode == 0 and "Resumed from" in second.stderr, second.stderr[-2000:]
    a, b = _final_state(straight), _final_state(resumed)
    assert a["hierarchy"]["hier_proxies"].shape == (8, 16)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_hier_needs_a_learning_rate_rule_for_its_proxies():
    config = tiny_config(**{"hier.weight": 0.5})
    with pytest.raises(config_checks.ConfigError, match=r"^config\.optim\.lr_mults: has no rule for HIER's proxies"):
        config_checks.validate_config(config, device_count=2, process_count=1)
    config_checks.validate_config(tiny_config(**WITH_HIER), device_count=2, process_count=1)


@pytest.mark.parametrize("backbone", hier_recipe.BACKBONES)
@pytest.mark.parametrize("dataset", sorted(hier_recipe.DATASET_CONFIGS))
def test_hiers_recipe_configs_load_and_pass_the_checks(backbone, dataset, tmp_path):
    config = importlib.import_module("configs.hier_recipe").get_config(f"{backbone},{dataset}")
    config.model.pretrained = ""
    config.model.bn_frozen = False  # frozen BatchNorm needs pretrained weights, which these checks do not have
    config_checks.validate_config(config, device_count=2, process_count=1)
    assert (config.hier.weight, config.hier.num_proxies, config.hier.top_k) == (0.5, 512, 20)
    assert (config.hier.curvature, config.hier.clip_r, config.hier.margin) == (0.1, 2.3, 0.1)
    assert config.hpl.weights == (1.0,) and config.batch_size == 180
    assert config.optim.lr_mults[:2] == (("hier_proxies", 50.0), ("proxies/.*", 1e4))
    assert "hier_proxies" in config.optim.warmup_trainable
    if backbone == "resnet50":
        lr, epochs, weight_decay, warmup, decay_epochs, gamma, _ = hier_recipe.RESNET50_SCHEDULES[dataset]
        assert (config.optim.lr, config.num_epochs, config.optim.weight_decay, config.optim.warmup_epochs,
                config.optim.decay_epochs, config.optim.decay_gamma) == (lr, epochs, weight_decay, warmup,
                                                                          decay_epochs, gamma)
        assert config.model.embedding_dim == 512 and config.dataset.samples_per_class == 2
    else:
        assert config.model.backbone == "vit_small" and config.optim.lr == 1e-5


def test_a_bad_recipe_argument_says_what_it_takes():
    with pytest.raises(ValueError, match="BACKBONE,DATASET"):
        hier_recipe.get_config("resnet50")
