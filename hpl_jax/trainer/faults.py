"""The places where another process's death can show up first in this one, marked where they are (the train loop,
the evaluation's gather, a checkpoint save) so that the tests can inject a death there (distributed.py: `Fault`,
HPL_JAX_FAULT). It imports nothing of the package, so any module may mark its places; without a registered
watcher (a single process, or no injection) `reached` does nothing.
"""
from __future__ import annotations

from typing import Callable, Optional

_watcher: Optional[Callable[[str], None]] = None


def watch(watcher: Optional[Callable[[str], None]]) -> None:
    """Registers the function every `reached` calls (distributed.Watch.reached), or None."""
    global _watcher
    _watcher = watcher


def reached(point: str) -> None:
    """This process is at `point`: 'train_gather' just before a train step is dispatched, 'eval_gather' just before
    an evaluation's gather, 'save_barrier' just before a checkpoint save (whose barriers follow)."""
    if _watcher is not None:
        _watcher(point)
