"""What the training loop asks of a dataset, whichever source it comes from.

A dataset is class-disjoint (docs/method.md, "Benchmarks and class splits"): train labels are 0..C-1, test labels
are 0..C_test-1 and name other classes. Every host reads only its own shard. Two sources implement it:
`synthetic.py` and `synthetic_sop.py` (NumPy, the embedded datasets) and `input_pipeline.py` (tf.data + TFDS,
the only module that imports TensorFlow); `datasets.get_dataset` picks one. This module imports neither, so
both can import it.

Batches are dicts of host-local NumPy arrays:
  train:  {'image': u8[local_batch, H, W, 3], 'label': i32[local_batch]}
  eval:   {'image': u8[local_batch, H, W, 3], 'label': i32[local_batch], 'mask': bool[local_batch],
           'index': i64[local_batch]}  (each example's index within its split; padding is masked out)
The images are RGB pixels in 0..255, u8 (1 byte a pixel to the devices, a quarter of float32), except the
embedded datasets' training crops, which interpolate and stay f32 in 0..255 (rounding them would change the
embedded runs' numbers). The jitted steps turn them into the network's input on the device (`normalize_pixels`).
`shard_for_devices` reshapes them to [local_devices, per_device_batch, ...] for pmap.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from hpl_jax.errors import DataError, require

Batch = Dict[str, np.ndarray]

SYNTHETIC = "synthetic"
SYNTHETIC_SOP = "synthetic_sop"
SYNTHETIC_SOURCE = "synthetic_source"  # the embedded pretraining source (synthetic_source.py)
TFDS_DATASETS = ("cub", "cars", "sop", "inshop", "cifar100", "image_folder")
EMBEDDED_DATASETS = (SYNTHETIC, SYNTHETIC_SOP, SYNTHETIC_SOURCE)
DATASETS = EMBEDDED_DATASETS + TFDS_DATASETS


def embedded_draws(dataset_config) -> List[Tuple[str, int]]:
    """The generator draws an embedded dataset is made of, [(generator, data seed), ...] in label order; [] for
    data read from files. The pretraining source (synthetic_source.py) is one draw per seed it lists."""
    if dataset_config.name == SYNTHETIC_SOURCE:
        source = dataset_config.synthetic_source
        return ([(SYNTHETIC_SOP, int(seed)) for seed in source.sop_seeds]
                + [(SYNTHETIC, int(seed)) for seed in source.default_seeds])
    if dataset_config.name in (SYNTHETIC, SYNTHETIC_SOP):
        return [(dataset_config.name, int(dataset_config.seed))]
    return []
COLOR_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts the training loop needs before it reads any image.

    Attributes:
      name: the `config.dataset.name` it came from.
      num_train_classes: C, the number of fine proxies.
      num_train_examples: training images over all hosts (steps per epoch follow from it).
      image_shape: (H, W, 3) of the batches.
      eval_splits: ('test',) for self-retrieval (CUB, Cars, SOP) or ('query', 'gallery') (In-Shop).
      num_eval_examples: images of each eval split over all hosts, e.g. {'test': 5924}.
      train_super_labels: i32[num_train_classes], the ground-truth super-class of each train class, if any.
      test_super_labels: i32[num_test_classes], the same for the test classes, if any.
      val_super_labels: i32[num_val_classes], the same for the validation classes, if any.
      super_parents: i32[num_super_ids], where the ground truth has a second level above the classes: the
        parent of each super-class id of the `*_super_labels` (synthetic_sop: sub-family -> super-class).
      train_class_names: the name of each train class, where the source has names (image folders).

    With validation classes (`dataset.num_val_classes` > 0 or `dataset.num_folds` > 0, see `held_out_classes`),
    'val' is a key of `num_eval_examples`: the held-out training classes (labels 0..V-1), and the training classes
    are the others, relabelled 0..C-1.
    """

    name: str
    num_train_classes: int
    num_train_examples: int
    image_shape: Tuple[int, int, int]
    eval_splits: Tuple[str, ...]
    num_eval_examples: Dict[str, int]
    train_super_labels: Optional[np.ndarray] = None
    test_super_labels: Optional[np.ndarray] = None
    val_super_labels: Optional[np.ndarray] = None
    super_parents: Optional[np.ndarray] = None
    train_class_names: Optional[Tuple[str, ...]] = None


