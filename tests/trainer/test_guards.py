"""The non-finite guard's bookkeeping (guards.StepMetrics): which steps' metrics the host reads, and when."""
import jax.numpy as jnp
import numpy as np
import pytest

from hpl_jax.trainer import guards
from hpl_jax.trainer import sharding
from hpl_jax.trainer import train


def _metrics(loss: float) -> dict:
    """Replicated step metrics as a step leaves them: [local devices] per leaf."""
    values = {"loss": jnp.float32(loss), "lr": jnp.float32(0.1), "loss/level_0": jnp.float32(loss),
              "finite": jnp.isfinite(jnp.float32(loss))}
    return sharding.replicate(values, train.AXIS)


class _NotYetComputed:
    """Stands for the metrics of the step just dispatched: reading them would wait for the device."""

    @property
    def addressable_shards(self):
        raise AssertionError("the host read the metrics of the step it has just dispatched")


def test_fetch_behind_one_reads_the_earlier_steps_and_never_the_newest():
    seen = guards.StepMetrics(skip_nonfinite=False)
    seen.add(1, 1, _metrics(3.0))
    seen.add(2, 1, _metrics(2.0), report=True)
    seen.add(3, 1, {"loss": _NotYetComputed()})
    lines = seen.fetch(behind=1)
    assert [(step, epoch) for step, epoch, _ in lines] == [(2, 1)]
    assert lines[0][2] == {"loss": 2.0, "lr": pytest.approx(0.1), "loss/level_0": 2.0}


def test_fetch_behind_one_transfers_nothing_until_a_line_is_due():
    seen = guards.StepMetrics(skip_nonfinite=False)
    seen.add(1, 1, _metrics(3.0))
    seen.add(2, 1, _metrics(2.0), report=True)
    assert seen.fetch(behind=1) == []  # step 2, the newest, is left to the next step's fetch
    seen.add(3, 1, _metrics(1.0))
    assert [step for step, _, _ in seen.fetch(behind=1)] == [2]
    # behind=0 (before the state is read or saved) transfers every step, reported or not.
    assert seen.fetch() == [] and seen.fetch(behind=1) == []


def test_a_nonfinite_step_is_named_whichever_fetch_reads_it():
    seen = guards.StepMetrics(skip_nonfinite=False)
    seen.add(1, 1, _metrics(1.0))
    seen.add(2, 1, _metrics(float("nan")))
    seen.add(3, 1, _metrics(float("inf")), report=True)
    seen.add(4, 1, _metrics(1.0))
    with pytest.raises(guards.NonFiniteError, match=r"at step 2 \(epoch 1\)"):
        seen.fetch(behind=1)

    newest_bad = guards.StepMetrics(skip_nonfinite=False)
    newest_bad.add(1, 1, _metrics(1.0), report=True)
    newest_bad.add(2, 1, _metrics(float("nan")))
    assert [step for step, _, _ in newest_bad.fetch(behind=1)] == [1]
    with pytest.raises(guards.NonFiniteError, match=r"at step 2 \(epoch 1\)"):
        newest_bad.fetch()  # what the loop calls before it reads or saves the state


def test_skipped_steps_are_counted_once():
    seen = guards.StepMetrics(skip_nonfinite=True)
    seen.add(1, 1, _metrics(float("nan")), report=True)
    seen.add(2, 1, _metrics(1.0))
    lines = seen.fetch(behind=1)
    assert len(lines) == 1 and np.isnan(lines[0][2]["loss"]) and seen.num_skipped == 1
    seen.fetch()
    assert seen.num_skipped == 1
