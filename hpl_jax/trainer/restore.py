"""A run rebuilt from its workdir without the training loop: its saved config, this host's dataset, the model and a
restored train state (what `python -m hpl_jax.evaluate`, `visualize` and `mlrc_report` read)."""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import ml_collections
from etils import epath

from hpl_jax import data
from hpl_jax import models
from hpl_jax.data import datasets
from hpl_jax.trainer.checkpointing import (CONFIG_FILE, METRICS_FILE, RunError, checkpoint_location, load_config,
                                           load_metrics, restore_state, workdir_path)
from hpl_jax.trainer.train_state import TrainState, create_train_state


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
    holds them) and with a single k-means restart (the checkpoint holds the groupings). A checkpoint an older
    version wrote in another layout (0.3.0's optimiser state) is migrated to this one's (checkpointing.restore_state).
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
    # create_train_state sizes every level as training did (ground-truth level 1 included).
    template = create_train_state(jax.random.PRNGKey(config.seed), template_config, model, dataset.info)
    state = restore_state(workdir, template, which, best_metric)
    return RestoredRun(workdir=workdir, config=config, dataset=dataset, model=model, state=state)
