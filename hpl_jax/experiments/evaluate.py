"""Evaluate a trained run without training it: restore a checkpoint, embed a split, print its metrics, export.

  python -m hpl_jax.evaluate --workdir=/tmp/hpl_default [--checkpoint=latest|best|STEP] [--split=test]
      [--export=/tmp/hpl_default/test_embeddings.npz]

The run's saved config (WORKDIR/config.json) rebuilds the dataset and the model. `--split` is any eval split of
the dataset ('test', 'train', 'val' when the run holds out validation classes; for In-Shop 'test' is the query
set searching the gallery). The table also shows the metrics the run recorded at that epoch, where metrics.json
has them. `--export` writes an .npz with one row per example (see `export_embeddings`). A multi-process run
evaluates like training: start the same command in every process with the flags of `hpl_jax.main`.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags

from hpl_jax import data
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import cli
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import restore
from hpl_jax.trainer.sharding import device_mesh

FLAGS = flags.FLAGS
# The device axis, named as the trainer's (train.AXIS); the embedding step has no collectives.
AXIS = "batch"


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run's workdir (config.json, checkpoints/, best/, metrics.json).")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
    flags.DEFINE_string("split", "test", "The eval split: 'test', 'train', 'val' (with validation classes), "
                        "'query'/'gallery' (In-Shop).")
    flags.DEFINE_string("export", None, "Also write embeddings, labels, super-labels and ids to this .npz.")
    flags.register_validator("checkpoint", checkpoint_name_is_valid,
                             "--checkpoint is 'latest', 'best' or a step number.")
    cli.define_process_flags()
    flags.mark_flags_as_required(["workdir"])


def checkpoint_name_is_valid(which: str) -> bool:
    return which in ("latest", "best") or which.isdigit()


@functools.lru_cache(maxsize=None)
def embed_function(model, mesh: jax.sharding.Mesh, dataset_config: ml_collections.FrozenConfigDict):
    """The trainer's embedding step (evaluation.embed_on_devices) of `model` over `mesh`, its pixels normalised by
    `dataset_config` on the device; compiled once per model and normalisation (hence the frozen, hashable config)."""
    return evaluation.embed_on_devices(model, mesh, dataset_config)


def embed_run(run: restore.RestoredRun, split: str = "test") -> Dict[str, evaluation.Embedded]:
    """The eval splits the protocol of `split` reads (In-Shop 'test': query and gallery), embedded on every device
    of every process, as the trainer embeds them."""
    mesh = device_mesh(AXIS)
    embed = embed_function(run.model, mesh, ml_collections.FrozenConfigDict(run.config.dataset))
    return evaluation.embed_protocol_splits(embed, evaluation.state_on_devices(run.state, mesh), run.dataset, split)


def evaluate_run(run: restore.RestoredRun,
                 split: str = "test") -> Tuple[Dict[str, float], Dict[str, evaluation.Embedded]]:
    """The metrics of `split` under the dataset's protocol (the queries split across the devices, as in training),
    and the embedded eval splits they came from."""
    embedded = embed_run(run, split)
    return evaluation.split_metrics(embedded, run.dataset.info, run.config, split, mesh=device_mesh(AXIS)), embedded


def recorded_metrics(run: restore.RestoredRun, split: str) -> Optional[Dict[str, float]]:
    """What the run's metrics.json recorded for `split` at the restored epoch, if it did ('val/' keys unprefixed)."""
    if split not in ("test", "val") or not (run.workdir / checkpointing.METRICS_FILE).exists():
        return None
    entry = checkpointing.load_metrics(run.workdir)["history"].get(str(run.epoch))
    if not entry:
        return None
    if split == "val":
        return {key[len("val/"):]: value for key, value in entry.items() if key.startswith("val/")} or None
    return {key: value for key, value in entry.items() if not key.startswith("val/")}


def export_embeddings(path: str, embedded: Dict[str, evaluation.Embedded], info: data.DatasetInfo,
                      *, step: int, epoch: int) -> None:
    """Writes an .npz with one row per example of every embedded split (In-Shop: the queries, then the gallery).

    Arrays: embeddings f32[n, d]; labels i32[n] (class within the split's label space); ids i64[n] (index of
    the example within its split); split str[n]; example_super_labels i32[n], each example's super-class, where
    the dataset has super-classes (per example: `metrics.class_super_labels` turns one split's into the per-class
    `super_labels` of `retrieval_metrics`); and step, epoch of the checkpoint.
    """
    names = list(embedded)
    arrays = dict(
        embeddings=np.concatenate([embedded[n].embeddings for n in names]).astype(np.float32),
        labels=np.concatenate([embedded[n].labels for n in names]).astype(np.int32),
        ids=np.concatenate([embedded[n].ids for n in names]).astype(np.int64),
        split=np.concatenate([np.full(len(embedded[n].labels), n) for n in names]),
        step=np.int64(step), epoch=np.int64(epoch))
    supers = [evaluation.split_super_labels(info, n) for n in names]
    if all(s is not None for s in supers):
        arrays["example_super_labels"] = np.concatenate(
            [np.asarray(s)[embedded[n].labels] for s, n in zip(supers, names)]).astype(np.int32)
    path = checkpointing.workdir_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)


def run_command(workdir: str, checkpoint: str, split: str, export: Optional[str]) -> Dict[str, float]:
    run = restore.restore_run(workdir, checkpoint)
    run.check_split(split)
    metrics, embedded = evaluate_run(run, split)
    if jax.process_index() == 0:
        title = f"{split}, {checkpoint} (epoch {run.epoch}, step {int(run.state.step)})"
        print(evaluation.format_columns([(f"recorded at epoch {run.epoch}", recorded_metrics(run, split)),
                                         (title, metrics)]), flush=True)
        if export:
            export_embeddings(export, embedded, run.dataset.info, step=int(run.state.step), epoch=run.epoch)
            print(f"wrote {export}: {sum(len(e.labels) for e in embedded.values())} examples of {list(embedded)}")
    return metrics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    cli.join_processes()
    cli.exit_on_user_error(run_command, FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.export)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
