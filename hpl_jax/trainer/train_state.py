"""The train state: everything a run needs to continue exactly, how it is created, and its host copy (what a
checkpoint holds). Where it lives on the devices is hpl_jax/trainer/sharding.py."""
from __future__ import annotations

import functools
from typing import Any, Dict

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging

from hpl_jax import data
from hpl_jax import grouping
from hpl_jax.core import hier as hier_lib
from hpl_jax.core import hierarchy as hierarchy_lib
from hpl_jax.models import convert as convert_weights
from hpl_jax.trainer import optim
from hpl_jax.trainer.sharding import unreplicate


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; saved whole in every checkpoint.

    Attributes:
      step: i32[], optimiser steps taken.
      epoch: i32[], the epoch in progress (= epochs completed, at an epoch boundary).
      params: the model's parameters {'backbone': ..., 'embedding': ...}.
      batch_stats: the model's BatchNorm running statistics.
      hierarchy: proxies of every level (trained with the model), the parent maps (set by refreshes), and HIER's
        hierarchical proxies when HIER regularises the loss.
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


def trainable(params, hierarchy: hierarchy_lib.ProxyHierarchy) -> Dict[str, Any]:
    """The tree the optimiser updates; its paths ('model/...', 'proxies/<level>', and 'hier_proxies' when HIER
    regularises the loss) are what config regexes match. Without HIER the tree is the one earlier versions saved."""
    tree = {"model": params, "proxies": hierarchy.proxies}
    if hierarchy.hier_proxies is not None:
        tree["hier_proxies"] = hierarchy.hier_proxies
    return tree


def with_trained_proxies(hierarchy: hierarchy_lib.ProxyHierarchy, tree) -> hierarchy_lib.ProxyHierarchy:
    """`hierarchy` holding the proxies of `tree` (a `trainable` tree); its groupings unchanged."""
    return hierarchy.replace(proxies=tree["proxies"], hier_proxies=tree.get("hier_proxies"))


def host_copy(replicated_state: TrainState) -> TrainState:
    """The state as NumPy arrays, what checkpoints hold: orbax writes NumPy leaves from process 0 alone, and
    refuses the host-local jax.Arrays that pmap leaves in a multi-process run."""
    return jax.device_get(unreplicate(replicated_state))


def initial_hierarchy(rng, config, info: data.DatasetInfo) -> hierarchy_lib.ProxyHierarchy:
    """Fresh proxies of every level, with the level sizes the run trains with.

    With `hpl.ground_truth_level1`, level 1 is the dataset's super-classes present among the training
    classes (its size comes from the data, whatever `hpl.num_coarse` says); otherwise the coarse levels are
    placeholders (hierarchy.placeholder_hierarchy, no k-means), which the loop's first grouping replaces
    (docs/method.md: by default from the class means of the initial network) and a resume overwrites. Either way the
    sizes are final here, so the optimiser state and the restore template are built for them.
    """
    hpl = config.hpl
    num_coarse = tuple(hpl.num_coarse)[:len(hpl.weights) - 1]
    if hpl.ground_truth_level1:
        fine = hierarchy_lib.init_proxies(rng, info.num_train_classes, config.model.embedding_dim)
        hierarchy = grouping.hierarchy_from_super_labels(
            fine, info.train_super_labels, num_coarse_above=num_coarse[1:], seed=config.seed,
            n_init=hpl.kmeans_restarts, coarse_norm=hpl.coarse_norm, backend=hpl.kmeans_backend)
        if hierarchy.level_sizes[1] != num_coarse[0]:
            logging.info("hpl.ground_truth_level1: level 1 has the %d super-classes of the training classes "
                         "(hpl.num_coarse[0] = %d is not used).", hierarchy.level_sizes[1], num_coarse[0])
        return hierarchy
    return hierarchy_lib.placeholder_hierarchy(rng, info.num_train_classes, num_coarse, config.model.embedding_dim,
                                               coarse_norm=hpl.coarse_norm)


def with_hier_proxies(rng, config, hierarchy: hierarchy_lib.ProxyHierarchy) -> hierarchy_lib.ProxyHierarchy:
    """`hierarchy` with HIER's `hier.num_proxies` fresh hierarchical proxies when `hier.weight` > 0 (else as it is,
    so a run without HIER keeps the layout of earlier versions' checkpoints)."""
    if config.hier.weight <= 0:
        return hierarchy
    return hierarchy.replace(hier_proxies=hier_lib.init_hier_proxies(
        rng, config.hier.num_proxies, config.model.embedding_dim, clip_r=config.hier.clip_r))


def create_train_state(rng, config, model, info: data.DatasetInfo) -> TrainState:
    """Fresh parameters, proxy hierarchy (`initial_hierarchy`) and optimiser state."""
    model_rng, proxy_rng, run_rng = jax.random.split(rng, 3)
    image = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(model_rng, image)
    # HIER's proxies from a key of their own, so the other draws stay those of a run without HIER.
    hierarchy = with_hier_proxies(jax.random.fold_in(proxy_rng, 1), config, initial_hierarchy(proxy_rng, config, info))
    params = variables["params"]
    if config.model.pretrained:
        backbone_params, backbone_stats, _ = convert_weights.load_pretrained(
            config.model.pretrained, config.model.backbone, config.model.width,
            patch_size=config.model.patch_size, image_size=info.image_shape[0])
        params = {**params, "backbone": backbone_params}
        if backbone_stats:  # a ViT has no BatchNorm
            variables = {**variables, "batch_stats": {**variables["batch_stats"], "backbone": backbone_stats}}
    labels, groups = optim.parameter_groups(trainable(params, hierarchy), config.optim)
    optimizer = optim.create_optimizer(labels, groups, config.optim)
    return TrainState(
        step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), hierarchy=hierarchy,
        opt_state=optimizer.init(trainable(params, hierarchy)), rng=run_rng)


# --------------------------------------------------------------------------------------------- older layouts
def v0_3_0_template(template: TrainState, config) -> TrainState:
    """`template` (host copy) with the optimiser state laid out as hpl-jax 0.3.0 saved it
    (optim.create_optimizer_v0_3_0): what a checkpoint of 0.3.0 is restored into before `from_v0_3_0` migrates it."""
    tree = trainable(template.params, template.hierarchy)
    labels, groups = optim.parameter_groups(tree, config.optim)
    old_optimizer = optim.create_optimizer_v0_3_0(labels, groups, config.optim)
    return jax.device_get(template.replace(opt_state=old_optimizer.init(tree)))


def from_v0_3_0(old: TrainState, template: TrainState, config) -> TrainState:
    """A train state restored in 0.3.0's layout (`v0_3_0_template`) in this version's: the same parameters,
    statistics, proxies, groupings and counters, its optimiser state mapped into `template`'s
    (optim.migrate_from_v0_3_0)."""
    _, groups = optim.parameter_groups(trainable(old.params, old.hierarchy), config.optim)
    return old.replace(opt_state=optim.migrate_from_v0_3_0(old.opt_state, template.opt_state, groups,
                                                           updates_seen=old.step))


# (version, the template of its layout, the migration to this version's) for every older layout a checkpoint
# may hold; checkpointing.restore_checkpoint reads the one a checkpoint's tree matches.
OLDER_LAYOUTS = (("0.3.0", v0_3_0_template, from_v0_3_0),)
