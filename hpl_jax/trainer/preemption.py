"""Preemption: SIGTERM turns into a save at one step agreed by every host, then a clean exit."""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """Says at a step boundary whether to save and stop because a SIGTERM arrived, the same on every host.

    SIGTERM is how TPU and spot-GPU preemption (and SLURM before its time limit) announces itself. With
    jax.distributed, JAX's preemption service catches it on whichever host gets it and agrees with every
    host on a step: the largest step any host has reported, plus one; `reached` turns True at that step on
    all hosts at once. A single process without jax.distributed catches SIGTERM itself.

    `reached` must be called with every step id in increasing order, the same on every host; once True it
    stays True.
    """

    def __init__(self):
        self._distributed = jax.distributed.is_initialized()
        self._stop = False
        self._previous_handler = None
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True
        # A second SIGTERM then ends the process at once, as it would without this handler.
        signal.signal(signal.SIGTERM, self._previous_handler)

    def reached(self, step: int) -> bool:
        if self._distributed:
            self._stop = self._stop or multihost_utils.reached_preemption_sync_point(step)
        return self._stop

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
