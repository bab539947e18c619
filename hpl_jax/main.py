"""Entry point: parse flags, join the other processes of a multi-process run, call train.train_and_evaluate.

  python -m hpl_jax.main --config=configs/default.py --workdir=/tmp/hpl_default [--config.optim.lr=3e-4]

A multi-process run (several hosts, or several processes on one host) starts the same command in every
process, adding either `--distributed` (Cloud TPU pod slices, SLURM with one task per GPU: JAX reads the
layout from the environment) or the explicit `--coordinator_address`, `--num_processes` and `--process_id`.
The scripts in launch/ do this.
"""
import logging as std_logging
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hpl_jax import checkpointing
from hpl_jax import config_checks
from hpl_jax import data
from hpl_jax import guards
from hpl_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and metrics.json; "
                    "a run started on an existing workdir resumes where it stopped.")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool("distributed", False, "Join a multi-process run whose layout JAX detects from the environment "
                  "(Cloud TPU pod slice, SLURM with one task per GPU, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run with an "
                    "explicit layout; needs --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])
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


def parse_flags(argv):
    """absl's flag parsing, but a `--config.<field>` override that names no field is one line, not tracebacks."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        message = config_checks.unknown_field(error, argv)
        if message is None:
            raise
        sys.exit(f"Config error: {message}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().python_handler.addFilter(_own_info_only)
    logging.get_absl_handler().python_handler.addFilter(_one_line_library_errors)
    sys.unraisablehook = _no_closed_loop_noise
    if FLAGS.coordinator_address:
        # 'deactivate': under SLURM, detection would otherwise give each process a single GPU.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                   cluster_detection_method="deactivate")
    elif FLAGS.distributed:
        jax.distributed.initialize()
    if jax.process_count() > 1 and not jax.distributed.is_initialized():
        sys.exit("This is one of several JAX processes but jax.distributed is not initialised; pass --distributed "
                 "or --coordinator_address, --num_processes and --process_id (see launch/).")
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_checks.ConfigError as error:
        sys.exit(f"Config error: {error}")
    except data.DataError as error:
        sys.exit(f"Data error: {error}")
    except checkpointing.WorkdirError as error:
        sys.exit(f"Workdir error: {error}")
    except guards.NonFiniteError as error:
        sys.exit(f"Training error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
