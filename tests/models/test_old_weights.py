"""Converted weights written by hpl-jax 0.3.0 (tests/fixtures/v0_3_0: backbone.tgz and what 0.3.0 read back from
it) still load, leaf for leaf, and a fine-tuning run still starts from them."""
import jax
import numpy as np
import pytest

from configs import finetune_synthetic_sop
from hpl_jax.models import convert
from hpl_jax.trainer import restore
from hpl_jax.trainer import train
from tests.fixtures import old_release

WIDTH = 0.0625  # the exported backbone's (tests/fixtures/v0_3_0/README.md)


@pytest.fixture
def old_backbone(tmp_path):
    """The directory 0.3.0's pretraining exported (orbax checkpoint + metadata.json), extracted afresh."""
    return old_release.extract("backbone.tgz", tmp_path, "backbone")


def recorded_backbone():
    """{'params': {keystr: float64 sum}, 'batch_stats': {...}}: what 0.3.0 read back from backbone.tgz."""
    return old_release.recorded()["backbone"]


def leaf_sums(tree):
    """{jax.tree_util.keystr(path): float64 sum of the leaf}, the form recorded.json keeps."""
    return {jax.tree_util.keystr(path): float(np.asarray(leaf, np.float64).sum())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_sums_equal(tree, recorded, name):
    sums = leaf_sums(tree)
    assert sorted(sums) == sorted(recorded), f"{name}: the leaves differ from 0.3.0's"
    for key, value in recorded.items():
        assert sums[key] == pytest.approx(value, rel=1e-12, abs=1e-12), f"{name}{key}"


def test_weights_converted_by_0_3_0_load_leaf_for_leaf(old_backbone):
    params, batch_stats, metadata = convert.load_pretrained(old_backbone, "resnet18", WIDTH)
    recorded = recorded_backbone()
    assert len(recorded["params"]) > 50 and len(recorded["batch_stats"]) > 30
    assert_sums_equal(params, recorded["params"], "params")
    assert_sums_equal(batch_stats, recorded["batch_stats"], "batch_stats")
    assert metadata["architecture"] == "resnet18" and metadata["width"] == WIDTH
    assert metadata["preprocessing"] == convert.TORCHVISION_PREPROCESSING


def finetune_config(pretrained):
    """configs/finetune_synthetic_sop.py at the toy sizes of tests/trainer/test_pretraining.py's fine-tuning
    runs, at the old backbone's width, for one step."""
    config = finetune_synthetic_sop.get_config()
    config.model.pretrained = pretrained
    config.dataset.image_size = 16
    config.dataset.resize_size = 18
    config.dataset.synthetic_sop.num_super_classes = 2
    config.dataset.synthetic_sop.sub_families_per_super_class = 2
    config.dataset.synthetic_sop.classes_per_sub_family = 4
    config.dataset.synthetic_sop.images_per_class = (2, 4)
    config.dataset.num_val_classes = 0
    config.model.width = WIDTH
    config.model.embedding_dim = 16
    config.hpl.num_coarse = (3,)
    config.batch_size = 16
    config.eval.batch_size = 16
    config.num_epochs = 1
    config.steps_per_epoch = 1
    return config


@pytest.mark.slow
def test_a_finetuning_run_starts_from_weights_converted_by_0_3_0(old_backbone, tmp_path):
    workdir = str(tmp_path / "finetune")
    result = train.train_and_evaluate(finetune_config(old_backbone), workdir)
    assert not result["preempted"] and result["skipped_steps"] == 0
    assert np.isfinite(result["last"]["map@r"])
    state = restore.restore_run(workdir).state
    assert int(state.step) == 1
    # The one step is in the recipe's warm-up (only the embedding layer and the proxies train) with BatchNorm
    # frozen, so the run's backbone is still the old one, leaf for leaf.
    recorded = recorded_backbone()
    assert_sums_equal(state.params["backbone"], recorded["params"], "params")
    assert_sums_equal(state.batch_stats["backbone"], recorded["batch_stats"], "batch_stats")
