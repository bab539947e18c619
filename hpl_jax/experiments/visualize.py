"""Pictures of a trained run: a t-SNE of a split's embeddings, retrieval grids, the learned hierarchy.

  python -m hpl_jax.visualize tsne --workdir=W [--split=test] [--classes=20] [--checkpoint=latest]
  python -m hpl_jax.visualize grid --workdir=W [--split=test] [--queries=6] [--top_k=5]
  python -m hpl_jax.visualize hierarchy --workdir=W

tsne: scikit-learn t-SNE of the embeddings of a sample of `--classes` classes (all when fewer), points coloured by
class and marked by ground-truth super-class (the paper's Figure of Cars-196); writes tsne_<split>.png and the
2-D coordinates as tsne_<split>.csv. grid: a few queries (left column) and their top-k neighbours, framed green
when of the query's class and red when not; grid_<split>.png. hierarchy: the learned level-1 groups of the
training classes against the true super-classes (contingency heat map), and the group sizes and other
`hierarchy/` scalars metrics.json recorded over the refreshes; hierarchy.png. Files go to --out_dir (default
WORKDIR/figures). One process; the embedding runs on its local devices.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
import matplotlib.ticker
import numpy as np
import sklearn.manifold
import sklearn.metrics
from absl import app
from absl import flags
from matplotlib.figure import Figure  # not pyplot: no display backend, no global figure state

from hpl_jax import data
from hpl_jax.experiments import evaluate
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import cli
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import restore

FLAGS = flags.FLAGS
COMMANDS = ("tsne", "grid", "hierarchy")
DPI = 80
MARKERS = "o^sDvP*Xh<>p"


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run's workdir (config.json, checkpoints/, metrics.json).")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
    flags.DEFINE_string("split", "test", "The eval split to embed (tsne, grid).")
    flags.DEFINE_string("out_dir", None, "Where the pictures go (default WORKDIR/figures).")
    flags.DEFINE_integer("classes", 20, "tsne: classes shown, a random sample when the split has more.")
    flags.DEFINE_integer("queries", 6, "grid: number of queries, one row each.")
    flags.DEFINE_integer("top_k", 5, "grid: neighbours shown per query.")
    flags.DEFINE_integer("seed", 0, "Seed of the class/query sample and of t-SNE.")
    flags.register_validator("checkpoint", evaluate.checkpoint_name_is_valid,
                             "--checkpoint is 'latest', 'best' or a step number.")
    flags.mark_flags_as_required(["workdir"])


# ----------------------------------------------------------------------------------------------- t-SNE
def sample_classes(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """bool[n]: the examples of `num_classes` classes drawn at random (all classes when there are fewer)."""
    classes = np.unique(labels)
    if len(classes) > num_classes:
        classes = np.sort(np.random.default_rng(seed).choice(classes, num_classes, replace=False))
    return np.isin(labels, classes)


def tsne_coordinates(embeddings: np.ndarray, seed: int) -> np.ndarray:
    """f32[n, 2]: scikit-learn t-SNE (PCA initialisation) of f32[n, d] embeddings, perplexity capped for small n."""
    perplexity = float(min(30.0, max(2.0, (len(embeddings) - 1) / 3.0)))
    tsne = sklearn.manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                                 random_state=seed)
    return tsne.fit_transform(np.asarray(embeddings, np.float64)).astype(np.float32)


def class_colours(num_classes: int) -> np.ndarray:
    """f32[num_classes, 4]: distinct colours (tab20 up to 20 classes, evenly spaced hues beyond)."""
    if num_classes <= 20:
        return matplotlib.colormaps["tab20"](np.arange(num_classes))
    return matplotlib.colormaps["hsv"](np.linspace(0.0, 1.0, num_classes, endpoint=False))


def plot_tsne(path: str, coords: np.ndarray, labels: np.ndarray, super_labels: Optional[np.ndarray],
              title: str) -> None:
    """Scatter of f32[n, 2] points: colour = class, marker = super-class (one legend entry per super-class)."""
    classes = np.unique(labels)
    colours = class_colours(len(classes))[np.searchsorted(classes, labels)]
    supers = np.zeros(len(labels), int) if super_labels is None else np.asarray(super_labels)
    fig = Figure(figsize=(6.0, 5.0), dpi=DPI)
    ax = fig.subplots()
    for rank, s in enumerate(np.unique(supers)):
        rows = supers == s
        ax.scatter(coords[rows, 0], coords[rows, 1], c=colours[rows], marker=MARKERS[rank % len(MARKERS)], s=18,
                   linewidths=0.3, edgecolors="black",
                   label=None if super_labels is None else f"super-class {s}")
    if super_labels is not None:
        ax.legend(fontsize=7, loc="best", markerscale=0.8, framealpha=0.7)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def write_tsne_csv(path: str, ids, labels, super_labels, coords) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "super_label", "x", "y"])
        for i in range(len(ids)):
            super_label = "" if super_labels is None else int(super_labels[i])
            writer.writerow([int(ids[i]), int(labels[i]), super_label, f"{coords[i, 0]:.5f}", f"{coords[i, 1]:.5f}"])


def tsne_command(run: restore.RestoredRun, split: str, out_dir: str, num_classes: int,
                 seed: int) -> List[str]:
    """Embeds `split` (In-Shop 'test': the gallery), writes tsne_<split>.png and .csv; returns their paths."""
    embedded = evaluate.embed_run(run, split)
    name = "gallery" if "gallery" in embedded else split
    examples = embedded[name]
    chosen = sample_classes(examples.labels, num_classes, seed)
    labels, ids = examples.labels[chosen], examples.ids[chosen]
    class_supers = evaluation.split_super_labels(run.dataset.info, name)
    super_labels = None if class_supers is None else np.asarray(class_supers)[labels]
    coords = tsne_coordinates(examples.embeddings[chosen], seed)
    png, csv_path = (os.path.join(out_dir, f"tsne_{split}.{ext}") for ext in ("png", "csv"))
    title = (f"t-SNE of {run.dataset.info.name} {name}: {len(np.unique(labels))} classes, {len(labels)} images "
             f"(epoch {run.epoch}); colour = class" + ("" if super_labels is None else ", marker = super-class"))
    plot_tsne(png, coords, labels, super_labels, title)
    write_tsne_csv(csv_path, ids, labels, super_labels, coords)
    return [png, csv_path]


# ----------------------------------------------------------------------------------------------- grid
def nearest_neighbours(queries: evaluation.Embedded, gallery: evaluation.Embedded, top_k: int,
                       exclude_self: bool) -> np.ndarray:
    """i64[num_queries, top_k]: gallery rows by decreasing cosine similarity; with `exclude_self` (self-retrieval)
    each query's own row (same id) is left out, by index as the metrics do."""
    q = queries.embeddings / np.linalg.norm(queries.embeddings, axis=1, keepdims=True)
    g = gallery.embeddings / np.linalg.norm(gallery.embeddings, axis=1, keepdims=True)
    similarity = q @ g.T
    if exclude_self:
        similarity[queries.ids[:, None] == gallery.ids[None, :]] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :top_k]


