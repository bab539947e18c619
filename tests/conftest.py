"""Test session setup, done before JAX is imported anywhere: two simulated CPU devices compiling without XLA's
backend optimisation (tests/xla.py), and one persistent compilation cache shared by every test process of the
session (the xdist workers and the subprocess runs they start inherit this environment), so a program that several
tests compile alike is compiled once."""
import os
import shutil
import tempfile

from tests import xla

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla.flags(2)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The controller makes the directory before xdist starts its workers; they find it in their environment.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpl_jax_tests_compile_cache_")
# Every program is kept, however fast it compiled (the default keeps those of >= 1 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(items):
    """The tests marked `long` (minutes on 2 cores) go first, then the rest: pytest-xdist hands work out in this
    order, so no worker is left running a long test alone at the end of the session. Of the tests that read a run
    made once per session (a fixture marked `@once.shared`), the first makes the run and goes ahead of its group; the
    others go behind their group, so they find the run made instead of waiting on its lock beside the test that
    makes it (a timeline of the suite at d5fa967: 28-45 s waits)."""
    first_reader, later_reader, made = set(), set(), set()
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        shared = {definition for name in item.fixturenames
                  for definition in (definitions.name2fixturedefs.get(name, ()) if definitions else ())
                  if getattr(definition.func, "made_once", False)}
        if shared - made:
            first_reader.add(item.nodeid)
        elif shared:
            later_reader.add(item.nodeid)
        made |= shared

    def rank(item):
        place = 0 if item.nodeid in first_reader else 2 if item.nodeid in later_reader else 1
        return item.get_closest_marker("long") is None, place
    items.sort(key=rank)


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
