"""Pretraining here (export_backbone), the embedded source, and what fine-tuning checks of pretrained weights."""
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from configs import finetune_default
from configs import finetune_synthetic_sop
from configs import pretrain_synthetic
from hpl_jax import data
from hpl_jax import models
from hpl_jax.data import datasets
from hpl_jax.data import synthetic
from hpl_jax.data import synthetic_sop
from hpl_jax.data import synthetic_source
from hpl_jax.models import convert as convert_weights
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import pretraining
from hpl_jax.trainer import restore
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state


def tiny_generators(config):
    """Small draws of both generators at 16 px (the source's and the targets' settings alike)."""
    config.dataset.image_size = 16
    config.dataset.resize_size = 18
    config.dataset.synthetic.num_families = 3
    config.dataset.synthetic.classes_per_family = 4
    config.dataset.synthetic.images_per_class = 5
    config.dataset.synthetic_sop.num_super_classes = 2
    config.dataset.synthetic_sop.sub_families_per_super_class = 2
    config.dataset.synthetic_sop.classes_per_sub_family = 4
    config.dataset.synthetic_sop.images_per_class = (2, 4)
    config.model.width = 0.125
    config.model.embedding_dim = 16
    return config


def tiny_source_config():
    config = tiny_generators(pretrain_synthetic.get_config())
    config.dataset.synthetic_source.sop_seeds = (1000, 1001)
    config.dataset.synthetic_source.default_seeds = (1000,)
    # Not the defaults, so the test can tell that the recorded preprocessing is the one the pretraining used.
    config.dataset.mean = (0.5, 0.4, 0.3)
    config.dataset.std = (0.2, 0.3, 0.25)
    config.dataset.color_order = "bgr"
    config.batch_size = 16
    config.eval.batch_size = 16
    config.num_epochs = 1
    config.steps_per_epoch = 3
    config.eval.every_epochs = 1
    config.log_every_steps = 1
    return config


def test_the_source_is_the_generators_draws_at_its_seeds_with_labels_numbered_draw_after_draw():
    config = tiny_source_config()
    images, labels, supers = synthetic_source.generate(config.dataset)
    assert data.embedded_draws(config.dataset) == [("synthetic_sop", 1000), ("synthetic_sop", 1001),
                                                   ("synthetic", 1000)]
    # 2 SOP-like draws of 2 x 2 x 4 products (half train) and one default draw of 3 x 4 classes (half train).
    assert len(supers["train"]) == len(supers["test"]) == 8 + 8 + 6
    for split in ("train", "test"):
        assert np.array_equal(np.unique(labels[split]), np.arange(22))
        assert np.all(np.diff(labels[split]) >= 0)  # draw after draw, class after class
        assert len(images[split]) == len(labels[split]) and images[split].dtype == np.uint8
    # Super-classes: 4 sub-families per SOP-like draw, 3 families for the default one, numbered globally.
    assert np.array_equal(np.unique(supers["train"]), np.arange(11))

    # The first draw is exactly the SOP-like generator's dataset at that seed, and not the target's at data seed 0.
    sop_config = config.dataset.copy_and_resolve_references()
    sop_config.seed = 1000
    _, sop_images, sop_classes = synthetic_sop.generate(sop_config)
    train_rows = np.flatnonzero(np.isin(sop_classes, synthetic_sop.split_classes(16, 4)["train"]))
    np.testing.assert_array_equal(images["train"][:len(train_rows)], sop_images[train_rows])
    sop_config.seed = 0
    _, target_images, _ = synthetic_sop.generate(sop_config)
    assert not np.array_equal(target_images[:len(train_rows)], images["train"][:len(train_rows)])
    default_images, _, _, _ = synthetic.generate_splits(1000, num_families=3, classes_per_family=4, images_per_class=5,
                                                        size=18)
    np.testing.assert_array_equal(images["train"][-len(default_images["train"]):], default_images["train"])


def test_the_source_config_and_the_finetune_configs_check_and_keep_the_targets_data():
    for config in (pretrain_synthetic.get_config(), finetune_default.get_config(), finetune_synthetic_sop.get_config()):
        config.model.pretrained = ""
        config_checks.validate_config(config, device_count=2, process_count=1)
    sop = finetune_synthetic_sop.get_config()
    assert sop.dataset.name == "synthetic_sop" and sop.model.bn_frozen and sop.optim.lr == 1e-4
    assert sop.num_epochs == 10 and finetune_default.get_config().num_epochs == default.get_config().num_epochs
    source = pretrain_synthetic.get_config()
    assert not set(data.embedded_draws(source.dataset)) & {(name, seed) for name in ("synthetic", "synthetic_sop")
                                                           for seed in range(3)}
    bad = pretrain_synthetic.get_config()
    bad.dataset.synthetic_source.sop_seeds = (1000, 1000)
    with pytest.raises(config_checks.ConfigError, match="config.dataset.synthetic_source: lists a seed twice"):
        config_checks.validate_config(bad, device_count=1, process_count=1)


def _save_weights(path, metadata, width=0.125):
    model = models.Embedder("resnet18", embedding_dim=16, width=width)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
    convert_weights.save_converted(str(path), jax.device_get(variables["params"]["backbone"]),
                                   jax.device_get(variables["batch_stats"]["backbone"]), metadata)


def _finetune(pretrained, **overrides):
    config = tiny_generators(finetune_synthetic_sop.get_config())
    config.model.pretrained = str(pretrained)
    config.update_from_flattened_dict(overrides)
    return config


