"""Evaluation: embed a split on every device of every host, the dataset's retrieval protocol, the metric table.

Used by the training loop and by the commands that restore a run without training it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from hpl_jax import data
from hpl_jax.core import metrics as metrics_lib
from hpl_jax.trainer import faults
from hpl_jax.trainer.sharding import as_global, as_local, over_devices, replicate
from hpl_jax.trainer.train_state import TrainState


def embed_step(state: TrainState, batch, *, model, dataset_config):
    """Embeddings of one eval batch on one device: f32[per_device, embedding_dim].

    batch['image']: u8[per_device, H, W, 3], normalised here, on the device, by `dataset_config` (the run's
    config.dataset; data.normalize_pixels).
    """
    images = data.normalize_pixels(batch["image"], dataset_config)
    return model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)


def embed_on_devices(model, mesh: jax.sharding.Mesh, dataset_config):
    """`embed_step` on every device of `mesh` as the trainer runs its steps (jit + shard_map,
    sharding.over_devices), pixels normalised by `dataset_config` (the run's config.dataset): the embedding
    function `embed_examples` takes, one per entry point and model.

    Returns p_embed(state, batch): state as global arrays over `mesh` (`state_on_devices`); batch per local device
    {'image': [local devices, per_device, H, W, 3]} (data.prefetch_to_devices); embeddings of this process's
    devices, f32[local devices, per_device, embedding_dim].
    """
    embed = over_devices(functools.partial(embed_step, model=model, dataset_config=dataset_config), mesh)
    return lambda state, batch: as_local(embed(state, as_global(batch, mesh)))


def state_on_devices(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """A host state copied to every device of `mesh`, as the global arrays `embed_on_devices` takes."""
    return as_global(replicate(state, mesh.axis_names[0]), mesh)


@dataclasses.dataclass(frozen=True)
class Embedded:
    """Every example of one eval split, embedded.

    embeddings: f32[n, embedding_dim]; labels: i32[n]; ids: i64[n], each example's index within the split.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


def embed_examples(p_embed, state, dataset: data.Dataset, split: str) -> Embedded:
    """Embeddings, labels and ids of every example of `split`, from every host, each exactly once.

    The images go to the devices two batches ahead (data.prefetch_to_devices) and the embeddings come back once,
    after the last batch: the host never waits for a batch's embeddings before sending the next.
    """
    labels, ids, masks = [], [], []

    def images():
        for batch in dataset.eval_batches(split):
            labels.append(batch["label"])
            ids.append(batch["index"].astype(np.int32))  # int32: what process_allgather keeps without x64
            masks.append(batch["mask"])
            yield {"image": batch["image"]}

    outputs = [p_embed(state, sharded) for sharded in data.prefetch_to_devices(images())]
    embeddings = [np.asarray(out).reshape(-1, out.shape[-1]) for out in jax.device_get(outputs)]
    embeddings, labels, ids, masks = map(np.concatenate, (embeddings, labels, ids, masks))
    if jax.process_count() > 1:
        faults.reached("eval_gather")
        embeddings, labels, ids, masks = (
            np.asarray(x).reshape((-1,) + x.shape[2:])
            for x in multihost_utils.process_allgather((embeddings, labels, ids, masks)))
    return Embedded(embeddings=embeddings[masks], labels=labels[masks], ids=ids[masks].astype(np.int64))


def embed_split(p_embed, state, dataset: data.Dataset, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every example of `split`, from every host, each exactly once."""
    embedded = embed_examples(p_embed, state, dataset, split)
    return embedded.embeddings, embedded.labels


def protocol_splits(info: data.DatasetInfo, split: str) -> Tuple[str, ...]:
    """The eval splits evaluating `split` reads: ('query', 'gallery') for 'test' of a query-vs-gallery dataset
    (In-Shop), else the split itself."""
    if split in ("test", "query", "gallery") and "query" in info.eval_splits:
        return ("query", "gallery")
    if split not in info.num_eval_examples:
        raise ValueError(f"{info.name} has no eval split {split!r}; it has {tuple(info.num_eval_examples)}.")
    return (split,)


def split_super_labels(info: data.DatasetInfo, split: str) -> Optional[np.ndarray]:
    """i32[classes of the split]: the ground-truth super-class of each class of `split`, or None."""
    if split == "train":
        return info.train_super_labels
    if split == "val":
        return getattr(info, "val_super_labels", None)
    return info.test_super_labels


def costly_metrics_due(config, epoch: int) -> bool:
    """Whether the evaluation after `epoch` computes the costly metrics (NMI, `super/`): at epoch 0, at every
    `eval.costly_metrics_every_epochs`-th epoch and at the last epoch."""
    return epoch % config.eval.costly_metrics_every_epochs == 0 or epoch >= config.num_epochs


def split_metrics(embedded: Dict[str, Embedded], info: data.DatasetInfo, config, split: str, *,
                  costly: bool = True, mesh: Optional[jax.sharding.Mesh] = None) -> Dict[str, float]:
    """The dataset's retrieval protocol on `split` (docs/method.md, "Benchmarks"), from its embedded eval splits.

    embedded: {name: Embedded} for every name in `protocol_splits(info, split)`.
    costly: False leaves out NMI and the super-class metrics even where `config.eval` asks for them.
    mesh: where it spans more than one device on GPUs or TPUs, or several processes, the queries are split across
      its devices (of every process; metrics.sharded_retrieval_metrics, called by every process alike); else
      metrics.retrieval_metrics on the default device.
    """
    super_labels = split_super_labels(info, split) if config.eval.super_metrics and costly else None
    options = dict(recall_at=tuple(config.eval.recall_at), super_labels=super_labels,
                   nmi=config.eval.nmi and costly, chunk_size=config.eval.chunk_size, seed=config.seed)
    # On one CPU process the devices share the host's cores: splitting only adds the collectives (docs/benchmarks.md).
    if mesh is not None and mesh.size > 1 and (jax.default_backend() != "cpu" or jax.process_count() > 1):
        metric_fn = functools.partial(metrics_lib.sharded_retrieval_metrics, mesh=mesh)
    else:
        metric_fn = metrics_lib.retrieval_metrics
    if "query" in embedded:
        gallery, queries = embedded["gallery"], embedded["query"]
        return metric_fn(gallery.embeddings, gallery.labels, query_embeddings=queries.embeddings,
                         query_labels=queries.labels, **options)
    return metric_fn(embedded[split].embeddings, embedded[split].labels, **options)


def embed_protocol_splits(p_embed, state, dataset: data.Dataset, split: str) -> Dict[str, Embedded]:
    """{name: Embedded} of the eval splits evaluating `split` reads (`protocol_splits`)."""
    return {name: embed_examples(p_embed, state, dataset, name) for name in protocol_splits(dataset.info, split)}


VAL = "val"


def has_validation(info: data.DatasetInfo) -> bool:
    """Whether the dataset holds out validation classes (`dataset.num_val_classes` or `dataset.num_folds`)."""
    return VAL in info.num_eval_examples


def selection_metric(config, info: data.DatasetInfo) -> str:
    """The metrics key the best epoch and the `best/` checkpoint are chosen on: the validation classes'
    `checkpoint.best_metric` when there are validation classes (never test), else the test metric."""
    metric = config.checkpoint.best_metric or "recall@1"
    return f"{VAL}/{metric}" if has_validation(info) else metric


def evaluate(p_embed, state, dataset: data.Dataset, config, *, costly: bool = True,
             mesh: Optional[jax.sharding.Mesh] = None) -> Dict[str, float]:
    """The dataset's retrieval protocol (docs/method.md, "Benchmarks") on the unseen test classes, and on the
    held-out validation classes when there are any (keys prefixed 'val/'); `costly`, `mesh`: see `split_metrics`.

    Validation is always self-retrieval over its images (the training classes have no query/gallery split).
    """
    values = split_metrics(embed_protocol_splits(p_embed, state, dataset, "test"), dataset.info, config, "test",
                           costly=costly, mesh=mesh)
    if has_validation(dataset.info):
        val_values = split_metrics(embed_protocol_splits(p_embed, state, dataset, VAL), dataset.info, config, VAL,
                                   costly=costly, mesh=mesh)
        values.update({f"{VAL}/{name}": value for name, value in val_values.items()})
    return values


# The hierarchy scalars a run records that the final table shows (the rest are in metrics.json/TensorBoard).
TABLE_HIERARCHY_KEYS = ("hierarchy/level_1_nmi", "hierarchy/level_1_ari", "hierarchy/level_1_purity")


def format_columns(columns: Sequence[Tuple[str, Optional[Dict[str, Any]]]]) -> str:
    """A metric table: one row per float metric of the last column, one column per (title, metrics)."""
    columns = [(title, values) for title, values in columns if values]
    names = [k for k, v in columns[-1][1].items() if k != "epoch" and isinstance(v, float)
             and (not k.startswith("hierarchy/") or k in TABLE_HIERARCHY_KEYS)]
    width = max(len(n) for n in names) + 2
    lines = ["metric".ljust(width) + "".join(title.rjust(max(22, len(title) + 2)) for title, _ in columns)]
    for name in names:
        lines.append(name.ljust(width) + "".join(
            f"{values.get(name, float('nan')):{max(22, len(title) + 2)}.4f}" for title, values in columns))
    return "\n".join(lines)


def format_table(summary: Dict[str, Any], untrained: Optional[Dict[str, float]]) -> str:
    return format_columns([("epoch 0 (untrained)", untrained),
                           (f"last (epoch {summary['last']['epoch']})", summary["last"]),
                           (f"best (epoch {summary['best']['epoch']})", summary["best"])])
