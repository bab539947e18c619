"""evaluate and visualize on one short trained run (tiny model, 2 epochs) shared by every test of this module."""
import csv
import dataclasses
import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from hpl_jax.core import metrics
from hpl_jax.experiments import evaluate
from hpl_jax.experiments import visualize
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import restore
from tests import once
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# The tiny model of tests/trainer/test_train.py; no warm-up epoch, so one train step is compiled.
TINY = ["--config.dataset.image_size=16", "--config.dataset.resize_size=18",
        "--config.dataset.synthetic.num_families=3", "--config.dataset.synthetic.classes_per_family=4",
        "--config.dataset.synthetic.images_per_class=7", "--config.model.width=0.125",
        "--config.model.embedding_dim=16", "--config.hpl.num_coarse=(3,)", "--config.batch_size=16",
        "--config.eval.batch_size=16", "--config.eval.nmi=False", "--config.num_epochs=2",
        "--config.optim.warmup_epochs=0", "--config.dataset.num_val_classes=0"]
# Training and `evaluate` compile with the same flags (tests/xla.py), so the metrics agree exactly.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla.flags(2))


def command(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
@once.shared
def workdir(tmp_path_factory):
    """A finished tiny run that the tests below only read, trained once per session (tests/once.py)."""
    def train(root):
        result = command("hpl_jax.main", "--config=configs/default.py", f"--workdir={root}", *TINY)
        assert result.returncode == 0, result.stderr[-3000:]
    return str(once.made_once(tmp_path_factory, "evaluate_run", train))


@pytest.fixture(scope="module")
def evaluated(workdir, tmp_path_factory):
    """`python -m hpl_jax.evaluate` on the latest checkpoint, with --export: (its stdout, the .npz path)."""
    export = str(tmp_path_factory.mktemp("exported") / "test.npz")  # not in the shared workdir
    result = command("hpl_jax.evaluate", f"--workdir={workdir}", f"--export={export}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, export


@pytest.fixture(scope="module")
def restored(workdir):
    return restore.restore_run(workdir, "latest")


def recorded(workdir, epoch):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)["history"][str(epoch)]


def assert_same_metrics(metrics, expected):
    floats = {k for k, v in expected.items() if isinstance(v, float) and not k.startswith(("val/", "hierarchy/"))}
    assert floats and floats <= set(metrics)
    for key in floats:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_evaluate_equals_the_metrics_recorded_at_that_epoch(workdir, evaluated, restored):
    stdout, export = evaluated
    assert "recorded at epoch 2" in stdout and "test, latest (epoch 2, step 4)" in stdout
    exported = np.load(export)
    embedded = {"test": evaluation.Embedded(exported["embeddings"], exported["labels"], exported["ids"])}
    metrics = evaluation.split_metrics(embedded, restored.dataset.info, restored.config, "test")
    assert_same_metrics(metrics, recorded(workdir, 2))
    # The checkpoint of epoch 1 by its step (2 steps of 16 of the 42 training images per epoch), here.
    first = dataclasses.replace(restored, state=checkpointing.restore_state(workdir, restored.state, "2"))
    assert (first.epoch, int(first.state.step)) == (1, 2)
    assert_same_metrics(evaluate.evaluate_run(first, "test")[0], recorded(workdir, 1))


@pytest.mark.slow
def test_export_round_trips_and_ids_name_the_examples(evaluated, restored):
    exported = np.load(evaluated[1])
    assert set(exported.files) == {"embeddings", "labels", "ids", "split", "example_super_labels", "step", "epoch"}
    assert exported["embeddings"].shape == (42, 16) and exported["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(np.sort(exported["ids"]), np.arange(42))
    np.testing.assert_array_equal(exported["example_super_labels"],
                                  restored.dataset.info.test_super_labels[exported["labels"]])
    # The export's per-example super-classes give retrieval_metrics' per-class ones back, and the super/ metrics
    # the run recorded; the per-example array itself is refused, not read as a class -> super-class map.
    per_class = metrics.class_super_labels(exported["labels"], exported["example_super_labels"])
    np.testing.assert_array_equal(per_class, restored.dataset.info.test_super_labels)
    by_export = metrics.retrieval_metrics(exported["embeddings"], exported["labels"], super_labels=per_class,
                                          nmi=False)
    by_run = metrics.retrieval_metrics(exported["embeddings"], exported["labels"],
                                       super_labels=restored.dataset.info.test_super_labels, nmi=False)
    assert by_export == by_run
    with pytest.raises(ValueError, match="one entry per item"):
        metrics.retrieval_metrics(exported["embeddings"], exported["labels"],
                                  super_labels=exported["example_super_labels"], nmi=False)
    assert set(exported["split"]) == {"test"} and int(exported["epoch"]) == 2 and int(exported["step"]) == 4
    # Row i is the embedding of example ids[i] of the split, computed here directly from that image.
    rows = [0, 17, 41]
    images = visualize.eval_images(restored.dataset, "test", exported["ids"][rows])
    config = restored.config.dataset
    inputs = np.stack([(images[int(i)] * config.pixel_scale - np.asarray(config.mean)) / np.asarray(config.std)
                       for i in exported["ids"][rows]]).astype(np.float32)
    state = restored.state
    direct = restored.model.apply({"params": state.params, "batch_stats": state.batch_stats}, inputs, train=False)
    np.testing.assert_allclose(exported["embeddings"][rows], np.asarray(direct), rtol=1e-4, atol=1e-5)
    label_of = {int(i): int(label) for batch in restored.dataset.eval_batches("test")
                for i, label, keep in zip(batch["index"], batch["label"], batch["mask"]) if keep}
    np.testing.assert_array_equal(exported["labels"], [label_of[int(i)] for i in exported["ids"]])


@pytest.mark.slow
def test_asking_for_a_missing_run_checkpoint_or_split_stops_with_one_line(tmp_path, workdir, restored):
    best_step = 2 * checkpointing.load_metrics(workdir)["best"]["epoch"]  # 2 steps per epoch
    with pytest.raises(checkpointing.RunError, match=rf"no checkpoint of step 3; it has the steps \[2, 4\] in "
                                                     rf"checkpoints/ and \[{best_step}\] in best/"):
        restore.restore_run(workdir, "3")
    with pytest.raises(checkpointing.RunError, match="config.json does not exist; is .* the workdir of a run"):
        restore.restore_run(str(tmp_path), "latest")
    with pytest.raises(checkpointing.RunError, match=r"has no eval split 'val'; use one of \('test', 'train'\)"):
        restored.check_split("val")
    assert checkpointing.checkpoint_location(workdir, "best")[1] == best_step


@pytest.mark.slow
def test_commands_reject_bad_arguments_in_one_line(workdir):
    result = command("hpl_jax.evaluate", f"--workdir={workdir}", "--checkpoint=first")
    assert result.returncode == 1 and "--checkpoint is 'latest', 'best' or a step number" in result.stderr
    result = command("hpl_jax.visualize", f"--workdir={workdir}")
    assert result.returncode == 1 and "Give one command: tsne | grid | hierarchy" in result.stderr


def png_shape(path):
    assert os.path.getsize(path) > 0
    return matplotlib.image.imread(path).shape[:2]


@pytest.mark.slow
def test_pictures_have_the_expected_size(tmp_path, workdir, restored):
    out = str(tmp_path)
    png, csv_path = visualize.tsne_command(restored, "test", out, num_classes=4, seed=0)
    assert png_shape(png) == (5 * 80, 6 * 80)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 4 * 7 and len({r["label"] for r in rows}) == 4
    assert {r["super_label"] for r in rows} <= {"0", "1", "2"}

    [png] = visualize.grid_command(restored, "test", out, num_queries=3, top_k=4, seed=0)
    assert png_shape(png) == (int(round((1.2 * 3 + 0.4) * 80)), int(round(1.2 * 5 * 80)))

    [png] = visualize.hierarchy_command(restored, out)
    keys = [k for k in recorded(workdir, 2) if k.startswith("hierarchy/")]
    sizes = [k for k in keys if "_group_size_" in k]
    agreement = [k for k in keys if k not in sizes and any(n in k for n in ("_nmi", "_ari", "_purity"))]
    panels = 1 + bool(sizes) + bool(agreement) + bool(set(keys) - set(sizes) - set(agreement))
    assert panels == 4  # the contingency, sizes, agreement and geometry panels of a run with super-classes
    assert png_shape(png) == (4 * 80, int(4.5 * 80 * panels))


def test_nearest_neighbours_leave_the_query_out_and_contingency_counts_classes():
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    gallery = evaluation.Embedded(vectors, np.array([0, 0, 1, 1]), np.arange(4))
    queries = evaluation.Embedded(vectors[:1], np.array([0]), np.array([0]))
    np.testing.assert_array_equal(visualize.nearest_neighbours(queries, gallery, 2, exclude_self=True), [[1, 3]])
    np.testing.assert_array_equal(visualize.nearest_neighbours(queries, gallery, 2, exclude_self=False), [[0, 1]])
    table = visualize.contingency(np.array([0, 0, 1, 2, 2]), np.array([1, 1, 0, 0, 1]))
    np.testing.assert_array_equal(table, [[0, 2], [1, 0], [1, 1]])
    history = {"0": {"recall@1": 0.1}, "2": {"hierarchy/level_1_group_size_max": 5.0},
               "1": {"hierarchy/level_1_group_size_max": 4.0}}
    epochs, values = visualize.hierarchy_history(history)["hierarchy/level_1_group_size_max"]
    assert list(epochs) == [1, 2] and list(values) == [4.0, 5.0]
