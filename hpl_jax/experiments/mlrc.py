"""The folds of "A Metric Learning Reality Check" (docs/method.md, "The MLRC protocol"): one model per fold.

  python -m hpl_jax.mlrc run --config=configs/mlrc/cub.py --workdir=ROOT [--run=local|print] [--config.x=y ...]

Fold p (p = 0..dataset.num_folds-1) trains in ROOT/fold_<p> with `--config.dataset.val_fold=p`, validating on
block p of the training classes (data.fold_split), and keeps its best validation checkpoint in
ROOT/fold_<p>/best. `--run=local` (the default) runs the folds one after another on this host, each as its own
`python -m hpl_jax.main` process, and skips the folds that have finished (all epochs, or stopped early); a
stopped or preempted fold resumes from its checkpoint. `--run=print` prints the commands, one fold a line, to
run on several hosts or as an array job (line p + 1 is fold p). The --config.x=y overrides given here are passed
on to every fold. Then `python -m hpl_jax.mlrc_report ROOT` writes the tables.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import List, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax.trainer import reporting

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config every fold trains (configs/mlrc/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "ROOT: fold p trains in ROOT/fold_<p>.")
flags.DEFINE_enum("run", "local", ["local", "print"], "'local': train the unfinished folds here, one after "
                  "another; 'print': print one command per fold.")
flags.mark_flags_as_required(["config", "workdir"])

COMMANDS = ("run",)


def fold_workdir(root: str, fold: int) -> str:
    return os.path.join(root, f"fold_{fold}")


def fold_command(config_path: str, root: str, fold: int, overrides: Sequence[str],
                 python: str = "python") -> List[str]:
    """The `hpl_jax.main` command line that trains fold `fold` in ROOT/fold_<fold>."""
    return [python, "-m", "hpl_jax.main", f"--config={config_path}", f"--workdir={fold_workdir(root, fold)}",
            *overrides, f"--config.dataset.val_fold={fold}"]


def _override_flags() -> List[str]:
    """The --config.x=y flags given on this command line, to pass on (the fold's val_fold is set per fold)."""
    values = config_flags.get_override_values(FLAGS["config"])
    return [f"--config.{name}={value if isinstance(value, str) else repr(value)}"
            for name, value in values.items() if name != "dataset.val_fold"]


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Give one command, {' or '.join(COMMANDS)}: python -m hpl_jax.mlrc run --config=C "
                             "--workdir=ROOT [--run=local|print]")
    config, config_path = FLAGS.config, config_flags.get_config_filename(FLAGS["config"])
    if not config.dataset.num_folds:
        sys.exit(f"Config error: config.dataset.num_folds is 0 in {config_path}; the MLRC runner trains one model "
                 "per fold: use a config of configs/mlrc/ or set it (MLRC: 4).")
    overrides = _override_flags()
    folds = range(config.dataset.num_folds)
    if FLAGS.run == "print":
        for fold in folds:
            print(shlex.join(fold_command(config_path, FLAGS.workdir, fold, overrides)))
        return
    for fold in folds:
        workdir = fold_workdir(FLAGS.workdir, fold)
        if reporting.run_has_ended(workdir):
            print(f"fold {fold}: finished in {workdir}, skipped.", flush=True)
            continue
        command = fold_command(config_path, FLAGS.workdir, fold, overrides, python=sys.executable)
        print(f"fold {fold}: {shlex.join(command)}", flush=True)
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            sys.exit(f"fold {fold} failed (exit status {returncode}); see its output above. Run the same command "
                     "again to resume it; the finished folds are skipped.")
        if not reporting.run_has_ended(workdir):
            sys.exit(f"fold {fold} stopped before its end (preempted?); run the same command again to resume it.")
    print(f"All {len(folds)} folds finished; the tables: python -m hpl_jax.mlrc_report {FLAGS.workdir}")


if __name__ == "__main__":
    app.run(main)
