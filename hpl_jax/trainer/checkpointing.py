"""The workdir: where a run keeps its state and its config, and how another command finds them again.

  WORKDIR/config.json     the resolved config of the run, written at its first start (human-readable)
  WORKDIR/checkpoints/    the whole train state after every epoch (orbax; the last `checkpoint.keep`)
  WORKDIR/best/           the train state of the best epoch so far (the `best` entry of metrics.json)
  WORKDIR/metrics.json    every evaluation, and the last and best epoch
  WORKDIR/tensorboard/    TensorBoard scalars

`restore_state` reads a checkpoint into a template of the train state; hpl_jax/trainer/restore.py rebuilds a
whole run (config, dataset, model, state) for the commands that read one without training. A checkpoint an
older version wrote in another layout of the train state (0.3.0's optimiser state) is read in that layout and
migrated (`restore_checkpoint`, train_state.OLDER_LAYOUTS).

What a run may rely on: a resume compares the config with config.json first (`check_resumed_config`); what a
save cut short left is removed (`remove_unfinished_saves`); best/ is made to agree with metrics.json
(`Checkpoints.reconcile_best`); a save that fails in the background stops the run within a step
(`Checkpoints.raise_if_a_save_failed`).
"""
from __future__ import annotations

import fnmatch
import json
import logging as std_logging
import os
import re
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from hpl_jax.errors import ConfigError
from hpl_jax.trainer import faults

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
# What orbax names a step directory while it is being written; renamed to the step number when complete.
UNFINISHED_SAVE = ".orbax-checkpoint-tmp"

# Fields a resumed run may change: how long it runs, what and how often it reports, where the data lies. Every
# other field (model.*, hpl.*, loss.*, optim.*, dataset.* but the paths, seed, batch_size, checkpoint.best_metric,
# and any field added later) changes the train state's shape or what it means, and must match config.json.
RESUMABLE_FIELDS = (
    "num_epochs", "log_every_steps", "eval.*", "checkpoint.keep", "checkpoint.every_steps", "compilation_cache_dir",
    "dataset.data_dir", "dataset.manual_dir",
    # Read only to initialise the backbone (the resumed state replaces it); the input normalisation the
    # weights imply is in dataset.* and compared.
    "model.pretrained",
    # How convolutions are computed: the same parameters and results under each (a CPU run resumes on a GPU).
    "model.conv_impl",
    # A way to resume a run that stopped on a non-finite step (see train.train_step).
    "optim.skip_nonfinite_steps",
)
MISSING = "(absent)"


class RunError(FileNotFoundError):
    """A run or checkpoint a command names does not exist; the message says what exists instead."""


class WorkdirError(Exception):
    """The workdir cannot be used or written (a file, read-only, full); the message says what to do."""


def workdir_path(workdir: str) -> epath.Path:
    """The workdir as a path orbax and the reporter can use: local ones made absolute, gs:// ones kept."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def _tuples(value):
    """JSON lists back to the tuples configs use (ml_collections keeps a field's type)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def save_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config as WORKDIR/config.json (atomically: a temporary file, then a rename)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _with_defaults(saved: Dict[str, Any], defaults: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """`saved` with every field it lacks taken from `defaults` (fields added to the project after the run
    started; their defaults keep the earlier behaviour), logged."""
    merged = dict(saved)
    for key, value in defaults.items():
        if key not in saved:
            logging.info("%s has no config.%s%s (added since the run started): using its default %r.",
                         CONFIG_FILE, prefix, key, value)
            merged[key] = value
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            merged[key] = _with_defaults(saved[key], value, f"{prefix}{key}.")
    return merged


def read_saved_config(path: epath.Path) -> Dict[str, Any]:
    """The dict of a config.json, completed with the defaults of configs/default.py for fields it lacks."""
    from configs import default  # the repository's configs/ (imported here: hpl_jax does not need it otherwise)
    return _with_defaults(_tuples(json.loads(path.read_text())), _tuples(default.get_config().to_dict()))


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a run was started with, read from WORKDIR/config.json (fields added to the project since,
    at their defaults)."""
    path = workdir_path(str(workdir)) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{path} does not exist; is {workdir} the workdir of a run?")
    return ml_collections.ConfigDict(read_saved_config(path))


