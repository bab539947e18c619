"""What every command (main, evaluate, visualize) shares: joining a multi-process run, quiet library logs, and
user errors reported as one line."""
from __future__ import annotations

import logging as std_logging
import sys
from typing import Callable, Optional, TypeVar

import jax
from absl import flags
from absl import logging

from hpl_jax import data
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import distributed
from hpl_jax.trainer import guards

FLAGS = flags.FLAGS
T = TypeVar("T")


def define_process_flags() -> None:
    """The flags that join a multi-process run (the launch/ scripts pass them)."""
    flags.DEFINE_bool("distributed", False, "Join a multi-process run whose layout JAX detects from the environment "
                      "(Cloud TPU pod slice, SLURM with one task per GPU, Open MPI).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run with an "
                        "explicit layout; needs --num_processes and --process_id.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of the run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (with --coordinator_address).")
    flags.DEFINE_integer("heartbeat_timeout_s", 100, "In a multi-process run, a process whose heartbeats stop for "
                         "this many seconds (killed, preempted, its host lost) is taken for dead, and every other "
                         "process stops with one line naming the checkpoint to resume from; a process's own error "
                         "stops the others at once (see hpl_jax/trainer/distributed.py).")
    flags.register_validator("heartbeat_timeout_s", lambda seconds: seconds >= distributed.MIN_TIMEOUT_S,
                             f"--heartbeat_timeout_s must be at least {distributed.MIN_TIMEOUT_S} (seconds): a "
                             "shorter one could take a compile or a garbage collection for a dead process.")
    flags.register_multi_flags_validator(
        ["coordinator_address", "num_processes", "process_id"],
        lambda f: (f["coordinator_address"] is None) == (f["num_processes"] is None) == (f["process_id"] is None),
        "--coordinator_address, --num_processes and --process_id go together: give all three or none.")


def _own_info_only(record) -> bool:
    # orbax and tensorflow-datasets log every file operation at INFO; keep their warnings only.
    return record.levelno >= std_logging.WARNING or "/hpl_jax/" in record.pathname


# A failed background save (a full disk) is reported by the run in one line. Around it, orbax logs the failure
# with a traceback from each of its threads, and the writes it left running end after orbax stopped waiting: each
# reports "Event loop is closed" (about 150 tracebacks on a full disk) or, when garbage-collected, "exception was
# never retrieved". The filters below keep orbax's one-line messages and drop the rest.
def _one_line_library_errors(record) -> bool:
    if "/hpl_jax/" not in record.pathname:
        record.exc_info, record.exc_text = None, None
    return not (record.name == "asyncio" and "exception was never retrieved" in record.getMessage())


def _no_closed_loop_noise(unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def quiet_library_logs() -> None:
    handler = logging.get_absl_handler().python_handler
    handler.addFilter(_own_info_only)
    handler.addFilter(_one_line_library_errors)
    sys.unraisablehook = _no_closed_loop_noise


def parse_flags(argv):
    """absl's flag parsing, but a `--config.<field>` override that names no field, and a config file that cannot be
    read or whose get_config raises (e.g. a bad `configs/hier_recipe.py:ARGUMENT`), are one line, not tracebacks."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):
            # ml_collections quotes the whole traceback of a config file it could not load; its last line is the
            # file's own message (a missing file, get_config's error).
            sys.exit(f"Config error: {lines[0].split(': ')[0].removeprefix('flag ')}: {lines[-1]}")
        sys.stderr.write(f"FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    except (AttributeError, KeyError) as error:
        message = config_checks.unknown_field(error, argv)
        if message is None:
            raise
        sys.exit(f"Config error: {message}")


def join_processes() -> None:
    """Joins the other processes of a multi-process run as the flags of `define_process_flags` say."""
    if FLAGS.coordinator_address:
        # 'deactivate': under SLURM, detection would otherwise give each process a single GPU.
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_s=FLAGS.heartbeat_timeout_s, cluster_detection_method="deactivate")
    elif FLAGS.distributed:
        distributed.initialize(heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
    if jax.process_count() > 1 and not jax.distributed.is_initialized():
        sys.exit("This is one of several JAX processes but jax.distributed is not initialised; pass --distributed "
                 "or --coordinator_address, --num_processes and --process_id (see launch/).")
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())


def user_error_line(error: BaseException) -> Optional[str]:
    """The one line of an error the user can fix (config, data, a missing run or checkpoint, an unusable workdir,
    a non-finite step); None for any other error."""
    for kind, prefix in ((config_checks.ConfigError, "Config error"), (data.DataError, "Data error"),
                         (checkpointing.RunError, "Run error"), (checkpointing.WorkdirError, "Workdir error"),
                         (guards.NonFiniteError, "Training error")):
        if isinstance(error, kind):
            return f"{prefix}: {error}"
    return None


def exit_on_user_error(fn: Callable[..., T], *args, **kwargs) -> T:
    """Calls fn; an error the user can fix exits with its one line (`user_error_line`).

    In a multi-process run every error also stops the other processes (distributed.py), once every other process
    has answered that it is alive: while one is silent the error is taken for a consequence of its death, and every
    process prints the line that names it.
    """
    try:
        result = fn(*args, **kwargs)
    except Exception as error:  # pylint: disable=broad-except
        line = user_error_line(error)
        if distributed.watching():
            distributed.stop_on_error(error, line)
        if line is None:
            raise
        sys.exit(line)
    distributed.finish()
    return result
