"""HPL over several devices: each device embeds its share of the batch, the embeddings are gathered into the
global batch, and every device computes the loss of that global batch, so N devices with global batch B get the
loss and gradient that one device with batch B gets. Proxy-Anchor needs the gather: its per-proxy log-sum-exp runs
over every embedding of the batch and its 1/|P+| counts the proxies with a positive anywhere in it; a per-device
loss would see only 1/N of the negatives and average N different losses.

From a checkout, on 8 simulated CPU devices (or your GPUs / TPU cores: the device count is whatever JAX finds):

    PYTHONPATH=. python docs/multi_device_loss.py

The trainer does the same in hpl_jax/trainer/train.py: loss_and_gradients. This script checks the result against
one device computing the whole batch, and shows what a loss without the gather would have given instead.
"""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Read when JAX starts: a CPU shows up as 8 devices (no effect on GPUs or TPUs).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import hpl_jax  # noqa: E402

AXIS = "data"


class Embedder(nn.Module):
    """f32[batch, 32] features -> embeddings f32[batch, 16]: a stand-in for your network."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.relu(nn.Dense(64)(x)))


def main(global_batch=64, num_classes=12, seed=0):
    devices = jax.devices()
    if global_batch % len(devices):
        raise ValueError(f"global_batch {global_batch} is not divisible by the {len(devices)} devices.")
    mesh = jax.make_mesh((len(devices),), (AXIS,))

    model = Embedder()
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    features = jax.random.normal(keys[0], (global_batch, 32))
    labels = jax.random.randint(keys[1], (global_batch,), 0, num_classes)
    mask = jnp.arange(global_batch) < global_batch - 5  # the last 5 rows are padding
    params = model.init(keys[2], features[:1])["params"]
    hierarchy = hpl_jax.init_hierarchy(keys[2], num_classes, num_coarse=(4,), dim=16, seed=seed)
    base_loss = functools.partial(hpl_jax.proxy_anchor_loss, alpha=32.0, delta=0.1)

    def loss_of(params, proxies, features, labels, mask):
        embeddings = model.apply({"params": params}, features)
        total, _ = hpl_jax.hierarchical_proxy_loss(embeddings, labels, hierarchy.replace(proxies=proxies),
                                                   base_loss=base_loss, weights=(1.0, 0.1), mask=mask)
        return total

    def per_device(params, proxies, features, labels, mask):
        # features, labels, mask: this device's rows [global_batch / N, ...]; params and proxies: replicated.
        num_devices = jax.lax.psum(1, AXIS)

        def share_of_global_batch_loss(params, proxies):
            embeddings = model.apply({"params": params}, features)
            gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True)
            total, _ = hpl_jax.hierarchical_proxy_loss(
                gather(embeddings), gather(labels), hierarchy.replace(proxies=proxies), base_loss=base_loss,
                weights=(1.0, 0.1), mask=gather(mask))
            # Every device computes the same global loss. JAX sums the gradient of a replicated parameter over the
            # devices (and all_gather's transpose sums each row's cotangent from every device), so each device
            # contributes 1/N of it: the sum is the global-batch loss, and its gradient the exact one.
            return total / num_devices

        share, grads = jax.value_and_grad(share_of_global_batch_loss, argnums=(0, 1))(params, proxies)
        return jax.lax.psum(share, AXIS), grads

    def per_device_without_gather(params, proxies, features, labels, mask):
        return jax.lax.pmean(loss_of(params, proxies, features, labels, mask), AXIS)

    sharded = P(AXIS)
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), sharded, sharded, sharded),
                                 out_specs=(P(), P())))
    no_gather = jax.jit(jax.shard_map(per_device_without_gather, mesh=mesh,
                                      in_specs=(P(), P(), sharded, sharded, sharded), out_specs=P()))
    one_device = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1)))

    # The batch arrives split over the devices (each host would load its own rows); the parameters on every one.
    on_devices = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(mesh, sharded))
    everywhere = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(mesh, P()))
    loss, grads = step(everywhere(params), everywhere(hierarchy.proxies), on_devices(features), on_devices(labels),
                       on_devices(mask))
    reference_loss, reference_grads = one_device(params, hierarchy.proxies, features, labels, mask)
    grad_error = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                     for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference_grads)))
    print(f"{len(devices)} devices, global batch {global_batch}: loss {float(loss):.6f} "
          f"(one device, whole batch: {float(reference_loss):.6f}); largest gradient difference "
          f"{grad_error:.1e} of the largest entry")
    without = float(no_gather(everywhere(params), everywhere(hierarchy.proxies), on_devices(features),
                              on_devices(labels), on_devices(mask)))
    print(f"without the gather (mean of the per-device losses): {without:.6f}")
    if not (abs(float(loss) - float(reference_loss)) <= 1e-5 * abs(float(reference_loss)) and grad_error <= 1e-4):
        raise SystemExit("the gathered loss differs from the one-device loss")
    return float(loss), float(reference_loss), grad_error


if __name__ == "__main__":
    main()
