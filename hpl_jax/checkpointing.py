"""The workdir: where a run keeps its state and its config, and how another command finds them again.

  WORKDIR/config.json     the resolved config of the run, written at its first start (human-readable)
  WORKDIR/checkpoints/    the whole train state after every epoch (orbax; the last `checkpoint.keep`)
  WORKDIR/best/           the best train state by `checkpoint.best_metric`
  WORKDIR/metrics.json    every evaluation, and the last and best epoch
  WORKDIR/tensorboard/    TensorBoard scalars

`restore_state` gives a command that does not train (mlrc_report) a saved train state.
"""
from __future__ import annotations

import json
import os
from typing import List, Union

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


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
        raise FileNotFoundError(f"{path} does not exist; is {workdir} the workdir of a run?")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _steps(directory: epath.Path) -> List[int]:
    return sorted(ocp.CheckpointManager(directory).all_steps()) if directory.exists() else []


def restore_state(workdir, template_state, which: Union[str, int] = "latest"):
    """The train state a run saved, as NumPy arrays shaped like `template_state` (a TrainState the run's config
    creates), without the training loop.

    which: 'best' (WORKDIR/best/, the best epoch by the run's selection metric: it keeps one), 'latest' (the last
    of WORKDIR/checkpoints/) or a step number (looked for in checkpoints/, then in best/).
    Raises FileNotFoundError naming what the workdir holds when there is no such checkpoint.
    """
    workdir = workdir_path(str(workdir))
    found = {name: _steps(workdir / name) for name in (CHECKPOINTS_DIR, BEST_DIR)}
    if which in ("latest", "best"):
        name = CHECKPOINTS_DIR if which == "latest" else BEST_DIR
        candidates = [(name, step) for step in found[name][-1:]]
    else:
        candidates = [(name, int(which)) for name in (CHECKPOINTS_DIR, BEST_DIR) if int(which) in found[name]]
    if not candidates:
        raise FileNotFoundError(
            f"{workdir} has no checkpoint {which!r}: it holds the steps {found[CHECKPOINTS_DIR]} in {CHECKPOINTS_DIR}/ "
            f"and {found[BEST_DIR]} in {BEST_DIR}/ (a best/ checkpoint needs config.checkpoint.best_metric).")
    name, step = candidates[0]
    manager = ocp.CheckpointManager(workdir / name)
    return manager.restore(step, args=ocp.args.StandardRestore(jax.device_get(template_state)))
