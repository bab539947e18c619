"""oneDNN's convolutions (hpl_jax/models/onednn.py): built and loaded here, equal to XLA's convolution in value and
both gradients on every geometry the backbones use, chosen per convolution by conv_impl 'auto' on a CPU, and
refused in one line where they cannot run."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hpl_jax import models
from hpl_jax.models import layers, onednn
from hpl_jax.trainer import config_checks
from configs import default

REPO = Path(__file__).resolve().parents[2]


def test_onednn_is_available_where_requirements_install_it():
    # requirements.txt installs the oneDNN wheels on Linux x86-64, and the machines here have g++: 'auto' must not
    # silently fall back to XLA's (slower) convolutions there.
    if not (sys.platform == "linux" and os.uname().machine == "x86_64"):
        pytest.skip("the oneDNN wheels are for Linux x86-64")
    state = onednn.status()
    assert state.available, state.detail
    assert state.detail.startswith("oneDNN 3.2.0 (") and state.detail.endswith(".so)"), state.detail


# (batch, height, width, C_in, C_out, kernel, stride, padding): ResNet's stem (even and odd maps), 3x3 convolutions
# with strides 1 and 2, a stride-2 1x1 downsample of an even map (whose last row and column no output reads), a
# 3x3 convolution of a 2x2 map, a map that is not square.
GEOMETRIES = [(2, 16, 16, 3, 8, 7, 2, 3), (2, 15, 15, 3, 8, 7, 2, 3), (2, 8, 8, 8, 16, 3, 1, 1),
              (2, 8, 8, 8, 16, 3, 2, 1), (2, 8, 8, 8, 16, 1, 2, 0), (3, 2, 2, 16, 8, 3, 1, 1),
              (2, 9, 6, 4, 4, 3, 2, 1)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_onednn_conv_equals_xla_in_value_and_both_gradients(geometry):
    batch, height, width, c_in, c_out, size, stride, pad = geometry
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, height, width, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(size, size, c_in, c_out)), jnp.float32)
    padding = ((pad, pad), (pad, pad))

    def loss(conv_fn):
        # sin: a cotangent that differs at every output, so every gradient entry is checked.
        return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k))), argnums=(0, 1)))

    xla = loss(lambda x, k: lax.conv_general_dilated(x, k, (stride, stride), padding,
                                                     dimension_numbers=models.NHWC_DIMENSION_NUMBERS,
                                                     precision=lax.Precision.HIGHEST))
    ours = loss(lambda x, k: models.onednn_conv(x, k, (stride, stride), padding,
                                                dimension_numbers=models.NHWC_DIMENSION_NUMBERS))
    (value, grads), (expected_value, expected_grads) = ours(x, kernel), xla(x, kernel)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-4)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(expected))))
    # Run to run the same bits (a resumed run repeats the steps it lost exactly).
    again = ours(x, kernel)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves((value, grads)),
                                                           jax.tree_util.tree_leaves(again)))


def _custom_calls(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("ffi_call")


def test_auto_on_a_cpu_picks_per_convolution():
    conv = lambda shape, size, stride, pad, dtype=jnp.float32: lambda x, k: layers.cpu_conv(
        x, k, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=models.NHWC_DIMENSION_NUMBERS)
    x16, x2 = jnp.zeros((2, 16, 16, 64)), jnp.zeros((2, 2, 2, 64))
    k3, k1, k7 = jnp.zeros((3, 3, 64, 64)), jnp.zeros((1, 1, 64, 64)), jnp.zeros((7, 7, 3, 8))
    assert _custom_calls(conv(x16, 3, 1, 1), x16, k3) == 1  # oneDNN
    assert _custom_calls(conv(x16, 7, 2, 3), jnp.zeros((2, 16, 16, 3)), k7) == 1  # the stem: oneDNN
    assert _custom_calls(conv(x16, 3, 1, 1), x16[..., :32], k3[:, :, :32, :32]) == 0  # 32 channels: XLA's op
    assert "conv_general_dilated" in str(jax.make_jaxpr(conv(x16, 3, 1, 1))(x16[..., :32], k3[:, :, :32, :32]))
    for x, k, size, stride, pad in ((x2, k3, 3, 1, 1), (x16, k1, 1, 2, 0)):  # a 2x2 map, a 1x1 kernel: im2col
        jaxpr = str(jax.make_jaxpr(conv(x, size, stride, pad))(x, k))
        assert "ffi_call" not in jaxpr and "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    bf16 = jnp.zeros((2, 16, 16, 64), jnp.bfloat16), jnp.zeros((3, 3, 64, 64), jnp.bfloat16)
    assert _custom_calls(conv(None, 3, 1, 1), *bf16) == 0  # oneDNN's calls here are float32 only


def test_auto_falls_back_to_xla_where_onednn_is_unavailable(monkeypatch):
    monkeypatch.setattr(onednn, "status", lambda: onednn.OnednnStatus(False, "no C++ compiler (set CXX)"))
    x, k = jnp.zeros((2, 16, 16, 64)), jnp.zeros((3, 3, 64, 64))
    fn = lambda x, k: layers.cpu_conv(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=models.NHWC_DIMENSION_NUMBERS)
    assert _custom_calls(fn, x, k) == 0
    assert "XLA's op for the others (oneDNN unavailable: no C++ compiler (set CXX))" in models.describe_conv_impl("cpu")
    config = default.get_config()
    config.model.conv_impl = "onednn"
    with pytest.raises(config_checks.ConfigError, match=r"model.conv_impl: 'onednn' but oneDNN is unavailable here: "
                                                        r"no C\+\+ compiler \(set CXX\); use 'auto' or 'xla'"):
        config_checks.check_model(config)


def test_a_model_under_onednn_equals_the_model_under_xla():
    config = default.get_config()
    images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    outputs = {}
    for conv_impl in ("xla", "onednn"):
        config.model.conv_impl = conv_impl
        model = models.create_model(config.model)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params):
            embeddings, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return jnp.sum(embeddings[:, 0])
        outputs[conv_impl] = jax.jit(jax.value_and_grad(loss))(variables["params"])
    (value, grads), (expected, expected_grads) = outputs["onednn"], outputs["xla"]
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(expected_grads)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(want))) + 1e-7)


def test_onednn_conv_runs_under_pmap_on_every_device():
    n = jax.local_device_count()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 2, 8, 8, 4)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 4)), jnp.float32)
    conv = lambda x: models.onednn_conv(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=models.NHWC_DIMENSION_NUMBERS)
    per_device = jax.pmap(jax.grad(lambda x: jnp.sum(conv(x) ** 2)))(x)
    alone = jnp.stack([jax.grad(lambda x: jnp.sum(conv(x) ** 2))(x[i]) for i in range(n)])
    np.testing.assert_allclose(per_device, alone, rtol=1e-6)


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HPL_JAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling onednn_conv.cc failed"):
        onednn.build_library("/bin/false", onednn.find_onednn() or tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-built is left where the next process would load it


def test_processes_building_at_once_each_load_a_whole_library(tmp_path):
    # Two processes start on an empty cache at once (xdist workers, or the processes of one run): each builds into
    # a scratch file and renames it into place, so neither loads the other's half-written file.
    script = "from hpl_jax.models import onednn; s = onednn.status(); assert s.available, s.detail; print(s.detail)"
    env = dict(os.environ, HPL_JAX_CACHE_DIR=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=300) + (run.returncode,) for run in runs]
    assert all(code == 0 for _, _, code in results), results
    assert len(list(tmp_path.glob("onednn_conv-*.so"))) == 1 and not list(tmp_path.glob("tmp*/*"))
    # A third process finds it built: it loads the same file.
    again = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stdout == results[0][0], again.stderr
