"""The training system on CPU with 2 simulated devices (tests/conftest.py)."""
import functools
import itertools
import json
import os
import re
import subprocess
import sys

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from hpl_jax import data
from hpl_jax import grouping
from hpl_jax import models
from hpl_jax.core import hierarchy as hierarchy_lib
from hpl_jax.data import datasets
from hpl_jax.grouping import refresh as grouping_refresh
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import guards
from hpl_jax.trainer import optim
from hpl_jax.trainer import reporting
from hpl_jax.trainer import sharding
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
    config = default.get_config()
    config.dataset.image_size = 16
    config.dataset.resize_size = 18
    config.dataset.synthetic.num_families = 3
    config.dataset.synthetic.classes_per_family = 4
    config.dataset.synthetic.images_per_class = 7
    config.model.width = 0.125
    config.model.embedding_dim = 16
    config.hpl.num_coarse = (3,)
    config.batch_size = 16
    config.eval.batch_size = 16
    config.eval.nmi = False
    config.num_epochs = 2
    config.log_every_steps = 1
    config.dataset.num_val_classes = 0
    config.update_from_flattened_dict(overrides)
    return config


def _setup(config):
    dataset = datasets.get_dataset(config, local_batch_size=config.batch_size,
                               local_eval_batch_size=config.eval.batch_size)
    model = models.create_model(config.model, bn_axis_name=None if config.model.bn_frozen else train.AXIS)
    state = train_state.create_train_state(jax.random.PRNGKey(config.seed), config, model, dataset.info)
    labels, groups = optim.parameter_groups(train_state.trainable(state.params, state.hierarchy), config.optim)
    return dataset, model, state, labels, groups


def _run_steps(config, num_devices, num_steps, in_warmup=False, wrapper="pmap"):
    """`num_steps` train steps on `num_devices` devices, the step wrapped by jax.pmap or by sharding.over_devices
    (jit + shard_map, what the loop runs)."""
    dataset, model, state, labels, groups = _setup(config)
    devices = jax.local_devices()[:num_devices]
    step = train.create_train_step(config, model, labels, groups, in_warmup=in_warmup)
    batches = (batch for epoch in range(num_steps) for batch in dataset.train_batches(epoch))
    batches = data.prefetch_to_devices(itertools.islice(batches, num_steps), devices=devices)
    if wrapper == "pmap":
        step_fn = jax.pmap(step, axis_name=train.AXIS, devices=devices)
        state = flax.jax_utils.replicate(state, devices)
    else:
        mesh = sharding.device_mesh(train.AXIS, devices)
        step_fn = sharding.over_devices(step, mesh, donate_argnums=(0,))
        state = sharding.as_global(flax.jax_utils.replicate(state, devices), mesh)
        batches = (sharding.as_global(batch, mesh) for batch in batches)
    losses = []
    for batch in batches:
        state, step_metrics = step_fn(state, batch)
        losses.append(float(step_metrics["loss"][0]))
    return jax.device_get(sharding.unreplicate(state)), losses


