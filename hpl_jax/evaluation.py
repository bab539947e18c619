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


def evaluate(p_embed, state, dataset: data.Dataset, config) -> Dict[str, float]:
    """The dataset's retrieval protocol on the unseen test classes (METHOD.md, "Benchmarks")."""
    info = dataset.info
    super_labels = info.test_super_labels if config.eval.super_metrics else None
    options = dict(recall_at=tuple(config.eval.recall_at), super_labels=super_labels,
                   nmi=config.eval.nmi, chunk_size=config.eval.chunk_size, seed=config.seed)
    if "query" in info.eval_splits:
        gallery, gallery_labels = embed_split(p_embed, state, dataset, "gallery")
        queries, query_labels = embed_split(p_embed, state, dataset, "query")
        return metrics_lib.retrieval_metrics(gallery, gallery_labels, query_embeddings=queries,
                                             query_labels=query_labels, **options)
    embeddings, labels = embed_split(p_embed, state, dataset, "test")
    return metrics_lib.retrieval_metrics(embeddings, labels, **options)


def format_table(summary: Dict[str, Any], untrained: Optional[Dict[str, float]]) -> str:
    columns = [("epoch 0 (untrained)", untrained)] if untrained else []
    columns += [(f"last (epoch {summary['last']['epoch']})", summary["last"]),
                (f"best (epoch {summary['best']['epoch']})", summary["best"])]
    names = [k for k, v in summary["last"].items() if k != "epoch" and isinstance(v, float)]
    width = max(len(n) for n in names) + 2
    lines = ["metric".ljust(width) + "".join(title.rjust(22) for title, _ in columns)]
    for name in names:
        lines.append(name.ljust(width) + "".join(f"{values.get(name, float('nan')):22.4f}" for _, values in columns))
    return "\n".join(lines)
