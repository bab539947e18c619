"""The paper's tables under "A Metric Learning Reality Check" (docs/method.md): the test P@1 / R-Precision / MAP@R
of the fold models `python -m hpl_jax.mlrc run` trained, separated and concatenated, beside the published rows.

  python -m hpl_jax.mlrc_report ROOT

Each ROOT/fold_<p> is rebuilt from its config.json and restored from its best checkpoint (best/: the epoch with
the best validation MAP@R on its held-out block of training classes, never chosen on test); it embeds the test
split (self-retrieval, as in training). Then, with the embeddings L2-normalised:
  separated     each fold's model alone (128-d in the MLRC configs): the mean and the sample standard deviation
                over the folds;
  concatenated  the folds' normalised embeddings of each test image concatenated (4 x 128 = 512-d) and
                evaluated as one model: the setting of the paper's Tables 1-3.
Writes ROOT/mlrc.md (the tables) and ROOT/mlrc.json (every number, per fold too) and prints the tables.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any, Dict, List, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from hpl_jax import models
from hpl_jax.core import metrics as metrics_lib
from hpl_jax.data import datasets
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import evaluation
from hpl_jax.trainer.sharding import device_mesh
from hpl_jax.trainer.train_state import create_train_state

METRICS = ("precision@1", "r_precision", "map@r")
TITLES = ("P@1", "R-Precision", "MAP@R")
# docs/method.md, "Published numbers" (a third-party transcription of the HPL paper's Tables 1-3):
# P@1, R-Precision, MAP@R in %, BN-Inception, four 128-d fold models concatenated to 512-d.
PUBLISHED = {
    "sop": {"Proxy-Anchor": (76.12, 50.82, 47.88), "HPL on Proxy-Anchor": (76.97, 51.97, 49.07)},
    "cars": {"Proxy-Anchor": (86.38, 37.53, 27.77), "HPL on Proxy-Anchor": (86.84, 38.36, 28.67)},
    "cub": {"Proxy-Anchor": (67.64, 37.29, 26.47), "HPL on Proxy-Anchor": (68.25, 37.57, 26.72)},
}


class ReportError(ValueError):
    """Folds a user can fix (missing, unfinished, or from different runs); the message says what to do."""


# ------------------------------------------------------------------------------------------ the numbers
def concatenate_embeddings(per_fold: Sequence[np.ndarray]) -> np.ndarray:
    """MLRC's 'concatenated' model: each fold's f32[n, d_p] L2-normalised row by row, then joined to
    f32[n, sum_p d_p] (rows of norm sqrt(folds); retrieval normalises again, so cosine = the folds' mean)."""
    return np.concatenate([e / np.linalg.norm(e, axis=1, keepdims=True) for e in per_fold], axis=1)


def mlrc_metrics(embeddings: np.ndarray, labels: np.ndarray, chunk_size: int = 1024) -> Dict[str, float]:
    """P@1, R-Precision and MAP@R of self-retrieval over f32[n, d] with labels i32[n] (metrics.retrieval_metrics)."""
    values = metrics_lib.retrieval_metrics(embeddings, labels, recall_at=(1,), nmi=False, chunk_size=chunk_size)
    return {name: values[name] for name in METRICS}


def separated_and_concatenated(per_fold: Sequence[np.ndarray], labels: np.ndarray,
                               chunk_size: int = 1024) -> Dict[str, Any]:
    """The two MLRC results of the folds' test embeddings per_fold[p]: f32[n, d_p], all of the same n images.

    Returns {'per_fold': [metrics of each fold], 'separated': {metric: {'mean', 'std'}}, 'concatenated':
    metrics}; 'std' is the sample standard deviation over the folds (0 for one fold).
    """
    folds = [mlrc_metrics(embeddings, labels, chunk_size) for embeddings in per_fold]
    separated = {}
    for name in METRICS:
        values = np.array([fold[name] for fold in folds])
        separated[name] = {"mean": float(values.mean()),
                           "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    concatenated = mlrc_metrics(concatenate_embeddings(per_fold), labels, chunk_size)
    return {"per_fold": folds, "separated": separated, "concatenated": concatenated}


# ------------------------------------------------------------------------------------------ the folds
def fold_workdirs(root: str) -> Dict[int, str]:
    """{p: ROOT/fold_<p>} of the fold directories under ROOT, by p."""
    if not os.path.isdir(root):
        raise ReportError(f"{root} is not a directory; give the ROOT that `python -m hpl_jax.mlrc run` trained in.")
    folds = {}
    for entry in os.listdir(root):
        match = re.fullmatch(r"fold_(\d+)", entry)
        if match and os.path.isdir(os.path.join(root, entry)):
            folds[int(match.group(1))] = os.path.join(root, entry)
    return dict(sorted(folds.items()))


@functools.lru_cache(maxsize=None)
def _embed_function(model, mesh: jax.sharding.Mesh, dataset_config: ml_collections.FrozenConfigDict):
    """The trainer's embedding step (evaluation.embed_on_devices) of `model`, compiled once for all the folds that
    share the model's config and normalisation."""
    return evaluation.embed_on_devices(model, mesh, dataset_config)


def embed_test_split(workdir: str, config) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """The test embeddings of the fold in `workdir` (whose config.json is `config`) under its best checkpoint.

    Returns (f32[n, d], labels i32[n], facts about the fold for the report).
    """
    if config.eval.batch_size % jax.local_device_count():
        raise ReportError(f"{workdir}: eval.batch_size = {config.eval.batch_size} is not a multiple of the "
                          f"{jax.local_device_count()} devices here; report on a device count that divides it.")
    dataset = datasets.get_dataset(config, local_batch_size=config.batch_size,
                                   local_eval_batch_size=config.eval.batch_size)
    info = dataset.info
    if info.eval_splits != ("test",):
        raise ReportError(f"{workdir}: {info.name} is evaluated on {info.eval_splits}; the MLRC protocol is "
                          "self-retrieval on one test split (CUB, Cars196, SOP, ...).")
    model = models.create_model(config.model)
    # The checkpoint holds the weights and the groupings: no pretrained file is read, one k-means restart is enough.
    template_config = config.copy_and_resolve_references()
    template_config.model.pretrained = ""
    template_config.hpl.kmeans_restarts = 1
    template = create_train_state(jax.random.PRNGKey(config.seed), template_config, model, info)
    state = checkpointing.restore_state(workdir, template, "best")
    mesh = device_mesh("batch")
    embeddings, labels = evaluation.embed_split(_embed_function(model, mesh, ml_collections.FrozenConfigDict(config.dataset)), evaluation.state_on_devices(state, mesh),
                                                dataset, "test")

    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    history = {int(epoch): values for epoch, values in saved["history"].items()}
    epoch = int(state.epoch)
    facts = {"workdir": workdir, "val_fold": config.dataset.val_fold, "train_classes": info.num_train_classes,
             "val_images": info.num_eval_examples.get("val", 0), "best_epoch": epoch,
             "epochs_trained": max(history), "selected_on": saved["selected_on"],
             "selection_value": history.get(epoch, {}).get(saved["selected_on"], float("nan"))}
    return embeddings, labels, facts


def restore_folds(root: str) -> Tuple[List[np.ndarray], np.ndarray, Any, List[Dict[str, Any]]]:
    """Every fold under ROOT embedded (see `embed_test_split`), after checking that they are one MLRC run:
    dataset.num_folds folds, fold p validating on block p, the same test images."""
    workdirs = fold_workdirs(root)
    if not workdirs:
        raise ReportError(f"{root} holds no fold_<p> directory; train the folds first: python -m hpl_jax.mlrc run "
                          f"--config=configs/mlrc/<dataset>.py --workdir={root}")
    configs = {fold: checkpointing.load_config(workdir) for fold, workdir in workdirs.items()}
    config = configs[min(configs)]
    for fold, fold_config in configs.items():
        if fold_config.dataset.val_fold != fold or fold_config.dataset.num_folds != config.dataset.num_folds:
            raise ReportError(f"{workdirs[fold]} validated on fold {fold_config.dataset.val_fold} of "
                              f"{fold_config.dataset.num_folds}; fold_<p> must be fold p of "
                              f"{config.dataset.num_folds}, trained with --config.dataset.val_fold=<p>.")
    missing = sorted(set(range(config.dataset.num_folds)) - set(workdirs))
    if missing:
        raise ReportError(f"{root} lacks the folds {missing} of {config.dataset.num_folds}; train them with "
                          f"python -m hpl_jax.mlrc run --config=... --workdir={root} (finished folds are skipped).")
    per_fold, labels, facts = [], None, []
    for fold, workdir in workdirs.items():
        embeddings, fold_labels, fold_facts = embed_test_split(workdir, configs[fold])
        if labels is not None and not np.array_equal(fold_labels, labels):
            raise ReportError(f"{workdir} embedded other test images than {workdirs[min(workdirs)]}; the folds of "
                              "ROOT must come from one config.")
        per_fold.append(embeddings)
        facts.append(fold_facts)
        labels = fold_labels
    return per_fold, labels, config, facts


# ------------------------------------------------------------------------------------------ the tables
def method_name(config) -> str:
    base = {"proxy_anchor": "Proxy-Anchor", "proxy_nca": "Proxy-NCA"}[config.loss.base]
    weights = tuple(config.hpl.weights)
    if len(weights) == 1:
        return f"flat {base}"
    return f"HPL on {base} (w = {weights}, K = {tuple(config.hpl.num_coarse)[:len(weights) - 1]})"


def format_markdown(report: Dict[str, Any]) -> str:
    """The tables of ROOT/mlrc.md: the two MLRC results beside the published rows, then one row per fold."""
    num_folds, dim = len(report["folds"]), report["embedding_dim"]

    def percent(value):
        return f"{100 * value:.2f}"

    lines = [f"# {report['dataset']}: {report['method']}, {num_folds} folds (\"A Metric Learning Reality Check\")",
             "",
             f"Test: {report['test_images']} images of {report['test_classes']} unseen classes, self-retrieval, "
             f"L2-normalised embeddings. Each fold's model is its best epoch by {report['selected_on']} on its "
             "held-out block of training classes. P@1 / R-Precision / MAP@R in %.",
             "",
             "| model | " + " | ".join(TITLES) + " |",
             "|---|" + "---|" * len(TITLES),
             f"| hpl-jax, concatenated ({num_folds} x {dim} = {num_folds * dim}-d) | "
             + " | ".join(percent(report["concatenated"][name]) for name in METRICS) + " |",
             f"| hpl-jax, separated ({dim}-d; mean ± std over {num_folds} folds) | "
             + " | ".join(f"{percent(report['separated'][name]['mean'])} ± {percent(report['separated'][name]['std'])}"
                          for name in METRICS) + " |"]
    for method, values in report["published"].items():
        lines.append(f"| published: {method}, concatenated 512-d (docs/method.md) | "
                     + " | ".join(f"{value:.2f}" for value in values) + " |")
    if not report["published"]:
        lines += ["", f"No published rows for {report['dataset']} (docs/method.md has SOP, Cars196 and CUB-200)."]
    lines += ["", "| fold | training classes | best epoch | epochs trained | "
              f"{report['selected_on']} at best | " + " | ".join(f"test {title}" for title in TITLES) + " |",
              "|---|" + "---|" * (4 + len(TITLES))]
    for fold, (facts, values) in enumerate(zip(report["folds"], report["per_fold"])):
        lines.append(f"| {fold} | {facts['train_classes']} | {facts['best_epoch']} | {facts['epochs_trained']} | "
                     f"{percent(facts['selection_value'])} | "
                     + " | ".join(percent(values[name]) for name in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_report(root: str) -> Dict[str, Any]:
    """Restores and embeds every fold under ROOT, writes ROOT/mlrc.json and ROOT/mlrc.md; returns the report."""
    per_fold, labels, config, facts = restore_folds(root)
    results = separated_and_concatenated(per_fold, labels, config.eval.chunk_size)
    report = {"dataset": config.dataset.name, "method": method_name(config), "embedding_dim": per_fold[0].shape[1],
              "test_images": int(len(labels)), "test_classes": int(len(np.unique(labels))),
              "selected_on": facts[0]["selected_on"], "folds": facts, **results,
              "published": {method: list(values) for method, values in PUBLISHED.get(config.dataset.name, {}).items()}}
    with open(os.path.join(root, "mlrc.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(root, "mlrc.md"), "w") as f:
        f.write(format_markdown(report))
    return report


def main(argv: Sequence[str]) -> None:
    if len(argv) == 2 and argv[1] in ("-h", "--help", "--helpshort", "--helpfull"):
        print(__doc__.strip())
        return
    if len(argv) != 2:
        sys.exit("Usage: python -m hpl_jax.mlrc_report ROOT (the --workdir of `python -m hpl_jax.mlrc run`)")
    try:
        report = write_report(argv[1])
    except (ReportError, FileNotFoundError) as error:
        sys.exit(f"Report error: {error}")
    print(format_markdown(report), end="", flush=True)


if __name__ == "__main__":
    main(sys.argv)