class Dataset(Protocol):
    info: DatasetInfo
    # Images this host's batches skipped because they failed to decode, counted at every read.
    num_skipped_images: int

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This host's training batches of `epoch`, in an order fixed by (seed, epoch).

        Yields exactly `steps_per_epoch - start_step` batches of `local_batch_size` (the last partial global
        batch is dropped, as the Proxy-Anchor recipe does); `start_step` skips ahead when resuming mid-epoch.
        """

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This host's share of `split` ('test', 'query', 'gallery', or 'train' with test transforms).

        Every example of the split appears exactly once over all hosts with mask True; the last batches are
        padded (mask False) so that every host yields the same number of full local batches.
        """


def require_every_train_class(labels: np.ndarray, info: DatasetInfo) -> None:
    """Raises DataError naming the train classes absent from `labels` (i32[n], every train image that decoded)."""
    missing = np.flatnonzero(np.bincount(labels, minlength=info.num_train_classes) == 0)
    if missing.size:
        names = info.train_class_names
        listed = ", ".join(f"{c} ({names[c]!r})" if names else str(c) for c in missing[:5])
        more = f" and {missing.size - 5} more" if missing.size > 5 else ""
        raise DataError(f"{info.name}: no image of train class(es) {listed}{more} decodes; replace the broken "
                        "files or remove the class.")


def total_over_hosts(count: int) -> int:
    """The sum of a per-host count over every host (a collective: every host calls it at the same point)."""
    if jax.process_count() == 1:
        return int(count)
    return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