def eval_images(dataset: data.Dataset, split: str, ids: Sequence[int]) -> Dict[int, np.ndarray]:
    """{id: f32[H, W, 3] in [0, 1]}: the images of `split` with these ids as the network sees them (the test
    transform), before the device normalises them. Reads the split until every id was seen."""
    wanted, images = set(int(i) for i in ids), {}
    for batch in dataset.eval_batches(split):
        for image, index, keep in zip(batch["image"], batch["index"], batch["mask"]):
            if keep and int(index) in wanted:
                images[int(index)] = np.asarray(image, np.float32) / 255.0
        if len(images) == len(wanted):
            break
    return images


def plot_grid(path: str, query_images: Sequence[np.ndarray], neighbour_images: Sequence[Sequence[np.ndarray]],
              correct: np.ndarray, title: str) -> None:
    """Rows: a query (grey frame) then its neighbours framed green (same class) or red (another class)."""
    rows, top_k = correct.shape
    fig = Figure(figsize=(1.2 * (top_k + 1), 1.2 * rows + 0.4), dpi=DPI)
    axes = fig.subplots(rows, top_k + 1, squeeze=False)
    for r in range(rows):
        cells = [(query_images[r], "0.4")] + [
            (image, "tab:green" if ok else "tab:red") for image, ok in zip(neighbour_images[r], correct[r])]
        for c, (image, colour) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3.0)
    axes[0, 0].set_title("query", fontsize=8)
    for c in range(1, top_k + 1):
        axes[0, c].set_title(f"#{c}", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1.0 - 0.45 / (1.2 * rows + 0.4), wspace=0.08,
                        hspace=0.08)
    fig.savefig(path, dpi=DPI)


