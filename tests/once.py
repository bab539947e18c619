"""Work that several tests read and any pytest-xdist worker may be first to need: made once per test session.

`made_once(tmp_path_factory, name, make)` is a directory of the session's temporary tree shared by its workers
(their base temporary directories' parent; a session without workers uses its own). The first process that asks
runs `make(path)` under a file lock; the others wait on the lock and read what it made. The tests that read it must
not write into it. A `make` that fails leaves no `.made` mark, so the next process that asks makes it again (and
fails the same way, in its own test). A fixture that returns such a directory is marked `@once.shared` (under
`@pytest.fixture`): tests/conftest.py runs the first test that reads it ahead of the others.
"""
import fcntl
import os
import pathlib
import shutil
from typing import Callable


def session_root(tmp_path_factory) -> pathlib.Path:
    """The directory every process of this test session shares."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """session_root / name, filled by `make(path)` in the first process of the session that asks for it."""
    root = session_root(tmp_path_factory)
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (path / ".made").exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed `make` left
            path.mkdir()
            make(path)
            (path / ".made").touch()
    return path


def shared(fixture_function: Callable) -> Callable:
    """Marks a fixture that returns a `made_once` directory (tests/conftest.py orders the tests that read it)."""
    fixture_function.made_once = True
    return fixture_function
