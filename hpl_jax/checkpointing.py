"""The workdir: where a run keeps its state and its config, and how another command finds them again.

  WORKDIR/config.json     the resolved config of the run, written at its first start (human-readable)
  WORKDIR/checkpoints/    the whole train state after every epoch (orbax; the last `checkpoint.keep`)
  WORKDIR/best/           the best train state by `checkpoint.best_metric`
  WORKDIR/metrics.json    every evaluation, and the last and best epoch
  WORKDIR/tensorboard/    TensorBoard scalars
"""
from __future__ import annotations

import json
import os

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"


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
