"""Sweeps: the product of config grids times seeds, one workdir per run, run here one after another or printed.

  python -m hpl_jax.sweep --config=configs/default.py --workdir=/tmp/sweep_w1 \
      --grid='hpl.weights=(1.0,0.0),(1.0,0.01),(1.0,0.1),(1.0,1.0)' --seeds=0,1,2 [--run=local|print]
  python -m hpl_jax.sweep --config=configs/default.py --workdir=/tmp/sweep_k1 \
      --grid='hpl.num_coarse=(4,),(8,),(16,)' --seeds=0,1,2 --set=num_epochs=12

Each run is `python -m hpl_jax.main --config=CONFIG --workdir=ROOT/<name> --config.<key>=<value> ...`; its name
comes from its overrides (`hpl.weights=1.0,0.01__seed=2`), so the same grid always gives the same workdirs.
`--grid KEY=V1,V2,...` (repeatable; commas inside brackets belong to a value) sweeps a config field;
`--seeds` sets `config.seed` (the training seed); `--data_seeds` also sweeps `config.dataset.seed`;
`--set KEY=VALUE` (repeatable) fixes a field for every run. Every override is parsed as `hpl_jax.main` parses
it before anything runs, so a typo stops the sweep at once.

A run whose metrics.json has evaluated its last epoch is finished and skipped; any other run is (re)started
and resumes from its workdir's latest checkpoint, so an interrupted sweep continues where it stopped when
the same command is run again. `--run=local` runs them here, one after another, each logging to
ROOT/<name>/log.txt; `--run=print` prints one command per unfinished run instead (for a cluster array job:
see launch/sweep_slurm.sbatch). Both write ROOT/sweep.json, the grid and the runs, which
`python -m hpl_jax.report ROOT` reads.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax.trainer import reporting

FLAGS = flags.FLAGS
SWEEP_FILE = "sweep.json"
LOG_FILE = "log.txt"


class SweepError(ValueError):
    """A grid, seed list or override the user can fix; the message names it."""


def define_flags() -> None:
    flags.DEFINE_string("config", None, "The config file every run starts from (configs/*.py).")
    flags.DEFINE_string("workdir", None, "ROOT: each run gets ROOT/<name>; ROOT/sweep.json describes the sweep.")
    flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: a config field and its values (repeatable; the runs "
                              "are the product of all grids and the seeds).")
    flags.DEFINE_list("seeds", ["0"], "Training seeds (config.seed).")
    flags.DEFINE_list("data_seeds", None, "Data seeds (config.dataset.seed), swept too when given.")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE fixed for every run (repeatable).")
    flags.DEFINE_enum("run", "local", ["local", "print"], "local: run here one after another; print: print one "
                      "command per unfinished run.")
    flags.DEFINE_string("python", None, "Interpreter of the runs (default: this one for local, `python` for print).")
    flags.mark_flags_as_required(["config", "workdir"])


# ----------------------------------------------------------------------------------------------- the plan
def split_values(text: str) -> List[str]:
    """'(1.0,0.0),(1.0,0.1)' -> ['(1.0,0.0)', '(1.0,0.1)']: commas inside brackets belong to a value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if depth != 0 or not all(values):
        raise SweepError(f"{text!r} is not a comma-separated list of values with balanced brackets.")
    return values


def parse_assignment(text: str, what: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not value.strip():
        raise SweepError(f"{what} {text!r}: write KEY=VALUE with KEY a config field such as hpl.weights.")
    return key, value.strip()


def parse_grid(text: str) -> Tuple[str, List[str]]:
    """'hpl.num_coarse=(4,),(8,)' -> ('hpl.num_coarse', ['(4,)', '(8,)'])."""
    key, values = parse_assignment(text, "--grid")
    values = split_values(values)
    if len(set(values)) != len(values):
        raise SweepError(f"--grid {text!r} repeats a value.")
    return key, values


def safe_value(value: str) -> str:
    """A value as it reads in a directory name: brackets, quotes and spaces dropped, other odd characters '_'."""
    value = re.sub(r"[()\[\]{}'\" ]", "", value).strip(",")
    return re.sub(r"[^A-Za-z0-9._,+=-]", "_", value) or "_"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep.

    name: ROOT/<name> is its workdir, made from its overrides ('hpl.weights=1.0,0.1__seed=2').
    setting: the grid values of the run, {key: value text} (the same for every seed).
    overrides: every --config.<key>=<value> the run gets, in order (fixed ones, grid, seeds).
    """

    name: str
    setting: Dict[str, str]
    seed: str
    data_seed: Optional[str]
    overrides: Tuple[Tuple[str, str], ...]


def plan_runs(grids: Sequence[Tuple[str, List[str]]], seeds: Sequence[str], data_seeds: Optional[Sequence[str]],
              fixed: Sequence[Tuple[str, str]]) -> List[Run]:
    """Every combination of the grids' values, the seeds and the data seeds, the last varying fastest."""
    keys = [key for key, _ in grids] + [key for key, _ in fixed]
    for reserved in ("seed", "dataset.seed"):
        if reserved in keys:
            raise SweepError(f"{reserved} is set by --seeds / --data_seeds, not by --grid or --set.")
    if len(set(keys)) != len(keys):
        raise SweepError(f"a config field appears twice in --grid / --set: {keys}.")
    if not seeds:
        raise SweepError("--seeds is empty; give at least one seed.")
    combos = [{}]
    for key, values in grids:
        combos = [{**combo, key: value} for combo in combos for value in values]
    runs = []
    for combo in combos:
        for seed in seeds:
            for data_seed in (data_seeds or [None]):
                parts = [f"{key}={safe_value(value)}" for key, value in combo.items()] + [f"seed={seed}"]
                overrides = list(fixed) + list(combo.items()) + [("seed", seed)]
                if data_seed is not None:
                    parts.append(f"data_seed={data_seed}")
                    overrides.append(("dataset.seed", data_seed))
                runs.append(Run(name="__".join(parts), setting=combo, seed=seed, data_seed=data_seed,
                                overrides=tuple(overrides)))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise SweepError(f"two runs would share a directory name ({names}); write each value once, the same way.")
    return runs


def _field_names(config, prefix: str = "") -> List[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, "items"):
            names += _field_names(value, prefix + key + ".")
    return names


def resolve_config(config_path: str, overrides: Sequence[Tuple[str, str]]):
    """The config a run gets, parsed as hpl_jax.main parses its flags (so a bad key or value fails here)."""
    argv = ["sweep", f"--config={config_path}", *(f"--config.{key}={value}" for key, value in overrides)]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        flag_values(argv)
        return flag_values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, (AttributeError, KeyError)):
            fields = _field_names(resolve_config(config_path, []))
            for key, _ in overrides:
                if key not in fields:
                    close = difflib.get_close_matches(key, fields, n=1)
                    raise SweepError(f"{key} is not a field of {config_path}"
                                     + (f"; did you mean {close[0]}?" if close else ".")) from None
        message = " ".join(str(error.args[0] if error.args else error).split())
        raise SweepError(f"{config_path} with {' '.join(argv[2:])}: {message}") from None


