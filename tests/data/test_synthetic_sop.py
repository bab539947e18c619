"""The SOP-like embedded dataset (hpl_jax/data/synthetic_sop.py): data seed, splits, hierarchy, images, class sizes."""
import json

import numpy as np
import pytest

from configs import synthetic_sop as sop_config
from hpl_jax import data
from hpl_jax.data import datasets
from hpl_jax.data import synthetic_sop
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import train


def small_config(**overrides):
    """The real config with a smaller catalogue: 12 super-classes x 3 sub-families x 6 products."""
    config = sop_config.get_config()
    config.dataset.synthetic_sop.sub_families_per_super_class = 3
    config.dataset.synthetic_sop.classes_per_sub_family = 6
    config.dataset.num_val_classes = 0
    config.update_from_flattened_dict(overrides)
    return config


def load(config):
    return datasets.get_dataset(config, local_batch_size=16, local_eval_batch_size=16)


def eval_images(dataset, split):
    batches = list(dataset.eval_batches(split))
    return (np.concatenate([b["image"][b["mask"]] for b in batches]),
            np.concatenate([b["label"][b["mask"]] for b in batches]))


def test_the_data_follow_dataset_seed_not_the_training_seed():
    reference, labels = eval_images(load(small_config()), "test")
    same, same_labels = eval_images(load(small_config(seed=7)), "test")
    np.testing.assert_array_equal(same, reference)
    np.testing.assert_array_equal(same_labels, labels)
    other, _ = eval_images(load(small_config(**{"dataset.seed": 7})), "test")
    assert other.shape != reference.shape or not np.allclose(other, reference)


def test_splits_are_class_disjoint_and_every_test_group_also_trains():
    config = small_config()
    catalogue, _, classes = synthetic_sop.generate(config.dataset)
    splits = synthetic_sop.split_classes(catalogue.num_classes, 6)
    assert not set(splits["train"]) & set(splits["test"])
    assert sorted(np.concatenate(list(splits.values()))) == list(range(catalogue.num_classes))
    assert set(catalogue.sub_family[splits["test"]]) == set(catalogue.sub_family[splits["train"]])
    assert set(catalogue.super_class[splits["test"]]) == set(catalogue.super_class[splits["train"]])

    dataset = load(config)
    info = dataset.info
    for name in ("train", "test"):
        ids = splits[name]
        assert info.num_eval_examples[name] == np.isin(classes, ids).sum()
        _, labels = eval_images(dataset, name)
        # Labels 0..C-1 in catalogue order, with each class's photos.
        np.testing.assert_array_equal(np.bincount(labels), np.bincount(classes)[ids])
    np.testing.assert_array_equal(info.train_super_labels, catalogue.sub_family[splits["train"]])
    np.testing.assert_array_equal(info.test_super_labels, catalogue.sub_family[splits["test"]])
    assert info.num_train_classes == len(splits["train"]) == 12 * 3 * 3


def test_the_hierarchy_is_a_tree_of_three_levels():
    catalogue, _, _ = synthetic_sop.generate(small_config().dataset)
    for sub_family in np.unique(catalogue.sub_family):
        assert len(np.unique(catalogue.super_class[catalogue.sub_family == sub_family])) == 1
    assert len(np.unique(catalogue.sub_family)) == 36 and len(np.unique(catalogue.super_class)) == 12
    np.testing.assert_array_equal(np.bincount(catalogue.sub_family), np.full(36, 6))

    by_sub = load(small_config()).info
    by_super = load(small_config(**{"dataset.synthetic_sop.super_level": "super_class"})).info
    assert by_super.super_parents is None and by_sub.super_parents.shape == (36,)
    for split in ("train", "test"):
        np.testing.assert_array_equal(by_sub.super_parents[getattr(by_sub, f"{split}_super_labels")],
                                      getattr(by_super, f"{split}_super_labels"))


