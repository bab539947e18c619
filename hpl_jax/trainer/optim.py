"""The optimiser (docs/method.md, "Training recipe"): AdamW (or MLRC's RMSprop) per parameter group, element-wise
clipping, step decay and a warm-up during which some groups wait, all optax pieces:

    chain(clip(grad_clip_value), partition({group: group optimiser, ..., FROZEN: set_to_zero()}, labels))

    group optimiser = chain(inject_hyperparams(adamw | torch_rmsprop)(learning_rate=base rate, ...),
                            scale(the group's multiplier))
    a group that waits out the warm-up: conditionally_mask(group optimiser, not in_warmup)

Parameter groups are data, not code paths (big_vision style): config regexes on parameter paths
('model/backbone/...', 'model/embedding/kernel', 'proxies/<level>') give each parameter its learning-rate
multiplier, whether it trains during warm-up, or FROZEN.

Everything the loop changes in the state it changes by name (optax.tree_utils), never by position:
- the learning rate: every group holds the same injected `learning_rate`, the base rate of the epoch;
  `set_learning_rate` is tree_set(learning_rate=...). The multiplier is a static `optax.scale` after it, so
  the proxies' 100x is config data, not state (the update is (lr * direction) * 100 where 0.3.0 computed
  (lr * 100) * direction: equal up to float rounding).
- the warm-up: `update(..., in_warmup=...)` (an extra argument: the loop runs the warm-up's step in the first
  `optim.warmup_epochs` epochs, train.create_train_step) lets conditionally_mask zero a waiting group's updates
  and keep its state. The epoch decides, not a count of updates: a skipped non-finite step or a refresh's reset
  cannot shift the end of the warm-up.
- a refresh's reset (`reset_group_states`): the named groups' states replaced by a fresh init of those groups
  (core/optimizer_state.py: reset_optimizer_groups, by the partition's group labels; what a user's own optax
  chain uses too).

`create_optimizer_v0_3_0` keeps the optimiser of hpl-jax 0.3.0 for one purpose: reading the checkpoints it
wrote (`migrate_from_v0_3_0`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils

from hpl_jax.core import optimizer_state

FROZEN = "frozen"


def parameter_path(path) -> str:
    names = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
    return "/".join(names)


def _first_match(patterns, path: str, default):
    for pattern, value in patterns:
        if re.fullmatch(pattern, path):
            return value
    return default


def parameter_groups(tree, optim_config) -> Tuple[Any, Dict[str, Tuple[float, bool]]]:
    """Labels every parameter by (learning-rate multiplier, trains during warm-up), or FROZEN.

    Each proxy level is a group of its own ('proxies_<level>_lr_x100'): a refresh re-initialises a coarse
    level's whole AdamW state (moments and step count) without touching the other levels' (docs/method.md,
    "Coarse-proxy bookkeeping"). A shared step count would leave a reset proxy's second moment under-corrected
    and its first steps several times larger than a fresh AdamW's.

    Returns the label tree (same structure as `tree`) and {label: (lr multiplier, trains during warm-up)}.
    """
    groups = {}

    def label(path, _):
        name = parameter_path(path)
        if any(re.fullmatch(pattern, name) for pattern in optim_config.frozen):
            return FROZEN
        multiplier = float(_first_match(optim_config.lr_mults, name, 1.0))
        in_warmup = any(re.fullmatch(pattern, name) for pattern in optim_config.warmup_trainable)
        level = re.fullmatch(r"proxies/(\d+)", name)
        group = (f"proxies_{level.group(1)}_" if level else "") + f"lr_x{multiplier:g}"
        group += "" if in_warmup else "_after_warmup"
        groups[group] = (multiplier, in_warmup)
        return group

    labels = jax.tree_util.tree_map_with_path(label, tree)
    return labels, groups


def waiting_in_warmup(labels, groups) -> Any:
    """bool per parameter (the structure of `labels`): True where its group waits out the warm-up."""
    return jax.tree_util.tree_map(lambda label: label in groups and not groups[label][1], labels)


def torch_rmsprop(learning_rate, weight_decay, momentum) -> optax.GradientTransformation:
    """PyTorch's RMSprop, which "A Metric Learning Reality Check" trains with: the weight decay is added to the
    gradient, then g / (sqrt(v) + eps) with v the moving average of g^2 (alpha 0.99, eps 1e-8; no bias
    correction), heavy-ball momentum on that, and the learning rate applied last."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False),
                       optax.trace(decay=momentum),
                       optax.scale_by_learning_rate(learning_rate))


def _base_optimizer(optim_config, learning_rate) -> optax.GradientTransformation:
    """`optim.name` with its hyperparameters in the state (`learning_rate` among them)."""
    if optim_config.name == "rmsprop":
        return optax.inject_hyperparams(torch_rmsprop)(learning_rate=learning_rate,
                                                       weight_decay=optim_config.weight_decay,
                                                       momentum=optim_config.momentum)
    return optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate,
                                                 weight_decay=optim_config.weight_decay)


def _not_in_warmup(count, *, in_warmup):
    del count  # the epoch decides (see the module docstring), not how many updates the group has seen
    return jnp.logical_not(in_warmup)


