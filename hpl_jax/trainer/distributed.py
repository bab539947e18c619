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

Whoever stops first announces its line, so that every process prints the same. Process 0 exits last: a process
still connected when the coordination service goes would abort. Process 0's sudden death (kill -9) is the one
case left to JAX: its coordination service dies with it, and JAX aborts the other processes at once.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Dict, Optional, Tuple

import jax
from absl import logging

from hpl_jax.trainer import checkpointing

# JAX's heartbeat timeout for ours of `t` seconds: long enough that this watch always decides first.
JAX_TIMEOUT_FACTOR, JAX_TIMEOUT_EXTRA_S = 2, 60
MIN_TIMEOUT_S = 5  # below this a compile or a garbage collection could pass for a dead process
_PREFIX = "hpl_jax/"
_HEARTBEAT = _PREFIX + "heartbeat/"  # heartbeat/<process>: "<count> <step>", or _DONE once its run has ended
_STOP = _PREFIX + "stop"  # the first stopping process's line, for every process to print
_EXITING = _PREFIX + "exiting/"  # exiting/<process>: set just before a stopping process exits
_DONE = "done"
_ANNOUNCEMENT_WAIT_S = 1.0

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
        _watch = Watch(client, jax.process_index(), jax.process_count(), heartbeat_timeout_s)
        _watch.start()


def watching() -> bool:
    return _watch is not None


def at_step(step: int) -> None:
    """Tells the watch the step the training loop has reached (named in the line if the run stops)."""
    if _watch is not None:
        _watch.step = step


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


def stop_on_error(line: str) -> None:
    """Ends this process on its own error: prints its one `line`, tells the others, exits with status 1."""
    _watch.stop(f"process {_watch.process_id} stopped {_watch.when()} on its own error "
                f"({line.rstrip('.')}); every process stops. Run the same command on every host to resume from "
                f"{_watch.resume_point()}.", own_line=line)


def stop_on_unexpected_error(error: BaseException) -> None:
    """Ends this process on an error that is not the user's: prints the traceback (it is ours to fix) and tells
    the others. An error of JAX's runtime (a collective or a barrier that lost a peer) may be the consequence of
    another process's death: the watch is first given the time to find that."""
    if isinstance(error, jax.errors.JaxRuntimeError):
        _watch.wait_for_a_cause()
    traceback.print_exception(error, file=sys.stderr)
    lines = str(error).strip().splitlines()
    _watch.stop(f"process {_watch.process_id} stopped {_watch.when()} on an unexpected error "
                f"({type(error).__name__}: {lines[0] if lines else ''}; its log has the traceback); every process "
                f"stops. Run the same command on every host to resume from {_watch.resume_point()}.",
                own_line=None)


class Watch:
    """The heartbeats of one process of a run and its view of the others' (see the module docstring)."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
        self._client = client
        self.process_id = process_id
        self._peers = [p for p in range(num_processes) if p != process_id]
        self._timeout = timeout_s
        self._interval = timeout_s / 5
        self.step: Optional[int] = None
        self.workdir: Optional[str] = None
        self._count = 0
        now = time.monotonic()
        self._last_answer = now
        self._heard: Dict[int, Tuple[Optional[str], float]] = {p: (None, now) for p in self._peers}
        self._silent = set()
        self._stopping = threading.Lock()
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
                continue
            self.stop(message, own_line=None, announce=False)

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
    def wait_for_a_cause(self) -> None:
        """Waits as long as the watch may take to find a stopped process (it then ends this one)."""
        time.sleep(self._timeout + 3 * self._interval)

    def stop(self, message: str, *, own_line: Optional[str], announce: bool = True) -> None:
        """Prints `own_line` or 'Distributed error: <message>', tells the others, and exits with status 1."""
        if not self._stopping.acquire(blocking=False):
            # Another thread of this process is stopping it: wait for it.
            threading.Event().wait()
        self._finished.set()
        print(own_line if own_line is not None else f"Distributed error: {message}", file=sys.stderr, flush=True)
        logging.flush()
        if announce:
            try:
                # The first process to stop names the cause for all; a later announcement is refused.
                self._client.key_value_set(_STOP, message)
            except Exception:  # pylint: disable=broad-except
                pass
        try:
            self._client.key_value_set(f"{_EXITING}{self.process_id}", "")
        except Exception:  # pylint: disable=broad-except
            pass
        if self.process_id == 0:
            self._wait_for_the_others_to_exit()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # pylint: disable=protected-access  (no shutdown barrier: the others are gone or going)

    def _wait_for_the_others_to_exit(self) -> None:
        deadline = time.monotonic() + self._timeout
        for peer in self._peers:
            if peer in self._silent or self._heard[peer][0] == _DONE:
                continue
            remaining_ms = int(max(deadline - time.monotonic(), 0) * 1000)
            try:
                self._client.blocking_key_value_get(f"{_EXITING}{peer}", max(remaining_ms, 1))
            except Exception:  # pylint: disable=broad-except  (not heard within the timeout: it is stuck or gone)
                pass
        # The others' last step after announcing 'exiting' is os._exit, but it may not have run yet.
        time.sleep(min(1.0, self._interval))
