"""The data layer: the dataset protocol the trainer reads, and its sources.

  protocol.py          what the loop asks of a dataset (DatasetInfo, Dataset, batches, class splits, held-out
                       classes, pixels normalised on the device, prefetch to the devices); re-exported here
  datasets.py          the registry: `get_dataset(config, ...)` picks the source a config names
  synthetic.py, synthetic_sop.py, synthetic_source.py
                       the embedded datasets (NumPy generators: no download, no files)
  input_pipeline.py    tf.data over TFDS builders and image folders (the only module that imports TensorFlow)
  inshop.py, cars_makes.py
                       the In-Shop TFDS builder and the Cars196 make table

`from hpl_jax import data` gives the protocol (`data.DatasetInfo`, `data.normalize_pixels`, ...); the sources are
imported by name (`from hpl_jax.data import datasets`).
"""
from hpl_jax.data.protocol import (COLOR_ORDERS, DATASETS, EMBEDDED_DATASETS, SYNTHETIC, SYNTHETIC_SOP,
                                   SYNTHETIC_SOURCE, TFDS_DATASETS, Batch, DataError, Dataset, DatasetInfo,
                                   check_held_out_classes, check_num_val_classes, embedded_draws, fold_split,
                                   held_out_classes, holds_out_classes, host_shard, normalize_pixels,
                                   num_eval_batches, prefetch_to_devices, relabelling, require_every_train_class,
                                   shard_for_devices, steps_per_epoch, total_over_hosts, validation_split)

__all__ = [
    "COLOR_ORDERS", "DATASETS", "EMBEDDED_DATASETS", "SYNTHETIC", "SYNTHETIC_SOP", "SYNTHETIC_SOURCE",
    "TFDS_DATASETS", "Batch", "DataError", "Dataset", "DatasetInfo", "check_held_out_classes",
    "check_num_val_classes", "embedded_draws", "fold_split", "held_out_classes", "holds_out_classes", "host_shard",
    "normalize_pixels", "num_eval_batches", "prefetch_to_devices", "relabelling", "require_every_train_class",
    "shard_for_devices", "steps_per_epoch", "total_over_hosts", "validation_split",
]
