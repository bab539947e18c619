"""The workdir's guarantees on small pytrees: best/ reconciled with metrics.json, unfinished saves removed."""
import ml_collections
import numpy as np
from etils import epath

from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import reporting


def _state(value):
    return {"params": np.full((3,), value, np.float32), "step": np.asarray(value, np.int32)}


def _checkpoints(workdir):
    config = ml_collections.ConfigDict({"checkpoint": {"keep": 2, "best_metric": "recall@1"}})
    return checkpointing.Checkpoints(epath.Path(workdir), config, is_lead=True)


def test_best_is_resaved_from_checkpoints_or_the_notes_say_what_it_holds(tmp_path):
    checkpoints = _checkpoints(tmp_path)
    for step in (2, 4, 6):  # epochs 1, 2, 3 at 2 steps each; keep=2 leaves 4 and 6
        checkpoints.save(step, _state(step))
    checkpoints.save_best(2, _state(2), metrics={"recall@1": 0.5})
    checkpoints.wait()

    # metrics.json says epoch 2 is the best so far; best/ missed it (its save was cut short).
    checkpoints.reconcile_best(best_epoch=2, best_metrics={"recall@1": 0.6}, steps_per_epoch=2, resumed_step=6,
                               template=_state(0))
    assert checkpoints.best.all_steps() == [4]
    np.testing.assert_array_equal(checkpoints.best.restore(4)["params"], _state(4)["params"])

    # A best epoch whose checkpoint is gone: best/ stays, and the closing notes say which epoch it holds.
    checkpoints.reconcile_best(best_epoch=1, best_metrics={"recall@1": 0.7}, steps_per_epoch=2, resumed_step=6,
                               template=_state(0))
    assert checkpoints.best.all_steps() == [4] and checkpoints.held_best_epoch(2) == 2
    notes = reporting.format_notes({"best": {"epoch": 1}}, {"best_checkpoint_epoch": 2})
    assert notes == ["best/ holds epoch 2, not epoch 1: that epoch's checkpoint was lost when the run stopped"]

    # best/ ahead of the resume point (that epoch's regular checkpoint was cut short): the epoch is redone.
    checkpoints.reconcile_best(best_epoch=1, best_metrics={}, steps_per_epoch=2, resumed_step=2, template=_state(0))
    assert checkpoints.best.all_steps() == []


def test_unfinished_saves_are_removed_when_a_run_starts(tmp_path):
    for leftover in ("checkpoints/8.orbax-checkpoint-tmp", "best/8.orbax-checkpoint-tmp-1716000000"):
        (tmp_path / leftover / "default").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6").mkdir()
    _checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]
    assert not list((tmp_path / "best").iterdir())