def command(run: Run, config_path: str, root: str, python: str) -> List[str]:
    return [python, "-m", "hpl_jax.main", f"--config={config_path}", f"--workdir={os.path.join(root, run.name)}",
            *(f"--config.{key}={value}" for key, value in run.overrides)]


def is_finished(workdir: str, num_epochs: int) -> bool:
    """True when the run's metrics.json has evaluated epoch `num_epochs` (its last), or early stopping
    (`eval.early_stopping_patience`) ended it before."""
    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            if int(json.load(f)["last"]["epoch"]) >= num_epochs:
                return True
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return reporting.run_has_ended(workdir)


def write_sweep_file(root: str, config_path: str, grids, seeds, data_seeds, fixed, runs: Sequence[Run]) -> None:
    os.makedirs(root, exist_ok=True)
    sweep = dict(config=config_path, grid={key: values for key, values in grids}, seeds=list(seeds),
                 data_seeds=None if data_seeds is None else list(data_seeds), set=dict(fixed),
                 runs=[dataclasses.asdict(run) for run in runs])
    path = os.path.join(root, SWEEP_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(sweep, f, indent=2)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------- running
class _ForwardTerm:
    """While a run is in progress, a SIGTERM to the sweep goes to the run (it checkpoints and exits) and the
    sweep stops after it."""

    def __init__(self):
        self.child: Optional[subprocess.Popen] = None
        self.stopping = False
        self._before = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame):
        del signum, frame
        self.stopping = True
        if self.child is not None:
            self.child.terminate()

    def close(self):
        signal.signal(signal.SIGTERM, self._before)


def run_local(runs: Sequence[Run], commands: Sequence[List[str]], root: str, num_epochs: Sequence[int]) -> int:
    """Runs the unfinished runs one after another; returns how many did not finish."""
    unfinished, forward = 0, _ForwardTerm()
    try:
        for index, (run, argv, epochs) in enumerate(zip(runs, commands, num_epochs), start=1):
            workdir = os.path.join(root, run.name)
            prefix = f"[{index}/{len(runs)}] {run.name}:"
            if is_finished(workdir, epochs):
                print(f"{prefix} finished before, skipped", flush=True)
                continue
            if forward.stopping:
                unfinished += 1
                continue
            os.makedirs(workdir, exist_ok=True)
            print(f"{prefix} running (log {os.path.join(workdir, LOG_FILE)})", flush=True)
            start = time.time()
            with open(os.path.join(workdir, LOG_FILE), "a") as log:
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                forward.child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
                returncode = forward.child.wait()
                forward.child = None
            if is_finished(workdir, epochs):
                print(f"{prefix} finished in {time.time() - start:.0f} s", flush=True)
                continue
            unfinished += 1
            status = "stopped with a checkpoint" if returncode == 0 else f"failed (exit status {returncode})"
            print(f"{prefix} {status}; see the log", flush=True)
    finally:
        forward.close()
    return unfinished


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        grids = [parse_grid(text) for text in FLAGS.grid]
        fixed = [parse_assignment(text, "--set") for text in FLAGS.set]
        runs = plan_runs(grids, FLAGS.seeds, FLAGS.data_seeds, fixed)
        num_epochs = [resolve_config(FLAGS.config, run.overrides).num_epochs for run in runs]
    except SweepError as error:
        sys.exit(f"Sweep error: {error}")
    root = os.path.abspath(FLAGS.workdir)
    python = FLAGS.python or (sys.executable if FLAGS.run == "local" else "python")
    commands = [command(run, FLAGS.config, root, python) for run in runs]
    write_sweep_file(root, FLAGS.config, grids, FLAGS.seeds, FLAGS.data_seeds, fixed, runs)
    if FLAGS.run == "print":
        todo = [shlex.join(argv) for run, argv, epochs in zip(runs, commands, num_epochs)
                if not is_finished(os.path.join(root, run.name), epochs)]
        print("\n".join(todo))
        print(f"{len(todo)} of {len(runs)} runs to do; {len(runs) - len(todo)} finished.", file=sys.stderr)
        return
    unfinished = run_local(runs, commands, root, num_epochs)
    print(f"{len(runs) - unfinished} of {len(runs)} runs finished in {root}; "
          + ("run the same command again to resume the others." if unfinished else
             f"next: python -m hpl_jax.report {root}"))
    if unfinished:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
