"""The workdir: where a run keeps its state and its config, and how another command finds them again.

  WORKDIR/config.json     the resolved config of the run, written at its first start (human-readable)
  WORKDIR/checkpoints/    the whole train state after every epoch (orbax; the last `checkpoint.keep`)
  WORKDIR/best/           the best train state by `checkpoint.best_metric`
  WORKDIR/metrics.json    every evaluation, and the last and best epoch
  WORKDIR/tensorboard/    TensorBoard scalars

`restore_run` gives another command (evaluate, visualize) a run's config, dataset, model and a restored train
state without the training loop.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Optional, Union

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from hpl_jax import data
from hpl_jax import datasets
from hpl_jax import hierarchy as hierarchy_lib
from hpl_jax import models
from hpl_jax.train_state import TrainState, create_train_state

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


class RunError(FileNotFoundError):
    """A run or checkpoint a command names does not exist; the message says what exists instead."""


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


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a run was started with, read from WORKDIR/config.json."""
    path = workdir_path(str(workdir)) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{path} does not exist; is {workdir} the workdir of a run?")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


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
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, **best))


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


def restore_state(workdir, template: TrainState, which: Union[str, int] = "latest",
                  best_metric: Optional[str] = None) -> TrainState:
    """The train state of checkpoint `which` ('latest', 'best' or a step), as NumPy arrays shaped like `template`."""
    directory, step = checkpoint_location(workdir, which, best_metric)
    return _manager(directory).restore(step, args=ocp.args.StandardRestore(jax.device_get(template)))


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run rebuilt from its workdir: its saved config, this host's dataset, the model and a restored state.

    state: the train state on the host (NumPy arrays, not replicated); epoch and step say which checkpoint.
    """

    workdir: epath.Path
    config: ml_collections.ConfigDict
    dataset: data.Dataset
    model: Any
    state: TrainState

    @property
    def epoch(self) -> int:
        return int(self.state.epoch)

    def check_split(self, split: str) -> None:
        """Stops with a RunError unless `split` is an eval split of the run's dataset ('test' always is)."""
        info = self.dataset.info
        if split != "test" and split not in info.num_eval_examples:
            raise RunError(f"{info.name} (the dataset of {self.workdir}) has no eval split {split!r}; use one of "
                           f"{('test',) + tuple(s for s in info.num_eval_examples if s != 'test')}.")


def restore_run(workdir, which: Union[str, int] = "latest") -> RestoredRun:
    """Rebuilds the run in `workdir` from WORKDIR/config.json and restores checkpoint `which`.

    The state template is created as the training loop creates it, without pretrained weights (the checkpoint
    holds them) and with a single k-means restart (the checkpoint holds the groupings).
    """
    workdir = workdir_path(str(workdir))
    config = load_config(workdir)
    best_metric = None
    if (workdir / METRICS_FILE).exists():
        best_metric = load_metrics(workdir).get("selected_on")
    best_metric = best_metric or config.checkpoint.best_metric or None
    checkpoint_location(workdir, which, best_metric)  # a missing checkpoint stops before the dataset is built
    process_count = jax.process_count()
    if config.eval.batch_size % jax.device_count():
        raise RunError(f"{workdir / CONFIG_FILE}: eval.batch_size = {config.eval.batch_size} is not a multiple of "
                       f"the {jax.device_count()} devices here; evaluate on a device count that divides it.")
    dataset = datasets.get_dataset(config, local_batch_size=max(config.batch_size // process_count, 1),
                                   local_eval_batch_size=config.eval.batch_size // process_count,
                                   process_index=jax.process_index(), process_count=process_count)
    model = models.create_model(config.model)
    template_config = config.copy_and_resolve_references()
    template_config.model.pretrained = ""
    template_config.hpl.kmeans_restarts = 1
    template = create_train_state(jax.random.PRNGKey(config.seed), template_config, model, dataset.info)
    if config.hpl.ground_truth_level1 and dataset.info.train_super_labels is not None:
        # As the training loop does: level 1 is then the S ground-truth super-classes, not K_1 clusters.
        template = template.replace(hierarchy=hierarchy_lib.hierarchy_from_super_labels(
            template.hierarchy.proxies[0], dataset.info.train_super_labels))
    state = restore_state(workdir, template, which, best_metric)
    return RestoredRun(workdir=workdir, config=config, dataset=dataset, model=model, state=state)
