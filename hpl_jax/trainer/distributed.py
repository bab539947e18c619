"""When one process of a multi-process run stops, every other one stops too: within a bounded time, with exit
status 1 and one line that says which process stopped, at about which step, and where the same command resumes.

JAX's coordination service (run by process 0) notices a process that stops sending heartbeats, but then ends
every other process with an abort (a C++ LOG(FATAL) with a stack dump, then Python's faulthandler listing every
extension module); and a process whose own error ends it leaves the others waiting for that timeout. So the
processes also watch each other here, through the coordination service's key-value store, with the timeout
`--heartbeat_timeout_s` (JAX's own is set to twice it plus a minute, so this watch decides first):

- every process publishes a heartbeat (a count and its current step) every timeout/5 seconds and reads all of them,
  and in between waits for an announced stop;
- a process whose heartbeat has not changed for the timeout is taken for dead (killed, preempted, its host lost);
  the coordination service not answering for the timeout means that process 0 is;
- a process whose run ends on an error (a failed save, a full disk for metrics.json, a config error) announces
  it before it exits, and every other process stops at once, quoting it.

A peer's death often shows up first as an error of this process: a collective, a barrier or a transfer that lost
its peer (gloo's "Connection closed by peer", NCCL, an orbax barrier, `process_allgather`), or a save that failed
with it. Which comes first, that error or the watch's verdict, is luck; the line must not depend on it. So before
any error is reported as this process's own, the others are asked to beat at once (`Watch.wait_for_the_others`):
an error is the process's own only once every other process has answered; while one is silent, the watch's verdict
on it (within the timeout) ends the process with that one's line, and no traceback.

Whoever stops first announces its line, so that every process prints the same. Process 0 exits last: a process
still connected when the coordination service goes would abort. Process 0's sudden death (kill -9) is the one
case left to JAX: its coordination service dies with it, and JAX aborts the other processes at once
(docs/scaling.md, "When one process stops").

The tests inject deaths at the places where one can show up first (`Fault`, HPL_JAX_FAULT), which the loop, the
evaluation and the checkpoints mark with faults.reached; without that variable the marks do nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Dict, Optional, Tuple

import jax
from absl import logging

from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import faults

# JAX's heartbeat timeout for ours of `t` seconds: long enough that this watch always decides first.
JAX_TIMEOUT_FACTOR, JAX_TIMEOUT_EXTRA_S = 2, 60
MIN_TIMEOUT_S = 5  # below this a compile or a garbage collection could pass for a dead process
_PREFIX = "hpl_jax/"
_HEARTBEAT = _PREFIX + "heartbeat/"  # heartbeat/<process>: "<count> <step>", or _DONE once its run has ended
_STOP = _PREFIX + "stop"  # the first stopping process's line, for every process to print
_EXITING = _PREFIX + "exiting/"  # exiting/<process>: set just before a stopping process exits
_DEAD = _PREFIX + "dead/"  # dead/<process>: set by the process that found it silent (no one waits for it to exit)
_ASK = _PREFIX + "ask"  # "<process> <count>": a process with an error asks every other one to beat at once
_AT = _PREFIX + "at/"  # at/<process>: "<point> <step>", the last fault point it passed (only with HPL_JAX_FAULT)
_DONE = "done"
_ANNOUNCEMENT_WAIT_S = 1.0
_POLL_S = 0.25
FAULT_ENV = "HPL_JAX_FAULT"
FAULT_POINTS = ("between_steps", "train_gather", "eval_gather", "save_barrier")

_watch: Optional["Watch"] = None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, heartbeat_timeout_s: int, **kwargs) -> None:
    """jax.distributed.initialize (its arguments), then, with more than one process, the watch of the others."""
    global _watch
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        heartbeat_timeout_seconds=JAX_TIMEOUT_FACTOR * heartbeat_timeout_s + JAX_TIMEOUT_EXTRA_S, **kwargs)
    if jax.process_count() > 1:
        # The client orbax's multihost utilities use too; jax has no public accessor for it.
        client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
        spec = os.environ.get(FAULT_ENV)
        fault = Fault.from_spec(spec, client, jax.process_index(), jax.process_count()) if spec else None
        _watch = Watch(client, jax.process_index(), jax.process_count(), heartbeat_timeout_s, fault=fault)
        _watch.start()
        faults.watch(_watch.reached)


def watching() -> bool:
    return _watch is not None


def at_step(step: int) -> None:
    """Tells the watch the step the training loop has reached (named in the line if the run stops): call it once
    the step is dispatched."""
    if _watch is not None:
        _watch.step = step
        _watch.reached("step")


def resume_from(workdir: str) -> None:
    """Tells the watch the workdir whose latest complete checkpoint a stopped run resumes from."""
    if _watch is not None:
        _watch.workdir = workdir


def finish() -> None:
    """The run ended normally: the others no longer expect heartbeats from this process."""
    global _watch
    if _watch is not None:
        _watch.finish()
        _watch = None
        faults.watch(None)


def stop_on_error(error: BaseException, line: Optional[str]) -> None:
    """Ends this process on `error`, with exit status 1, and tells the others.

    If another process has died or stopped, the error is taken for its consequence and that process's line is
    printed (`Watch.wait_for_the_others`). Otherwise the error is this process's own: `line`, the one line of an error the user
    can fix, is printed as it is; any other error (ours to fix) is printed with its traceback. Either is quoted in
    the line every other process prints."""
    first = (str(error).strip().splitlines() or [""])[0]
    _watch.warn_unless_stopping("%s: %s; asking the other processes whether they are alive before reporting it.",
                                type(error).__name__, first)
    _watch.wait_for_the_others()
    if line is not None:
        _watch.stop(f"process {_watch.process_id} stopped {_watch.when()} on its own error "
                    f"({line.rstrip('.')}); every process stops. Run the same command on every host to resume from "
                    f"{_watch.resume_point()}.", own_line=line)
    traceback.print_exception(error, file=sys.stderr)
    _watch.stop(f"process {_watch.process_id} stopped {_watch.when()} on an unexpected error "
                f"({type(error).__name__}: {first}; its log has the traceback); every process "
                f"stops. Run the same command on every host to resume from {_watch.resume_point()}.",
                own_line=None)


class Fault:
    """A death injected by the tests: HPL_JAX_FAULT=<process>:<point>@<step>, the same in every process, makes
    process <process> kill itself with SIGKILL at <point> of step <step> (or the first one after it), where the
    others meet its death first in that place:

    - between_steps: right after dispatching the step, wherever the others then are;
    - train_gather: instead of dispatching the step, once every other process has dispatched it (they wait inside
      its gather);
    - eval_gather, save_barrier: at an evaluation's gather or a checkpoint save after the step, once every other
      process has reached it too (they wait inside the gather, or the save's first barrier).

    To know where the others are, every process records the last point it passed (at/<process>). Steps are those
    `at_step` was told; before the first one of a run (a resumed run's too) the step is taken for 0.
    """

    _HOLD_S = 0.5  # from the others' record to their entering the collective: a few lines of Python
    _PATIENCE_S = 120.0  # then it dies anyway, wherever the others are

    def __init__(self, client, process_id: int, num_processes: int, victim: int, point: str, step: int):
        self._client = client
        self._process_id = process_id
        self._others = [p for p in range(num_processes) if p != process_id]
        self._victim = victim
        self._point = point
        self._step = step

    @classmethod
    def from_spec(cls, spec: str, client, process_id: int, num_processes: int) -> "Fault":
        try:
            victim, rest = spec.split(":")
            point, step = rest.split("@")
            victim, step = int(victim), int(step)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r} is not <process>:<point>@<step>") from None
        if point not in FAULT_POINTS or not 0 <= victim < num_processes:
            raise ValueError(f"{FAULT_ENV}={spec!r}: the point is one of {FAULT_POINTS} and the process one of the "
                             f"{num_processes}")
        return cls(client, process_id, num_processes, victim, point, step)

    def reached(self, point: str, step: int) -> None:
        """Records that this process is at `point` ('step' once `step` is dispatched); the victim dies there if it
        is its place."""
        self._client.key_value_set(f"{_AT}{self._process_id}", f"{point} {step}", allow_overwrite=True)
        if self._process_id != self._victim:
            return
        if (self._point, point) == ("between_steps", "step") and step >= self._step:
            self._die()
        elif (self._point, point) == ("train_gather", "train_gather") and step + 1 >= self._step:
            # `step` is the last one dispatched: the others dispatch the next and wait inside its gather.
            self._die(once_the_others_reach=("step", step + 1))
        elif point == self._point and point in ("eval_gather", "save_barrier") and step >= self._step:
            self._die(once_the_others_reach=(point, step))

    def _die(self, once_the_others_reach: Optional[Tuple[str, int]] = None) -> None:
        deadline = time.monotonic() + self._PATIENCE_S
        waiting = list(self._others) if once_the_others_reach else []
        while waiting and time.monotonic() < deadline:
            waiting = [p for p in waiting if not self._is_at(p, *once_the_others_reach)]
            time.sleep(0.05)
        if once_the_others_reach:
            time.sleep(self._HOLD_S)
        print(f"{FAULT_ENV}: process {self._process_id} kills itself at {self._point}"
              f"{f' (processes {waiting} never reached it)' if waiting else ''}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def _is_at(self, process: int, point: str, step: int) -> bool:
        """Whether `process` has passed `point` of a step >= `step` (any point of it for 'step')."""
        try:
            at_point, at_step_ = self._client.key_value_try_get(f"{_AT}{process}").split()
        except Exception:  # pylint: disable=broad-except  (not recorded yet)
            return False
        return point in ("step", at_point) and int(at_step_) >= step


class Watch:
    """The heartbeats of one process of a run and its view of the others' (see the module docstring)."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, *,
                 fault: Optional[Fault] = None):
        self._client = client
        self.process_id = process_id
        self._peers = [p for p in range(num_processes) if p != process_id]
        self._timeout = timeout_s
        self._interval = timeout_s / 5
        self._fault = fault
        self.step: Optional[int] = None
        self.workdir: Optional[str] = None
        self._count = 0
        self._asks = 0
        self._last_ask: Optional[str] = None
        now = time.monotonic()
        self._last_answer = now
        self._heard: Dict[int, Tuple[Optional[str], float]] = {p: (None, now) for p in self._peers}
        self._silent = set()
        self._stopping = threading.Lock()
        # Held by `stop` from its line to the exit, so that no other thread prints after the line.
        self._output = threading.Lock()
        self._finished = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="hpl_jax heartbeat", daemon=True),
                         threading.Thread(target=self._guard, name="hpl_jax coordinator guard", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        self._finished.set()
        for thread in self._threads:
            thread.join()
        self._client.key_value_set(f"{_HEARTBEAT}{self.process_id}", _DONE, allow_overwrite=True)

    def when(self) -> str:
        return "before the first step" if self.step is None else f"at about step {self.step}"

    def resume_point(self) -> str:
        if self.workdir is None:
            return "where it stopped"
        directory = checkpointing.workdir_path(self.workdir) / checkpointing.CHECKPOINTS_DIR
        step = checkpointing.latest_complete_step(directory)
        return f"{directory}/{step}" if step is not None else "the start (no checkpoint was complete)"

    def reached(self, point: str) -> None:
        if self._fault is not None:
            self._fault.reached(point, self.step or 0)

    # ------------------------------------------------------------------------------ the two threads
    def _beat(self) -> None:
        next_beat = time.monotonic()
        while not self._finished.is_set():
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self._interval
                try:
                    self._client.key_value_set(f"{_HEARTBEAT}{self.process_id}", f"{self._count} {self.step}",
                                               allow_overwrite=True)
                    entries = dict(self._client.key_value_dir_get(_PREFIX))
                except Exception:  # pylint: disable=broad-except  (an RPC that failed: the guard judges the silence)
                    entries = None
                if entries is not None:
                    self._count += 1
                    self._last_answer = time.monotonic()
                    self._listen(entries)
            # Between heartbeats, an announced stop is waited for: it ends this process within a second.
            started = time.monotonic()
            try:
                message = self._client.blocking_key_value_get(_STOP, int(_ANNOUNCEMENT_WAIT_S * 1000))
            except Exception:  # pylint: disable=broad-except  (none yet, or an RPC that failed)
                self._finished.wait(max(_ANNOUNCEMENT_WAIT_S - (time.monotonic() - started), 0))
                if self._asked():
                    next_beat = time.monotonic()
                continue
            self.stop(message, own_line=None, announce=False)

    def _asked(self) -> bool:
        """Whether a process with an error has asked since the last look (`wait_for_the_others`): this one then
        beats at once."""
        try:
            ask = self._client.key_value_try_get(_ASK)
        except Exception:  # pylint: disable=broad-except  (no one has asked yet, or an RPC that failed)
            return False
        asked, self._last_ask = ask != self._last_ask, ask
        return asked

    def _listen(self, entries: Dict[str, str]) -> None:
        if _STOP in entries:
            self.stop(entries[_STOP], own_line=None, announce=False)
        now = time.monotonic()
        for peer in self._peers:
            value = entries.get(f"{_HEARTBEAT}{peer}")
            if value == _DONE or value != self._heard[peer][0]:
                self._heard[peer] = (value, now)
            elif now - self._heard[peer][1] > self._timeout:
                self._silent.add(peer)
                try:
                    self._client.key_value_set(f"{_DEAD}{peer}", "", allow_overwrite=True)
                except Exception:  # pylint: disable=broad-except
                    pass
                self.stop(f"process {peer} stopped sending heartbeats (it died or was preempted, or its "
                          f"host was lost) {self.when()}; every process stops. Run the same "
                          f"command on every host to resume from {self.resume_point()}.", own_line=None)

    def _guard(self) -> None:
        while not self._finished.wait(self._interval):
            if time.monotonic() - self._last_answer > self._timeout:
                self._silent.add(0)
                self.stop(f"the coordination service on process 0 has not answered for {self._timeout:g} s (process "
                          f"0 died or was preempted, or the network to it failed) {self.when()}; "
                          f"every process stops. Run the same command on every host to resume from "
                          f"{self.resume_point()}.", own_line=None, announce=False)

    # ------------------------------------------------------------------------------ stopping
    def wait_for_the_others(self) -> None:
        """Returns once every other process has shown that it is alive (a heartbeat newer than this call, or its run
        ended); meanwhile an announced stop, or the watch finding one silent for the timeout, ends this process with
        that one's line. Bounded by the timeout and three heartbeat intervals (the watch decides within them)."""
        self._asks += 1
        try:
            before = dict(self._client.key_value_dir_get(_HEARTBEAT))
            self._client.key_value_set(_ASK, f"{self.process_id} {self._asks}", allow_overwrite=True)
        except Exception:  # pylint: disable=broad-except  (the coordination service is gone: the guard decides)
            before = {}
        deadline = time.monotonic() + self._timeout + 3 * self._interval
        while time.monotonic() < deadline:
            try:
                entries = dict(self._client.key_value_dir_get(_PREFIX))
            except Exception:  # pylint: disable=broad-except
                entries = {}
            if _STOP in entries:
                self.stop(entries[_STOP], own_line=None, announce=False)
            beats = [entries.get(f"{_HEARTBEAT}{peer}") for peer in self._peers]
            if entries and all(beat == _DONE or (beat is not None and beat != before.get(f"{_HEARTBEAT}{peer}"))
                               for peer, beat in zip(self._peers, beats)):
                return
            time.sleep(_POLL_S)

    def stop(self, message: str, *, own_line: Optional[str], announce: bool = True) -> None:
        """Prints `own_line` or 'Distributed error: <message>', tells the others, and exits with status 1. If another
        process announced its stop first, its line is printed instead."""
        if not self._stopping.acquire(blocking=False):
            # Another thread of this process is stopping it: wait for it.
            threading.Event().wait()
        self._finished.set()
        self._output.acquire()
        if announce:
            try:
                # The first process to stop names the cause for all; a later announcement is refused.
                self._client.key_value_set(_STOP, message)
            except Exception:  # pylint: disable=broad-except
                first = self._announced()
                if first is not None and first != message:
                    message, own_line = first, None
        print(own_line if own_line is not None else f"Distributed error: {message}", file=sys.stderr, flush=True)
        logging.flush()
        try:
            self._client.key_value_set(f"{_EXITING}{self.process_id}", "")
        except Exception:  # pylint: disable=broad-except
            pass
        if self.process_id == 0:
            self._wait_for_the_others_to_exit()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # pylint: disable=protected-access  (no shutdown barrier: the others are gone or going)

    def warn_unless_stopping(self, message: str, *args) -> None:
        """Logs a warning, unless another thread is already stopping this process: its line must stay the last one
        printed (the collective a peer's death broke can fail after the watch has named the death), so the calling
        thread then waits for the exit instead."""
        if not self._output.acquire(blocking=False):
            threading.Event().wait()
        try:
            logging.warning(message, *args)
        finally:
            self._output.release()

    def _announced(self) -> Optional[str]:
        try:
            return self._client.key_value_try_get(_STOP)
        except Exception:  # pylint: disable=broad-except
            return None

    def _wait_for_the_others_to_exit(self) -> None:
        deadline = time.monotonic() + self._timeout
        try:
            dead = {int(key.rsplit("/", 1)[-1]) for key, _ in self._client.key_value_dir_get(_DEAD)}
        except Exception:  # pylint: disable=broad-except
            dead = set()
        for peer in self._peers:
            if peer in self._silent or peer in dead or self._heard[peer][0] == _DONE:
                continue
            remaining_ms = int(max(deadline - time.monotonic(), 0) * 1000)
            try:
                self._client.blocking_key_value_get(f"{_EXITING}{peer}", max(remaining_ms, 1))
            except Exception:  # pylint: disable=broad-except  (not heard within the timeout: it is stuck or gone)
                pass
        # The others' last step after announcing 'exiting' is os._exit, but it may not have run yet.
        time.sleep(min(1.0, self._interval))
