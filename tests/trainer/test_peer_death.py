"""A peer's death among 3 processes (1 CPU device each), wherever it shows up first in the 2 survivors: each
survivor exits 1 within the heartbeat timeout with the same one line, process 0 last, and a rerun resumes to the
state of an uninterrupted run (test_multihost.py's `_kill_in_turn`, which does the same with 2 processes).

The config is test_multihost.py's with a global batch of 6 (2 per process): 1 epoch of 6 steps, a checkpoint every
2 steps. The decision itself (an error is a process's own only once every other one has answered) is also tested in
one process, over a key-value store like the coordination service's.
"""
import threading
import time

import pytest

from hpl_jax.trainer import distributed
from tests.trainer.test_multihost import _finish_all, _kill_in_turn, _start

FLAGS_3 = ("--config.batch_size=6", "--config.eval.batch_size=12")
# Process 1 (between two survivors) and process 2 (the last) in turn; every fault after the save of step 2 is
# complete, as in test_multihost.py's FAULTS_2.
FAULTS_3 = ("2:save_barrier@4", "1:train_gather@4", "2:between_steps@4", "1:eval_gather@6")


@pytest.fixture(scope="module")
def uninterrupted_3(tmp_path_factory):
    """The workdir of a 3-process run of FLAGS_3 that nothing interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted_3")
    (root / "logs").mkdir()
    _finish_all(_start(root / "run", root / "logs", *FLAGS_3, num_processes=3, devices=1), root / "logs")
    return str(root / "run")


@pytest.mark.slow
@pytest.mark.long
def test_a_peers_death_among_3_processes_is_named_by_both_survivors_and_a_rerun_resumes_exactly(tmp_path,
                                                                                              uninterrupted_3):
    _kill_in_turn(tmp_path / "run", tmp_path / "logs", uninterrupted_3, FAULTS_3, *FLAGS_3, num_processes=3,
                  devices=1)


# ----------------------------------------------------------------------------------- the decision, in one process
class _KeyValueStore:
    """The coordination service's key-value store as distributed.Watch uses it (jaxlib's DistributedRuntimeClient)."""

    def __init__(self):
        self._values = {}
        self._changed = threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self._changed:
            if key in self._values and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self._values[key] = value
            self._changed.notify_all()

    def key_value_try_get(self, key):
        with self._changed:
            if key not in self._values:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self._values[key]

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self._changed:
            if not self._changed.wait_for(lambda: key in self._values, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self._values[key]

    def key_value_dir_get(self, prefix):
        with self._changed:
            return [(k, v) for k, v in self._values.items() if k.startswith(prefix)]


class _Stopped(Exception):
    pass


def _watches(store, num_processes, timeout_s, stops):
    """A Watch per process over `store`, whose `stop` records (process, message, time) in `stops` instead of exiting:
    in the test's thread it raises _Stopped, in the watch's own it never returns (as the real one)."""
    watches = [distributed.Watch(store, i, num_processes, timeout_s) for i in range(num_processes)]
    for watch in watches:
        def stop(message, *, own_line, announce=True, watch=watch):
            stops.append((watch.process_id, message, time.monotonic()))
            watch._finished.set()
            if threading.current_thread() is threading.main_thread():
                raise _Stopped(message)
            threading.Event().wait()
        watch.stop = stop
    return watches


def test_an_error_is_the_process_own_once_every_other_process_answers():
    store, stops = _KeyValueStore(), []
    watches = _watches(store, 3, timeout_s=60, stops=stops)
    for watch in watches:
        watch.start()
    time.sleep(0.5)
    asked = time.monotonic()
    watches[0].wait_for_the_others()
    # The others answer within about a second, not the heartbeat interval (12 s here).
    assert time.monotonic() - asked < 5 and not stops


def test_an_error_while_another_process_is_silent_is_reported_as_that_ones_death():
    store, stops = _KeyValueStore(), []
    watches = _watches(store, 3, timeout_s=distributed.MIN_TIMEOUT_S, stops=stops)
    watches[0].step = 7
    for watch in watches[:2]:  # process 2 never beats: killed
        watch.start()
    asked = time.monotonic()
    watches[0].wait_for_the_others()
    assert stops, "no process was found silent"
    process, message, stopped = stops[0]
    assert process in (0, 1) and message.startswith("process 2 stopped sending heartbeats")
    # Within the timeout and an interval, before the wait gave up (the timeout and three intervals).
    assert stopped - asked < 1.2 * distributed.MIN_TIMEOUT_S + 1


def test_an_announced_stop_is_printed_by_a_process_with_an_error():
    store, stops = _KeyValueStore(), []
    watches = _watches(store, 2, timeout_s=60, stops=stops)
    store.key_value_set("hpl_jax/stop", "process 1 stopped at about step 3 on its own error (...)")
    with pytest.raises(_Stopped):
        watches[0].wait_for_the_others()
    assert stops == [(0, "process 1 stopped at about step 3 on its own error (...)", stops[0][2])]


def test_nothing_is_printed_after_the_line_once_the_watch_is_stopping(caplog):
    # Process 0's watch names a peer's death while its main thread is still inside the collective the death broke;
    # when the collective fails later, the main thread must not print after the line (it waits for the exit).
    watch = distributed.Watch(_KeyValueStore(), 0, 2, 60)
    watch.warn_unless_stopping("before the stop")
    assert "before the stop" in caplog.text
    watch._output.acquire()  # what `stop` holds from its line to the exit
    late = threading.Thread(target=watch.warn_unless_stopping, args=("after the line",), daemon=True)
    late.start()
    late.join(0.5)
    assert late.is_alive() and "after the line" not in caplog.text


@pytest.mark.parametrize("spec", ["1:train_gather", "x:train_gather@3", "1:somewhere@3", "2:eval_gather@3"])
def test_a_fault_spec_that_names_no_place_is_refused(spec):
    with pytest.raises(ValueError, match="HPL_JAX_FAULT="):
        distributed.Fault.from_spec(spec, _KeyValueStore(), 0, 2)