def load_metrics(workdir) -> dict:
    """WORKDIR/metrics.json: {'history': {epoch (str): metrics}, 'last': ..., 'best': ..., maybe 'selected_on'}."""
    path = workdir_path(str(workdir)) / METRICS_FILE
    if not path.exists():
        raise RunError(f"{path} does not exist; the run has not finished an evaluation yet.")
    return json.loads(path.read_text())


def _steps(directory: epath.Path) -> List[int]:
    if not directory.exists():
        return []
    return sorted(_manager(directory).all_steps())


def _manager(directory: epath.Path, best_metric: Optional[str] = None) -> ocp.CheckpointManager:
    """A manager that reads `directory` (never creates it; orbax's read_only mode would warn on every open)."""
    best = dict(best_fn=lambda m: m[best_metric], best_mode="max") if best_metric else {}
    return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                                 options=ocp.CheckpointManagerOptions(create=False, **best))


def _leaf_paths(tree) -> Set[Tuple[str, ...]]:
    """The paths of `tree`'s leaves as orbax names them in a checkpoint (attribute, key or index, as text)."""
    def name(key) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)
    return {tuple(map(name, path)) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, template, config):
    """The state `manager` saved at `step`, with the structure and dtypes of `template` (NumPy leaves).

    A checkpoint whose leaves are not `template`'s is compared with the layouts older versions saved
    (train_state.OLDER_LAYOUTS, built for `config`); one that matches is restored in that layout and migrated,
    with a line in the log. Any other mismatch is left to orbax's error.
    """
    # Imported here: the rest of this module (the workdir, the config, saving) needs no model or optimiser.
    from hpl_jax.trainer import train_state

    saved = manager.item_metadata(step)
    if saved is not None and _leaf_paths(saved.tree) != _leaf_paths(template):
        for version, old_template, migrate in train_state.OLDER_LAYOUTS:
            old = old_template(template, config)
            if _leaf_paths(saved.tree) == _leaf_paths(old):
                restored = manager.restore(step, args=ocp.args.StandardRestore(old))
                logging.info("%s/%d was written by hpl-jax %s: its optimiser state is migrated to this version's "
                             "layout.", manager.directory, step, version)
                return migrate(restored, template, config)
    return manager.restore(step, args=ocp.args.StandardRestore(template))


def checkpoint_location(workdir, which: Union[str, int] = "latest", best_metric: Optional[str] = None):
    """(directory, step) of the checkpoint `which` names: 'latest', 'best' or a step number.

    'best' is the one checkpoint WORKDIR/best keeps (should an interrupted save have left two, the better by
    `best_metric`). A step is looked for in WORKDIR/checkpoints, then in WORKDIR/best.
    """
    workdir = workdir_path(str(workdir))
    regular, best = workdir / CHECKPOINTS_DIR, workdir / BEST_DIR
    regular_steps, best_steps = _steps(regular), _steps(best)
    if which == "latest":
        if not regular_steps:
            raise RunError(f"{regular} holds no checkpoint; is {workdir} a run that finished an epoch?")
        return regular, regular_steps[-1]
    if which == "best":
        if not best_steps:
            raise RunError(f"{best} holds no checkpoint (config.checkpoint.best_metric was '' or no epoch was "
                           f"evaluated); use the checkpoint 'latest' or one of the steps {regular_steps}.")
        if len(best_steps) > 1 and best_metric:
            return best, int(_manager(best, best_metric).best_step())
        return best, best_steps[-1]
    step = int(which)
    for directory, steps in ((regular, regular_steps), (best, best_steps)):
        if step in steps:
            return directory, step
    raise RunError(f"{workdir} has no checkpoint of step {step}; it has the steps {regular_steps} in "
                   f"{CHECKPOINTS_DIR}/ and {best_steps} in {BEST_DIR}/ (or use 'latest' or 'best').")