def mean_pixel_distances(images, classes, catalogue, rng, num_pairs=40000):
    """Mean |a - b| over pixels of photo pairs: same class; same sub-family, other class; same super-class,
    other sub-family; other super-class."""
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
    same_class = np.array([(i, j) for c in np.unique(classes) for i in np.flatnonzero(classes == c)
                           for j in np.flatnonzero(classes == c) if i < j])
    first, second = rng.integers(0, len(images), size=(2, num_pairs))
    sub, sup = catalogue.sub_family[classes], catalogue.super_class[classes]
    groups = {
        "class": same_class,
        "sub_family": np.stack([first, second], 1)[(sub[first] == sub[second]) & (classes[first] != classes[second])],
        "super_class": np.stack([first, second], 1)[(sup[first] == sup[second]) & (sub[first] != sub[second])],
        "other": np.stack([first, second], 1)[sup[first] != sup[second]],
    }
    return {name: float(np.abs(pixels[p[:, 0]] - pixels[p[:, 1]]).mean()) for name, p in groups.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_photos_are_8_bit_and_alike_in_the_order_of_the_hierarchy(seed):
    config = small_config(**{"dataset.seed": seed})
    catalogue, images, classes = synthetic_sop.generate(config.dataset)
    assert images.dtype == np.uint8 and images.shape[1:] == (36, 36, 3)
    assert images.min() == 0 and images.max() == 255 and 80 < images.mean() < 200
    distances = mean_pixel_distances(images, classes, catalogue, np.random.default_rng(seed))
    ordered = [distances[name] for name in ("class", "sub_family", "super_class", "other")]
    assert ordered == sorted(ordered) and ordered[-1] - ordered[0] > 0.02, distances

    # The batches carry pixels in 0..255 (data.py): interpolated f32 train crops, u8 eval crops.
    dataset = load(config)
    batch = next(dataset.train_batches(0))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (16, 32, 32, 3)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 255.0 and batch["image"].max() > 1.0
    batch = next(dataset.eval_batches("test"))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (16, 32, 32, 3)


def test_class_sizes_are_skewed_like_sop():
    sizes = synthetic_sop.class_sizes(np.random.default_rng(0), 1920, (2, 12), 0.8)
    counts = np.bincount(sizes, minlength=13)
    assert sizes.min() == 2 and sizes.max() == 12
    assert np.all(np.diff(counts[2:]) < 0.1 * len(sizes))  # no size clearly more common than a smaller one
    assert counts[2] > 3 * counts[8] and 4.6 < sizes.mean() < 5.4
    assert np.mean(sizes <= 6) > 0.7


def test_validation_classes_are_held_out_of_training():
    whole = load(small_config()).info
    held = load(small_config(**{"dataset.num_val_classes": 10})).info
    train_classes, val_classes = data.validation_split(whole.num_train_classes, 10, 0)
    assert held.num_train_classes == whole.num_train_classes - 10
    assert held.num_eval_examples["train"] + held.num_eval_examples["val"] == whole.num_eval_examples["train"]
    np.testing.assert_array_equal(held.val_super_labels, whole.train_super_labels[val_classes])
    np.testing.assert_array_equal(held.train_super_labels, whole.train_super_labels[train_classes])
    np.testing.assert_array_equal(held.super_parents, whole.super_parents)
    with pytest.raises(config_checks.ConfigError, match="num_val_classes.*synthetic_sop"):
        load(small_config(**{"dataset.num_val_classes": whole.num_train_classes}))


@pytest.mark.parametrize("field, value", [
    ("num_super_classes", 1), ("sub_families_per_super_class", 0), ("classes_per_sub_family", 1),
    ("images_per_class", (1, 5)), ("images_per_class", (6, 5)), ("image_count_decay", 0.0),
    ("super_level", "products"),
])
def test_each_field_is_checked(field, value):
    config = small_config(**{f"dataset.synthetic_sop.{field}": value})
    with pytest.raises(config_checks.ConfigError, match=rf"^config\.dataset\.synthetic_sop\.{field}: "):
        config_checks.validate_config(config, device_count=2, process_count=1)


@pytest.mark.slow
def test_the_config_trains_with_ground_truth_sub_families(tmp_path):
    """configs/synthetic_sop.py through train_and_evaluate, small: level 1 is the 12 sub-families."""
    config = small_config(**{
        "dataset.synthetic_sop.num_super_classes": 4, "dataset.synthetic_sop.images_per_class": (2, 6),
        "dataset.image_size": 16, "dataset.resize_size": 18, "dataset.num_val_classes": 8,
        "model.width": 0.125, "model.embedding_dim": 16, "num_epochs": 1, "batch_size": 32,
        "optim.warmup_epochs": 0, "hpl.ground_truth_level1": True})
    train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["selected_on"] == "val/map@r"
    assert saved["last"]["hierarchy/level_1_nmi"] == pytest.approx(1.0)
    # 36 training products less 8 validation ones, in 12 sub-families (4 super-classes would give 7 a group).
    assert saved["refreshes"][0]["hierarchy/level_1_group_size_mean"] == pytest.approx(28 / 12)
    assert {"recall@100", "super/map@r", "val/map@r"} <= set(saved["last"])
