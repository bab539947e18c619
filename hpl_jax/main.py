"""Entry point: parse --config/--workdir, log the devices, call train.train_and_evaluate.

  python -m hpl_jax.main --config=configs/default.py --workdir=/tmp/hpl_default [--config.optim.lr=3e-4]
"""
import logging as std_logging
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hpl_jax import config_checks
from hpl_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and metrics.json; "
                    "a run started on an existing workdir resumes where it stopped.")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _own_info_only(record) -> bool:
    # orbax and tensorflow-datasets log every file operation at INFO; keep their warnings only.
    return record.levelno >= std_logging.WARNING or "/hpl_jax/" in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().python_handler.addFilter(_own_info_only)
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_checks.ConfigError as error:
        sys.exit(f"Config error: {error}")


if __name__ == "__main__":
    app.run(main)
