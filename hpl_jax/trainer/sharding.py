"""Where the train state and the batches live: one-axis device meshes, per-device stacks and global arrays, and the
per-device step function run on every device by jit + shard_map (`over_devices`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def replicate(tree, axis_name: str):
    """A copy of `tree` on every local device, [...] -> [devices, ...], laid out as the outputs of a pmap over
    `axis_name` are: a pmap-ed step then sees one input layout from its first call on and compiles once, not
    again at its second call (flax.jax_utils.replicate names the mesh axis otherwise)."""
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (axis_name,)),
                                          jax.sharding.PartitionSpec(axis_name))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), sharding), tree)


def device_mesh(axis_name: str, devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh of `devices` (default: every device of every process, in process order)."""
    return jax.sharding.Mesh(np.array(devices if devices is not None else jax.devices()), (axis_name,))


def as_global(tree, mesh: jax.sharding.Mesh):
    """Per-device stacks over this process's devices, [local_devices, ...] (`replicate`, data.prefetch_to_devices),
    as global arrays over every device of `mesh`, [mesh devices, ...], without a copy: what `over_devices` takes."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))

    def to_global(x):
        # pmap's layout (flax.jax_utils.replicate) keeps shards without the device axis: it is put back.
        by_device = {shard.device: shard.data if shard.data.ndim == x.ndim else shard.data[None]
                     for shard in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            (mesh.size,) + x.shape[1:], sharding, [by_device[d] for d in sharding.addressable_devices_indices_map(
                (mesh.size,) + x.shape[1:])])
    return jax.tree_util.tree_map(to_global, tree)


def as_local(tree):
    """Global arrays [devices, ...] as this process's part, [local_devices, ...] (NumPy-convertible), without a
    copy: what the host reads of an `over_devices` output (the inverse of `as_global`)."""
    def to_local(x):
        shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start)
        devices = [shard.device for shard in shards]
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("local",)),
                                              jax.sharding.PartitionSpec("local"))
        return jax.make_array_from_single_device_arrays((len(shards),) + x.shape[1:], sharding,
                                                        [shard.data for shard in shards])
    return jax.tree_util.tree_map(to_local, tree)


def over_devices(fn, mesh: jax.sharding.Mesh, *, donate_argnums=()):
    """`fn`, written for one device as pmap runs it (collectives by the mesh's axis name), run on every device of
    `mesh` by jax.jit of jax.shard_map: arguments and results carry a leading axis of one entry per device, as
    pmap's do, but as global arrays (`as_global`). In a multi-process run pmap converts every leaf of its inputs
    and outputs between host-local and global arrays in Python at every call (docs/scaling.md);
    jit dispatches global arrays without that."""
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])

    def per_device(*args):
        out = fn(*jax.tree_util.tree_map(lambda x: x[0], args))
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], out)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec),
                   donate_argnums=donate_argnums)


def unreplicate(tree):
    """Device 0's copy of a pmap-replicated pytree, [devices, ...] -> [...]."""
    return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]), tree)