def restore_state(workdir, template, which: Union[str, int] = "latest",
                  best_metric: Optional[str] = None):
    """The train state of checkpoint `which` ('latest', 'best' or a step), as NumPy arrays shaped like `template`
    (migrated from an older version's layout: `restore_checkpoint`, with the workdir's config)."""
    directory, step = checkpoint_location(workdir, which, best_metric)
    return restore_checkpoint(_manager(directory), step, jax.device_get(template), load_config(workdir))


# --------------------------------------------------------------------------------------------- the config
def _fields(tree: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{field: (saved value, current value)} for every leaf field that differs; MISSING where one side lacks it."""
    saved, current = dict(_fields(_tuples(dict(saved)))), dict(_fields(_tuples(dict(current))))
    pairs = {field: (saved.get(field, MISSING), current.get(field, MISSING))
             for field in sorted(saved.keys() | current.keys())}
    return {field: (then, now) for field, (then, now) in pairs.items() if then != now}


def is_resumable(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in RESUMABLE_FIELDS)


def check_resumed_config(saved: Mapping[str, Any], config: ml_collections.ConfigDict, path) -> None:
    """Raises ConfigError if `config` differs from the saved one in a field a resume may not change; logs the
    changes it may make."""
    changes = changed_fields(saved, config.to_dict())
    refused = {field: values for field, values in changes.items() if not is_resumable(field)}
    if refused:
        listed = "; ".join(f"config.{field} = {then!r} there, {now!r} now" for field, (then, now) in refused.items())
        raise ConfigError(
            f"{path} holds the config this workdir's run started with, and fields that change the train state's "
            f"shape or meaning differ: {listed}. Run with the saved values to resume, or use a new --workdir.")
    for field, (then, now) in changes.items():
        logging.info("Resuming with config.%s = %r (was %r; allowed on resume).", field, now, then)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> epath.Path:
    """The workdir, created if new and checked against the config it holds; `write_config` records the config
    once every check has passed.

    Raises WorkdirError if it is a file or cannot be created, ConfigError if a resume would change a field that
    changes the train state's shape or meaning (see RESUMABLE_FIELDS).
    """
    path = workdir_path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WorkdirError(f"--workdir {workdir} is a file (or lies under one); pass a directory.") from None
    except OSError as error:
        raise WorkdirError(f"--workdir {workdir} cannot be created ({error.strerror or error}); pass a "
                           "writable directory.") from None
    if (path / CONFIG_FILE).exists():
        check_resumed_config(read_saved_config(path / CONFIG_FILE), config, path / CONFIG_FILE)
    return path


def write_config(path: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config.json into the workdir `path` (process 0); the trainer calls it once the config has
    passed every check, the dataset's included, so a refused config leaves no record that a rerun would take for a
    run to resume."""
    try:
        save_config(path, config)
    except OSError as error:
        raise WorkdirError(f"--workdir {path} cannot be written ({error.strerror or error}); pass a "
                           "writable directory.") from None


# --------------------------------------------------------------------------------------------- checkpoints
def remove_unfinished_saves(directory: epath.Path) -> None:
    """Deletes the step directories of saves a stopped run left half-written (orbax never reads them)."""
    if not directory.exists():
        return
    for child in directory.iterdir():
        if UNFINISHED_SAVE in child.name:
            logging.warning("Removing %s, a save that a stopped run left unfinished.", child)
            child.rmtree()


def latest_complete_step(directory: epath.Path) -> Optional[int]:
    """The step of the latest complete save in `directory` (the one a rerun resumes from), or None; reads the
    directory only (no orbax manager, no barrier), so it is safe while another process is gone."""
    steps = ocp.utils.checkpoint_steps(directory)
    return max(steps) if steps else None


def _failure_reason(error: BaseException) -> str:
    """One line: the OS error a save met where there is one (tensorstore reports it as os_error_code='28')."""
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class _BackgroundSaveErrors(std_logging.Handler):
    """The errors of orbax's background save threads, taken from the records orbax logs as they fail.

    In a multi-process run, the save of a process whose write failed never ends: the other processes wait for it
    at a barrier, and so does its own finalising thread, which has taken the error. The log record is where the
    error can be seen without waiting. (A single process waits for the saves to end, as the resume point it names
    may be a save that ends meanwhile.)
    """

    def __init__(self):
        super().__init__(level=std_logging.ERROR)
        self.errors: List[Tuple[BaseException, str]] = []

    def emit(self, record) -> None:
        if "/orbax/checkpoint/" in record.pathname and record.exc_info and record.exc_info[1] is not None:
            self.errors.append((record.exc_info[1], record.getMessage()))


class Checkpoints:
    """A run's WORKDIR/checkpoints (the last `checkpoint.keep` saves) and, with `checkpoint.best_metric`,
    WORKDIR/best (the state of the best epoch so far), saved in the background by orbax.

    A save that fails in the background (a full disk) raises WorkdirError at the next `raise_if_a_save_failed`
    (called at every step boundary) or save, naming the resume point: the latest complete save, untouched.
    """

    def __init__(self, workdir: epath.Path, config, *, is_lead: bool):
        if is_lead:
            remove_unfinished_saves(workdir / CHECKPOINTS_DIR)
            remove_unfinished_saves(workdir / BEST_DIR)
        self._failures = _BackgroundSaveErrors()
        std_logging.getLogger("absl").addHandler(self._failures)
        self._config = config
        self.all = ocp.CheckpointManager(
            workdir / CHECKPOINTS_DIR, item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True))
        self.best = None
        if config.checkpoint.best_metric:
            self.best = ocp.CheckpointManager(
                workdir / BEST_DIR, item_handlers=ocp.StandardCheckpointHandler(),
                options=ocp.CheckpointManagerOptions(
                    # The loop saves here only at an epoch metrics.json calls the best so far, so the latest save
                    # is the best: one rule (the summary's) decides, ties included.
                    max_to_keep=1, create=True,
                    # Its saves run beside those of `all`, at the same steps: the hosts' barriers need other names.
                    multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best")))

    @property
    def directory(self) -> epath.Path:
        return self.all.directory

    def latest_step(self) -> Optional[int]:
        return self.all.latest_step()

    def restore(self, step: int, template):
        """The state saved at `step`, with the structure and dtypes of `template` (NumPy leaves); one an older
        version saved is migrated (`restore_checkpoint`)."""
        return restore_checkpoint(self.all, step, template, self._config)

    def save(self, step: int, state) -> None:
        """Starts a background save of `state` (NumPy leaves) once the previous one has ended (orbax waits for
        it anyway); that one's failure raises WorkdirError."""
        self._wait_for(self.all)
        faults.reached("save_barrier")
        self.all.save(step, args=ocp.args.StandardSave(state))

    def save_best(self, step: int, state, metrics: Dict[str, float]) -> None:
        """Saves `state` as the best so far (call it only at an epoch metrics.json calls the best)."""
        self._wait_for(self.best)
        self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

    def raise_if_a_save_failed(self) -> None:
        """Raises WorkdirError if a background save has failed; returns at once while saves are still running,
        so it is cheap enough for every step boundary."""
        if jax.process_count() > 1:
            self._raise_if_logged()
        for manager in self._managers():
            if not manager.is_saving_in_progress():
                self._raise_if_failed(manager)

    def wait(self) -> None:
        """Blocks until the background saves have ended; a failed one raises WorkdirError."""
        for manager in self._managers():
            self._raise_if_failed(manager)

    def finish_quietly(self) -> None:
        """When a run stops on an error: the saves in flight (of good state) complete; a failing one is logged,
        as the error that stopped the run is the one to report. In a multi-process run they are left unfinished
        (the next run removes them): they need every process, and the error stops the others (distributed.py)."""
        try:
            if jax.process_count() == 1:
                self.wait()
        except WorkdirError as error:
            logging.error("%s", error)
        finally:
            std_logging.getLogger("absl").removeHandler(self._failures)

    def reconcile_best(self, *, best_epoch: int, best_metrics: Dict[str, float], steps_per_epoch: int,
                       resumed_step: int, template) -> None:
        """On resume, makes best/ hold the state of `best_epoch`, metrics.json's best epoch up to the resume point.

        A run stopped between the saves of an epoch can leave best/ one best epoch behind (its save was cut
        short) or ahead of the resume point (the epoch's regular checkpoint was cut short, and the epoch is
        redone). best/ is re-saved from checkpoints/ where that still holds the epoch; otherwise it stays as it
        is, and the run's closing notes say which epoch it holds (`held_best_epoch`).
        """
        for step in self.best.all_steps():
            if step > resumed_step:
                self.best.delete(step)
        if best_epoch < 1:
            return
        step = best_epoch * steps_per_epoch
        if self.best.all_steps() == [step]:
            return
        if step not in self.all.all_steps():
            logging.warning("best/ cannot be brought up to epoch %d, the best so far: checkpoints/%d is gone.",
                            best_epoch, step)
            return
        for stale in self.best.all_steps():
            self.best.delete(stale)
        self.save_best(step, self.restore(step, template), best_metrics)
        self.wait()
        logging.warning("best/ re-saved from checkpoints/%d: epoch %d is the best so far.", step, best_epoch)

    def held_best_epoch(self, steps_per_epoch: int) -> Optional[int]:
        """The epoch whose state best/ holds (None if empty)."""
        step = self.best.latest_step()
        return None if step is None else step // steps_per_epoch

    def _managers(self):
        return [m for m in (self.all, self.best) if m is not None]

    def _wait_for(self, manager: ocp.CheckpointManager) -> None:
        """Waits for `manager`'s save in flight to end; raises WorkdirError as soon as it fails."""
        while jax.process_count() > 1 and manager.is_saving_in_progress():
            self._raise_if_logged()
            time.sleep(0.05)
        self._raise_if_failed(manager)

    def _raise_if_logged(self) -> None:
        if self._failures.errors:
            error = self._failures.errors[0][0]
            # orbax's records name the directory of the failed save.
            failed = [m for m in self._managers() if any(f"{m.directory}/" in message
                                                         for _, message in self._failures.errors)] or [self.all]
            self._raise_workdir_error(failed[-1], error)

    def _raise_if_failed(self, manager: ocp.CheckpointManager) -> None:
        try:
            manager.wait_until_finished()
        except Exception as error:  # pylint: disable=broad-except  (orbax re-raises its save thread's error)
            self._raise_workdir_error(manager, error)

    def _raise_workdir_error(self, manager: ocp.CheckpointManager, error: BaseException) -> None:
        if isinstance(error, jax.errors.JaxRuntimeError):
            # A barrier between the processes failed, not the file system: another process stopped (distributed.py).
            raise error
        # A single process completes its saves in flight before it exits (finish_quietly): the latest one started is
        # the resume point. A multi-process run abandons them: the latest complete one in the directory is.
        latest = self.all.latest_step() if jax.process_count() == 1 else latest_complete_step(self.all.directory)
        resume = (f"{self.all.directory}/{latest} is the resume point" if latest is not None
                  else "no checkpoint is complete yet")
        raise WorkdirError(f"saving a checkpoint in {manager.directory} failed ({_failure_reason(error)}); "
                           f"{resume}: free space or fix the file system, then run the same command "
                           "again.") from None
