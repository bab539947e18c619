"""Which dataset a config names: the one place that imports the data sources.

`data.py` defines what a dataset is; `synthetic.py`, `synthetic_sop.py`, `synthetic_source.py` and `input_pipeline.py` implement it and
import `data`; this module imports them, so there is no import cycle, and TensorFlow is imported only for a TFDS
dataset.
"""
from __future__ import annotations

from hpl_jax import data
from hpl_jax.data import synthetic
from hpl_jax.data import synthetic_sop
from hpl_jax.data import synthetic_source


def get_dataset(config, *, local_batch_size: int, local_eval_batch_size: int,
                process_index: int = 0, process_count: int = 1) -> data.Dataset:
    """Builds the dataset named by `config.dataset.name` for this host."""
    name = config.dataset.name
    if name in data.EMBEDDED_DATASETS:
        source = {data.SYNTHETIC: synthetic.SyntheticDataset, data.SYNTHETIC_SOP: synthetic_sop.SyntheticSopDataset,
                  data.SYNTHETIC_SOURCE: synthetic_source.SyntheticSourceDataset}[name]
        return source(
            config, local_batch_size=local_batch_size, local_eval_batch_size=local_eval_batch_size,
            process_index=process_index, process_count=process_count)
    if name in data.TFDS_DATASETS:
        from hpl_jax.data import input_pipeline  # imports TensorFlow: only when a TFDS dataset is asked for
        return input_pipeline.create_dataset(
            config, local_batch_size=local_batch_size, local_eval_batch_size=local_eval_batch_size,
            process_index=process_index, process_count=process_count)
    raise ValueError(f"config.dataset.name={name!r} is unknown; use one of {data.DATASETS}.")
