"""The tf.data + TFDS input pipeline on data the tests make.

TFDS benchmarks run on tiny datasets served through `tfds.testing.mock_data` (their real builders' features,
our records, TFDS sub-split syntax honoured); In-Shop runs on a tiny tree prepared by the project's builder for
real; image folders are written to tmp dirs. Every image is one flat colour that encodes its id, so a batch tells
which examples it holds after cropping, flipping and normalising.
"""
import json
import os
import re
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import cars as cars_config
from configs import cifar100 as cifar100_config
from configs import cub as cub_config
from configs import image_folder as image_folder_config
from configs import inshop as inshop_config
from configs import sop as sop_config
from hpl_jax import data
from hpl_jax.data import cars_makes
from hpl_jax.data import input_pipeline
from hpl_jax.data import inshop
from hpl_jax.models import convert as convert_weights
from hpl_jax.trainer import config_checks
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------------------------------------
# Helpers.

def colour_of(example_id: int) -> np.ndarray:
    return np.array([8 + 16 * (example_id % 16), 8 + 16 * (example_id // 16), 128], np.uint8)


def flat_image(example_id: int, shape=(20, 26)) -> np.ndarray:
    return np.broadcast_to(colour_of(example_id), tuple(shape) + (3,)).copy()


def jpeg_of(example_id: int, shape=(20, 26)) -> bytes:
    return input_pipeline.encode_jpeg(flat_image(example_id, shape))


def ids_of(images: np.ndarray) -> np.ndarray:
    """The example ids of flat-colour images u8[n, H, W, 3] (RGB pixels, as the batches carry them)."""
    rgb = images.mean(axis=(1, 2), dtype=np.float64)
    return np.round((rgb[:, 0] - 8) / 16).astype(int) + 16 * np.round((rgb[:, 1] - 8) / 16).astype(int)


def tiny(config_module, **overrides):
    config = config_module.get_config()
    # One epoch: no next epoch is drawn ahead on a thread (TfDataset.train_batches) that could outlive the
    # test's tfds.testing.mock_data, whose patches are global.
    config.num_epochs = 1
    config.dataset.image_size = 16
    config.dataset.resize_size = 18
    config.dataset.shuffle_buffer = 64
    # These tiny networks start from random weights, which the recipe's frozen BatchNorm refuses (config_checks);
    # training with frozen BatchNorm from pretrained weights: tests/trainer/test_pretraining.py.
    config.model.bn_frozen = False
    config.update_from_flattened_dict(overrides)
    return config


def train_epoch(dataset, epoch=0, start_step=0):
    batches = list(dataset.train_batches(epoch, start_step))
    return batches, np.concatenate([ids_of(b["image"]) for b in batches]) if batches else np.zeros(0, int)


def eval_ids(dataset, split):
    """(ids of the masked-in examples, number of batches, the batches)."""
    batches = list(dataset.eval_batches(split))
    ids = np.concatenate([ids_of(b["image"])[b["mask"]] for b in batches])
    return ids, len(batches), batches


def split_index_of_image(host_results):
    """{the batches' 'index': image id} over every host's eval batches; checks each index appears once, 0..n-1."""
    pairs = [(index, image) for _, _, batches in host_results for b in batches
             for index, image in zip(b["index"][b["mask"]], ids_of(b["image"])[b["mask"]])]
    assert sorted(index for index, _ in pairs) == list(range(len(pairs)))
    return dict(pairs)


def fake_tfds(records):
    """mock_data serving `records` ({tfds_split: [feature dict]}) through the builder's real features."""
    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del read_config, shuffle_files
        features = decoders.extract_features(self.info.features)
        sizes = {name: types.SimpleNamespace(num_examples=len(rows)) for name, rows in records.items()}
        rows = [row for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
                for row in records[part.splitname][part.from_:part.to]]
        serialized = [features.serialize_example({key: row[key] for key in features.keys()}) for row in rows]
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(serialized, tf.string, shape=[len(serialized)]))
        return ds.map(lambda s: features.deserialize_example(s, decoders=decoders.decoders))

    return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset)


def make_image_folder(root, classes, images_per_class, corrupt_in=None):
    """ROOT/<class>/<id>.jpg; returns {id: class name}."""
    owner, next_id = {}, 0
    for name, count in zip(classes, images_per_class):
        os.makedirs(os.path.join(root, name))
        for _ in range(count):
            with open(os.path.join(root, name, f"{next_id:03d}.jpg"), "wb") as f:
                f.write(jpeg_of(next_id, (20 + next_id % 5, 26)))
            owner[next_id] = name
            next_id += 1
    if corrupt_in:
        with open(os.path.join(root, corrupt_in, "broken.jpg"), "wb") as f:
            f.write(jpeg_of(0)[:40])
    with open(os.path.join(root, classes[0], "notes.txt"), "w") as f:
        f.write("not an image")
    return owner


# ----------------------------------------------------------------------------------------------------------
# Pixels.

def host_normalize(images, mean, std, color_order="rgb", pixel_scale=1.0):
    """The host-side float32 normalisation the batches had before the device took it over (data.normalize_pixels)."""
    images = images.astype(np.float32) * (pixel_scale / 255.0)
    if color_order == "bgr":
        images = images[..., ::-1]
    return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@pytest.mark.parametrize("settings", [
    dict(mean=tuple(MEAN), std=tuple(STD), color_order="rgb", pixel_scale=1.0),  # ImageNet ResNets
    dict(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), color_order="bgr", pixel_scale=255.0),  # BN-Inception
])
def test_device_normalisation_equals_the_former_host_normalisation(settings):
    import functools

    import jax

    dataset_config = types.SimpleNamespace(**settings)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 5, 3)).astype(np.uint8)
    crops = rng.uniform(0.0, 255.0, (2, 4, 5, 3)).astype(np.float32)  # the embedded datasets' train crops
    on_device = jax.jit(functools.partial(data.normalize_pixels, dataset_config=dataset_config))
    for images in (pixels, crops):
        expected = host_normalize(images, **settings)
        # XLA may divide by a constant as a multiplication by its reciprocal: the last bit may differ.
        np.testing.assert_allclose(np.asarray(on_device(images)), expected, rtol=2e-7, atol=1e-6)
    formula = np.asarray(on_device(pixels))
    if settings["color_order"] == "rgb":
        np.testing.assert_allclose(formula, (pixels / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(formula, pixels[..., ::-1] - np.array([104.0, 117.0, 128.0]), atol=1e-4)
    with pytest.raises(ValueError, match="color_order"):
        data.normalize_pixels(pixels, types.SimpleNamespace(**{**settings, "color_order": "hsv"}))


def test_eval_image_is_resize_then_centre_crop():
    """Shorter side 40 -> 20, centre crop 16, on a linear ramp: exact at every interior pixel to one u8 level (PIL
    rounds after each of its two passes)."""
    y, x = np.mgrid[0:40, 0:60]
    ramp = np.repeat((2 * y + x + 10)[..., None], 3, axis=-1).astype(np.uint8)
    png = tf.io.encode_png(ramp).numpy()
    out = input_pipeline.eval_image(tf.constant(png), image_size=16, resize_size=20).numpy()[..., 0]
    # Resized image: pixel (r, c) covers original rows [2r, 2r + 2); the crop starts at (2, 7) of 20 x 30.
    i, j = np.mgrid[0:16, 0:16]
    centre_y, centre_x = 2 * (2 + i + 0.5), 2 * (7 + j + 0.5)
    expected = 2 * (centre_y - 0.5) + (centre_x - 0.5) + 10
    assert out.dtype == np.uint8
    np.testing.assert_allclose(out[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1.0 + 1e-3)


def test_fused_jpeg_crop_equals_decode_then_crop():
    y, x = np.mgrid[0:60, 0:80]
    smooth = np.stack([2 * y + 40, 2 * x + 20, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    jpeg = input_pipeline.encode_jpeg(smooth, quality=100)
    png = tf.io.encode_png(smooth).numpy()
    seed = tf.constant([3, 4], tf.int64)
    options = dict(image_size=24, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), horizontal_flip=True)
    from_jpeg = input_pipeline.train_image(tf.constant(jpeg), seed, **options).numpy().astype(np.float32)
    from_png = input_pipeline.train_image(tf.constant(png), seed, **options).numpy().astype(np.float32)
    assert np.abs(from_jpeg - from_png).max() < 4.0
    assert from_png.std() > 5.0  # a real crop of the gradient, not a flat patch
    eval_jpeg = input_pipeline.eval_image(tf.constant(jpeg), image_size=24, resize_size=28).numpy().astype(np.float32)
    eval_png = input_pipeline.eval_image(tf.constant(png), image_size=24, resize_size=28).numpy().astype(np.float32)
    assert np.abs(eval_jpeg - eval_png).max() < 4.0


def test_resize_window_is_pils_resize_and_tfs_antialiased_kernel_to_one_level():
    """PIL's bilinear resize of the box (what torchvision runs), and within one u8 level of TF's antialiased resize
    of the whole image, down and up; a fractional window samples a ramp where it should."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 41, 3)).astype(np.uint8)
    image = tf.constant(pixels)
    for size in [(16, 16), (45, 20), (24, 70)]:
        out = input_pipeline.resize_window(image, input_pipeline.whole(image), size).numpy()
        assert out.dtype == np.uint8 and out.shape == (*size, 3)
        np.testing.assert_array_equal(out, np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BILINEAR)))
        reference = tf.image.resize(image, size, antialias=True).numpy()
        assert np.abs(out - reference).max() <= 0.5 + 1.0
    window = tf.constant([2.25, 3.5, 20.0, 30.0])
    out = input_pipeline.resize_window(image, window, (10, 12)).numpy()
    boxed = Image.fromarray(pixels).resize((12, 10), Image.BILINEAR, box=(3.5, 2.25, 33.5, 22.25))
    np.testing.assert_array_equal(out, np.asarray(boxed))
    # A linear ramp's window [5.5, 25.5) x [3.25, 35.25) at 20 x 32: output (i, j) is the ramp at (5.5 + i + 0.5,
    # 3.25 + j + 0.5) (one input pixel per output pixel: the kernel is bilinear interpolation), to one level: PIL
    # rounds to u8 after each of its two passes.
    y, x = np.mgrid[0:30, 0:41]
    ramp = tf.constant(np.repeat((3 * y + 2 * x + 5)[..., None], 3, axis=-1).astype(np.uint8))
    out = input_pipeline.resize_window(ramp, tf.constant([5.5, 3.25, 20.0, 32.0]), (20, 32)).numpy()[..., 0]
    i, j = np.mgrid[0:20, 0:32]
    np.testing.assert_allclose(out, 3 * (5.5 + i) + 2 * (3.25 + j) + 5, atol=1.0 + 1e-3)
    # A window a float rounding puts past the edge is cut at the edge, not refused.
    past = input_pipeline.resize_window(image, tf.constant([0.0, 0.0, 30.00001, 41.00001]), (16, 16)).numpy()
    np.testing.assert_array_equal(past, input_pipeline.resize_window(image, input_pipeline.whole(image),
                                                                     (16, 16)).numpy())


def test_a_jpeg_crop_decoded_at_a_reduced_dct_scale_agrees_with_the_full_decode():
    """A crop at least twice the output a side decodes at 1/2, 1/4 or 1/8 scale: on a smooth picture the resized
    crop is the full decode's to within JPEG rounding (the full decode's own difference to the PNG)."""
    y, x = np.mgrid[0:240, 0:320]
    smooth = np.stack([0.6 * y + 20, 0.5 * x + 30, 90 + 0.2 * (x - y)], axis=-1).astype(np.uint8)
    jpeg, png = tf.constant(input_pipeline.encode_jpeg(smooth, quality=95)), tf.constant(tf.io.encode_png(smooth))

    def crop(image_bytes, window, min_side):
        pixels, inside = input_pipeline.decode_window_at_scale(image_bytes, lambda shape: tf.constant(window),
                                                               min_side)
        return pixels.shape, input_pipeline.resize_window(pixels, inside, (24, 24)).numpy().astype(np.float32)

    # Scales 1/8 (rows 13 // 8 to ceil(213 / 8): the decode covers the window), 1/4, then 1 (40 < 2 x 24).
    for window, scaled_rows in [([13, 21, 200, 250], 26), ([40, 7, 99, 130], 25), ([3, 5, 40, 80], 40)]:
        shape, scaled = crop(jpeg, window, 24)
        full_shape, full = crop(jpeg, window, 10 ** 6)  # never reduced
        _, exact = crop(png, window, 24)
        assert shape[0] == scaled_rows and full_shape[0] == window[2]
        jpeg_error = np.abs(full - exact).mean()
        assert np.abs(scaled - exact).mean() <= 1.5 * max(jpeg_error, 0.5)
        assert np.abs(scaled - full).mean() <= 1.5 * max(jpeg_error, 0.5) and np.abs(scaled - full).max() < 4.0


def test_random_crop_windows_respect_scale_and_ratio():
    shape = tf.constant([120, 160], tf.int32)
    windows = np.array([input_pipeline.random_crop_window(shape, tf.constant([7, s], tf.int64),
                                                          scale=(0.08, 1.0), ratio=(0.75, 4 / 3)).numpy()
                        for s in range(40)])
    top, left, height, width = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 120).all() and (left + width <= 160).all()
    area = height * width / (120 * 160)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    whole = (height == 120) & (width == 160)  # TF's fallback after 10 failed draws
    ratio = (width / height)[~whole]
    assert ratio.min() >= 0.75 * 0.95 and ratio.max() <= 4 / 3 * 1.05
    assert len({tuple(w) for w in windows}) > 30
    again = input_pipeline.random_crop_window(shape, tf.constant([7, 0], tf.int64), scale=(0.08, 1.0),
                                              ratio=(0.75, 4 / 3)).numpy()
    np.testing.assert_array_equal(again, windows[0])


# ----------------------------------------------------------------------------------------------------------
# Image folders.

def test_image_folder_split_labels_shapes_and_a_corrupt_jpeg(tmp_path):
    root = str(tmp_path)
    owner = make_image_folder(root, ["ant", "bee", "cat", "dog", "eel"], [4, 3, 4, 3, 2], corrupt_in="bee")
    config = tiny(image_folder_config, **{"dataset.data_dir": root})
    dataset = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=3)
    info = dataset.info
    # First half of 5 sorted classes, rounded up, trains; the broken file counts until it is read.
    assert info.num_train_classes == 3 and info.num_train_examples == 12
    assert info.eval_splits == ("test",) and info.num_eval_examples == {"test": 5, "train": 12}
    assert info.image_shape == (16, 16, 3) and info.train_super_labels is None

    batches, ids = train_epoch(dataset)
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        expected = [["ant", "bee", "cat"].index(owner[i]) for i in ids_of(batch["image"])]
        np.testing.assert_array_equal(batch["label"], expected)
    # The broken JPEG is skipped and counted; the epoch keeps its 3 batches by reading on into a second pass.
    assert dataset.num_skipped_images == 1
    assert set(ids) == {i for i, name in owner.items() if name in ("ant", "bee", "cat")}

    ids, num_batches, batches = eval_ids(dataset, "test")
    assert num_batches == 2 and sorted(ids) == [i for i, name in owner.items() if name in ("dog", "eel")]
    np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False])
    assert batches[-1]["mask"].dtype == bool and batches[-1]["label"].dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:5], [0, 0, 0, 1, 1])
    ids, num_batches, batches = eval_ids(dataset, "train")
    assert num_batches == 4 and len(ids) == 11 and dataset.num_skipped_images == 2
    np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False])


def test_image_folder_class_lists_and_hierarchy(tmp_path):
    root = str(tmp_path)
    make_image_folder(root, ["ant", "bee", "cat", "dog", "eel"], [2, 2, 2, 2, 2])
    with open(os.path.join(root, "train_classes.txt"), "w") as f:
        f.write("eel\nant\n\n")
    with open(os.path.join(root, "hierarchy.csv"), "w") as f:
        f.write("class,super_class\nant,insect\nbee,insect\ncat,mammal\ndog,mammal\neel,fish\n")
    config = tiny(image_folder_config, **{"dataset.data_dir": root, "batch_size": 2})
    info = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2).info
    # Train: ant, eel (sorted); test: the rest. Super-class ids follow the sorted names fish, insect, mammal.
    assert info.num_train_classes == 2 and info.num_eval_examples["test"] == 6
    np.testing.assert_array_equal(info.train_super_labels, [1, 0])
    np.testing.assert_array_equal(info.test_super_labels, [1, 2, 2])

    with open(os.path.join(root, "test_classes.txt"), "w") as f:
        f.write("ant\ncat\n")
    with pytest.raises(ValueError, match="disjoint"):
        input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    with open(os.path.join(root, "test_classes.txt"), "w") as f:
        f.write("cat\nwolf\n")
    with pytest.raises(ValueError, match="wolf"):
        input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    with open(os.path.join(root, "test_classes.txt"), "w") as f:
        f.write("cat\ndog\n")
    train, test, _, _ = input_pipeline.image_folder_splits(root)
    assert train.num_classes == 2 and test.num_classes == 2  # bee is in neither list
    with open(os.path.join(root, "hierarchy.csv"), "w") as f:
        f.write("ant,insect\ncat,mammal\ndog,mammal\n")
    with pytest.raises(ValueError, match="eel"):
        input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)


def test_image_folder_errors_name_the_fix(tmp_path):
    config = tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="data_dir.*not a directory"):
        input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    make_image_folder(str(tmp_path / "few"), ["a", "b", "c"], [2, 2, 2])
    config.dataset.data_dir = str(tmp_path / "few")
    with pytest.raises(ValueError, match="at least 4"):
        input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)


@pytest.mark.parametrize("process_count", [2, 3])
def test_image_folder_host_sharding(tmp_path, process_count):
    root = str(tmp_path)
    owner = make_image_folder(root, ["a", "b", "c", "d"], [9, 8, 7, 6])
    config = tiny(image_folder_config, **{"dataset.data_dir": root})
    hosts = [input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2,
                                           process_index=p, process_count=process_count)
             for p in range(process_count)]
    steps = data.steps_per_epoch(17, 2 * process_count)
    train_ids = [train_epoch(host)[1] for host in hosts]
    assert all(len(ids) == 2 * steps for ids in train_ids)
    everything = np.concatenate(train_ids)
    assert len(set(everything)) == len(everything) and {owner[i] for i in everything} <= {"a", "b"}
    test = [eval_ids(host, "test") for host in hosts]
    assert len({num_batches for _, num_batches, _ in test}) == 1
    assert sorted(np.concatenate([ids for ids, _, _ in test])) == [i for i, n in owner.items() if n in "cd"]
    # The split index of an image is the same whichever hosts read it.
    one_host = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    assert split_index_of_image(test) == split_index_of_image([eval_ids(one_host, "test")])


def test_train_order_is_seeded_and_resumable(tmp_path):
    make_image_folder(str(tmp_path), ["a", "b", "c", "d"], [6, 6, 2, 2])
    dataset = input_pipeline.create_dataset(tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path)}),
                                            local_batch_size=4, local_eval_batch_size=4)
    first, ids = train_epoch(dataset, epoch=3)
    again, ids_again = train_epoch(dataset, epoch=3)
    np.testing.assert_array_equal(ids, ids_again)
    np.testing.assert_array_equal(np.stack([b["image"] for b in first]), np.stack([b["image"] for b in again]))
    _, other_epoch = train_epoch(dataset, epoch=4)
    assert not np.array_equal(ids, other_epoch) and sorted(ids) == sorted(other_epoch)
    resumed, _ = train_epoch(dataset, epoch=3, start_step=1)
    assert len(resumed) == 2
    for original, replayed in zip(first[1:], resumed):
        np.testing.assert_array_equal(original["image"], replayed["image"])  # same crops and flips
        np.testing.assert_array_equal(original["label"], replayed["label"])


def test_the_next_epoch_is_drawn_ahead_and_equals_a_fresh_pipeline(tmp_path, monkeypatch):
    """Once an epoch's last batch is out, the next epoch's pipeline is built and its first batch drawn on a
    background thread; the batches are those a pipeline built for that epoch alone gives (resumption needs it)."""
    import threading

    make_image_folder(str(tmp_path), ["a", "b", "c", "d"], [6, 6, 2, 2])
    config = tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path), "num_epochs": 3})
    built, train_iterator = [], input_pipeline.TfDataset._train_iterator

    def recorded(self, epoch, start_step):
        built.append((epoch, start_step, threading.current_thread() is threading.main_thread()))
        return train_iterator(self, epoch, start_step)

    monkeypatch.setattr(input_pipeline.TfDataset, "_train_iterator", recorded)
    dataset = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=4)
    epochs = [train_epoch(dataset, epoch) for epoch in range(3)]
    # Epochs 1 and 2 were built on the background thread; nothing is drawn beyond the last epoch (num_epochs).
    assert built == [(0, 0, True), (1, 0, False), (2, 0, False)] and dataset._ahead is None
    for epoch, (batches, ids) in enumerate(epochs):
        fresh = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=4)
        fresh_batches, fresh_ids = train_epoch(fresh, epoch)
        np.testing.assert_array_equal(ids, fresh_ids)
        np.testing.assert_array_equal(np.stack([b["image"] for b in batches]),
                                      np.stack([b["image"] for b in fresh_batches]))
    # A resume mid-epoch (or any other epoch than the one drawn ahead) builds its own pipeline.
    del built[:]
    train_epoch(dataset, 0)
    resumed, _ = train_epoch(dataset, 1, start_step=1)
    dataset._ahead._thread.join()  # epoch 2, drawn ahead again
    assert sorted(built) == [(0, 0, True), (1, 0, False), (1, 1, True), (2, 0, False)]
    for original, replayed in zip(epochs[1][0][1:], resumed):
        np.testing.assert_array_equal(original["image"], replayed["image"])


def test_an_error_drawing_ahead_is_raised_where_the_batches_are_asked_for():
    def broken():
        raise data.DataError("no images")

    ahead = input_pipeline.EpochAhead(5, broken)
    with pytest.raises(data.DataError, match="no images"):
        ahead.batches()
    ahead = input_pipeline.EpochAhead(5, lambda: iter([{"x": 1}, {"x": 2}]))
    assert [batch["x"] for batch in ahead.batches()] == [1, 2]


def cached(config, **overrides):
    return tiny(config, **{"dataset.cache_decoded": True, **overrides})


def test_the_decoded_cache_gives_the_files_crops(tmp_path):
    """Images no larger than cache_shorter_side: every batch equals the files' pipeline's, pixel for pixel; resized
    into the cache, the same images in the same order, the same flat colours up to rounding."""
    make_image_folder(str(tmp_path), ["a", "b", "c", "d"], [6, 6, 2, 2])
    settings = {"dataset.data_dir": str(tmp_path)}
    from_files = input_pipeline.create_dataset(tiny(image_folder_config, **settings), local_batch_size=4,
                                               local_eval_batch_size=4)
    kept = input_pipeline.create_dataset(cached(image_folder_config, **settings, **{"dataset.cache_shorter_side": 32}),
                                         local_batch_size=4, local_eval_batch_size=4)
    resized = input_pipeline.create_dataset(cached(image_folder_config, **settings,
                                                   **{"dataset.cache_shorter_side": 16}),
                                            local_batch_size=4, local_eval_batch_size=4)
    for epoch in (0, 1):
        files_batches, files_ids = train_epoch(from_files, epoch)
        for dataset, exact in ((kept, True), (resized, False)):
            batches, ids = train_epoch(dataset, epoch)
            np.testing.assert_array_equal(ids, files_ids)
            for batch, files_batch in zip(batches, files_batches):
                np.testing.assert_array_equal(batch["label"], files_batch["label"])
                difference = np.abs(batch["image"].astype(int) - files_batch["image"].astype(int)).max()
                assert difference == 0 if exact else difference <= 1
    assert kept.decoded_images().num_bytes == sum(20 * 26 * 3 + (i % 5) * 26 * 3 for i in range(12))
    assert (resized.decoded_images().shapes.min(axis=1) == 16).all()


def test_a_crop_from_the_resized_cache_matches_the_file_up_to_the_resize():
    """On a smooth picture (no detail above the cache's resolution) the crops drawn from a cache at half size are
    those of the JPEG for the same seeds, within rounding."""
    y, x = np.mgrid[0:120, 0:160]
    smooth = np.stack([y + 40, 0.8 * x + 20, 200 - 0.5 * y], axis=-1).astype(np.uint8)
    jpeg = input_pipeline.encode_jpeg(smooth, quality=95)
    records = tf.data.Dataset.from_tensor_slices({"image": [jpeg], "label": [0]})
    cache = input_pipeline.decode_into_cache(records, 1, shorter_side=60, max_bytes=10 ** 6, what="a test")
    assert cache.shapes.tolist() == [[60, 80]] and cache.full_shapes.tolist() == [[120, 160]]
    options = dict(image_size=24, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), horizontal_flip=True)
    for step in range(6):
        seed = tf.constant([5, step], tf.int64)
        from_cache = input_pipeline.cached_train_image(cache, tf.constant(0, tf.int64), seed, **options).numpy()
        from_file = input_pipeline.train_image(tf.constant(jpeg), seed, **options).numpy()
        assert np.abs(from_cache.astype(float) - from_file).mean() < 1.5


def test_the_decoded_cache_fills_once_and_a_resumed_run_sees_the_same_crops(tmp_path, monkeypatch):
    make_image_folder(str(tmp_path), ["a", "b", "c", "d"], [6, 6, 2, 2])
    fills, decode_into_cache = [], input_pipeline.decode_into_cache

    def counted(*args, **kwargs):
        fills.append(1)
        return decode_into_cache(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, "decode_into_cache", counted)
    config = cached(image_folder_config, **{"dataset.data_dir": str(tmp_path), "dataset.cache_shorter_side": 16})
    dataset = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=4)
    epochs = [train_epoch(dataset, epoch) for epoch in (0, 1, 2)]
    assert len(fills) == 1 and not np.array_equal(epochs[0][1], epochs[1][1])
    restarted = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=4)
    resumed, _ = train_epoch(restarted, 1, start_step=1)
    assert len(fills) == 2 and len(resumed) == 2
    for original, replayed in zip(epochs[1][0][1:], resumed):
        np.testing.assert_array_equal(original["image"], replayed["image"])
        np.testing.assert_array_equal(original["label"], replayed["label"])


def test_the_decoded_cache_of_tfds_hosts_holds_their_blocks_and_skips_a_broken_image():
    records, owner = benchmark_records("cub", copies=3)
    broken = int(ids_of(tf.io.decode_jpeg(records["train"][0]["image"]).numpy()[None])[0])
    assert owner[broken] in TRAIN_CLASSES["cub"]
    records["train"][0]["image"] = records["train"][0]["image"][:40]  # cut short: fails to decode
    with fake_tfds(records):
        hosts = [input_pipeline.create_dataset(cached(cub_config), local_batch_size=2, local_eval_batch_size=2,
                                               process_index=p, process_count=2) for p in range(2)]
        train_ids = [train_epoch(host)[1] for host in hosts]
        caches = [host.decoded_images() for host in hosts]
    num_train = hosts[0].info.num_train_examples
    assert sum(len(cache.slots) for cache in caches) == num_train
    assert sum(len(cache.offsets) for cache in caches) == num_train - 1
    assert sum(host.num_skipped_images for host in hosts) == 1
    everything = np.concatenate(train_ids)
    assert all(len(ids) == 2 * data.steps_per_epoch(num_train, 4) for ids in train_ids)
    assert broken not in everything and {owner[i] for i in everything} <= set(TRAIN_CLASSES["cub"])


def test_the_decoded_cache_refuses_a_split_over_its_memory_budget(tmp_path):
    make_image_folder(str(tmp_path), ["a", "b", "c", "d"], [6, 6, 2, 2])
    config = cached(image_folder_config, **{"dataset.data_dir": str(tmp_path), "dataset.cache_max_gb": 5e-6})
    dataset = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=4)
    with pytest.raises(data.DataError, match=r"config.dataset.cache_decoded: the 12 training images .* need more "
                                             r"than config.dataset.cache_max_gb = 5e-06 GB .* set cache_decoded=False"):
        train_epoch(dataset)


def test_class_balanced_sampler_groups_classes(tmp_path):
    make_image_folder(str(tmp_path), ["a", "b", "c", "d", "e", "f", "g", "h"], [3, 5, 4, 2, 1, 1, 1, 1])
    config = tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path), "dataset.sampler": "class_balanced",
                                          "dataset.samples_per_class": 2})
    dataset = input_pipeline.create_dataset(config, local_batch_size=4, local_eval_batch_size=4)
    batches, _ = train_epoch(dataset)
    assert len(batches) == data.steps_per_epoch(14, 4)
    for batch in batches:
        pairs = batch["label"].reshape(-1, 2)
        np.testing.assert_array_equal(pairs[:, 0], pairs[:, 1])
    with pytest.raises(ValueError, match="samples_per_class"):
        input_pipeline.create_dataset(config, local_batch_size=3, local_eval_batch_size=4)


# ----------------------------------------------------------------------------------------------------------
# TFDS benchmarks through tfds.testing.mock_data.

# name -> (config module, {tfds split: original class ids of its records}, {class id: super-class id})
CARS_MAKE = {0: "AM General", 1: "Acura", 13: "Audi", 97: "Eagle", 98: "FIAT", 150: "Lamborghini", 195: "smart"}
BENCHMARKS = {
    "cub": (cub_config, {"train": [0, 3, 50, 99, 100, 120, 199], "test": [0, 3, 50, 99, 100, 120, 199]}, None),
    "cars": (cars_config, {"train": [0, 1, 13, 97, 98, 150, 195], "test": [1, 13, 97, 98, 150]},
             {c: cars_makes.MAKES.index(make) for c, make in CARS_MAKE.items()}),
    "sop": (sop_config, {"train": [0, 5, 7, 7], "test": [11318, 11320, 22633, 11320]},
            {0: 0, 5: 0, 7: 3, 11318: 3, 11320: 5, 22633: 11}),
    "cifar100": (cifar100_config, {"train": [2, 10, 49, 50, 77, 99], "test": [2, 10, 49, 50, 77, 99]},
                 {2: 14, 10: 3, 49: 10, 50: 16, 77: 13, 99: 18}),
}
TRAIN_CLASSES = {"cub": [0, 3, 50, 99], "cars": [0, 1, 13, 97], "sop": [0, 5, 7], "cifar100": [2, 10, 49]}
TEST_CLASSES = {"cub": [100, 120, 199], "cars": [98, 150, 195], "sop": [11318, 11320, 22633],
                "cifar100": [50, 77, 99]}


def benchmark_records(name, copies=2, layout=None, supers=None):
    """Records for the fake TFDS dataset: each listed class id gets `copies` images; returns (records, owner).
    `layout` and `supers` replace the BENCHMARKS entry's."""
    _, default_layout, default_supers = BENCHMARKS[name]
    layout, supers = layout or default_layout, supers or default_supers
    label_key = input_pipeline.BENCHMARKS[name].label_key
    super_key = input_pipeline.BENCHMARKS[name].super_key
    records, owner, next_id = {}, {}, 0
    for split, classes in layout.items():
        records[split] = []
        for class_id in classes:
            for _ in range(copies):
                image = (tf.io.encode_png(flat_image(next_id, (32, 32))).numpy() if name == "cifar100"
                         else jpeg_of(next_id))
                row = {"image": image, label_key: class_id}
                if super_key:
                    row[super_key] = supers[class_id]
                records[split].append(row)
                owner[next_id] = class_id
                next_id += 1
    return records, owner


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_tfds_benchmark_splits_labels_and_supers(name):
    config_module, _, supers = BENCHMARKS[name]
    records, owner = benchmark_records(name)
    train_classes, test_classes = TRAIN_CLASSES[name], TEST_CLASSES[name]
    num_train = sum(c in train_classes for c in owner.values())
    with fake_tfds(records):
        dataset = input_pipeline.create_dataset(tiny(config_module), local_batch_size=4, local_eval_batch_size=4)
        info = dataset.info
        assert info.name == name and info.num_train_classes == len(train_classes)
        assert info.num_train_examples == num_train
        assert info.num_eval_examples["test"] == sum(c in test_classes for c in owner.values())
        if supers is None:
            assert info.train_super_labels is None and info.test_super_labels is None
        else:
            np.testing.assert_array_equal(info.train_super_labels, [supers[c] for c in train_classes])
            np.testing.assert_array_equal(info.test_super_labels, [supers[c] for c in test_classes])
            assert info.train_super_labels.dtype == np.int32

        batches, ids = train_epoch(dataset)
        assert len(batches) == num_train // 4 and len(set(ids)) == len(ids)
        for batch in batches:
            assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].dtype == np.int32
            # Class-disjoint, and labels are the rank of the original class id among the training classes.
            expected = [train_classes.index(owner[i]) for i in ids_of(batch["image"])]
            np.testing.assert_array_equal(batch["label"], expected)
        ids, _, batches = eval_ids(dataset, "test")
        assert sorted(ids) == sorted(i for i, c in owner.items() if c in test_classes)
        labels = np.concatenate([b["label"][b["mask"]] for b in batches])
        np.testing.assert_array_equal(labels, [test_classes.index(owner[i]) for i in ids])
        num_test = info.num_eval_examples["test"]
        assert batches[-1]["mask"].sum() == num_test - 4 * (len(batches) - 1) and len(batches) == -(-num_test // 4)


@pytest.mark.parametrize("process_count", [2, 3])
def test_tfds_host_sharding(process_count):
    records, owner = benchmark_records("cub", copies=3)
    with fake_tfds(records):
        hosts = [input_pipeline.create_dataset(tiny(cub_config), local_batch_size=2, local_eval_batch_size=2,
                                               process_index=p, process_count=process_count)
                 for p in range(process_count)]
        num_train = hosts[0].info.num_train_examples
        steps = data.steps_per_epoch(num_train, 2 * process_count)
        train_ids = [train_epoch(host)[1] for host in hosts]
        assert all(len(ids) == 2 * steps for ids in train_ids)
        everything = np.concatenate(train_ids)
        assert len(set(everything)) == len(everything)
        assert {owner[i] for i in everything} <= set(TRAIN_CLASSES["cub"])
        for split, classes in (("test", TEST_CLASSES["cub"]), ("train", TRAIN_CLASSES["cub"])):
            results = [eval_ids(host, split) for host in hosts]
            assert len({num_batches for _, num_batches, _ in results}) == 1
            assert sorted(np.concatenate([ids for ids, _, _ in results])) == sorted(
                i for i, c in owner.items() if c in classes)
            one_host = input_pipeline.create_dataset(tiny(cub_config), local_batch_size=2, local_eval_batch_size=2)
            assert split_index_of_image(results) == split_index_of_image([eval_ids(one_host, split)])


def counting_label_reads(monkeypatch):
    """Counts the full passes over a split's labels (input_pipeline.read_columns): the list of splits read."""
    reads, read_columns = [], input_pipeline.read_columns

    def counted(builder, split, features):
        reads.append(split)
        return read_columns(builder, split, features)

    monkeypatch.setattr(input_pipeline, "read_columns", counted)
    return reads


def test_tfds_labels_are_scanned_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """mock_data has no files to fingerprint: the fingerprints are set here, and the cache, which lives beside
    the prepared data (builder.data_dir), goes under tmp_path."""
    records, _ = benchmark_records("sop")
    fingerprints = {"train": "train-v1", "test": "test-v1"}
    monkeypatch.setattr(input_pipeline, "split_fingerprint", lambda builder, split: fingerprints[split])
    cache_path = input_pipeline.label_cache_path
    monkeypatch.setattr(input_pipeline, "label_cache_path", lambda *args: str(tmp_path) + cache_path(*args))
    reads = counting_label_reads(monkeypatch)
    with fake_tfds(records):
        def start():
            dataset = input_pipeline.create_dataset(tiny(sop_config), local_batch_size=2, local_eval_batch_size=2)
            return vars(dataset.info), {name: split.record_labels for name, split in dataset._splits.items()}

        scanned = start()
        assert reads == ["train", "test"]
        cached = start()
        assert reads == ["train", "test"]  # the second start read no record
        np.testing.assert_equal(cached, scanned)
        builder = input_pipeline.prepared_builder("sop", "", "")
        features = ("class_id", "super_class_id/num")
        for split in ("train", "test"):
            columns = input_pipeline.split_columns(builder, split, features)
            np.testing.assert_equal(columns, input_pipeline.read_columns(builder, split, features))
        del reads[:]

        fingerprints["train"] = "train-v2"  # the train files changed: their cache is stale
        np.testing.assert_equal(start(), scanned)
        assert reads == ["train"]
        # A cache file that holds another fingerprint's labels, or is damaged, is ignored and replaced.
        path = input_pipeline.label_cache_path(builder, "test", "test-v1", features)
        input_pipeline._write_label_cache(path, "test-v0", features, {name: np.zeros(1) for name in features})
        np.testing.assert_equal(start(), scanned)
        with open(path, "wb") as f:
            f.write(b"not an npz")
        np.testing.assert_equal(start(), scanned)
        assert reads == ["train", "test", "test"]
        start()
        assert reads == ["train", "test", "test"]
        assert not [name for name in os.listdir(os.path.dirname(path)) if ".tmp-" in name]


def test_the_label_cache_of_prepared_files_follows_their_fingerprint(tmp_path, monkeypatch):
    """In-Shop prepared for real (the project's builder): the fingerprint of its files, unmocked."""
    manual_dir, data_dir = str(tmp_path / "files"), str(tmp_path / "tfds")
    write_inshop_tree(manual_dir)
    config = tiny(inshop_config, **{"dataset.data_dir": data_dir, "dataset.manual_dir": manual_dir})
    reads = counting_label_reads(monkeypatch)

    def start():
        dataset = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
        return vars(dataset.info), {name: split.record_labels for name, split in dataset._splits.items()}

    scanned = start()
    assert sorted(reads) == ["gallery", "query", "train"]
    np.testing.assert_equal(start(), scanned)
    assert sorted(reads) == ["gallery", "query", "train"]
    builder = input_pipeline.prepared_builder("inshop", data_dir, manual_dir)
    cached_files = os.listdir(os.path.join(builder.data_dir, input_pipeline.LABEL_CACHE_DIR))
    assert sorted(name.split("-")[0] for name in cached_files) == ["gallery", "query", "train"]
    # Rewriting a train file (same records, a new modification time) makes the train labels stale.
    [train_file] = builder.info.splits["train"].filepaths
    stat = os.stat(train_file)
    os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    np.testing.assert_equal(start(), scanned)
    assert sorted(reads) == ["gallery", "query", "train", "train"]


def test_host_record_ranges_cover_every_kept_record_once():
    labels = {"train": np.array([0, -1, 1, 2, -1, 0, -1]), "test": np.array([-1, 3, 3, -1, 4])}
    for process_count in (1, 2, 3, 4):
        seen, sizes = [], []
        for p in range(process_count):
            ranges, size = input_pipeline.host_record_ranges(labels, p, process_count)
            kept = [(split, i) for split, (start, stop) in ranges.items() for i in range(start, stop)
                    if labels[split][i] >= 0]
            assert len(kept) == size
            seen += kept
            sizes.append(size)
        assert sorted(seen) == sorted((s, i) for s, l in labels.items() for i in np.flatnonzero(l >= 0))
        assert max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------------------------------------
# In-Shop: the project's TFDS builder on a tiny tree.

INSHOP_ROWS = [  # (path, item, split)
    ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train"),
    ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train"),
    ("img/MEN/Tees_Tanks/id_00000003/01_1_front.jpg", "id_00000003", "train"),
    ("img/MEN/Tees_Tanks/id_00000003/02_1_front.jpg", "id_00000003", "train"),
    ("img/WOMEN/Skirts/id_00000007/01_1_front.jpg", "id_00000007", "train"),
    ("img/WOMEN/Skirts/id_00000007/01_4_full.jpg", "id_00000007", "train"),
    ("img/WOMEN/Dresses/id_00000002/01_1_front.jpg", "id_00000002", "query"),
    ("img/WOMEN/Dresses/id_00000002/01_2_side.jpg", "id_00000002", "gallery"),
    ("img/WOMEN/Dresses/id_00000002/01_3_back.jpg", "id_00000002", "gallery"),
    ("img/MEN/Denim/id_00000005/01_1_front.jpg", "id_00000005", "query"),
    ("img/MEN/Denim/id_00000005/01_2_side.jpg", "id_00000005", "query"),
    ("img/MEN/Denim/id_00000005/01_4_full.jpg", "id_00000005", "gallery"),
    ("img/WOMEN/Skirts/id_00000004/01_1_front.jpg", "id_00000004", "gallery"),
    ("img/WOMEN/Skirts/id_00000004/01_2_side.jpg", "id_00000004", "query"),
]


def write_inshop_tree(root, rows=INSHOP_ROWS):
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for example_id, (path, item, split) in enumerate(rows):
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, path), "wb") as f:
            f.write(jpeg_of(example_id))
        lines.append(f"{path:60s} {item} {split}")
    with open(os.path.join(root, inshop.PARTITION_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def inshop_dirs(tmp_path_factory):
    manual_dir = str(tmp_path_factory.mktemp("inshop_files"))
    write_inshop_tree(manual_dir)
    return str(tmp_path_factory.mktemp("tfds")), manual_dir


def test_inshop_builder_query_gallery_and_categories(inshop_dirs):
    data_dir, manual_dir = inshop_dirs
    config = tiny(inshop_config, **{"dataset.data_dir": data_dir, "dataset.manual_dir": manual_dir})
    dataset = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    info = dataset.info
    assert info.eval_splits == ("query", "gallery")
    assert info.num_train_classes == 3 and info.num_train_examples == 6
    assert info.num_eval_examples == {"query": 4, "gallery": 4, "train": 6}
    # Categories, sorted over all splits: MEN/Denim, MEN/Tees_Tanks, WOMEN/Dresses, WOMEN/Skirts.
    np.testing.assert_array_equal(info.train_super_labels, [2, 1, 3])  # items 1, 3, 7
    np.testing.assert_array_equal(info.test_super_labels, [2, 3, 0])  # items 2, 4, 5 (query and gallery)
    item_label = {"id_00000002": 0, "id_00000004": 1, "id_00000005": 2}
    for split in ("query", "gallery"):
        ids, _, batches = eval_ids(dataset, split)
        assert sorted(ids) == [i for i, row in enumerate(INSHOP_ROWS) if row[2] == split]
        labels = np.concatenate([b["label"][b["mask"]] for b in batches])
        np.testing.assert_array_equal(labels, [item_label[INSHOP_ROWS[i][1]] for i in ids])
    _, ids = train_epoch(dataset)
    assert sorted(ids) == list(range(6))
    np.testing.assert_array_equal(train_epoch(dataset)[1], ids)  # shuffled files and buffer, seeded


@pytest.mark.parametrize("process_count", [2, 3])
def test_inshop_host_sharding_reads_tfds_sub_splits(inshop_dirs, process_count):
    data_dir, manual_dir = inshop_dirs
    config = tiny(inshop_config, **{"dataset.data_dir": data_dir, "dataset.manual_dir": manual_dir})
    hosts = [input_pipeline.create_dataset(config, local_batch_size=1, local_eval_batch_size=1, process_index=p,
                                           process_count=process_count) for p in range(process_count)]
    for split in ("query", "gallery", "train"):
        results = [eval_ids(host, split) for host in hosts]
        assert len({num_batches for _, num_batches, _ in results}) == 1
        assert sorted(np.concatenate([ids for ids, _, _ in results])) == [
            i for i, row in enumerate(INSHOP_ROWS) if row[2] == split]
    everything = np.concatenate([train_epoch(host)[1] for host in hosts])
    assert len(everything) == 6 // process_count * process_count and len(set(everything)) == len(everything)


def test_inshop_missing_files_say_what_to_place_where(tmp_path):
    manual_dir = str(tmp_path / "empty")
    os.makedirs(manual_dir)
    config = tiny(inshop_config, **{"dataset.data_dir": str(tmp_path / "tfds"), "dataset.manual_dir": manual_dir})
    with pytest.raises(ValueError) as error:
        input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    message = str(error.value)
    assert "list_eval_partition.txt" in message and "img.zip" in message and manual_dir in message
    assert "tfds build --imports=hpl_jax.inshop inshop_clothes" in message


def test_inshop_partition_file_is_checked():
    text = "3\nimage_name item_id evaluation_status\nimg/MEN/Denim/id_00000005/a.jpg id_00000005 query\n"
    with pytest.raises(ValueError, match="announces 3 images but lists 1"):
        inshop.read_partition(text)
    rows = inshop.read_partition(text.replace("3\n", "1\n", 1))
    assert rows["query"] == [("img/MEN/Denim/id_00000005/a.jpg", "id_00000005")] and rows["train"] == []
    assert inshop.item_number("id_00000123") == 123
    assert inshop.category("img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg") == "WOMEN/Blouses_Shirts"


# ----------------------------------------------------------------------------------------------------------
# Cars196 makes, missing data, TensorFlow isolation.

def test_cars_makes_match_tfds_class_names():
    names = tfds.builder("cars196").info.features["label"].names
    assert [name for name, _ in cars_makes.CLASS_MAKES] == names
    for name, make in cars_makes.CLASS_MAKES:
        assert name.startswith(make + " ")
    assert len(cars_makes.MAKES) == 49
    spot_checks = {"AM General Hummer SUV 2000": "AM General", "HUMMER H2 SUT Crew Cab 2009": "HUMMER",
                   "Dodge Ram Pickup 3500 Crew Cab 2010": "Dodge", "Ram C/V Cargo Van Minivan 2012": "Ram",
                   "Land Rover LR2 SUV 2012": "Land Rover", "Rolls-Royce Ghost Sedan 2012": "Rolls-Royce",
                   "smart fortwo Convertible 2012": "smart"}
    make_of = dict(cars_makes.CLASS_MAKES)
    assert {name: make_of[name] for name in spot_checks} == spot_checks
    train_makes = {make for _, make in cars_makes.CLASS_MAKES[:98]}
    test_makes = {make for _, make in cars_makes.CLASS_MAKES[98:]}
    assert len(train_makes) == 14 and len(test_makes) == 35 and not train_makes & test_makes


def test_missing_cars_data_names_the_files_and_the_manual_dir(tmp_path):
    builder = tfds.builder("cars196", data_dir=str(tmp_path))
    message = input_pipeline.missing_data_message("cars", builder, "", ConnectionError("404"))
    assert "dead" in message and "cars_train.tgz" in message and "car_devkit.tgz" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert "--config.dataset.manual_dir" in message and "ConnectionError: 404" in message


def test_tensorflow_sees_no_accelerator_and_stays_in_the_input_pipeline():
    assert {device.device_type for device in tf.config.get_visible_devices()} == {"CPU"}
    allowed = {os.path.join("hpl_jax", "data", "input_pipeline.py"), os.path.join("hpl_jax", "data", "inshop.py")}
    importing = []
    for folder, _, files in os.walk(os.path.join(REPO, "hpl_jax")):
        for file in files:
            path = os.path.join(folder, file)
            if file.endswith(".py"):
                with open(path) as f:
                    if re.search(r"^\s*(import|from)\s+tensorflow", f.read(), re.MULTILINE):
                        importing.append(os.path.relpath(path, REPO))
    assert set(importing) <= allowed


# ----------------------------------------------------------------------------------------------------------
# Dataset configs.

RECIPES = {  # name: (module, lr, warmup, bn_frozen, decay_epochs, gamma, recall_at)
    "cub": (cub_config, 1e-4, 5, True, 5, 0.5, (1, 2, 4, 8)),
    "cars": (cars_config, 1e-4, 5, True, 10, 0.5, (1, 2, 4, 8)),
    "sop": (sop_config, 6e-4, 1, False, 20, 0.25, (1, 10, 100, 1000)),
    "inshop": (inshop_config, 6e-4, 1, False, 20, 0.25, (1, 10, 20, 30, 40, 50)),
    "cifar100": (cifar100_config, 1e-4, 5, True, 5, 0.5, (1, 2, 4, 8)),
    "image_folder": (image_folder_config, 1e-4, 5, True, 5, 0.5, (1, 2, 4, 8)),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_dataset_configs_follow_the_published_recipe(name, tmp_path):
    module, lr, warmup, bn_frozen, decay_epochs, gamma, recall_at = RECIPES[name]
    config = module.get_config()
    if name == "image_folder":
        config.dataset.data_dir = str(tmp_path)
    if bn_frozen:
        # The recipe fine-tunes ImageNet weights: frozen BatchNorm without them is refused, naming what to pass.
        with pytest.raises(config_checks.ConfigError, match=r"config.model.bn_frozen: .* model.pretrained is empty"):
            config_checks.validate_config(config, device_count=8, process_count=1)
    # A converted-weights directory as `python -m hpl_jax.convert_weights` writes it (its metadata is what the
    # checks read).
    weights = tmp_path / "resnet50"
    weights.mkdir()
    (weights / "metadata.json").write_text(json.dumps(
        {"architecture": "resnet50", "width": 1.0, "preprocessing": convert_weights.TORCHVISION_PREPROCESSING}))
    config.model.pretrained = str(weights)
    config_checks.validate_config(config, device_count=8, process_count=1)
    assert config.dataset.name == name and config.dataset.image_size == 224 and config.dataset.resize_size == 256
    assert tuple(config.dataset.crop_scale) == (0.08, 1.0) and config.dataset.color_order == "rgb"
    assert (config.model.backbone, config.model.width, config.model.embedding_dim, config.model.dtype) == (
        "resnet50", 1.0, 512, "bfloat16")
    assert config.batch_size == 120 and config.num_epochs == 60
    assert (config.optim.lr, config.optim.warmup_epochs, config.model.bn_frozen) == (lr, warmup, bn_frozen)
    assert (config.optim.decay_epochs, config.optim.decay_gamma) == (decay_epochs, gamma)
    assert (config.loss.base, config.loss.alpha, config.loss.delta) == ("proxy_anchor", 32.0, 0.1)
    assert tuple(config.hpl.weights) == (1.0, 0.1) and len(config.hpl.num_coarse) == 1
    assert tuple(config.eval.recall_at) == recall_at
    # Every dataset evaluates NMI and, where it has super-classes, the super-class metrics (docs/benchmarks.md).
    assert config.eval.nmi and config.eval.super_metrics
    assert f"--config=configs/{name}.py" in module.__doc__ and "launch/tpu_pod.sh" in module.__doc__


# ----------------------------------------------------------------------------------------------------------
# End to end: the training loop on an image folder.

EXIT_WITH_STREAMS_OPEN = """
import sys, time
from configs import image_folder as image_folder_config
from hpl_jax.data import input_pipeline
from tests.data.test_input_pipeline import make_image_folder, tiny
resample = input_pipeline._resample  # slowed, so that resizes are in flight when the process exits
input_pipeline._resample = lambda *args: (time.sleep(0.02), resample(*args))[1]
make_image_folder(sys.argv[1], ["a", "b", "c", "d"], [40] * 4)
config = tiny(image_folder_config, **{"dataset.data_dir": sys.argv[1]})
dataset = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
train, test = dataset.train_batches(0), dataset.eval_batches("test")
print(next(train)["image"].shape, next(test)["image"].shape, flush=True)
"""


@pytest.mark.slow
def test_a_process_exits_while_its_pipelines_are_still_resizing(tmp_path):
    """A process that stops with batches still being made (an early stop, an error, an epoch drawn ahead) exits:
    its streams are closed at exit, before the interpreter's teardown, where a tf.data thread waiting for the GIL to
    run PIL's resize never gets it and the iterator's destructor waits for that thread forever (5 runs of 5 hung
    without the close, with the resize slowed as here)."""
    import subprocess
    import sys

    for run in range(2):
        result = subprocess.run([sys.executable, "-c", EXIT_WITH_STREAMS_OPEN, str(tmp_path / f"images_{run}")],
                                cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == "(2, 16, 16, 3) (2, 16, 16, 3)"


@pytest.mark.slow
def test_training_runs_end_to_end_on_an_image_folder(tmp_path, capsys):
    """One epoch of train_and_evaluate on an image folder (a small ResNet-18 keeps the compile short); the
    broken image's skips are counted in the result, metrics.json and under the final table."""
    import json
    from hpl_jax.trainer import train

    make_image_folder(str(tmp_path / "images"), ["a", "b", "c", "d", "e", "f"], [4, 4, 4, 4, 3, 3], corrupt_in="b")
    config = tiny(image_folder_config, **{
        "dataset.data_dir": str(tmp_path / "images"), "dataset.image_size": 32, "dataset.resize_size": 36,
        "model.backbone": "resnet18", "model.width": 0.125, "model.embedding_dim": 16, "model.dtype": "float32",
        "hpl.num_coarse": (2,),
        "optim.warmup_epochs": 0, "batch_size": 4, "eval.batch_size": 4, "eval.nmi": False, "num_epochs": 1})
    result = train.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert 0.0 <= result["last"]["recall@1"] <= 1.0
    # Read in the epoch and when embedding the train split for the first grouping.
    assert result["skipped_images"] >= 2
    with open(tmp_path / "workdir" / "metrics.json") as f:
        assert json.load(f)["skipped_images"] == result["skipped_images"]
    assert f"images that failed to decode and were skipped: {result['skipped_images']}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_train_class_whose_images_all_fail_to_decode_is_one_data_error(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "images"
    owner = make_image_folder(str(root), ["a", "b", "c", "d", "e", "f"], [4, 4, 4, 4, 3, 3])
    for example_id, name in owner.items():
        if name == "b":
            (root / name / f"{example_id:03d}.jpg").write_bytes(b"not a jpeg")
    flags = [f"--config.dataset.data_dir={root}", "--config.dataset.image_size=16", "--config.dataset.resize_size=18",
             "--config.model.backbone=resnet18", "--config.model.width=0.125", "--config.model.embedding_dim=16",
             "--config.model.dtype=float32", "--config.hpl.num_coarse=(2,)", "--config.batch_size=4",
             "--config.eval.batch_size=4", "--config.eval.nmi=False", "--config.num_epochs=1",
             "--config.optim.warmup_epochs=0", "--config.model.bn_frozen=False"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla.flags(2))
    result = subprocess.run([sys.executable, "-m", "hpl_jax.main", "--config=configs/image_folder.py",
                             f"--workdir={tmp_path / 'workdir'}", *flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "Data error: image_folder: no image of train class(es) 1 ('b') decodes; replace the broken files or "
        "remove the class.")


E2E_OVERRIDES = {
    "dataset.image_size": 32, "dataset.resize_size": 36, "model.backbone": "resnet18", "model.width": 0.125,
    "model.embedding_dim": 16, "model.dtype": "float32", "hpl.num_coarse": (2,), "optim.warmup_epochs": 0,
    "batch_size": 4, "eval.batch_size": 4, "eval.nmi": False, "num_epochs": 1}


@pytest.mark.slow
@pytest.mark.long
def test_every_dataset_config_trains_end_to_end_on_mock_data(tmp_path, inshop_dirs):
    """The real configs (CUB, Cars, SOP, CIFAR-100 via mock TFDS; In-Shop via its builder on a tiny tree),
    each with a tiny model, through train_and_evaluate: the same call the training uses."""
    from hpl_jax.trainer import train

    for name in sorted(BENCHMARKS):
        records, _ = benchmark_records(name)
        with fake_tfds(records):
            result = train.train_and_evaluate(tiny(BENCHMARKS[name][0], **E2E_OVERRIDES), str(tmp_path / name))
        assert result["last"]["epoch"] == 1 and result["last"]["num_queries"] > 0, name
    data_dir, manual_dir = inshop_dirs
    config = tiny(inshop_config, **{**E2E_OVERRIDES, "dataset.data_dir": data_dir, "dataset.manual_dir": manual_dir,
                                    "batch_size": 2, "eval.batch_size": 2})
    result = train.train_and_evaluate(config, str(tmp_path / "inshop"))
    assert result["last"]["num_queries"] == 4  # the In-Shop queries, searched against the gallery


# ----------------------------------------------------------------------------------------------------------
# Validation classes and the ground-truth level 1 on every source.

def test_validation_classes_of_an_image_folder_and_a_tfds_benchmark(tmp_path):
    make_image_folder(str(tmp_path), [f"c{i}" for i in range(8)], [2] * 8)
    config = tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path), "dataset.num_val_classes": 2})
    held = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2)
    info = held.info
    assert (info.num_train_classes, info.num_eval_examples) == (2, {"test": 8, "train": 4, "val": 4})
    assert info.eval_splits == ("test",)
    whole = input_pipeline.create_dataset(tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path)}),
                                          local_batch_size=2, local_eval_batch_size=2)
    train_ids = set(eval_ids(held, "train")[0]) | set(eval_ids(held, "val")[0])
    assert train_ids == set(eval_ids(whole, "train")[0]) and not set(eval_ids(held, "train")[0]) & set(
        eval_ids(held, "val")[0])
    labels = np.concatenate([b["label"][b["mask"]] for b in held.eval_batches("val")])
    assert sorted(labels) == [0, 0, 1, 1]

    layout = {"train": [0, 1, 2, 13], "test": [98, 150, 195]}
    records, owner = benchmark_records("cars", layout=layout)
    with fake_tfds(records):
        config = tiny(cars_config, **{"dataset.num_val_classes": 0})
        whole_info = input_pipeline.create_dataset(config, local_batch_size=2, local_eval_batch_size=2).info
        held = input_pipeline.create_dataset(tiny(cars_config, **{"dataset.num_val_classes": 2}),
                                             local_batch_size=2, local_eval_batch_size=2)
        train_classes, val_classes = data.validation_split(4, 2, 0)
        ids_by_split = {split: eval_ids(held, split)[0] for split in ("train", "val")}
    original = np.array(layout["train"])
    assert {owner[i] for i in ids_by_split["val"]} == set(original[val_classes])
    assert {owner[i] for i in ids_by_split["train"]} == set(original[train_classes])
    np.testing.assert_array_equal(held.info.val_super_labels, whole_info.train_super_labels[val_classes])
    with pytest.raises(config_checks.ConfigError, match="config.dataset.num_val_classes"):
        input_pipeline.create_dataset(tiny(image_folder_config, **{"dataset.data_dir": str(tmp_path),
                                                                   "dataset.num_val_classes": 3}),
                                      local_batch_size=2, local_eval_batch_size=2)


