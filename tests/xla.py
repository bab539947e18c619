"""The XLA flags of every test process: tests/conftest.py sets them before JAX is imported, and the tests that start
processes of their own pass `flags(devices)` on.

Compiling dominates most tests' time, and XLA's backend optimisation off about halves it (the device check's dry
run: 146 s -> 72 s); every test process runs with it off, so the programs two tests compare are compiled alike.
XLA:CPU's older elemental emitters (--xla_cpu_use_fusion_emitters=false) compile a tiny run's train step in 3.2 s
instead of 5.3 s on the 2-core machine; with them the suite went from 24 min 24 s to 19 min 10 s (2,861 -> 2,242
worker-seconds, the same way each time).
HPL_TESTS_XLA_OPTIMIZE=1 runs the suite with XLA's full optimisation, as users run the code."""
import os

FAST_COMPILE = ("" if os.environ.get("HPL_TESTS_XLA_OPTIMIZE") == "1" else
                "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def flags(devices: int) -> str:
    """XLA_FLAGS of a test process with `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}".strip()
