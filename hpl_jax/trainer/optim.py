"""The optimiser (METHOD.md, "Training recipe"): AdamW (or MLRC's RMSprop) per parameter group, element-wise
clipping, step decay.

Parameter groups are data, not code paths (big_vision style): config regexes on parameter paths
('model/backbone/...', 'model/embedding/kernel', 'proxies/<level>') give each parameter its learning-rate
multiplier, whether it trains during warm-up, or FROZEN.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

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
    level's whole AdamW state (moments and step count) without touching the other levels' (METHOD.md,
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


def torch_rmsprop(learning_rate, weight_decay, momentum) -> optax.GradientTransformation:
    """PyTorch's RMSprop, which "A Metric Learning Reality Check" trains with: the weight decay is added to the
    gradient, then g / (sqrt(v) + eps) with v the moving average of g^2 (alpha 0.99, eps 1e-8; no bias
    correction), heavy-ball momentum on that, and the learning rate applied last."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False),
                       optax.trace(decay=momentum),
                       optax.scale_by_learning_rate(learning_rate))


def create_optimizer(labels, groups, optim_config) -> optax.GradientTransformation:
    """`optim.name` per group, after element-wise clipping: AdamW (decoupled weight decay) as the Proxy-Anchor
    code, or PyTorch's RMSprop as MLRC (`torch_rmsprop`).

    The learning rates are hyperparameters in the state, set every step by `set_learning_rates`.
    """
    def group_optimizer():
        if optim_config.name == "rmsprop":
            return optax.inject_hyperparams(torch_rmsprop)(learning_rate=optim_config.lr,
                                                           weight_decay=optim_config.weight_decay,
                                                           momentum=optim_config.momentum)
        return optax.inject_hyperparams(optax.adamw)(learning_rate=optim_config.lr,
                                                     weight_decay=optim_config.weight_decay)

    transforms = {group: group_optimizer() for group in groups}
    transforms[FROZEN] = optax.set_to_zero()
    steps = [optax.multi_transform(transforms, labels)]
    if optim_config.grad_clip_value > 0:
        # torch.nn.utils.clip_grad_value_: each gradient entry clipped to [-c, c] before the optimiser.
        steps.insert(0, optax.clip(optim_config.grad_clip_value))
    return optax.chain(*steps)


def learning_rate(optim_config, epoch):
    """Step decay per epoch, counted from epoch 0: lr * gamma^(epoch // decay_epochs)."""
    return optim_config.lr * optim_config.decay_gamma ** (epoch // optim_config.decay_epochs)


def _partition_state(opt_state) -> optax.MultiTransformState:
    return opt_state[-1]


def set_learning_rates(opt_state, groups, base_lr):
    partition = _partition_state(opt_state)
    inner = dict(partition.inner_states)
    for group, (multiplier, _) in groups.items():
        masked = inner[group]
        hyper = dict(masked.inner_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(base_lr * multiplier, jnp.float32)
        inner[group] = masked._replace(inner_state=masked.inner_state._replace(hyperparams=hyper))
    return opt_state[:-1] + (partition._replace(inner_states=inner),)


def keep_waiting_groups(new_opt_state, old_opt_state, groups):
    """During warm-up, the groups that wait keep their optimiser state untouched (no step, no decay)."""
    new_partition, old_partition = _partition_state(new_opt_state), _partition_state(old_opt_state)
    inner = dict(new_partition.inner_states)
    for group, (_, in_warmup) in groups.items():
        if not in_warmup:
            inner[group] = old_partition.inner_states[group]
    return new_opt_state[:-1] + (new_partition._replace(inner_states=inner),)


def proxy_group(labels, level: int) -> str:
    """The optimiser group of the proxies of `level` (see `parameter_groups`)."""
    return labels["proxies"][level]


def reset_group_states(opt_state, group_names):
    """The optimiser state with the state of the named groups as a fresh init leaves it.

    Moments (AdamW's, or RMSprop's average and momentum) and step counts go to zero (the bias correction of
    AdamW's next step is a first step's); the hyperparameters (learning rate, weight decay) stay.
    """
    partition = _partition_state(opt_state)
    inner = dict(partition.inner_states)
    for group in group_names:
        injected = inner[group].inner_state
        fresh = injected._replace(count=jnp.zeros_like(injected.count),
                                  inner_state=jax.tree_util.tree_map(jnp.zeros_like, injected.inner_state))
        inner[group] = inner[group]._replace(inner_state=fresh)
    return opt_state[:-1] + (partition._replace(inner_states=inner),)