GROUND_TRUTH_LAYOUTS = {  # train classes with a shared super-class: 2 <= S < C (for Cars: Acura twice)
    "cars": ({"train": [0, 1, 2, 13], "test": [98, 150, 195]}, None),
    "sop": (None, None),
    # Super-class ids 3 and 14 only among the training classes: renumbered, not a crash.
    "cifar100": (None, {**BENCHMARKS["cifar100"][2], 49: 3}),
}
INSHOP_GT_ROWS = INSHOP_ROWS + [("img/WOMEN/Dresses/id_00000009/01_1_front.jpg", "id_00000009", "train")]


@pytest.mark.slow
@pytest.mark.long
def test_ground_truth_level1_trains_end_to_end_on_every_dataset_config(tmp_path):
    """hpl.ground_truth_level1 through train_and_evaluate for every dataset config on its mock data, with a K_1
    that differs from the number of super-classes; CUB has none and stops with a Config error."""
    from hpl_jax.trainer import train

    overrides = {**E2E_OVERRIDES, "hpl.ground_truth_level1": True, "hpl.num_coarse": (5,)}
    for name, (layout, supers) in GROUND_TRUTH_LAYOUTS.items():
        records, _ = benchmark_records(name, layout=layout, supers=supers)
        with fake_tfds(records):
            result = train.train_and_evaluate(tiny(BENCHMARKS[name][0], **overrides), str(tmp_path / name))
        assert result["last"]["hierarchy/level_1_nmi"] == pytest.approx(1.0), name
    records, _ = benchmark_records("cub")
    with fake_tfds(records), pytest.raises(config_checks.ConfigError, match="no ground-truth super-classes"):
        train.train_and_evaluate(tiny(cub_config, **overrides), str(tmp_path / "cub"))

    manual_dir = tmp_path / "inshop_files"
    write_inshop_tree(str(manual_dir), INSHOP_GT_ROWS)
    config = tiny(inshop_config, **{**overrides, "dataset.data_dir": str(tmp_path / "tfds"),
                                    "dataset.manual_dir": str(manual_dir), "batch_size": 2, "eval.batch_size": 2})
    assert train.train_and_evaluate(config, str(tmp_path / "inshop"))["last"]["hierarchy/level_1_nmi"] == 1.0

    # An image folder whose hierarchy.csv has a super-class ('fish') with test classes only.
    classes = [f"c{i}" for i in range(10)]
    make_image_folder(str(tmp_path / "images"), classes, [2] * 10)
    with open(tmp_path / "images" / "hierarchy.csv", "w") as f:
        f.write("class,super_class\n" + "".join(
            f"{c},{['bird', 'cat', 'bird', 'cat', 'dog', 'fish', 'fish', 'fish', 'fish', 'fish'][i]}\n"
            for i, c in enumerate(classes)))
    config = tiny(image_folder_config, **{**overrides, "dataset.data_dir": str(tmp_path / "images")})
    result = train.train_and_evaluate(config, str(tmp_path / "image_folder"))
    assert result["last"]["hierarchy/level_1_nmi"] == pytest.approx(1.0)
