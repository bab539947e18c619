"""The two examples of the functional API run as their docstrings say, and the library's defaults are the trainer's
(configs/default.py), so a loss or a refresh called from a user's own loop computes what the trainer computes."""
import inspect
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hpl_jax
from configs import default
from hpl_jax.core import optimizer_state
from hpl_jax.grouping import refresh
from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_documented(script, **env):
    """Runs `PYTHONPATH=. python docs/<script>` from the repository root, the command its docstring gives."""
    with open(os.path.join(ROOT, "docs", script)) as f:
        assert f"PYTHONPATH=. python docs/{script}" in f.read()
    finished = subprocess.run([sys.executable, os.path.join("docs", script)], cwd=ROOT, capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": ".", "JAX_PLATFORMS": "cpu", **env})
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


@pytest.mark.slow
def test_own_training_loop_learns_with_the_default_reset_policy():
    out = _run_documented("own_training_loop.py")
    # Every epoch's refresh reset the coarse level (the default policy) and its optimiser group.
    assert len(re.findall(r"reset \['coarse_1'\]", out)) == 8, out
    untrained, trained = map(float, re.search(r"Recall@1 \(unseen classes\): ([\d.]+) untrained -> ([\d.]+)",
                                              out).groups())
    assert trained > untrained + 0.05, out


def test_multi_device_example_equals_one_device_on_the_whole_batch():
    out = _run_documented("multi_device_loss.py", XLA_FLAGS=xla.flags(4))
    loss, reference = map(float, re.search(r"loss ([\d.]+) \(one device, whole batch: ([\d.]+)\)", out).groups())
    assert out.startswith("4 devices") and loss == pytest.approx(reference, rel=1e-5), out
    # The per-device losses without the gather are another number: the gather is what makes it the same.
    without = float(re.search(r"without the gather .*: ([\d.]+)", out).group(1))
    assert abs(without - reference) > 0.01 * reference, out


def _defaults(fn):
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_library_defaults_are_the_trainers():
    config = default.get_config()
    assert _defaults(hpl_jax.proxy_anchor_loss) == {"alpha": config.loss.alpha, "delta": config.loss.delta,
                                                    "mask": None}
    assert _defaults(hpl_jax.proxy_nca_loss) == {"temperature": config.loss.temperature,
                                                 "exclude_positive": config.loss.exclude_positive, "mask": None}
    for fn in (refresh.init_hierarchy, refresh.refresh_hierarchy):
        found = _defaults(fn)
        assert found["n_init"] == config.hpl.kmeans_restarts, fn
        assert found["coarse_norm"] == config.hpl.coarse_norm, fn
        assert found["backend"] == config.hpl.kmeans_backend, fn
    assert _defaults(refresh.refresh_hierarchy)["policy"] == config.hpl.coarse_policy
    # The library's first grouping clusters the proxies unless given the class means; the trainer's default
    # clusters the class means, which the example computes (class_means) and passes as level1_vectors.
    assert config.hpl.first_grouping == "class_means"


def test_reset_optimizer_groups_resets_only_the_named_groups_of_a_users_chain():
    params = {"model": jnp.ones(3), "proxies": (jnp.ones((4, 2)), jnp.ones((2, 2)))}
    labels = {"model": "model", "proxies": ("fine", "coarse_1")}
    optimizer = optax.chain(optax.clip(1.0), optax.partition({name: optax.adam(0.1) for name in
                                                              ("model", "fine", "coarse_1")}, labels))
    state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(3):
        _, state = optimizer.update(grads, state, params)
    fresh = optimizer.init(params)
    reset = jax.jit(optimizer_state.reset_optimizer_groups, static_argnums=2)(state, fresh, ("coarse_1",))
    inner = reset[1].inner_states
    assert int(inner["coarse_1"].inner_state[0].count) == 0
    np.testing.assert_array_equal(inner["coarse_1"].inner_state[0].mu["proxies"][1], 0.0)
    for name in ("model", "fine"):
        assert int(inner[name].inner_state[0].count) == 3
    assert optimizer_state.reset_optimizer_groups(state, fresh, ()) is state
    with pytest.raises(ValueError, match=r"no optax.partition group named \['coarse_2'\].*'coarse_1', 'fine'"):
        optimizer_state.reset_optimizer_groups(state, fresh, ["coarse_2"])