def steps_per_epoch(num_train_examples: int, global_batch_size: int, override: int = 0) -> int:
    """Optimiser steps of an epoch: `override` when set (`config.steps_per_epoch`, e.g. MLRC's 100 iterations),
    else one pass over the training images with the last partial global batch dropped."""
    return override or num_train_examples // global_batch_size


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return -(-num_examples // global_batch_size)


def host_shard(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
    """Indices of the examples a host reads: a strided slice, so every example belongs to one host."""
    return np.arange(process_index, num_examples, process_count)


def validation_split(num_classes: int, num_val_classes: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Which training classes are held out for validation: class-disjoint, deterministic from `seed`.

    A uniform draw without replacement (not a block of the sorted list), so the held-out classes spread over
    the super-classes the way the test classes do.

    Returns:
      (train_classes, val_classes): sorted i64 arrays of class ids that partition range(num_classes).
    """
    val = np.sort(np.random.default_rng([seed, 2718]).choice(num_classes, num_val_classes, replace=False))
    return np.setdiff1d(np.arange(num_classes), val), val


def fold_split(num_classes: int, num_folds: int, val_fold: int) -> Tuple[np.ndarray, np.ndarray]:
    """The class-disjoint folds of "A Metric Learning Reality Check" (docs/method.md): the sorted training classes cut
    into `num_folds` contiguous blocks; block `val_fold` validates, the others train.

    Block p starts at floor(p * num_classes / num_folds), where powerful-benchmarker's MLRCSplitManager starts
    its partition p, and every class validates in exactly one fold. MLRCSplitManager's validation blocks differ
    slightly: they have a fixed length (an eighth of all the dataset's classes, rounded down) and end where its
    partition p starts, so its partition p validates about our block p - 1, and with Cars196's 98 training
    classes (blocks of 24) two classes never validate there.

    Returns:
      (train_classes, val_classes): sorted i64 arrays of class ids that partition range(num_classes).
    """
    val = np.arange(val_fold * num_classes // num_folds, (val_fold + 1) * num_classes // num_folds)
    return np.setdiff1d(np.arange(num_classes), val), val


def holds_out_classes(dataset_config) -> bool:
    """Whether `config.dataset` asks for validation classes: a fold (num_folds) or a random draw (num_val_classes)."""
    return dataset_config.num_folds > 0 or dataset_config.num_val_classes > 0


def held_out_classes(dataset_config, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train_classes, val_classes) of the C = `num_classes` training classes, as `config.dataset` asks:
    fold `val_fold` of `num_folds` (`fold_split`), else `num_val_classes` drawn with `seed` (`validation_split`)."""
    if dataset_config.num_folds:
        return fold_split(num_classes, dataset_config.num_folds, dataset_config.val_fold)
    return validation_split(num_classes, dataset_config.num_val_classes, dataset_config.seed)


def relabelling(kept_classes: np.ndarray, num_classes: int) -> np.ndarray:
    """i32[num_classes]: class id -> its index among `kept_classes` (sorted), -1 for the others."""
    table = np.full(num_classes, -1, np.int32)
    table[kept_classes] = np.arange(len(kept_classes), dtype=np.int32)
    return table


def normalize_pixels(pixels: jax.Array, dataset_config) -> jax.Array:
    """The network's input from RGB pixels in 0..255: ((x / 255 * pixel_scale)[channels in color_order] - mean) / std.

    Called inside the jitted per-device steps (train.loss_and_gradients, evaluation.embed_step), so the host
    sends u8 pixels and the device does the arithmetic. `dataset_config` is the config the loop holds (after
    train.with_pretrained_preprocessing), captured statically. ImageNet ResNets: 'rgb', pixel_scale 1, the
    ImageNet mean/std; BN-Inception weights: 'bgr', pixel_scale 255, mean (104, 117, 128), std (1, 1, 1)
    (docs/method.md, "Training recipe").

    pixels: u8[..., 3] (or f32[..., 3] in 0..255). Returns f32[..., 3].
    """
    if dataset_config.color_order not in COLOR_ORDERS:
        raise ValueError(f"color_order={dataset_config.color_order!r} is unknown; use one of {COLOR_ORDERS}.")
    # The same f32 operations in the same order as the host code this replaced, so the inputs are unchanged.
    x = jnp.asarray(pixels).astype(jnp.float32) * (dataset_config.pixel_scale / 255.0)
    if dataset_config.color_order == "bgr":
        x = x[..., ::-1]
    return (x - jnp.asarray(dataset_config.mean, jnp.float32)) / jnp.asarray(dataset_config.std, jnp.float32)


def shard_for_devices(batch: Batch, num_devices: int) -> Batch:
    """[local_batch, ...] -> [num_devices, local_batch // num_devices, ...] for pmap."""
    return jax.tree_util.tree_map(
        lambda x: x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:]), batch)


def prefetch_to_devices(batches: Iterator[Batch], size: int = 2,
                        devices: Optional[Sequence[jax.Device]] = None) -> Iterator[Batch]:
    """Shards host batches over the local devices and keeps `size` of them in flight on the devices."""
    devices = list(devices or jax.local_devices())
    # The layout pmap expects for an input sharded over its leading axis (flax.jax_utils.replicate uses it too).
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)),
                                          jax.sharding.PartitionSpec("devices"))
    batches = iter(batches)
    queue = collections.deque()

    def put(batch):
        return jax.device_put(shard_for_devices(batch, len(devices)), sharding)

    for batch in itertools.islice(batches, size):
        queue.append(put(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(batches, 1):
            queue.append(put(batch))


def check_held_out_classes(dataset_config, num_classes: int, name: str) -> None:
    """Checks the validation classes `config.dataset` asks for against the C training classes a dataset has
    before the hold-out (see `held_out_classes`)."""
    if dataset_config.num_folds:
        num_folds = dataset_config.num_folds
        require(num_classes // num_folds >= 2, "dataset.num_folds",
                 f"{num_folds} folds of the {num_classes} training classes of {name} leave folds of fewer than 2 "
                 f"classes (validation retrieval needs 2); use at most {num_classes // 2} folds.")
    else:
        check_num_val_classes(dataset_config.num_val_classes, num_classes, name)


def check_num_val_classes(num_val_classes: int, num_classes: int, name: str) -> None:
    """Checks `dataset.num_val_classes` against the C training classes a dataset has before the hold-out."""
    require(num_val_classes == 0 or 2 <= num_val_classes <= num_classes - 2, "dataset.num_val_classes",
             f"{num_val_classes} validation classes out of the {num_classes} training classes of {name}: use 0 "
             f"(off) or 2..{num_classes - 2} (validation retrieval needs 2 classes, training keeps at least 2).")
