"""The train state: everything a run needs to continue exactly, and how it is created and moved between
devices and host."""
from __future__ import annotations

import functools
from typing import Any, Dict

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from hpl_jax import convert_weights
from hpl_jax import data
from hpl_jax import hierarchy as hierarchy_lib
from hpl_jax import optim


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; saved whole in every checkpoint.

    Attributes:
      step: i32[], optimiser steps taken.
      epoch: i32[], the epoch in progress (= epochs completed, at an epoch boundary).
      params: the model's parameters {'backbone': ..., 'embedding': ...}.
      batch_stats: the model's BatchNorm running statistics.
      hierarchy: proxies of every level (trained with the model) and the parent maps (set by refreshes).
      opt_state: the optimiser state over `trainable(state)`.
      rng: the run's PRNG key; k-means seeds are folded out of it.
    """

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    hierarchy: hierarchy_lib.ProxyHierarchy
    opt_state: optax.OptState
    rng: jax.Array


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


def trainable(params, hierarchy: hierarchy_lib.ProxyHierarchy) -> Dict[str, Any]:
    """The tree the optimiser updates; its paths ('model/...', 'proxies/<level>') are what config regexes match."""
    return {"model": params, "proxies": hierarchy.proxies}


def host_copy(replicated_state: TrainState) -> TrainState:
    """The state as NumPy arrays, what checkpoints hold: orbax writes NumPy leaves from process 0 alone, and
    refuses the host-local jax.Arrays that pmap leaves in a multi-process run."""
    return jax.device_get(unreplicate(replicated_state))


def initial_hierarchy(rng, config, info: data.DatasetInfo) -> hierarchy_lib.ProxyHierarchy:
    """Fresh proxies of every level, with the level sizes the run trains with.

    With `hpl.ground_truth_level1`, level 1 is the dataset's super-classes present among the training
    classes (its size comes from the data, whatever `hpl.num_coarse` says); otherwise the coarse levels are
    placeholders (hierarchy.placeholder_hierarchy, no k-means), which the loop's first grouping replaces
    (METHOD.md: by default from the class means of the initial network) and a resume overwrites. Either way the
    sizes are final here, so the optimiser state and the restore template are built for them.
    """
    hpl = config.hpl
    num_coarse = tuple(hpl.num_coarse)[:len(hpl.weights) - 1]
    if hpl.ground_truth_level1:
        fine = hierarchy_lib.init_proxies(rng, info.num_train_classes, config.model.embedding_dim)
        hierarchy = hierarchy_lib.hierarchy_from_super_labels(
            fine, info.train_super_labels, num_coarse_above=num_coarse[1:], seed=config.seed,
            n_init=hpl.kmeans_restarts, coarse_norm=hpl.coarse_norm, backend=hpl.kmeans_backend)
        if hierarchy.level_sizes[1] != num_coarse[0]:
            logging.info("hpl.ground_truth_level1: level 1 has the %d super-classes of the training classes "
                         "(hpl.num_coarse[0] = %d is not used).", hierarchy.level_sizes[1], num_coarse[0])
        return hierarchy
    return hierarchy_lib.placeholder_hierarchy(rng, info.num_train_classes, num_coarse, config.model.embedding_dim,
                                               coarse_norm=hpl.coarse_norm)


def create_train_state(rng, config, model, info: data.DatasetInfo) -> TrainState:
    """Fresh parameters, proxy hierarchy (`initial_hierarchy`) and optimiser state."""
    model_rng, proxy_rng, run_rng = jax.random.split(rng, 3)
    image = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(model_rng, image)
    hierarchy = initial_hierarchy(proxy_rng, config, info)
    params = variables["params"]
    if config.model.pretrained:
        backbone_params, backbone_stats, _ = convert_weights.load_pretrained(
            config.model.pretrained, config.model.backbone, config.model.width)
        params = {**params, "backbone": backbone_params}
        variables = {**variables, "batch_stats": {**variables["batch_stats"], "backbone": backbone_stats}}
    labels, groups = optim.parameter_groups(trainable(params, hierarchy), config.optim)
    optimizer = optim.create_optimizer(labels, groups, config.optim)
    return TrainState(
        step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), hierarchy=hierarchy,
        opt_state=optimizer.init(trainable(params, hierarchy)), rng=run_rng)
