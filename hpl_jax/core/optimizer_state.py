"""Optimiser state of the proxy levels (docs/method.md, "Coarse-proxy bookkeeping"): each level keeps its own, so
that a coarse proxy reset to a cluster centre starts like a fresh parameter (Adam's moments and step count), never
with the fine proxies' bias correction.

Any optax chain works if the proxy levels are groups of an `optax.partition` (or `optax.multi_transform`): its
state holds one inner state per group label. `reset_optimizer_groups` swaps the named groups' states for fresh
ones; it is pure (jit-able, no optax import) and finds the partition anywhere in the state (inside `optax.chain`,
`inject_hyperparams`, ...). The trainer uses it for its own groups (trainer/optim.py: reset_group_states);
docs/own_training_loop.py uses it on a plain optax chain.
"""
from __future__ import annotations

from typing import Any, Iterable, Set


def _is_namedtuple(value) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _replaced(state, fresh, groups: Set[str], seen: Set[str]):
    """`state` with the inner states of `groups` from `fresh`; adds every partition label met to `seen`."""
    inner = getattr(state, "inner_states", None)
    if isinstance(inner, dict) and _is_namedtuple(state):
        seen.update(inner)
        # The other groups are kept whole: `fresh_state` may hold anything for them (the trainer builds only the
        # groups it resets).
        return state._replace(inner_states={label: fresh.inner_states[label] if label in groups else value
                                            for label, value in inner.items()})
    if _is_namedtuple(state):
        return type(state)(*(_replaced(s, f, groups, seen) for s, f in zip(state, fresh)))
    if isinstance(state, (tuple, list)):
        return type(state)(_replaced(s, f, groups, seen) for s, f in zip(state, fresh))
    if isinstance(state, dict):
        return {key: _replaced(value, fresh[key], groups, seen) for key, value in state.items()}
    return state


def reset_optimizer_groups(opt_state: Any, fresh_state: Any, groups: Iterable[str]) -> Any:
    """`opt_state` with the states of the partition groups `groups` taken from `fresh_state`, the rest kept.

    Args:
      opt_state: the state of an optax transformation holding an `optax.partition` (or `multi_transform`).
      fresh_state: a state of the same transformation as its `init` gives it, e.g. `optimizer.init(params)`
        (moments and step counts zero; hyperparameters of `inject_hyperparams` at their initial values).
      groups: the labels of the groups to reset, e.g. the coarse levels a `refresh_hierarchy` with policy
        'reset' replaced. Empty: `opt_state` is returned unchanged.

    Returns:
      The new optimiser state, of `opt_state`'s structure.

    Raises:
      ValueError if a label is not a group of any partition in `opt_state`.
    """
    groups = set(groups)
    if not groups:
        return opt_state
    seen: Set[str] = set()
    new_state = _replaced(opt_state, fresh_state, groups, seen)
    if groups - seen:
        raise ValueError(
            f"no optax.partition group named {sorted(groups - seen)} in the optimiser state (its groups: "
            f"{sorted(seen) or 'none'}); give each proxy level its own group, e.g. "
            "optax.partition({'model': ..., 'fine': ..., 'coarse_1': ...}, labels).")
    return new_state