def grid_command(run: restore.RestoredRun, split: str, out_dir: str, num_queries: int, top_k: int,
                 seed: int) -> List[str]:
    """Writes grid_<split>.png: `num_queries` random queries of `split` and their top-k neighbours."""
    embedded = evaluate.embed_run(run, split)
    query_split, gallery_split = ("query", "gallery") if "query" in embedded else (split, split)
    queries, gallery = embedded[query_split], embedded[gallery_split]
    rows = np.sort(np.random.default_rng(seed).choice(len(queries.ids), min(num_queries, len(queries.ids)),
                                                      replace=False))
    chosen = evaluation.Embedded(queries.embeddings[rows], queries.labels[rows], queries.ids[rows])
    neighbours = nearest_neighbours(chosen, gallery, top_k, exclude_self=query_split == gallery_split)
    correct = gallery.labels[neighbours] == chosen.labels[:, None]
    query_images = eval_images(run.dataset, query_split, chosen.ids)
    gallery_images = eval_images(run.dataset, gallery_split, gallery.ids[neighbours].ravel())
    path = os.path.join(out_dir, f"grid_{split}.png")
    plot_grid(path, [query_images[int(i)] for i in chosen.ids],
              [[gallery_images[int(gallery.ids[j])] for j in row] for row in neighbours], correct,
              f"{run.dataset.info.name} {split}, epoch {run.epoch}: top-{top_k} "
              f"(green = same class), precision {correct.mean():.2f}")
    return [path]


# ----------------------------------------------------------------------------------------------- hierarchy
def contingency(groups: np.ndarray, super_labels: np.ndarray) -> np.ndarray:
    """i64[K_1, S]: entry (k, s) counts the training classes in learned group k and true super-class s."""
    table = np.zeros((int(groups.max()) + 1, int(super_labels.max()) + 1), np.int64)
    np.add.at(table, (groups, super_labels), 1)
    return table


