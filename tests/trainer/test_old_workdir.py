"""A workdir written by hpl-jax 0.3.0 (tests/fixtures/v0_3_0: workdir.tgz, stopped after 2 epochs of warm-up, and
what 0.3.0 read back from it) is still read and resumed: its optimiser state, laid out as 0.3.0's optimiser laid
it out, is migrated on restore (checkpointing.restore_checkpoint, train_state.OLDER_LAYOUTS)."""
import jax
import numpy as np
import optax
import pytest

from configs import default
from hpl_jax.trainer import optim
from hpl_jax.trainer import restore
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state
from tests.fixtures import old_release


@pytest.fixture
def old_workdir(tmp_path):
    """The workdir 0.3.0 wrote (tests/fixtures/v0_3_0/README.md has its command), extracted afresh."""
    return old_release.extract("workdir.tgz", tmp_path, "oldwd")


def recorded():
    """recorded.json: leaf sums (float64) of what 0.3.0 read back ('workdir_latest') and reached when it resumed
    the workdir for a third epoch ('resumed_to_3_epochs')."""
    return old_release.recorded()


def leaf_sums(tree):
    """{jax.tree_util.keystr(path): float64 sum of the leaf}, the form recorded.json keeps."""
    return {jax.tree_util.keystr(path): float(np.asarray(leaf, np.float64).sum())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def fixture_config(num_epochs):
    """configs/default.py with the overrides of the command that wrote the workdir (its README.md)."""
    config = default.get_config()
    config.update_from_flattened_dict({
        "dataset.image_size": 16, "dataset.resize_size": 18, "dataset.synthetic.num_families": 3,
        "dataset.synthetic.classes_per_family": 4, "dataset.synthetic.images_per_class": 7, "model.width": 0.0625,
        "model.embedding_dim": 8, "hpl.num_coarse": (3,), "batch_size": 16, "eval.batch_size": 16,
        "eval.nmi": False, "num_epochs": num_epochs, "optim.warmup_epochs": 2, "dataset.num_val_classes": 0,
        "log_every_steps": 1})
    return config


def test_a_0_3_0_workdir_is_read_with_its_optimizer_state_migrated(old_workdir):
    latest = recorded()["workdir_latest"]
    state = restore.restore_run(old_workdir).state
    assert (int(state.step), int(state.epoch)) == (latest["step"], latest["epoch"])
    for name, tree in (("params", state.params), ("proxies", state.hierarchy.proxies)):
        sums = leaf_sums(tree)
        assert sorted(sums) == sorted(latest[name])
        for key, value in latest[name].items():
            assert sums[key] == pytest.approx(value, rel=1e-12, abs=1e-12), f"{name}{key}"
    assert [np.asarray(parents).tolist() for parents in state.hierarchy.parents] == latest["parents"]

    # Every group's base-optimiser state, as 0.3.0 held it under [1].inner_states[group].inner_state: moments,
    # counts and hyperparameters, but the learning rate: 0.3.0's was multiplied by the group's multiplier, this
    # version's is the base rate (the multiplier is a transform).
    config = fixture_config(2)
    _, groups = optim.parameter_groups(train_state.trainable(state.params, state.hierarchy), config.optim)
    compared = set()
    for group, (multiplier, _) in groups.items():
        injected = optax.tree_utils.tree_get(optax.tree_utils.tree_get(state.opt_state, group),
                                             "InjectStatefulHyperparamsState")
        for path, value in leaf_sums(injected).items():
            old_path = f"[1].inner_states['{group}'].inner_state{path}"
            if path == ".hyperparams['learning_rate']":
                assert value == pytest.approx(config.optim.lr, rel=1e-7)
                assert latest["opt_state"][old_path] == pytest.approx(config.optim.lr * multiplier, rel=1e-7)
            else:
                assert value == pytest.approx(latest["opt_state"][old_path], rel=1e-12, abs=1e-12), old_path
            compared.add(old_path)
    assert compared == set(latest["opt_state"])  # 0.3.0's whole optimiser state has a place in the new one


@pytest.mark.slow
def test_a_0_3_0_workdir_resumes_where_0_3_0_resumed_it(old_workdir):
    """The third epoch (the first after the warm-up), resumed by this version from 0.3.0's checkpoint, ends where
    0.3.0 ended it, to float32 rounding: the group multiplier now scales the update after the learning rate
    ((lr x direction) x 100, not (lr x 100) x direction)."""
    resumed = recorded()["resumed_to_3_epochs"]
    result = train.train_and_evaluate(fixture_config(3), old_workdir)
    assert not result["preempted"] and result["skipped_steps"] == 0
    assert max(result["history"]) == 3
    state = restore.restore_run(old_workdir).state
    assert (int(state.step), int(state.epoch)) == (resumed["step"], resumed["epoch"])
    assert [np.asarray(parents).tolist() for parents in state.hierarchy.parents] == resumed["parents"]
    for name, tree in (("params", state.params), ("proxies", state.hierarchy.proxies)):
        sums = leaf_sums(tree)
        assert sorted(sums) == sorted(resumed[name])
        for key, value in resumed[name].items():
            assert sums[key] == pytest.approx(value, rel=1e-4, abs=2e-6), f"{name}{key}"
