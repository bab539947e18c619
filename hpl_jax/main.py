"""Entry point: parse flags, join the other processes of a multi-process run, call train.train_and_evaluate.

  python -m hpl_jax.main --config=configs/default.py --workdir=/tmp/hpl_default [--config.optim.lr=3e-4]

A multi-process run (several hosts, or several processes on one host) starts the same command in every
process, adding either `--distributed` (Cloud TPU pod slices, SLURM with one task per GPU: JAX reads the
layout from the environment) or the explicit `--coordinator_address`, `--num_processes` and `--process_id`.
The scripts in launch/ do this. If one process stops, the others stop within `--heartbeat_timeout_s` with one
line naming the checkpoint to resume from (hpl_jax/trainer/distributed.py).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax.trainer import cli
from hpl_jax.trainer import distributed
from hpl_jax.trainer import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and metrics.json; "
                    "a run started on an existing workdir resumes where it stopped.")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
cli.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    cli.join_processes()
    distributed.resume_from(FLAGS.workdir)
    cli.exit_on_user_error(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
