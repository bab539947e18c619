"""Evaluation: embed a split on every device of every host, the dataset's retrieval protocol, the metric table.

Used by the training loop and by the commands that restore a run without training it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from hpl_jax import data
from hpl_jax import metrics as metrics_lib
from hpl_jax.train_state import TrainState


def embed_step(state: TrainState, batch, *, model):
    """Embeddings of one eval batch on one device: f32[per_device, embedding_dim]."""
    return model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)


def embed_split(p_embed, state, dataset: data.Dataset, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every example of `split`, from every host, each exactly once."""
    embeddings, labels, masks = [], [], []
    for batch in dataset.eval_batches(split):
        sharded = data.shard_for_devices(batch, jax.local_device_count())
        out = p_embed(state, {"image": sharded["image"]})
        embeddings.append(np.asarray(out).reshape(-1, out.shape[-1]))
        labels.append(batch["label"])
        masks.append(batch["mask"])
    embeddings, labels, masks = map(np.concatenate, (embeddings, labels, masks))
    if jax.process_count() > 1:
        embeddings, labels, masks = (
            np.asarray(x).reshape((-1,) + x.shape[2:])
            for x in multihost_utils.process_allgather((embeddings, labels, masks)))
    return embeddings[masks], labels[masks]


VAL = "val"


def has_validation(info: data.DatasetInfo) -> bool:
    """Whether the dataset holds out validation classes (`dataset.num_val_classes` or `dataset.num_folds`)."""
    return VAL in info.num_eval_examples


def selection_metric(config, info: data.DatasetInfo) -> str:
    """The metrics key the best epoch and the `best/` checkpoint are chosen on: the validation classes'
    `checkpoint.best_metric` when there are validation classes (never test), else the test metric."""
    metric = config.checkpoint.best_metric or "recall@1"
    return f"{VAL}/{metric}" if has_validation(info) else metric


def evaluate(p_embed, state, dataset: data.Dataset, config) -> Dict[str, float]:
    """The dataset's retrieval protocol (METHOD.md, "Benchmarks") on the unseen test classes, and on the
    held-out validation classes when there are any (keys prefixed 'val/').

    Validation is always self-retrieval over its images (the training classes have no query/gallery split).
    """
    info = dataset.info
    options = dict(recall_at=tuple(config.eval.recall_at), nmi=config.eval.nmi, chunk_size=config.eval.chunk_size,
                   seed=config.seed)

    def supers(labels):
        return labels if config.eval.super_metrics else None

    if "query" in info.eval_splits:
        gallery, gallery_labels = embed_split(p_embed, state, dataset, "gallery")
        queries, query_labels = embed_split(p_embed, state, dataset, "query")
        values = metrics_lib.retrieval_metrics(gallery, gallery_labels, query_embeddings=queries,
                                               query_labels=query_labels, super_labels=supers(info.test_super_labels),
                                               **options)
    else:
        embeddings, labels = embed_split(p_embed, state, dataset, "test")
        values = metrics_lib.retrieval_metrics(embeddings, labels, super_labels=supers(info.test_super_labels),
                                               **options)
    if has_validation(info):
        embeddings, labels = embed_split(p_embed, state, dataset, VAL)
        val_values = metrics_lib.retrieval_metrics(embeddings, labels, super_labels=supers(info.val_super_labels),
                                                   **options)
        values.update({f"{VAL}/{name}": value for name, value in val_values.items()})
    return values


# The hierarchy scalars a run records that the final table shows (the rest are in metrics.json/TensorBoard).
TABLE_HIERARCHY_KEYS = ("hierarchy/level_1_nmi", "hierarchy/level_1_ari", "hierarchy/level_1_purity")


def format_table(summary: Dict[str, Any], untrained: Optional[Dict[str, float]]) -> str:
    """The untrained, last and best epoch's metrics side by side, one metric a row."""
    columns = [("epoch 0 (untrained)", untrained)] if untrained else []
    columns += [(f"last (epoch {summary['last']['epoch']})", summary["last"]),
                (f"best (epoch {summary['best']['epoch']})", summary["best"])]
    names = [k for k, v in summary["last"].items() if k != "epoch" and isinstance(v, float)
             and (not k.startswith("hierarchy/") or k in TABLE_HIERARCHY_KEYS)]
    width = max(len(n) for n in names) + 2
    lines = ["metric".ljust(width) + "".join(title.rjust(22) for title, _ in columns)]
    for name in names:
        lines.append(name.ljust(width) + "".join(f"{values.get(name, float('nan')):22.4f}" for _, values in columns))
    return "\n".join(lines)