def test_weights_pretrained_on_the_target_itself_are_refused_and_other_weights_accepted(tmp_path):
    metadata = {"architecture": "resnet18", "width": 0.125, "preprocessing": convert_weights.TORCHVISION_PREPROCESSING,
                "source_dataset": {"name": "synthetic_source", "draws": [["synthetic_sop", 1000], ["synthetic", 7]]}}
    _save_weights(tmp_path / "source", metadata)

    def check(config):
        config_checks.validate_config(config, device_count=1, process_count=1)

    check(_finetune(tmp_path / "source"))  # data seed 0: disjoint
    check(_finetune(tmp_path / "source", **{"dataset.seed": 7}))  # the default generator drew seed 7, not SOP-like
    with pytest.raises(config_checks.ConfigError, match=r"config.model.pretrained: .* synthetic_sop at data seed 1000"):
        check(_finetune(tmp_path / "source", **{"dataset.seed": 1000}))
    with pytest.raises(config_checks.ConfigError, match="synthetic at data seed 7"):
        check(_finetune(tmp_path / "source", **{"dataset.name": "synthetic", "dataset.seed": 7}))
    with pytest.raises(config_checks.ConfigError, match="config.model.width: 0.25, but model.pretrained holds a "
                                                        "backbone of width 0.125"):
        check(_finetune(tmp_path / "source", **{"model.width": 0.25}))

    # Pretrained on a benchmark's training classes: not on that benchmark; converted ImageNet weights carry no source.
    cub = {**metadata, "source_dataset": {"name": "cub", "draws": []}}
    assert "cub's training classes" in pretraining.source_overlap(cub, ml_collections.ConfigDict({"name": "cub"}))
    assert pretraining.source_overlap(cub, _finetune(tmp_path).dataset) is None
    assert pretraining.source_overlap({"architecture": "resnet50"}, _finetune(tmp_path).dataset) is None


def test_the_overlap_check_compares_the_data_not_the_datasets_name(tmp_path):
    # Two image folders are two datasets: weights pretrained on one fine-tune on the other. The same folder, by any
    # spelling of its path, is refused; so is a TFDS benchmark whatever data_dir holds it.
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir(), folder_b.mkdir()

    def dataset(name, data_dir=""):
        return ml_collections.ConfigDict({"name": name, "data_dir": str(data_dir), "seed": 0})

    source_a = {"source_dataset": pretraining.source_description(dataset("image_folder", folder_a))}
    assert source_a["source_dataset"]["folder"] == os.path.realpath(folder_a)
    assert pretraining.source_overlap(source_a, dataset("image_folder", folder_b)) is None
    assert "image folder" in pretraining.source_overlap(source_a, dataset("image_folder", folder_a))
    assert "image folder" in pretraining.source_overlap(source_a, dataset("image_folder", f"{tmp_path}/b/../a/"))
    old_record = {"source_dataset": {"name": "image_folder", "draws": []}}
    assert "names no folder" in pretraining.source_overlap(old_record, dataset("image_folder", folder_b))

    cub = {"source_dataset": pretraining.source_description(dataset("cub", "/data/one"))}
    assert cub["source_dataset"]["split"] == "train"
    assert "cub's training classes" in pretraining.source_overlap(cub, dataset("cub", "/data/other"))
    assert pretraining.source_overlap(cub, dataset("cars")) is None
    assert pretraining.source_overlap(cub, dataset("image_folder", folder_a)) is None


@pytest.mark.slow
def test_a_pretraining_exports_its_backbone_which_finetuning_loads_bit_exactly_with_its_preprocessing(tmp_path):
    config = tiny_source_config()
    workdir = str(tmp_path / "pretrain")
    train.train_and_evaluate(config, workdir)
    exported = os.path.join(workdir, pretraining.EXPORT_DIR)
    metadata = convert_weights.read_metadata(exported)
    assert metadata["architecture"] == "resnet18" and metadata["width"] == 0.125
    assert metadata["preprocessing"] == {"input_space": "BGR", "input_range": [0, 1.0], "mean": [0.5, 0.4, 0.3],
                                         "std": [0.2, 0.3, 0.25]}
    assert metadata["source_dataset"]["draws"] == [["synthetic_sop", 1000], ["synthetic_sop", 1001], ["synthetic", 1000]]
    assert metadata["pretraining"]["step"] == 3

    # The export is the run's last state, bit for bit.
    final = restore.restore_run(workdir).state
    params, stats, _ = convert_weights.load_pretrained(exported, "resnet18", 0.125)
    for got, want in ((params, final.params["backbone"]), (stats, final.batch_stats["backbone"])):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A fine-tuning run starts from it and feeds it images normalised as the pretraining did.
    finetune = train.with_pretrained_preprocessing(_finetune(exported, **{"dataset.num_val_classes": 0, "hpl.num_coarse": (3,)}))
    assert (tuple(finetune.dataset.mean), tuple(finetune.dataset.std), finetune.dataset.color_order,
            finetune.dataset.pixel_scale) == ((0.5, 0.4, 0.3), (0.2, 0.3, 0.25), "bgr", 1.0)
    dataset = datasets.get_dataset(finetune, local_batch_size=16, local_eval_batch_size=16)
    model = models.create_model(finetune.model)
    state = train_state.create_train_state(jax.random.PRNGKey(3), finetune, model, dataset.info)
    for a, b in zip(jax.tree_util.tree_leaves(state.params["backbone"]), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Run again: the finished export is kept; an unfinished one (no metadata.json) is written again.
    written = os.path.getmtime(os.path.join(exported, convert_weights.METADATA_FILE))
    train.train_and_evaluate(config, workdir)
    assert os.path.getmtime(os.path.join(exported, convert_weights.METADATA_FILE)) == written
    os.remove(os.path.join(exported, convert_weights.METADATA_FILE))
    train.train_and_evaluate(config, workdir)
    assert convert_weights.read_metadata(exported) == metadata
