"""The "Metric Learning Reality Check" path: folds, early stopping, RMSprop, iterations per epoch, the fold runner
and the report, on the embedded data with a tiny model."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs.mlrc import cars as mlrc_cars
from configs.mlrc import cub as mlrc_cub
from configs.mlrc import sop as mlrc_sop
from configs.mlrc import synthetic as mlrc_synthetic
from hpl_jax import data
from hpl_jax import models
from hpl_jax.data import datasets
from hpl_jax.experiments import mlrc
from hpl_jax.models import convert as convert_weights
from hpl_jax.experiments import mlrc_report
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import optim
from hpl_jax.trainer import reporting
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state
from tests.trainer.test_train import REPO, tiny_config
from tests import once
from tests import xla


def test_folds_cut_the_sorted_classes_into_contiguous_blocks():
    # 10 classes, 4 folds: blocks start at floor(10 p / 4) = 0, 2, 5, 7.
    expected = [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    validated = []
    for fold, block in enumerate(expected):
        train_classes, val_classes = data.fold_split(10, 4, fold)
        np.testing.assert_array_equal(val_classes, block)
        np.testing.assert_array_equal(np.sort(np.concatenate([train_classes, val_classes])), np.arange(10))
        assert not set(train_classes) & set(val_classes)
        validated += list(val_classes)
    assert sorted(validated) == list(range(10))  # every class validates in exactly one fold
    # Cars196's 98 training classes: the blocks start where MLRC's partitions start.
    assert [len(data.fold_split(98, 4, fold)[1]) for fold in range(4)] == [24, 25, 24, 25]
    assert data.fold_split(98, 4, 1)[1][0] == 24


def test_the_fold_split_is_what_the_datasets_hold_out():
    config = tiny_config(**{"dataset.synthetic.num_families": 4, "dataset.num_folds": 4, "dataset.val_fold": 2})
    whole = datasets.get_dataset(tiny_config(**{"dataset.synthetic.num_families": 4}), local_batch_size=16,
                                 local_eval_batch_size=16)
    held = datasets.get_dataset(config, local_batch_size=16, local_eval_batch_size=16)
    # 8 training classes, 2 families' first halves each of 2 classes: fold 2 validates on classes 4 and 5.
    assert held.info.num_train_classes == 6 and held.info.num_eval_examples["val"] == 2 * 7
    np.testing.assert_array_equal(held.info.val_super_labels, whole.info.train_super_labels[[4, 5]])
    np.testing.assert_array_equal(held.info.train_super_labels, whole.info.train_super_labels[[0, 1, 2, 3, 6, 7]])


def test_an_image_folder_holds_out_a_fold_and_takes_steps_per_epoch(tmp_path):
    from configs import image_folder as image_folder_config
    from hpl_jax.data import input_pipeline
    from tests.data.test_input_pipeline import eval_ids, make_image_folder, tiny
    names = [f"c{i:02d}" for i in range(16)]  # c00-c07 train, c08-c15 test
    owner = make_image_folder(str(tmp_path), names, [2] * 16)
    config = tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path), "dataset.num_folds": 4,
                                          "dataset.val_fold": 1, "steps_per_epoch": 9})
    held = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    assert {owner[i] for i in eval_ids(held, "val")[0]} == {"c02", "c03"}
    assert {owner[i] for i in eval_ids(held, "train")[0]} == {"c00", "c01", "c04", "c05", "c06", "c07"}
    assert len(list(held.train_batches(0))) == 9  # 12 training images, batches of 2: 1.5 passes


def test_fold_config_errors_name_the_field(tmp_path):
    cases = [({"dataset.num_folds": 4, "dataset.num_val_classes": 2}, "config.dataset.num_folds: 4 folds and"),
             ({"dataset.num_folds": 4, "dataset.val_fold": 4}, "config.dataset.val_fold"),
             ({"dataset.num_folds": 1}, "config.dataset.num_folds"),
             ({"eval.early_stopping_patience": 3}, "config.eval.early_stopping_patience"),
             ({"optim.name": "sgd"}, "config.optim.name"),
             ({"model.pooling": "gem"}, "config.model.pooling"),
             ({"steps_per_epoch": -1}, "config.steps_per_epoch")]
    for overrides, message in cases:
        with pytest.raises(config_checks.ConfigError, match=message):
            config_checks.validate_config(tiny_config(**overrides), device_count=2, process_count=1)
    with pytest.raises(config_checks.ConfigError, match="config.dataset.num_folds: 4 folds of the 6 training"):
        datasets.get_dataset(tiny_config(**{"dataset.num_folds": 4}), local_batch_size=16, local_eval_batch_size=16)
    config_checks.validate_config(mlrc_synthetic.get_config(), device_count=8, process_count=1)
    # The benchmarks' folds fine-tune ImageNet BN-Inception with frozen BatchNorm: without the weights, refused.
    weights = tmp_path / "bn_inception"
    weights.mkdir()
    (weights / "metadata.json").write_text(json.dumps(
        {"architecture": "bn_inception", "width": 1.0, "preprocessing": convert_weights.BN_INCEPTION_PREPROCESSING}))
    for module in (mlrc_cub, mlrc_cars, mlrc_sop):
        config = module.get_config()
        with pytest.raises(config_checks.ConfigError, match="config.model.bn_frozen: .* model.pretrained is empty"):
            config_checks.validate_config(config, device_count=8, process_count=1)
        config.model.pretrained = str(weights)
        config_checks.validate_config(config, device_count=8, process_count=1)


def test_early_stopping_on_a_fabricated_validation_history():
    def history(values):
        return {epoch: {"val/map@r": value} for epoch, value in values.items()}

    # Evaluated every 2 epochs; epoch 0 (untrained) scores highest but starts no count.
    seen = history({0: 0.9, 2: 0.3, 4: 0.5, 6: 0.4, 8: 0.5, 10: 0.45})
    stops = {epoch: reporting.stops_early({e: v for e, v in seen.items() if e <= epoch}, "val/map@r", 5)
             for epoch in seen}
    # Best at epoch 4 (the 0.5 of epoch 8 ties and does not count as better): 10 - 4 > 5 stops.
    assert stops == {0: False, 2: False, 4: False, 6: False, 8: False, 10: True}
    assert reporting.best_epoch(seen, "val/map@r") == 4
    assert not reporting.stops_early(seen, "val/map@r", 6)  # 10 - 4 = 6 is not more than 6
    assert not reporting.stops_early(seen, "val/map@r", 0)  # 0 = off
    assert not reporting.stops_early(history({0: 0.9}), "val/map@r", 1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_takes_pytorchs_steps(momentum):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start, gradients = rng.normal(size=(3, 4)), rng.normal(size=(5, 3, 4))
    param = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.RMSprop([param], lr=1e-2, momentum=momentum, weight_decay=1e-2)
    ours = optim.torch_rmsprop(learning_rate=1e-2, weight_decay=1e-2, momentum=momentum)
    params = jax.numpy.asarray(start, jax.numpy.float32)
    state = ours.init(params)
    for gradient in gradients:
        param.grad = torch.tensor(gradient, dtype=torch.float64)
        reference.step()
        updates, state = ours.update(jax.numpy.asarray(gradient, jax.numpy.float32), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params), param.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_steps_per_epoch_sets_the_epoch_length_and_keeps_a_one_pass_order():
    def labels(**overrides):
        dataset = datasets.get_dataset(tiny_config(**overrides), local_batch_size=8, local_eval_batch_size=16)
        return [batch["label"] for batch in dataset.train_batches(epoch=3)]

    one_pass = labels()  # 6 classes x 7 images = 42 images: 5 steps of 8
    assert len(one_pass) == 5
    longer, shorter = labels(steps_per_epoch=12), labels(steps_per_epoch=2)
    assert len(longer) == 12 and len(shorter) == 2
    np.testing.assert_array_equal(np.concatenate(longer[:5]), np.concatenate(one_pass))
    np.testing.assert_array_equal(np.concatenate(shorter), np.concatenate(one_pass[:2]))
    first_two_passes = np.concatenate(longer)[:84]
    assert np.array_equal(np.bincount(first_two_passes), np.full(6, 14))  # every image once per pass


def test_concatenation_is_normalise_then_concatenate():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(6, 3)) * rng.uniform(0.5, 3.0, size=(6, 1)) for _ in range(4)]
    manual = np.concatenate([p / np.sqrt(np.sum(p ** 2, axis=1, keepdims=True)) for p in parts], axis=1)
    np.testing.assert_allclose(mlrc_report.concatenate_embeddings(parts), manual, rtol=1e-12)
    # One fold alone: the concatenated model is that fold's model.
    labels = np.array([0, 0, 1, 1, 2, 2])
    results = mlrc_report.separated_and_concatenated(parts[:1], labels)
    assert results["concatenated"] == results["per_fold"][0]
    assert results["separated"]["map@r"] == {"mean": results["per_fold"][0]["map@r"], "std": 0.0}


def _fold_config(fold):
    """A tiny MLRC run: 4 families of 4 classes -> 8 training classes, 4 folds of 2; frozen BatchNorm and a
    learning rate near 0 keep the validation metric flat, so early stopping must end each fold at epoch 3."""
    return tiny_config(**{
        "dataset.synthetic.num_families": 4, "dataset.synthetic.images_per_class": 6, "dataset.num_folds": 4,
        "dataset.val_fold": fold, "hpl.num_coarse": (2,), "model.bn_frozen": True, "model.embedding_dim": 8,
        "optim.name": "rmsprop", "optim.lr": 1e-12, "optim.warmup_epochs": 0, "batch_size": 8,
        "steps_per_epoch": 2, "num_epochs": 6, "eval.early_stopping_patience": 1, "checkpoint.keep": 1})


@pytest.fixture(scope="module")
def compile_once(tmp_path_factory):
    """JAX's persistent compilation cache, in a temporary directory, for this module's runs only: the folds,
    the report and the restores compile the same programs, once instead of 4 to 9 times."""
    options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in options}
    compilation_cache.reset_cache()
    for name, value in zip(options, (str(tmp_path_factory.mktemp("compilation_cache")), 0.0, 0)):
        jax.config.update(name, value)
    yield
    compilation_cache.reset_cache()
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
@once.shared
def four_folds(tmp_path_factory, compile_once):
    """ROOT with 4 trained folds, each run's result, and the report. The folds are trained once per session
    (tests/once.py) and copied here: a test moves a fold away and back."""
    def train_folds(shared):
        results = [train.train_and_evaluate(_fold_config(fold), mlrc.fold_workdir(str(shared), fold))
                   for fold in range(4)]
        (shared / "results.pickle").write_bytes(pickle.dumps(results))

    shared = once.made_once(tmp_path_factory, "mlrc_four_folds", train_folds)
    root = tmp_path_factory.mktemp("mlrc")
    for fold in range(4):
        shutil.copytree(mlrc.fold_workdir(str(shared), fold), mlrc.fold_workdir(str(root), fold))
    results = pickle.loads((shared / "results.pickle").read_bytes())
    return root, results, mlrc_report.write_report(str(root))


@pytest.mark.slow
def test_four_folds_stop_early_and_the_runner_prints_them(four_folds):
    root, results, _ = four_folds
    for fold, result in enumerate(results):
        assert sorted(result["history"]) == [0, 1, 2, 3]  # best at epoch 1, 3 - 1 > 1: no epoch 4
        assert reporting.run_has_ended(mlrc.fold_workdir(str(root), fold))
    assert not reporting.run_has_ended(str(root / "fold_9"))
    env = dict(os.environ, XLA_FLAGS=xla.flags(2), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "hpl_jax.mlrc", "run", "--config=configs/mlrc/synthetic.py",
               f"--workdir={root}", "--config.batch_size=8", "--config.dataset.synthetic.num_families=4"]
    printed = subprocess.run(command + ["--run=print"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 4
    for fold, line in enumerate(lines):
        assert line.startswith(f"python -m hpl_jax.main --config=configs/mlrc/synthetic.py --workdir={root}/fold_{fold} ")
        assert "--config.batch_size=8" in line and line.endswith(f"--config.dataset.val_fold={fold}")


@pytest.mark.slow
def test_the_report_restores_each_folds_best_epoch_and_concatenates_them(four_folds):
    root, results, report = four_folds
    assert (report["dataset"], report["embedding_dim"], report["test_images"]) == ("synthetic", 8, 8 * 6)
    assert [fold["val_fold"] for fold in report["folds"]] == [0, 1, 2, 3]
    for facts, values, result in zip(report["folds"], report["per_fold"], results):
        # The best checkpoint's test embeddings give the test metrics the run logged at its best epoch.
        assert facts["best_epoch"] == result["best"]["epoch"]
        for name in mlrc_report.METRICS:
            assert values[name] == pytest.approx(result["best"][name], abs=1e-6)
    for name in mlrc_report.METRICS:
        assert report["separated"][name]["mean"] == pytest.approx(np.mean([v[name] for v in report["per_fold"]]))
    with open(root / "mlrc.json") as f:
        assert json.load(f)["concatenated"] == report["concatenated"]
    table = (root / "mlrc.md").read_text()
    assert "| hpl-jax, concatenated (4 x 8 = 32-d) |" in table and "mean ± std over 4 folds" in table
    os.rename(root / "fold_3", root / "moved")
    try:
        with pytest.raises(mlrc_report.ReportError, match=r"lacks the folds \[3\] of 4"):
            mlrc_report.write_report(str(root))
    finally:
        os.rename(root / "moved", root / "fold_3")


@pytest.mark.slow
def test_restore_state_finds_the_latest_the_best_and_a_step(four_folds):
    root, _, _ = four_folds
    workdir = mlrc.fold_workdir(str(root), 0)
    config = _fold_config(0)
    dataset = datasets.get_dataset(config, local_batch_size=8, local_eval_batch_size=16)
    model = models.create_model(config.model)
    template = train_state.create_train_state(jax.random.PRNGKey(1), config, model, dataset.info)
    latest = checkpointing.restore_state(workdir, template, "latest")
    assert (int(latest.epoch), int(latest.step)) == (3, 6)
    best = checkpointing.restore_state(workdir, template, "best")
    assert int(best.epoch) == json.loads((root / "fold_0" / "metrics.json").read_text())["best"]["epoch"]
    by_step = checkpointing.restore_state(workdir, template, int(best.step))
    for a, b in zip(jax.tree_util.tree_leaves(best), jax.tree_util.tree_leaves(by_step)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 12345"):
        checkpointing.restore_state(workdir, template, 12345)