@pytest.mark.slow
# Under the trainer's wrapper; pmap takes the same 2-device steps (test_over_devices_takes_the_steps_pmap_takes).
@pytest.mark.parametrize("base, wrapper", [("proxy_anchor", "shard_map"), ("proxy_nca", "shard_map")])
def test_two_devices_take_the_same_step_as_one(base, wrapper):
    config = tiny_config(**{"loss.base": base, "optim.warmup_epochs": 0})
    one, _ = _run_steps(config, 1, 2, wrapper=wrapper)
    two, _ = _run_steps(config, 2, 2, wrapper=wrapper)
    for a, b in zip(jax.tree_util.tree_leaves((one.params, one.hierarchy, one.batch_stats)),
                    jax.tree_util.tree_leaves((two.params, two.hierarchy, two.batch_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_over_devices_takes_the_steps_pmap_takes():
    config = tiny_config(**{"optim.warmup_epochs": 0})
    by_pmap, pmap_losses = _run_steps(config, 2, 2)
    by_shard_map, shard_map_losses = _run_steps(config, 2, 2, wrapper="shard_map")
    np.testing.assert_allclose(pmap_losses, shard_map_losses, rtol=1e-5)
    # Two compiled programs of the same sums round apart; Adam's normalised steps carry that to parameters near 0,
    # so the tolerance of the 1-vs-2-device test.
    for a, b in zip(jax.tree_util.tree_leaves(by_pmap), jax.tree_util.tree_leaves(by_shard_map)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_warmup_leaves_backbone_and_its_optimizer_state_untouched():
    config = tiny_config()
    _, _, initial, _, _ = _setup(config)
    after, _ = _run_steps(config, 1, 2, in_warmup=True)
    for a, b in zip(jax.tree_util.tree_leaves(initial.params["backbone"]),
                    jax.tree_util.tree_leaves(after.params["backbone"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(initial.params["embedding"]["kernel"], after.params["embedding"]["kernel"])
    assert not np.allclose(initial.hierarchy.proxies[0], after.hierarchy.proxies[0])
    _, groups = optim.parameter_groups(train_state.trainable(after.params, after.hierarchy), config.optim)
    waiting = [group for group, (_, trains_in_warmup) in groups.items() if not trains_in_warmup]
    assert waiting, "the backbone should be in a group that waits for the end of warm-up"
    for group in waiting:
        state = optax.tree_utils.tree_get(after.opt_state, group)
        assert {int(count) for _, count in optax.tree_utils.tree_get_all_with_path(state, "count")} == {0}
        for leaf in jax.tree_util.tree_leaves(optax.tree_utils.tree_get(state, "mu")):
            assert not np.any(np.asarray(leaf))


@pytest.mark.slow
def test_proxies_learn_100x_faster_than_the_embedding():
    config = tiny_config(**{"optim.warmup_epochs": 0})
    _, _, state, labels, groups = _setup(config)
    assert labels["proxies"][0] == "proxies_0_lr_x100" and labels["proxies"][1] == "proxies_1_lr_x100"
    assert labels["model"]["embedding"]["kernel"] == "lr_x1"
    assert groups["lr_x1_after_warmup"] == (1.0, False)


def _small_tree():
    """A trainable tree of the trainer's paths: a backbone and an embedding layer, two proxy levels."""
    rng = np.random.default_rng(0)
    leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {"model": {"backbone": {"kernel": leaf(3, 2)}, "embedding": {"kernel": leaf(2, 2)}},
            "proxies": (leaf(4, 2), leaf(2, 2))}


def test_the_learning_rate_is_set_by_name_and_the_multiplier_scales_each_group():
    config = tiny_config()
    tree = _small_tree()
    labels, groups = optim.parameter_groups(tree, config.optim)
    optimizer = optim.create_optimizer(labels, groups, config.optim)
    opt_state = optim.set_learning_rate(optimizer.init(tree), 0.5)
    rates = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
    assert len(rates) == len(groups) and all(float(rate) == 0.5 for _, rate in rates)
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    updates, _ = optimizer.update(grads, opt_state, tree, in_warmup=False)
    # A first AdamW step moves each entry by about lr x multiplier (plus the tiny weight decay).
    np.testing.assert_allclose(updates["model"]["embedding"]["kernel"], -0.5, rtol=1e-3)
    np.testing.assert_allclose(updates["proxies"][1], -50.0, rtol=1e-3)


def test_waiting_groups_are_masked_while_the_step_says_warm_up_whatever_their_counts():
    """The warm-up is the step's `in_warmup` (the loop's choice by the epoch), not a count of updates: neither a
    skipped non-finite step nor a reset can shift it."""
    config = tiny_config()
    tree = _small_tree()
    labels, groups = optim.parameter_groups(tree, config.optim)
    assert groups["lr_x1_after_warmup"] == (1.0, False)
    optimizer = optim.create_optimizer(labels, groups, config.optim)
    opt_state = optimizer.init(tree)
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    updates, warm = optimizer.update(grads, opt_state, tree, in_warmup=True)
    assert not np.any(updates["model"]["backbone"]["kernel"]) and np.all(updates["model"]["embedding"]["kernel"])
    waiting = optax.tree_utils.tree_get(warm, "lr_x1_after_warmup")
    assert {int(count) for _, count in optax.tree_utils.tree_get_all_with_path(waiting, "count")} == {0}
    assert int(optax.tree_utils.tree_get(optax.tree_utils.tree_get(warm, "lr_x1"), "ScaleByAdamState").count) == 1
    updates, trained = optimizer.update(grads, warm, tree, in_warmup=False)
    assert np.all(updates["model"]["backbone"]["kernel"])
    # The waiting group's first step after the warm-up is a fresh AdamW's first step.
    np.testing.assert_allclose(updates["model"]["backbone"]["kernel"], -config.optim.lr, rtol=1e-3)


def test_a_reset_gives_the_named_groups_a_fresh_state_and_keeps_the_others():
    config = tiny_config()
    tree = _small_tree()
    labels, groups = optim.parameter_groups(tree, config.optim)
    optimizer = optim.create_optimizer(labels, groups, config.optim)
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    _, trained = optimizer.update(grads, optimizer.init(tree), tree, in_warmup=False)
    reset = optim.reset_group_states(trained, ["proxies_1_lr_x100"], tree, labels, groups, config.optim)
    fresh = optimizer.init(tree)
    for group in groups:
        expected = fresh if group == "proxies_1_lr_x100" else trained
        for a, b in zip(jax.tree_util.tree_leaves(optax.tree_utils.tree_get(reset, group)),
                        jax.tree_util.tree_leaves(optax.tree_utils.tree_get(expected, group))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=group)


@pytest.mark.slow
def test_tiny_run_overfits_training_classes():
    # No augmentation (train and eval see the same whole 16x16 images), the same few images every epoch.
    config = tiny_config(**{"optim.warmup_epochs": 0, "optim.lr": 3e-3, "hpl.weights": (1.0,),
                            "dataset.crop_scale": (1.0, 1.0), "dataset.crop_ratio": (1.0, 1.0),
                            "dataset.horizontal_flip": False, "dataset.resize_size": 16})
    dataset, model, _, _, _ = _setup(config)
    state, losses = _run_steps(config, 2, 60)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    p_embed = jax.pmap(functools.partial(evaluation.embed_step, model=model, dataset_config=config.dataset),
                       axis_name=train.AXIS)
    embeddings, labels = evaluation.embed_split(p_embed, flax.jax_utils.replicate(state), dataset, "train")
    from hpl_jax.core import metrics
    assert metrics.retrieval_metrics(embeddings, labels, nmi=False)["recall@1"] > 0.9


@pytest.mark.slow
def test_evaluation_embeds_every_example_exactly_once():
    config = tiny_config(**{"eval.batch_size": 10})  # 42 test images: not a multiple of 10
    dataset, model, state, _, _ = _setup(config)
    p_embed = jax.pmap(functools.partial(evaluation.embed_step, model=model, dataset_config=config.dataset),
                       axis_name=train.AXIS)
    embeddings, labels = evaluation.embed_split(p_embed, flax.jax_utils.replicate(state), dataset, "test")
    assert dataset.info.num_eval_examples["test"] == 42 and embeddings.shape == (42, 16)
    # The model applied to each batch's real images alone, under jit (op by op it took 15 s of the test's 18).
    apply = jax.jit(lambda images: model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                               data.normalize_pixels(images, config.dataset), train=False))
    reference = np.concatenate([apply(b["image"][b["mask"]]) for b in dataset.eval_batches("test")])
    np.testing.assert_allclose(embeddings, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.sort(labels), np.repeat(np.arange(6), 7))


@pytest.mark.slow
def test_refresh_regroups_without_empty_groups_and_resets_moments():
    config = tiny_config(**{"optim.warmup_epochs": 0})
    state, _ = _run_steps(config, 2, 3)
    before = np.asarray(state.hierarchy.parents[0])
    moved = state.replace(hierarchy=state.hierarchy.replace(
        proxies=(state.hierarchy.proxies[0][::-1],) + state.hierarchy.proxies[1:]))
    refreshed = train.refresh_groupings(moved, config)
    after = np.asarray(refreshed.hierarchy.parents[0])
    assert not np.array_equal(before, after)
    assert np.all(np.bincount(after, minlength=3) >= 1)
    fine, coarse = (optax.tree_utils.tree_get(refreshed.opt_state, f"proxies_{level}_lr_x100") for level in (0, 1))
    assert {int(count) for _, count in optax.tree_utils.tree_get_all_with_path(coarse, "count")} == {0}
    assert not np.any(np.asarray(optax.tree_utils.tree_get(coarse, "mu")["proxies"][1]))
    assert {int(count) for _, count in optax.tree_utils.tree_get_all_with_path(fine, "count")} == {3}
    assert np.any(np.asarray(optax.tree_utils.tree_get(fine, "mu")["proxies"][0]))


@pytest.mark.slow
def test_the_state_starts_without_kmeans_and_the_jax_backend_makes_the_first_and_the_refreshed_groupings(
        monkeypatch):
    config = tiny_config(**{"hpl.kmeans_backend": "jax"})
    calls = []
    kmeans_grouping = grouping.kmeans_grouping
    monkeypatch.setattr(grouping_refresh, "kmeans_grouping",
                        lambda *args, **kwargs: calls.append(kwargs["backend"]) or kmeans_grouping(*args, **kwargs))
    _, _, state, _, _ = _setup(config)
    # The loop's first grouping (or a restore) replaces the initial one: no k-means is made for it.
    assert calls == []
    hierarchy_lib.validate_parents(state.hierarchy.parents, state.hierarchy.level_sizes)
    fine = state.hierarchy.proxies[0]
    first = train.refresh_groupings(state, config, policy="reset")
    initial, _ = kmeans_grouping(fine, 3, seed=train.kmeans_seed(state, 0), n_init=config.hpl.kmeans_restarts,
                                 backend="jax")
    np.testing.assert_array_equal(first.hierarchy.parents[0], initial)
    assert calls == ["jax"]
    moved = state.replace(hierarchy=state.hierarchy.replace(proxies=(fine[::-1],) + state.hierarchy.proxies[1:]))
    refreshed = train.refresh_groupings(moved, config)
    expected, _ = grouping.kmeans_grouping(fine[::-1], 3, seed=train.kmeans_seed(moved, int(moved.step)),
                                                n_init=config.hpl.kmeans_restarts, backend="jax")
    np.testing.assert_array_equal(refreshed.hierarchy.parents[0], expected)


@pytest.mark.slow
def test_a_reset_coarse_proxy_takes_the_step_of_a_fresh_adamw():
    """After a refresh resets level 1, its first update is a fresh AdamW step (step count 1, zero moments), not
    one bias-corrected with the steps the fine proxies took."""
    config = tiny_config(**{"optim.warmup_epochs": 0})
    state, _ = _run_steps(config, 2, 4)
    refreshed = train.refresh_groupings(state, config)
    labels, groups = optim.parameter_groups(train_state.trainable(refreshed.params, refreshed.hierarchy),
                                            config.optim)
    tree = train_state.trainable(refreshed.params, refreshed.hierarchy)
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape), x.dtype), tree)
    opt_state = optim.set_learning_rate(refreshed.opt_state, config.optim.lr)
    updates, _ = optim.create_optimizer(labels, groups, config.optim).update(grads, opt_state, tree, in_warmup=False)

    proxy_lr = config.optim.lr * 100
    coarse = refreshed.hierarchy.proxies[1]
    fresh = optax.chain(optax.clip(config.optim.grad_clip_value),
                        optax.adamw(proxy_lr, weight_decay=config.optim.weight_decay))
    expected, _ = fresh.update(grads["proxies"][1], fresh.init(coarse), coarse)
    np.testing.assert_allclose(np.asarray(updates["proxies"][1]), np.asarray(expected), rtol=1e-5, atol=1e-8)
    # A fresh AdamW's first step moves every entry by about lr (|m_hat / sqrt(v_hat)| = 1).
    assert np.allclose(np.abs(np.asarray(updates["proxies"][1])), proxy_lr, rtol=0.05)


def _gradients(config, num_devices):
    dataset, model, state, labels, groups = _setup(config)
    devices = jax.local_devices()[:num_devices]
    grad_fn = jax.pmap(functools.partial(train.loss_and_gradients, model=model, loss_fn=train.create_loss_fn(config),
                                         normalize_fn=functools.partial(data.normalize_pixels,
                                                                        dataset_config=config.dataset)),
                       axis_name=train.AXIS, devices=devices)
    batch = data.shard_for_devices(next(dataset.train_batches(0)), num_devices)
    total, _, _, grads = grad_fn(flax.jax_utils.replicate(state, devices), batch)
    return float(total[0]), jax.device_get(sharding.unreplicate(grads))


@pytest.mark.slow
@pytest.mark.parametrize("base", ["proxy_anchor", "proxy_nca"])
def test_two_devices_get_exactly_the_global_batch_gradient(base):
    """all_gather + pmean over 2 devices gives the gradient 1 device computes on the whole batch: a gradient
    scaled by the device count (psum instead of pmean) fails here, though Adam steps nearly hide it."""
    config = tiny_config(**{"loss.base": base, "model.bn_frozen": True})
    loss_one, one = _gradients(config, 1)
    loss_two, two = _gradients(config, 2)
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for path, a in jax.tree_util.tree_leaves_with_path(one):
        b = two
        for key in path:
            b = b[key.key if hasattr(key, "key") else key.idx]
        scale = np.max(np.abs(a)) + 1e-12
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_config_errors_name_the_field():
    cases = {
        "dataset.name": "imagenet", "model.backbone": "vgg", "loss.base": "triplet", "hpl.coarse_policy": "x",
        "batch_size": 15, "eval.batch_size": 7, "optim.decay_gamma": 0.0, "hpl.num_coarse": (1,),
        "checkpoint.best_metric": "recall@3", "model.pretrained": "/no/such/dir",
        "dataset.resize_size": 8, "hpl.kmeans_backend": "faiss", "eval.costly_metrics_every_epochs": 0,
        "compilation_cache_dir": __file__,
    }
    # Tuple elements of the wrong type (ml_collections checks only scalar fields' types).
    wrong_elements = {"hpl.weights": ("(1.0,abc)",), "hpl.num_coarse": (2.5,), "dataset.mean": (0.5, 0.5, "x"),
                      "optim.lr_mults": ((1, 2.0),), "optim.frozen": (3,)}
    for field, value in [*cases.items(), *wrong_elements.items()]:
        with pytest.raises(config_checks.ConfigError, match=f"config.{field}"):
            config_checks.validate_config(tiny_config(**{field: value}), device_count=2, process_count=1)
    with pytest.raises(config_checks.ConfigError, match="config.checkpoint.best_metric.*costly_metrics_every_epochs"):
        config_checks.validate_config(tiny_config(**{"checkpoint.best_metric": "nmi", "eval.nmi": True,
                                                     "eval.costly_metrics_every_epochs": 2}),
                                      device_count=2, process_count=1)
    with pytest.raises(config_checks.ConfigError, match="config.dataset.data_dir"):
        config_checks.validate_config(tiny_config(**{"dataset.name": "image_folder", "dataset.data_dir": "/no/dir"}),
                                      device_count=2, process_count=1)
    info = datasets.get_dataset(tiny_config(), local_batch_size=16, local_eval_batch_size=16).info
    with pytest.raises(config_checks.ConfigError, match=r"config.hpl.num_coarse.*K_1 = 6 .* 6 training classes"):
        config_checks.validate_against_dataset(tiny_config(**{"hpl.num_coarse": (6,)}), info)


def test_a_config_the_dataset_refuses_leaves_no_record_so_the_corrected_rerun_is_a_new_run(tmp_path):
    # K_1 is checked against the dataset's class count once the dataset is read; the refused run must not have
    # written config.json, or the corrected command in the same workdir would be taken for a changed resume.
    with pytest.raises(config_checks.ConfigError, match=r"config.hpl.num_coarse.*K_1 = 6"):
        train.train_and_evaluate(tiny_config(**{"hpl.num_coarse": (6,)}), str(tmp_path))
    assert not (tmp_path / checkpointing.CONFIG_FILE).exists()
    checkpointing.prepare_workdir(str(tmp_path), tiny_config())  # not a resume: nothing to compare


def _main(workdir, *overrides, code=None):
    """Runs `python -m hpl_jax.main` on the tiny config (or `python -c code` with the same arguments)."""
    env = dict(os.environ, XLA_FLAGS=xla.flags(2), JAX_PLATFORMS="cpu")
    tiny = ["--config.dataset.image_size=16", "--config.dataset.resize_size=18",
            "--config.dataset.synthetic.num_families=3", "--config.dataset.synthetic.classes_per_family=4",
            "--config.dataset.synthetic.images_per_class=7", "--config.model.width=0.125",
            "--config.model.embedding_dim=16", "--config.hpl.num_coarse=(3,)", "--config.batch_size=16",
            "--config.eval.batch_size=16", "--config.eval.nmi=False", "--config.dataset.num_val_classes=0"]
    overridden = {flag.split("=")[0] for flag in overrides}
    command = [sys.executable, *(["-c", code] if code else ["-m", "hpl_jax.main"]), "--config=configs/default.py",
               f"--workdir={workdir}",
               *[flag for flag in tiny if flag.split("=")[0] not in overridden], *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _final_state(workdir):
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())


@pytest.mark.slow
def test_the_compilation_cache_keeps_the_programs_a_restart_loads(tmp_path):
    cache = tmp_path / "compile_cache"
    # Every program is kept (the default keeps those that took >= 1 s to compile).
    code = ("import jax; jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
            "from absl import app; from hpl_jax import main; from hpl_jax.trainer import cli; "
            "app.run(main.main, flags_parser=cli.parse_flags)")
    first = _main(str(tmp_path / "run"), "--config.num_epochs=1", f"--config.compilation_cache_dir={cache}",
                  code=code)
    assert first.returncode == 0, first.stderr[-2000:]
    kept = set(os.listdir(cache))
    assert kept
    again = _main(str(tmp_path / "again"), "--config.num_epochs=1", f"--config.compilation_cache_dir={cache}",
                  code=code)
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(os.listdir(cache)) == kept  # every program came from the cache


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert _main(straight, "--config.num_epochs=2").returncode == 0
    first = _main(resumed, "--config.num_epochs=1", "--config.optim.warmup_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    second = _main(resumed, "--config.num_epochs=2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Resumed from" in second.stderr
    a, b = _final_state(straight), _final_state(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    with open(os.path.join(resumed, "metrics.json")) as f:
        assert set(json.load(f)["history"]) == {"0", "1", "2"}


@pytest.mark.slow
def test_main_reports_a_bad_config_in_one_line(tmp_path):
    result = _main(str(tmp_path), "--config.hpl.num_coarse=(50,)")
    assert result.returncode != 0
    assert "config.hpl.num_coarse" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_pretrained_weights_start_the_backbone_and_set_the_input_normalisation(tmp_path):
    from hpl_jax.models import convert as convert_weights
    model = models.Embedder("resnet18", embedding_dim=16)
    variables = model.init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3)), train=False)
    backbone = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.5, variables["params"]["backbone"])
    stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"]["backbone"])
    metadata = {"architecture": "resnet18", "preprocessing": convert_weights.PREPROCESSING["bn_inception"]}
    convert_weights.save_converted(str(tmp_path / "weights"), backbone, stats, metadata)

    config = tiny_config(**{"model.width": 1.0, "model.pretrained": str(tmp_path / "weights")})
    config = train.with_pretrained_preprocessing(config)
    assert config.dataset.color_order == "bgr" and config.dataset.pixel_scale == 255.0
    assert tuple(config.dataset.mean) == (104, 117, 128)
    _, _, state, _, _ = _setup(config)
    for a, b in zip(jax.tree_util.tree_leaves(state.params["backbone"]), jax.tree_util.tree_leaves(backbone)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert np.std(np.asarray(state.params["embedding"]["kernel"])) > 0  # the head stays freshly initialised

    wrong = tiny_config(**{"model.width": 1.0, "model.backbone": "resnet34",
                           "model.pretrained": str(tmp_path / "weights")})
    with pytest.raises(ValueError, match="resnet34"):
        _setup(wrong)


@pytest.mark.slow
def test_main_reports_unusable_data_in_one_line(tmp_path):
    (tmp_path / "images").mkdir()  # an image folder with no class folders
    result = _main(str(tmp_path / "workdir"), "--config.dataset.name=image_folder",
                   f"--config.dataset.data_dir={tmp_path / 'images'}")
    assert result.returncode != 0
    assert "Data error: config.dataset.data_dir" in result.stderr and "Traceback" not in result.stderr


def test_embedded_batches_carry_pixels_the_device_normalises():
    """Train crops f32 in 0..255 (interpolated), eval crops u8 (data.py); the step's input is their
    normalisation on the device, equal to the host normalisation the batches had before (to float32 rounding)."""
    config = tiny_config()
    dataset = datasets.get_dataset(config, local_batch_size=16, local_eval_batch_size=16)
    train_batch, eval_batch = next(dataset.train_batches(0)), next(dataset.eval_batches("test"))
    assert train_batch["image"].dtype == np.float32 and train_batch["image"].shape == (16, 16, 16, 3)
    assert 0.0 <= train_batch["image"].min() and 1.0 < train_batch["image"].max() <= 255.0
    assert eval_batch["image"].dtype == np.uint8 and eval_batch["image"].shape == (16, 16, 16, 3)
    mean, std = np.asarray(config.dataset.mean, np.float32), np.asarray(config.dataset.std, np.float32)
    normalise = jax.jit(functools.partial(data.normalize_pixels, dataset_config=config.dataset))
    for images in (train_batch["image"], eval_batch["image"]):
        np.testing.assert_allclose(np.asarray(normalise(images)), (images.astype(np.float32) / 255.0 - mean) / std,
                                   rtol=2e-7, atol=1e-6)


def test_the_training_seed_keeps_the_data_and_the_data_seed_changes_it():
    def images(**overrides):
        dataset = datasets.get_dataset(tiny_config(**overrides), local_batch_size=16, local_eval_batch_size=16)
        return np.concatenate([b["image"] for b in dataset.eval_batches("test")])

    reference = images()
    np.testing.assert_array_equal(images(seed=5), reference)
    assert not np.allclose(images(**{"dataset.seed": 5}), reference)


def test_validation_classes_are_held_out_class_disjointly_and_deterministically():
    config = tiny_config(**{"dataset.num_val_classes": 2})
    whole = datasets.get_dataset(tiny_config(), local_batch_size=16, local_eval_batch_size=16)
    held = datasets.get_dataset(config, local_batch_size=16, local_eval_batch_size=16)
    info = held.info
    assert (info.num_train_classes, info.num_eval_examples) == (4, {"train": 28, "val": 14, "test": 42})
    assert info.eval_splits == ("test",)

    def rows(dataset, split):
        return np.concatenate([b["image"][b["mask"]].reshape(int(b["mask"].sum()), -1)
                               for b in dataset.eval_batches(split)])

    original = rows(whole, "train")
    parts = np.concatenate([rows(held, "train"), rows(held, "val")])
    np.testing.assert_array_equal(np.sort(parts, axis=0), np.sort(original, axis=0))  # a partition of train
    train_classes, val_classes = data.validation_split(6, 2, config.dataset.seed)
    np.testing.assert_array_equal(info.val_super_labels, whole.info.train_super_labels[val_classes])
    np.testing.assert_array_equal(info.train_super_labels, whole.info.train_super_labels[train_classes])
    again = data.validation_split(6, 2, config.dataset.seed)
    np.testing.assert_array_equal(again[1], val_classes)
    assert not set(train_classes) & set(val_classes) and len(set(train_classes) | set(val_classes)) == 6
    with pytest.raises(config_checks.ConfigError, match="config.dataset.num_val_classes"):
        datasets.get_dataset(tiny_config(**{"dataset.num_val_classes": 5}), local_batch_size=16,
                             local_eval_batch_size=16)


@pytest.mark.slow
def test_the_costly_metrics_are_computed_at_their_cadence_at_epoch_0_and_at_the_last_epoch(tmp_path):
    config = tiny_config(**{"num_epochs": 4, "steps_per_epoch": 1, "optim.warmup_epochs": 0, "eval.nmi": True,
                            "eval.costly_metrics_every_epochs": 3})
    result = train.train_and_evaluate(config, str(tmp_path))
    for epoch, values in result["history"].items():
        costly = epoch in (0, 3, 4)
        assert ("nmi" in values) == costly and ("super/map@r" in values) == costly, (epoch, sorted(values))
        assert "map@r" in values


@pytest.mark.slow
def test_validation_chooses_the_best_epoch_and_each_refresh_is_recorded(tmp_path):
    config = tiny_config(**{"dataset.num_val_classes": 2, "num_epochs": 3, "optim.warmup_epochs": 0})
    result = train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["selected_on"] == "val/map@r"
    trained = {int(e): v for e, v in saved["history"].items() if int(e) > 0}
    assert saved["best"]["epoch"] == max(trained, key=lambda e: trained[e]["val/map@r"])
    assert result["best"]["epoch"] == saved["best"]["epoch"]
    for values in saved["history"].values():
        assert {"map@r", "val/map@r", "val/super/map@r", "hierarchy/level_1_nmi"} <= set(values)
    refreshes = saved["refreshes"]
    assert [(r["epoch"], r["step"]) for r in refreshes] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert all(0.0 <= r["hierarchy/level_1_nmi"] <= 1.0 and "hierarchy/level_1_stability_ari" in r
               for r in refreshes[1:])
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dataset"]["num_val_classes"] == 2


@pytest.mark.slow
def test_ground_truth_level1_sizes_level1_from_the_super_classes(tmp_path):
    """K_1 = 2 asked, 3 families present: level 1 has 3 proxies, and the optimiser and checkpoints fit it."""
    config = tiny_config(**{"hpl.ground_truth_level1": True, "hpl.num_coarse": (2,), "num_epochs": 1,
                            "optim.warmup_epochs": 0})
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["last"]["hierarchy/level_1_nmi"] == pytest.approx(1.0)
    state = _final_state(str(tmp_path))
    assert [np.shape(p) for p in state["hierarchy"]["proxies"]] == [(6, 16), (3, 16)]
# --------------------------------------------------------------------------------------------- what stops a run
def _one_error_line(result, prefix):
    """The run failed with exactly one line starting with `prefix` and no traceback; returns that line."""
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _all_finite(tree):
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
    assert leaves
    return all(np.all(np.isfinite(leaf)) for leaf in leaves if np.issubdtype(leaf.dtype, np.floating))


@pytest.mark.slow
def test_a_nonfinite_step_stops_the_run_and_the_latest_checkpoint_stays_good(tmp_path):
    # lr 1e30 without clipping: step 1 leaves huge but finite parameters (saved: a checkpoint every step),
    # step 2's forward pass overflows.
    result = _main(str(tmp_path), "--config.optim.lr=1e30", "--config.optim.grad_clip_value=0",
                   "--config.hpl.weights=(1.0,)", "--config.optim.warmup_epochs=0", "--config.num_epochs=2",
                   "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=10")
    line = _one_error_line(result, "Training error:")
    assert re.search(r"non-finite loss or gradient at step 2 \(epoch 1\): loss nan \(levels nan\), lr 1\.00e\+30",
                     line), line
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    assert manager.all_steps() == [1]  # the save in flight when step 2 failed completed; step 2 was not saved
    assert _all_finite(manager.restore(1))


@pytest.mark.slow
def test_progress_lines_read_the_metrics_one_step_behind(tmp_path, monkeypatch):
    """A log step's line is written after the next step is dispatched (the host never waits for the step it has
    just dispatched to log), the epoch's last line at the epoch's end; every log step once, in order."""
    events = []
    add = guards.StepMetrics.add

    def recorded_add(self, step, epoch, metrics, **kwargs):
        events.append(("dispatched", step))
        return add(self, step, epoch, metrics, **kwargs)

    monkeypatch.setattr(guards.StepMetrics, "add", recorded_add)
    monkeypatch.setattr(reporting.Reporter, "progress",
                        lambda self, epoch, num_epochs, step, images, values: events.append(("line", step)))
    config = tiny_config(**{"num_epochs": 1, "steps_per_epoch": 4, "log_every_steps": 2, "hpl.weights": (1.0,),
                            "optim.warmup_epochs": 0})
    train.train_and_evaluate(config, str(tmp_path))
    assert events == [("dispatched", 1), ("dispatched", 2), ("dispatched", 3), ("line", 2), ("dispatched", 4),
                      ("line", 4)]


@pytest.mark.slow
def test_skip_nonfinite_steps_leaves_the_state_as_it_was_but_for_the_step():
    config = tiny_config(**{"optim.warmup_epochs": 0, "optim.skip_nonfinite_steps": True})
    dataset, model, state, labels, groups = _setup(config)
    step_fn = jax.pmap(train.create_train_step(config, model, labels, groups, in_warmup=False), axis_name=train.AXIS)
    batch = data.shard_for_devices(next(dataset.train_batches(0)), 2)
    replicated = sharding.replicate(state, train.AXIS)
    after, metrics = step_fn(replicated, batch)
    assert np.all(np.asarray(metrics["finite"]))
    after = jax.device_get(sharding.unreplicate(after))
    assert not np.allclose(after.hierarchy.proxies[0], state.hierarchy.proxies[0])

    batch["image"][0, 0, 0, 0, 0] = np.inf
    skipped, metrics = step_fn(replicated, batch)
    assert not np.any(np.asarray(metrics["finite"])) and np.isnan(np.asarray(metrics["loss"])).all()
    skipped = jax.device_get(sharding.unreplicate(skipped))
    assert int(skipped.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(skipped.replace(step=state.step)), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_resume_refuses_a_config_that_changes_the_train_state(tmp_path):
    checkpointing.save_config(checkpointing.workdir_path(str(tmp_path)), tiny_config())
    changed = tiny_config(**{"hpl.num_coarse": (4,), "model.embedding_dim": 8, "num_epochs": 3})
    with pytest.raises(config_checks.ConfigError) as error:
        train.train_and_evaluate(changed, str(tmp_path))
    message = str(error.value)
    assert "config.hpl.num_coarse = (3,) there, (4,) now" in message
    assert "config.model.embedding_dim = 16 there, 8 now" in message
    assert "num_epochs" not in message and "\n" not in message
    # Fields that steer how long a run goes and what it reports may change.
    saved = tiny_config().to_dict()
    allowed = tiny_config(**{"num_epochs": 30, "log_every_steps": 5, "eval.every_epochs": 2,
                             "checkpoint.keep": 5, "dataset.data_dir": "/elsewhere"})
    checkpointing.check_resumed_config(saved, allowed, "config.json")
    for field, value in {"seed": 1, "batch_size": 32, "optim.lr": 1.0, "loss.base": "proxy_nca",
                         "dataset.image_size": 24, "checkpoint.best_metric": "recall@1"}.items():
        with pytest.raises(config_checks.ConfigError, match=f"config.{field} = "):
            checkpointing.check_resumed_config(saved, tiny_config(**{field: value}), "config.json")


def test_a_config_json_from_before_a_field_existed_loads_with_its_default(tmp_path):
    """Workdirs saved before fields were added (e.g. optim.skip_nonfinite_steps) restore and resume: the missing
    fields take configs/default.py's values, which keep the earlier behaviour."""
    path = checkpointing.workdir_path(str(tmp_path))
    checkpointing.save_config(path, tiny_config())
    saved = json.loads((path / checkpointing.CONFIG_FILE).read_text())
    del saved["optim"]["skip_nonfinite_steps"], saved["steps_per_epoch"]
    (path / checkpointing.CONFIG_FILE).write_text(json.dumps(saved))
    loaded = checkpointing.load_config(path)
    assert loaded.optim.skip_nonfinite_steps is False and loaded.steps_per_epoch == 0
    assert loaded.model.embedding_dim == 16  # saved values win over the defaults
    checkpointing.prepare_workdir(str(tmp_path), tiny_config())  # the resume check passes


@pytest.mark.slow
def test_a_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(checkpointing.WorkdirError, match="is a file"):
        train.train_and_evaluate(tiny_config(), str(tmp_path / "file"))
    with pytest.raises(checkpointing.WorkdirError, match="is a file"):
        train.train_and_evaluate(tiny_config(), str(tmp_path / "file" / "run"))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(type(checkpointing.workdir_path(str(tmp_path))), "write_text", read_only)
    with pytest.raises(checkpointing.WorkdirError, match=r"cannot be written \(Read-only file system\)"):
        train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))


@pytest.mark.slow
def test_main_reports_a_typo_a_bad_tuple_and_a_file_workdir_in_one_line(tmp_path):
    line = _one_error_line(_main(str(tmp_path / "w"), "--config.optim.lrr=1"), "Config error:")
    assert line == "Config error: config.optim.lrr: no such field ('lrr'); did you mean 'lr'?"
    line = _one_error_line(_main(str(tmp_path / "w"), "--config.hpl.weights=(1.0,abc)"), "Config error:")
    assert line.startswith("Config error: config.hpl.weights: ('(1.0,abc)',) holds '(1.0,abc)', which is not a number")
    (tmp_path / "file").write_text("")
    line = _one_error_line(_main(str(tmp_path / "file")), "Workdir error:")
    assert line == f"Workdir error: --workdir {tmp_path / 'file'} is a file (or lies under one); pass a directory."


# Fails the background save of best/<BEST_STEP> as a full disk does (orbax's NumPy leaves are written by
# NumpyHandler._open_and_write in its save thread), then runs main with the command line's flags.
FULL_DISK = """
import errno, orbax.checkpoint as ocp
from absl import app
from hpl_jax import main
from hpl_jax.trainer import cli
write = ocp.type_handlers.NumpyHandler._open_and_write
async def full_disk(self, value, tspec, context):
    if "/best/{step}.orbax-checkpoint-tmp" in str(tspec):
        raise OSError(errno.ENOSPC, "No space left on device")
    return await write(self, value, tspec, context)
ocp.type_handlers.NumpyHandler._open_and_write = full_disk
app.run(main.main, flags_parser=cli.parse_flags)
"""


@pytest.mark.slow
def test_a_failed_save_stops_the_run_and_a_rerun_resumes_with_best_consistent(tmp_path):
    import orbax.checkpoint as ocp
    flags = ["--config.batch_size=8", "--config.num_epochs=3", "--config.optim.warmup_epochs=0",
             "--config.checkpoint.keep=3"]  # 5 steps per epoch
    # The save of best/ at the end of epoch 1 fails in the background: the run stops in epoch 2 or 3 (a step
    # after the failure, or at the next save), leaving best/5 half-written, as a kill during that save does.
    first = _main(str(tmp_path), *flags, code=FULL_DISK.format(step=5))
    line = _one_error_line(first, "Workdir error:")
    checkpoints = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    assert 5 <= checkpoints.latest_step() < 15
    assert line == (f"Workdir error: saving a checkpoint in {tmp_path / 'best'} failed (No space left on device); "
                    f"{tmp_path / 'checkpoints'}/{checkpoints.latest_step()} is the resume point: free space or fix "
                    "the file system, then run the same command again.")
    assert os.path.isdir(tmp_path / "best" / "5.orbax-checkpoint-tmp")

    # Space freed: the rerun resumes, removes the leftover, re-saves best/ from checkpoints/ and finishes.
    second = _main(str(tmp_path), *flags)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "best/ re-saved from checkpoints/" in second.stderr
    assert not [name for name in os.listdir(tmp_path / "best") if "tmp" in name]
    with open(tmp_path / "metrics.json") as f:
        summary = json.load(f)
    best = ocp.CheckpointManager(os.path.join(tmp_path, "best"))
    assert best.all_steps() == [5 * summary["best"]["epoch"]] and summary["best_checkpoint_epoch"] == summary["best"]["epoch"]
    assert sorted(summary["history"], key=int) == ["0", "1", "2", "3"]


def test_due_is_the_loops_one_cadence():
    assert [count for count in range(1, 13) if train.due(count, 5)] == [5, 10]
    assert [count for count in range(1, 4) if train.due(count, 1)] == [1, 2, 3]
    assert not any(train.due(count, 0) for count in range(1, 10))  # 0 = off (refresh_every_steps, every_steps)
