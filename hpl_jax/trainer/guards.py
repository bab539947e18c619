"""The non-finite guard: a step whose loss, gradients or updated parameters are not finite is caught on the device
(one reduction inside the step) and seen on the host with the metrics it fetches anyway, before anything reads
or saves the state.

By default such a step stops the run with one line naming the step, the level losses and the learning rate;
nothing non-finite is ever saved, so the latest checkpoint stays the resume point. With
`optim.skip_nonfinite_steps` the step is dropped instead: the step selects the state it started from, but for the
step counter (optax.tree_utils.tree_where in train.train_step).

Why not optax.apply_if_finite around the optimiser: it sees the gradient only, not the loss or the updated
parameters, and it is a conditional over the whole optimiser state at every step, skipping or not; on XLA:CPU it
made the AdamW update of an 11.5M-parameter model 40-50% slower. The select costs nothing unless
`optim.skip_nonfinite_steps` is set, and the optimiser state does not depend on that flag, which a resume may
change.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
from absl import logging

from hpl_jax.trainer.sharding import unreplicate


class NonFiniteError(RuntimeError):
    """A training step gave a non-finite loss or gradient; the message names the step and what to change."""


def all_finite(tree) -> jax.Array:
    """bool[]: True iff every element of every leaf of `tree` is finite (one fused pass, no host sync)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def describe(step: int, epoch: int, values: Dict[str, Any]) -> str:
    levels = ", ".join(f"{float(values[k]):.4g}" for k in sorted(values) if k.startswith("loss/level_"))
    return (f"non-finite loss or gradient at step {step} (epoch {epoch}): loss {float(values['loss']):.4g} "
            f"(levels {levels}), lr {float(values['lr']):.2e}")


class StepMetrics:
    """The device-side metrics of the steps the host has not looked at yet.

    `add` keeps a step's metrics without waiting for the device; `fetch` transfers them (the transfer the progress
    line makes anyway) and checks each step's `finite` flag in order, so the step named is the first bad one even
    when the host looks only every `log_every_steps`. `fetch(behind=1)` leaves the newest step alone: the host reads
    the metrics of steps the device has finished (or is about to), never waits for the step it has just dispatched,
    and the device keeps a step queued while the host writes the line.
    """

    def __init__(self, *, skip_nonfinite: bool):
        self._skip_nonfinite = skip_nonfinite
        # (step, epoch, replicated metrics, whether a progress line shows them)
        self._pending: List[Tuple[int, int, Any, bool]] = []
        self.num_skipped = 0

    def add(self, step: int, epoch: int, replicated_metrics, *, report: bool = False) -> None:
        """Keeps a step's metrics (no transfer); `report`: a progress line shows them once they are fetched."""
        self._pending.append((step, epoch, replicated_metrics, report))

    def fetch(self, *, behind: int = 0) -> List[Tuple[int, int, Dict[str, float]]]:
        """Transfers the metrics of every pending step but the newest `behind` and checks them; raises
        NonFiniteError on a bad step unless skipping.

        behind 0 (before the host reads or saves the state) transfers every step, whatever it shows. behind > 0
        transfers nothing unless one of the steps it would transfer is to be reported.

        Returns (step, epoch, values without 'finite') of each transferred step marked `report`, in order.
        """
        ready = self._pending[:len(self._pending) - behind] if behind else self._pending
        if not ready or (behind and not any(report for *_, report in ready)):
            return []
        fetched = jax.device_get([unreplicate(metrics) for _, _, metrics, _ in ready])
        self._pending = self._pending[len(ready):]
        lines = []
        for (step, epoch, _, report), values in zip(ready, fetched):
            if not bool(values["finite"]):
                if not self._skip_nonfinite:
                    raise NonFiniteError(
                        f"{describe(step, epoch, values)}. Nothing non-finite was saved: running the same command "
                        "again resumes from the latest checkpoint. Lower optim.lr, keep optim.grad_clip_value > 0, "
                        "or set optim.skip_nonfinite_steps=True to skip such steps.")
                self.num_skipped += 1
                logging.warning("Skipped the step: %s (optim.skip_nonfinite_steps).", describe(step, epoch, values))
            if report:
                lines.append((step, epoch, {k: v for k, v in values.items() if k != "finite"}))
        return lines