def group_optimizer(multiplier: float, trains_in_warmup: bool, optim_config) -> optax.GradientTransformation:
    """One group's optimiser: the base optimiser at the base rate, then its multiplier; a group that waits out the
    warm-up is masked (zero updates, state kept) while the update's `in_warmup` is true."""
    optimizer = optax.chain(_base_optimizer(optim_config, optim_config.lr), optax.scale(multiplier))
    if trains_in_warmup:
        return optimizer
    return optax.conditionally_mask(optimizer, _not_in_warmup, forward_extra_args=True)


def _group_transforms(groups, optim_config,
                      only: Optional[Iterable[str]] = None) -> Dict[str, optax.GradientTransformation]:
    """{group: its optimiser} (the groups not in `only`, where given, and FROZEN: set_to_zero)."""
    transforms = {group: group_optimizer(multiplier, trains_in_warmup, optim_config)
                  if only is None or group in only else optax.set_to_zero()
                  for group, (multiplier, trains_in_warmup) in groups.items()}
    transforms[FROZEN] = optax.set_to_zero()
    return transforms


def create_optimizer(labels, groups, optim_config,
                     only: Optional[Iterable[str]] = None) -> optax.GradientTransformationExtraArgs:
    """The run's optimiser (see the module docstring). `update(grads, state, params, in_warmup=bool)`; set the
    learning rate of the epoch first (`set_learning_rate`). With `only`, the groups not in it are set_to_zero (a
    state of the same layout whose other groups are empty: what `reset_group_states` initialises)."""
    steps = [optax.partition(_group_transforms(groups, optim_config, only), labels)]
    if optim_config.grad_clip_value > 0:
        # torch.nn.utils.clip_grad_value_: each gradient entry clipped to [-c, c] before the optimiser.
        steps.insert(0, optax.clip(optim_config.grad_clip_value))
    return optax.chain(*steps)


def create_learning_rate_fn(optim_config):
    """epoch (i32[]) -> f32[] base learning rate: step decay per epoch, counted from epoch 0,
    lr * gamma^(epoch // decay_epochs)."""
    def learning_rate_fn(epoch):
        return optim_config.lr * optim_config.decay_gamma ** (epoch // optim_config.decay_epochs)
    return learning_rate_fn


def set_learning_rate(opt_state, base_lr):
    """The optimiser state with every group's base rate `base_lr` (the multipliers stay in the transforms)."""
    return tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(base_lr, jnp.float32))


def proxy_group(labels, level: int) -> str:
    """The optimiser group of the proxies of `level` (see `parameter_groups`)."""
    return labels["proxies"][level]


def reset_group_states(opt_state, group_names, tree, labels, groups, optim_config):
    """The optimiser state with the states of the named groups as a fresh init leaves them (moments and step
    counts zero: the bias correction of AdamW's next step is a first step's); the other groups and the learning
    rate (set at every step) stay."""
    if not group_names:
        return opt_state
    fresh = create_optimizer(labels, groups, optim_config, only=group_names).init(tree)
    return optimizer_state.reset_optimizer_groups(opt_state, fresh, group_names)


# --------------------------------------------------------------------------------------------- 0.3.0's layout
def create_optimizer_v0_3_0(labels, groups, optim_config) -> optax.GradientTransformation:
    """The optimiser of hpl-jax 0.3.0, kept only to read the checkpoints it wrote: per group the base optimiser
    with the multiplier folded into its injected learning rate, no warm-up mask.

    Its state: (clip's EmptyState, if clipping,) PartitionState({group: MaskedState(InjectStatefulHyperparamsState(
    count, hyperparams {'learning_rate': lr x multiplier, ...}, inner_state=the base optimiser's))}).
    """
    transforms = {group: _base_optimizer(optim_config, optim_config.lr) for group in groups}
    transforms[FROZEN] = optax.set_to_zero()
    steps = [optax.partition(transforms, labels)]
    if optim_config.grad_clip_value > 0:
        steps.insert(0, optax.clip(optim_config.grad_clip_value))
    return optax.chain(*steps)


def migrate_from_v0_3_0(old_opt_state, new_opt_state, groups, *, updates_seen):
    """`new_opt_state` (a fresh init of `create_optimizer`) holding what `old_opt_state` (0.3.0's layout) held.

    Per group: the base optimiser's moments and step counts as they were, and its hyperparameters but the learning
    rate, which 0.3.0 held multiplied by the group's multiplier: it is the fresh state's base rate (every step sets
    its epoch's, `set_learning_rate`). A waiting group's warm-up mask counts `updates_seen` (the train state's
    step; the mask never reads it).
    """
    migrated = new_opt_state
    for group in groups:
        old = tree_utils.tree_get(tree_utils.tree_get(old_opt_state, group), "InjectStatefulHyperparamsState")
        new_group = tree_utils.tree_get(new_opt_state, group)
        new = tree_utils.tree_get(new_group, "InjectStatefulHyperparamsState")
        hyperparams = {**old.hyperparams, "learning_rate": new.hyperparams["learning_rate"]}
        new_group = tree_utils.tree_set(new_group, InjectStatefulHyperparamsState=new._replace(
            count=old.count, hyperparams=hyperparams, inner_state=old.inner_state))
        if tree_utils.tree_get(new_group, "ConditionallyMaskState") is not None:
            new_group = tree_utils.tree_set(new_group, step=np.asarray(updates_seen, np.int32))
        migrated = tree_utils.tree_set(migrated, **{group: new_group})
    return migrated