def hierarchy_history(history: Dict[str, Dict[str, float]]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{key: (epochs, values)} of every `hierarchy/` scalar metrics.json recorded, epochs ascending."""
    series = {}
    for epoch in sorted(history, key=int):
        for key, value in history[epoch].items():
            if key.startswith("hierarchy/") and isinstance(value, (int, float)):
                series.setdefault(key, ([], []))
                series[key][0].append(int(epoch))
                series[key][1].append(float(value))
    return {key: (np.asarray(e), np.asarray(v)) for key, (e, v) in series.items()}


def plot_hierarchy(path: str, groups: np.ndarray, super_labels: Optional[np.ndarray],
                   history: Dict[str, Tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Panels: contingency heat map (or the group sizes without super-classes); the level-1 group sizes over
    the refreshes; the agreement scalars (with the true super-classes and with the previous grouping, in
    [0, 1]); the geometry scalars (proxy norms, cosines). The history panels appear only when metrics.json has
    them."""
    sizes = {k: v for k, v in history.items() if "_group_size_" in k}
    agreement = {k: v for k, v in history.items() if k not in sizes and any(
        name in k for name in ("_nmi", "_ari", "_purity"))}
    geometry = {k: v for k, v in history.items() if k not in sizes and k not in agreement}
    panels = 1 + bool(sizes) + bool(agreement) + bool(geometry)
    fig = Figure(figsize=(4.5 * panels, 4.0), dpi=DPI)
    axes = fig.subplots(1, panels, squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    if super_labels is not None:
        table = contingency(groups, super_labels)
        order = np.lexsort((-table.max(axis=1), table.argmax(axis=1)))  # rows by their dominant super-class
        image = ax.imshow(table[order], cmap="Blues", aspect="auto")
        for (r, c), count in np.ndenumerate(table[order]):
            if count:
                ax.text(c, r, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > table.max() / 2 else "black")
        ax.set_xlabel("true super-class")
        ax.set_ylabel("learned level-1 group")
        ax.set_yticks(range(len(order)), [str(k) for k in order], fontsize=7)
        ax.set_xticks(range(table.shape[1]))
        nmi = sklearn.metrics.normalized_mutual_info_score(super_labels, groups)
        ari = sklearn.metrics.adjusted_rand_score(super_labels, groups)
        ax.set_title(f"training classes per group: NMI {nmi:.2f}, ARI {ari:.2f}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, ticks=matplotlib.ticker.MaxNLocator(integer=True))
    else:
        ax.bar(np.arange(groups.max() + 1), np.bincount(groups))
        ax.set_xlabel("learned level-1 group")
        ax.set_ylabel("training classes")
        ax.set_title("group sizes (the dataset has no super-classes)", fontsize=9)
    if sizes:
        ax = axes.pop(0)
        for key, (epochs, values) in sorted(sizes.items()):
            ax.plot(epochs, values, marker="o", ms=3, label=key[len("hierarchy/"):])
        ax.set_xlabel("epoch")
        ax.set_ylabel("classes per group")
        ax.set_title("group sizes over the refreshes", fontsize=9)
        ax.legend(fontsize=7)
    for series, panel_title in ((agreement, "agreement: with the true super-classes, with the last grouping"),
                                (geometry, "geometry: proxy norms, cos(coarse proxy, children's mean)")):
        if not series:
            continue
        ax = axes.pop(0)
        for key, (epochs, values) in sorted(series.items()):
            ax.plot(epochs, values, marker="o", ms=3, label=key[len("hierarchy/"):])
        ax.set_xlabel("epoch")
        ax.set_title(panel_title, fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def hierarchy_command(run: restore.RestoredRun, out_dir: str) -> List[str]:
    """Writes hierarchy.png for the restored run's level-1 groups."""
    parents = run.state.hierarchy.parents
    if not parents:
        raise checkpointing.RunError(f"{run.workdir} trained a flat loss (hpl.weights = "
                                     f"{tuple(run.config.hpl.weights)}); it has no learned groups to show.")
    groups = np.asarray(parents[0])
    super_labels = run.dataset.info.train_super_labels
    history = {}
    if (run.workdir / checkpointing.METRICS_FILE).exists():
        history = hierarchy_history(checkpointing.load_metrics(run.workdir)["history"])
    path = os.path.join(out_dir, "hierarchy.png")
    plot_hierarchy(path, groups, None if super_labels is None else np.asarray(super_labels), history,
                   f"{run.dataset.info.name}: {len(groups)} training classes in K_1 = {groups.max() + 1} groups "
                   f"(epoch {run.epoch})")
    return [path]


def run_command(command: str, workdir: str, checkpoint: str, split: str, out_dir: Optional[str], *,
                classes: int, queries: int, top_k: int, seed: int) -> List[str]:
    run = restore.restore_run(workdir, checkpoint)
    out_dir = out_dir or os.path.join(str(run.workdir), "figures")
    os.makedirs(out_dir, exist_ok=True)
    if command == "hierarchy":
        return hierarchy_command(run, out_dir)
    run.check_split(split)
    if command == "tsne":
        return tsne_command(run, split, out_dir, classes, seed)
    return grid_command(run, split, out_dir, queries, top_k, seed)


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Give one command: {' | '.join(COMMANDS)} (got {argv[1:]}).")
    cli.quiet_library_logs()
    paths = cli.exit_on_user_error(run_command, argv[1], FLAGS.workdir, FLAGS.checkpoint, FLAGS.split,
                                   FLAGS.out_dir, classes=FLAGS.classes, queries=FLAGS.queries, top_k=FLAGS.top_k,
                                   seed=FLAGS.seed)
    print("\n".join(f"wrote {path}" for path in paths))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
