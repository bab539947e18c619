"""The real benchmarks and image folders on tf.data + TFDS: the only module of hpl_jax that imports TensorFlow.

`create_dataset(config, ...)` returns a `data.Dataset` (see data.py for the batch format) for
`config.dataset.name` in:

  cub           TFDS caltech_birds2011, its train and test splits combined: classes 1-100 train, 101-200 test.
  cars          TFDS cars196, combined likewise: classes 1-98 / 99-196; super-class = make (cars_makes.py).
  sop           TFDS stanford_online_products: its train / test splits (11,318 / 11,316 products); the 12
                super-classes (bicycle, cabinet, ...).
  inshop        TFDS inshop_clothes (inshop.py, from a manual directory): train items; query and gallery
                images of the test items for evaluation; super-class = category ('WOMEN/Dresses').
  cifar100      TFDS cifar100, combined: fine classes 0-49 train, 50-99 test; super-class = coarse_label.
  image_folder  config.dataset.data_dir = ROOT/<class>/<images>; optional ROOT/hierarchy.csv
                (class,super_class rows) and ROOT/train_classes.txt / ROOT/test_classes.txt (one class a line);
                without class lists the sorted classes' first half (rounded up) trains.
(docs/method.md, "Benchmarks and class splits".) Labels are remapped to 0..C-1 within each label space (train; test,
which In-Shop's query and gallery share) in the order of the original class ids; super-classes keep one id
space over train and test.

How each host reads its share, every example exactly once over the hosts:
- TFDS: a one-time pass reads the labels of every record (not the images) in file order, cached beside the
  prepared data for the next starts (`split_columns`, keyed by the files' fingerprint); the kept records of a
  split are cut into `process_count` contiguous blocks (sizes differ by at most one) and each host reads only
  its block, as TFDS sub-splits 'train[a:b]' (TFDS shuffles records when it writes a dataset, so a block is a
  random subset). Training shuffles the files and a `shuffle_buffer` of records with a seed from
  (config.seed, epoch).
- Image folder: the file list is permuted once per (config.seed, epoch) over all hosts and each host takes its
  `data.host_shard`, an exact global shuffle.
Every host then yields `data.steps_per_epoch` batches: the last partial global batch is dropped, and since the
shards differ by at most one image, each host has enough. `start_step` skips records before they are read from
disk (image folder) or decoded (TFDS), and augmentation draws from a seed of (config.seed, epoch, position in
the epoch), so a run resumed mid-epoch sees the same images, crops and flips as the uninterrupted run.

An image that fails to decode is skipped (tf.data `ignore_errors`), counted in the log and in
`num_skipped_images`, and never stops the run. Training keeps its exact epoch length by reading on into a second
pass over the same epoch order for the shortfall; a resumed run then differs from the uninterrupted one by the
images skipped before the resume point. Evaluation pads the shortfall (mask False), so a broken image is the
only one that is not counted.

Augmentation (the public Proxy-Anchor recipe, docs/method.md "Training recipe"): train = random resized crop with
area fraction `crop_scale` and aspect ratio `crop_ratio` (uniform in the ratio, TensorFlow's sampler) to
`image_size`, horizontal flip; test = resize the shorter side to `resize_size` and centre-crop `image_size`.
Both crop before they resize, so JPEG bytes decode only the crop window (tf.image.decode_and_crop_jpeg), and a
training crop at least twice `image_size` a side decodes at a reduced DCT scale (`decode_window_at_scale`). The
resized crops are rounded to u8 pixels, and the device normalises them (data.normalize_pixels).

The decoded cache (config.dataset.cache_decoded, off by default): the first epoch a host asks for decodes each
training image it reads once, shorter side resized to config.dataset.cache_shorter_side, into host memory
(`decode_into_cache`); every epoch then cuts the same crop windows, from the same seeds, out of those pixels
(`cached_train_image`), so resumption stays exact; docs/datasets.md says how the crops differ from the files'.
"""
from __future__ import annotations

import atexit
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import threading
import uuid
import weakref
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from PIL import Image
from absl import logging

# TensorFlow only reads and decodes images here; it must never take the GPU/TPU memory JAX uses.
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU")

import tensorflow_datasets as tfds  # noqa: E402  (imported after the accelerators are hidden)

from hpl_jax import data  # noqa: E402
from hpl_jax.data import cars_makes  # noqa: E402
from hpl_jax.data import inshop  # noqa: E402  (registers the inshop_clothes builder)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
HIERARCHY_FILE = "hierarchy.csv"
TRAIN_CLASSES_FILE = "train_classes.txt"
TEST_CLASSES_FILE = "test_classes.txt"
AUTOTUNE = tf.data.AUTOTUNE
# Training tries at most this many times the images it needs before it gives up on a broken dataset.
MAX_READ_FACTOR = 2
# The label columns of prepared TFDS splits, cached beside the data: {builder.data_dir}/LABEL_CACHE_DIR/.
LABEL_CACHE_DIR = "hpl_jax_labels"
# The DCT scales (1 / ratio) a JPEG may be decoded at (libjpeg's M/8 with M = 8, 4, 2, 1).
DCT_RATIOS = (1, 2, 4, 8)


# ----------------------------------------------------------------------------------------------------------
# Pixels.

def _resample(pixels: np.ndarray, window: np.ndarray, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """PIL's bilinear resize of the window (top, left, height, width) of u8[h, w, 3] to u8[height, width, 3]."""
    top, left, window_height, window_width = (float(value) for value in window)
    rows, columns = pixels.shape[:2]
    # PIL refuses a box a float rounding puts past the edge; the kernel is cut at the edge anyway.
    box = (max(left, 0.0), max(top, 0.0), min(left + window_width, columns), min(top + window_height, rows))
    return np.asarray(Image.fromarray(pixels).resize((int(width), int(height)), Image.Resampling.BILINEAR, box=box))


def resize_window(image: tf.Tensor, window: tf.Tensor, size) -> tf.Tensor:
    """The window f32[4] (top, left, height, width; fractional, in pixels) of u8[h, w, 3], resized to `size`
    (height, width; ints or i32 scalars): u8[height, width, 3].

    PIL's bilinear resampling, the one torchvision's RandomResizedCrop and Resize run on the official recipes' PIL
    images: a triangle kernel widened by the downscale factor (antialiased), its weights cut at the image's edge and
    renormalised, computed in fixed point, rounded to u8 after each of its two passes. That is the kernel of
    tf.image.resize(antialias=True) (ScaleAndTranslate's triangle) to within one and a half levels (tested), at about
    a quarter of its CPU time (docs/benchmarks.md). It runs on tf.data's threads as a NumPy function; PIL lets go
    of the GIL while it resamples, so the parallel map still uses every core.
    """
    pixels = tf.numpy_function(_resample, [image, tf.cast(window, tf.float32), size[0], size[1]], tf.uint8,
                               stateful=False)
    pixels.set_shape([dim if isinstance(dim, int) else None for dim in size] + [3])
    return pixels


def whole(image: tf.Tensor) -> tf.Tensor:
    """The window f32[4] of all of u8[h, w, 3]."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    return tf.stack([0.0, 0.0, shape[0], shape[1]])


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, *, scale: Tuple[float, float],
                       ratio: Tuple[float, float]) -> tf.Tensor:
    """An Inception-style random window of an image of shape i32[2] (height, width): i32[4] (top, left, h, w).

    Area fraction in `scale`, aspect ratio (width / height) in `ratio`; after 10 failed draws, the whole image.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], axis=0), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def central_crop_window(shape: tf.Tensor, *, fraction: float) -> tf.Tensor:
    """The centred square of side `fraction` x the shorter side: i32[4] (top, left, h, w).

    Cropping `image_size / resize_size` of the shorter side and resizing that to `image_size` equals resizing
    the shorter side to `resize_size` and centre-cropping `image_size`, without decoding the rest of a JPEG.
    """
    side = tf.cast(tf.round(fraction * tf.cast(tf.reduce_min(shape), tf.float32)), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])


def decode_window(image_bytes: tf.Tensor, window_fn) -> tf.Tensor:
    """u8[h, w, 3]: the window `window_fn(shape i32[2]) -> i32[4]` of an encoded image.

    JPEG decodes only the window (fused decode and crop); other formats (CIFAR's PNG) decode whole, then crop.
    """
    def from_jpeg():
        window = window_fn(tf.image.extract_jpeg_shape(image_bytes)[:2])
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def from_other_format():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        top, left, height, width = tf.unstack(window_fn(tf.shape(image)[:2]))
        return image[top:top + height, left:left + width]

    return tf.cond(tf.io.is_jpeg(image_bytes), from_jpeg, from_other_format)


def decode_window_at_scale(image_bytes: tf.Tensor, window_fn, min_side: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """(u8[h', w', 3] pixels, f32[4] window in them): the window `window_fn(shape i32[2]) -> i32[4]` of an encoded
    image, a JPEG decoded at the smallest DCT scale (1/8, 1/4, 1/2; tf.io.decode_jpeg's `ratio`) that keeps both
    sides of the window at least `min_side` pixels.

    A JPEG decoded at scale 1/r gives pixel i the mean of full-size pixels [r i, r i + r), as the IDCT of the block's
    lowest frequencies: the crop resized from it equals the one resized from the full decode to within JPEG
    rounding (tests/data/test_input_pipeline.py), at a fraction of the IDCT and colour conversion. The window
    is then fractional (the scaled decode covers it whole); at scale 1 it is the decoded pixels exactly.
    """
    def from_jpeg():
        window = window_fn(tf.image.extract_jpeg_shape(image_bytes)[:2])
        shrink = tf.reduce_min(window[2:]) // min_side

        def decode_at(ratio):
            def decode():
                if ratio == 1:
                    pixels = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
                    return pixels, tf.cast(tf.concat([[0, 0], window[2:]], axis=0), tf.float32)
                top, left, height, width = tf.unstack(window)
                box = tf.stack([top // ratio, left // ratio, -(-(top + height) // ratio) - top // ratio,
                                -(-(left + width) // ratio) - left // ratio])
                pixels = tf.image.decode_and_crop_jpeg(image_bytes, box, channels=3, ratio=ratio)
                inside = tf.cast(window, tf.float32) / ratio - tf.cast(tf.concat([box[:2], [0, 0]], axis=0),
                                                                       tf.float32)
                return pixels, inside
            return decode

        branch = sum(tf.cast(shrink >= ratio, tf.int32) for ratio in DCT_RATIOS[1:])
        return tf.switch_case(branch, [decode_at(ratio) for ratio in DCT_RATIOS])

    def from_other_format():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        top, left, height, width = tf.unstack(window_fn(tf.shape(image)[:2]))
        pixels = image[top:top + height, left:left + width]
        return pixels, whole(pixels)

    return tf.cond(tf.io.is_jpeg(image_bytes), from_jpeg, from_other_format)


def crop_to_pixels(pixels: tf.Tensor, window: tf.Tensor, flip_seed: tf.Tensor, *, image_size: int,
                   horizontal_flip: bool) -> tf.Tensor:
    """The window f32[4] of u8[h, w, 3] resized to u8[image_size, image_size, 3], flipped or not by flip_seed."""
    image = resize_window(pixels, window, (image_size, image_size))
    if horizontal_flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, *, image_size: int, crop_scale: Tuple[float, float],
                crop_ratio: Tuple[float, float], horizontal_flip: bool) -> tf.Tensor:
    """Random resized crop + flip of an encoded image, drawn from seed i64[2]: u8[image_size, image_size, 3].

    A JPEG decodes only the crop, at a reduced DCT scale when the crop is at least twice image_size a side
    (`decode_window_at_scale`).
    """
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    pixels, window = decode_window_at_scale(
        image_bytes, lambda shape: random_crop_window(shape, crop_seed, scale=crop_scale, ratio=crop_ratio),
        image_size)
    return crop_to_pixels(pixels, window, flip_seed, image_size=image_size, horizontal_flip=horizontal_flip)


def eval_image(image_bytes: tf.Tensor, *, image_size: int, resize_size: int) -> tf.Tensor:
    """Shorter side to resize_size, centre crop image_size: u8[image_size, image_size, 3]."""
    image = decode_window(image_bytes, lambda shape: central_crop_window(shape, fraction=image_size / resize_size))
    return resize_window(image, whole(image), (image_size, image_size))


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of u8[h, w, 3] (for tests and the benchmark, which make their own images)."""
    return tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=quality).numpy()


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's order and augmentation: a 32-bit hash of (config.seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------
# The examples of one split, and how a host reads its share.

def host_block(num_examples: int, process_index: int, process_count: int) -> Tuple[int, int]:
    """[start, stop) of a host's contiguous block of `num_examples` (block sizes differ by at most one)."""
    return (num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count)


def host_record_ranges(record_labels: Mapping[str, np.ndarray], process_index: int,
                       process_count: int) -> Tuple[Dict[str, Tuple[int, int]], int]:
    """The record range of each TFDS split that holds a host's block of the kept examples, and the block's size.

    record_labels: {tfds_split: i32[num_records]}, the new label of each record in file order, -1 = not kept.
    The kept examples are numbered split after split; a range may also hold records that are not kept, which
    the reader drops by their label.
    """
    kept = {split: np.flatnonzero(labels >= 0) for split, labels in record_labels.items()}
    start, stop = host_block(sum(len(positions) for positions in kept.values()), process_index, process_count)
    ranges, offset = {}, 0
    for split, positions in kept.items():
        first, last = max(start - offset, 0), min(stop - offset, len(positions))
        if first < last:
            ranges[split] = (int(positions[first]), int(positions[last - 1]) + 1)
        offset += len(positions)
    return ranges, stop - start


def read_tfds(builder: tfds.core.DatasetBuilder, split: str, features: Sequence[str], *,
              shuffle_seed: Optional[int] = None, in_file_order: bool = False) -> tf.data.Dataset:
    """The named features of `split`, the image as its encoded bytes; files shuffled by `shuffle_seed` if given."""
    decoders = tfds.decode.PartialDecoding(
        {name: True for name in features},
        decoders={"image": tfds.decode.SkipDecoding()} if "image" in features else None)
    options = dict(interleave_cycle_length=1) if in_file_order else {}
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False, **options)
    return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None, decoders=decoders,
                              read_config=read_config)


def read_columns(builder: tfds.core.DatasetBuilder, split: str, features: Sequence[str]) -> Dict[str, np.ndarray]:
    """Every record's value of the named (non-image) features, in file order: {name: [num_records]}."""
    columns = {name: [] for name in features}
    for batch in read_tfds(builder, split, features, in_file_order=True).batch(4096).as_numpy_iterator():
        for name in features:
            columns[name].append(batch[name])
    return {name: np.concatenate(values) if values else np.zeros(0, np.int64) for name, values in columns.items()}


def _as_stored(column: np.ndarray) -> np.ndarray:
    """A column as the label cache stores it: text (TF strings, NumPy objects) as fixed-width bytes, which .npz
    keeps without pickling; numbers unchanged."""
    return column.astype(bytes) if column.dtype.kind == "O" else column


def split_fingerprint(builder: tfds.core.DatasetBuilder, split: str) -> Optional[str]:
    """What identifies the records of a prepared TFDS split: the dataset's name and version, the split, its size,
    and the name, size and modification time of each of its files (local or gs://); None where TFDS knows no
    files (not prepared)."""
    try:
        split_info = builder.info.splits[split]
        paths = [os.fspath(path) for path in split_info.filepaths]
    except (KeyError, ValueError):
        return None
    try:
        files = [(os.path.basename(path), stat.length, stat.mtime_nsec)
                 for path in paths for stat in [tf.io.gfile.stat(path)]]
    except tf.errors.OpError:
        return None
    key = json.dumps([builder.name, str(builder.version), split, split_info.num_examples, files])
    return hashlib.sha256(key.encode()).hexdigest()


def label_cache_path(builder: tfds.core.DatasetBuilder, split: str, fingerprint: str,
                     features: Sequence[str]) -> str:
    """Where the label columns of (split, features) of the prepared data with `fingerprint` are cached: beside
    the data, named by all of them, so a changed dataset (another fingerprint) never finds stale labels."""
    name = hashlib.sha256(json.dumps([fingerprint, list(features)]).encode()).hexdigest()[:24]
    return os.path.join(os.fspath(builder.data_dir), LABEL_CACHE_DIR, f"{split}-{name}.npz")


def _read_label_cache(path: str, fingerprint: str, features: Sequence[str]) -> Optional[Dict[str, np.ndarray]]:
    """The cached columns, or None where there is no cache file or it is not the one asked for."""
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "rb") as f:
            stored = np.load(io.BytesIO(f.read()), allow_pickle=False)
            if str(stored["fingerprint"]) != fingerprint or list(stored["features"]) != list(features):
                return None
            return {name: stored[f"column/{name}"] for name in features}
    except Exception as error:  # A damaged or foreign file is ignored and overwritten, never trusted.
        logging.warning("Ignoring the label cache %s (%s: %s).", path, type(error).__name__, error)
        return None


def _write_label_cache(path: str, fingerprint: str, features: Sequence[str],
                       columns: Mapping[str, np.ndarray]) -> None:
    """Writes the cache atomically: a file of this process's own, renamed into place, so hosts that start
    together each rename a complete file (with the same contents) and a reader never sees half of one."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        tf.io.gfile.makedirs(os.path.dirname(path))
        buffer = io.BytesIO()
        np.savez(buffer, fingerprint=np.array(fingerprint), features=np.array(list(features)),
                 **{f"column/{name}": columns[name] for name in features})
        with tf.io.gfile.GFile(temporary, "wb") as f:
            f.write(buffer.getvalue())
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except tf.errors.OpError as error:  # A read-only data_dir: every start scans the labels, as before.
        logging.warning("Could not cache the TFDS labels in %s (%s); the next start reads them again.", path,
                        error)
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)


def split_columns(builder: tfds.core.DatasetBuilder, split: str, features: Sequence[str]) -> Dict[str, np.ndarray]:
    """`read_columns` of a prepared split, read once and then from a cache beside the data (`label_cache_path`):
    a start no longer reads every record's label. Text columns come as fixed-width bytes either way."""
    fingerprint = split_fingerprint(builder, split)
    path = None if fingerprint is None else label_cache_path(builder, split, fingerprint, features)
    if path is not None:
        cached = _read_label_cache(path, fingerprint, features)
        if cached is not None:
            return cached
    columns = {name: _as_stored(column) for name, column in read_columns(builder, split, features).items()}
    if path is not None:
        _write_label_cache(path, fingerprint, features, columns)
    return columns


@dataclasses.dataclass(frozen=True)
class TfdsExamples:
    """The examples of one split of a TFDS benchmark: its records, in file order, in some TFDS splits.

    record_labels: {tfds_split: i32[num_records]}, each record's new label (-1 = not in this split).
    label_table: i32[max original id + 1], original class id -> new label (-1 = another label space).
    """

    builder: tfds.core.DatasetBuilder
    label_key: str
    record_labels: Mapping[str, np.ndarray]
    label_table: np.ndarray
    shuffle_buffer: int

    @property
    def num_examples(self) -> int:
        return int(sum(np.sum(labels >= 0) for labels in self.record_labels.values()))

    @property
    def num_classes(self) -> int:
        """Classes of the label space (for In-Shop's query or gallery: of both)."""
        return int(self.label_table.max()) + 1

    def host_records(self, process_index: int, process_count: int,
                     shuffle_seed: Optional[int]) -> Tuple[tf.data.Dataset, int]:
        """This host's {'image': encoded bytes, 'label': i32} records and their number."""
        ranges, count = host_record_ranges(self.record_labels, process_index, process_count)
        if not ranges:
            return _empty_records("image"), 0
        split = "+".join(f"{name}[{start}:{stop}]" for name, (start, stop) in ranges.items())
        table = tf.constant(self.label_table, tf.int32)
        records = read_tfds(self.builder, split, ("image", self.label_key), shuffle_seed=shuffle_seed)
        records = records.map(lambda ex: {"image": ex["image"], "label": tf.gather(table, ex[self.label_key])},
                              num_parallel_calls=AUTOTUNE)
        records = records.filter(lambda record: record["label"] >= 0)
        if shuffle_seed is not None:
            records = records.shuffle(min(self.shuffle_buffer, count), seed=shuffle_seed,
                                      reshuffle_each_iteration=False)
        return records, count

    def host_ids(self, process_index: int, process_count: int) -> np.ndarray:
        """i64[count]: the index within the split of each record `host_records` yields unshuffled."""
        return np.arange(*host_block(self.num_examples, process_index, process_count), dtype=np.int64)

    def cached_records(self, process_index: int, process_count: int) -> Tuple[tf.data.Dataset, int]:
        """The records a host's decoded cache holds: its block (`host_records` unshuffled), and their number."""
        return self.host_records(process_index, process_count, None)

    def epoch_slots(self, process_index: int, process_count: int, shuffle_seed: int) -> np.ndarray:
        """i64[count]: the host's records in an epoch's order, as positions in `cached_records`: an exact shuffle
        of its block (the files' `host_records` shuffle within a buffer)."""
        count = int(np.diff(host_block(self.num_examples, process_index, process_count))[0])
        return np.random.default_rng(shuffle_seed).permutation(count)


@dataclasses.dataclass(frozen=True)
class FileExamples:
    """The examples of one split of an image folder: paths: str[n], labels: i32[n], and each label's class folder."""

    paths: np.ndarray
    labels: np.ndarray
    class_names: Tuple[str, ...] = ()

    @property
    def num_examples(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def host_records(self, process_index: int, process_count: int,
                     shuffle_seed: Optional[int]) -> Tuple[tf.data.Dataset, int]:
        """This host's {'path': str, 'label': i32} records (files are read in the decode step) and their number."""
        mine = self.epoch_slots(process_index, process_count, shuffle_seed)
        if not len(mine):
            return _empty_records("path"), 0
        return tf.data.Dataset.from_tensor_slices({"path": self.paths[mine], "label": self.labels[mine]}), len(mine)

    def host_ids(self, process_index: int, process_count: int) -> np.ndarray:
        """i64[count]: the index within the split of each record `host_records` yields unshuffled."""
        return data.host_shard(self.num_examples, process_index, process_count).astype(np.int64)

    def cached_records(self, process_index: int, process_count: int) -> Tuple[tf.data.Dataset, int]:
        """The records a host's decoded cache holds: the whole split, since a host's share of an image folder is
        drawn anew every epoch; and their number."""
        del process_index, process_count
        return self.host_records(0, 1, None)

    def epoch_slots(self, process_index: int, process_count: int, shuffle_seed: Optional[int]) -> np.ndarray:
        """i64[count]: the host's share of the split in an epoch's order (a permutation over all hosts by
        `shuffle_seed`, None = in order), as indices into the split and into `cached_records`."""
        order = np.arange(self.num_examples)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(self.num_examples)
        return order[data.host_shard(self.num_examples, process_index, process_count)]


Examples = Union[TfdsExamples, FileExamples]


def _empty_records(key: str) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({key: tf.zeros([0], tf.string), "label": tf.zeros([0], tf.int32)})


def _encoded_image(record: Dict[str, tf.Tensor]) -> tf.Tensor:
    return record["image"] if "image" in record else tf.io.read_file(record["path"])


# ----------------------------------------------------------------------------------------------------------
# TFDS benchmarks.

@dataclasses.dataclass(frozen=True)
class TfdsBenchmark:
    """Where a benchmark's class-disjoint splits live in a TFDS dataset.

    train / evals: (TFDS splits read in this order, the original class ids kept; None = all). The eval splits
    share one label space (In-Shop's query and gallery hold the same items).
    super_key: the feature that holds the super-class (int id or text), if any.
    class_supers: the super-class id of each original class id, for a dataset whose records do not carry it.
    how_to_get: what TFDS downloads and what to place in the manual directory ({manual_dir}) without it.
    """

    tfds_name: str
    label_key: str
    train: Tuple[Tuple[str, ...], Optional[range]]
    evals: Mapping[str, Tuple[Tuple[str, ...], Optional[range]]]
    how_to_get: str
    super_key: Optional[str] = None
    class_supers: Optional[Tuple[int, ...]] = None


_BOTH = ("train", "test")
BENCHMARKS: Dict[str, TfdsBenchmark] = {
    "cub": TfdsBenchmark(
        "caltech_birds2011", "label", train=(_BOTH, range(0, 100)), evals={"test": (_BOTH, range(100, 200))},
        how_to_get="TFDS downloads CUB_200_2011.tgz and segmentations.tgz from data.caltech.edu; without "
                   "internet, place these two files in {manual_dir}."),
    "cars": TfdsBenchmark(
        "cars196", "label", train=(_BOTH, range(0, 98)), evals={"test": (_BOTH, range(98, 196))},
        class_supers=tuple(cars_makes.MAKES.index(make) for _, make in cars_makes.CLASS_MAKES),
        how_to_get="TFDS's download address for Cars196 (ai.stanford.edu/~jkrause/car196) is dead: get "
                   "cars_train.tgz, cars_test.tgz, cars_test_annos_withlabels.mat and car_devkit.tgz from a "
                   "mirror and place them in {manual_dir} (TFDS checks their SHA-256 against "
                   "tensorflow_datasets/url_checksums/cars196.txt)."),
    "sop": TfdsBenchmark(
        "stanford_online_products", "class_id", train=(("train",), None), evals={"test": (("test",), None)},
        super_key="super_class_id/num",
        how_to_get="TFDS downloads Stanford_Online_Products.zip (3.1 GB) from "
                   "ftp://cs.stanford.edu/cs/cvgl/; if that fails, place the zip in {manual_dir}."),
    "inshop": TfdsBenchmark(
        "inshop_clothes", "item_id", train=(("train",), None),
        evals={"query": (("query",), None), "gallery": (("gallery",), None)}, super_key="category",
        how_to_get="In-Shop cannot be downloaded by a script: from "
                   "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html unzip Img/img.zip "
                   "into {manual_dir} (so that {manual_dir}/img/WOMEN/Dresses/... exists) and copy "
                   "Eval/list_eval_partition.txt there."),
    "cifar100": TfdsBenchmark(
        "cifar100", "label", train=(_BOTH, range(0, 50)), evals={"test": (_BOTH, range(50, 100))},
        super_key="coarse_label",
        how_to_get="TFDS downloads cifar-100-binary.tar.gz from www.cs.toronto.edu/~kriz; without internet, "
                   "place it in {manual_dir}."),
}


def missing_data_message(name: str, builder: tfds.core.DatasetBuilder, manual_dir: str,
                         error: Exception) -> str:
    """One message: which TFDS dataset is missing, where TFDS looked, and what to download or place where."""
    benchmark = BENCHMARKS[name]
    manual_dir = manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
    imports = "--imports=hpl_jax.inshop " if name == "inshop" else ""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"config.dataset.name={name!r} reads the TFDS dataset {benchmark.tfds_name!r} from "
            f"{builder.data_dir}, which is not prepared, and preparing it failed ({type(error).__name__}: "
            f"{reason}). {benchmark.how_to_get.format(manual_dir=manual_dir)} Then run again, or prepare it once "
            f"with `tfds build {imports}{benchmark.tfds_name} --data_dir={os.fspath(builder.data_dir_root)} "
            f"--manual_dir={manual_dir}`; --config.dataset.data_dir and --config.dataset.manual_dir choose other "
            "places.")


def prepared_builder(name: str, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder of benchmark `name`, prepared (downloaded or read from `manual_dir`) if it was not.

    On a pod whose hosts share `data_dir`, prepare it once beforehand (`tfds build`, see the error message).
    """
    builder = tfds.builder(BENCHMARKS[name].tfds_name, data_dir=data_dir or None)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as error:  # Any failure to fetch, find or unpack the files calls for the same advice.
        raise data.DataError(missing_data_message(name, builder, manual_dir, error)) from error
    return builder


def _ids_of(values: np.ndarray, vocabulary: Optional[np.ndarray]) -> np.ndarray:
    return np.searchsorted(vocabulary, values) if vocabulary is not None else values.astype(np.int64)


def _label_space(columns: Mapping[str, Mapping[str, np.ndarray]], label_key: str,
                 splits: Sequence[Tuple[Tuple[str, ...], Optional[range]]]) -> np.ndarray:
    """Original class id -> new label (i32[max id + 1], -1 outside) for the classes kept by `splits`."""
    kept_ids = [columns[split][label_key][_kept(columns[split][label_key], classes)]
                for names, classes in splits for split in names]
    ids = np.unique(np.concatenate(kept_ids))
    max_id = max(int(columns[split][label_key].max(initial=0)) for split in columns)
    table = np.full(max_id + 1, -1, np.int32)
    table[ids] = np.arange(len(ids), dtype=np.int32)
    return table


def _kept(ids: np.ndarray, classes: Optional[range]) -> np.ndarray:
    if classes is None:
        return np.ones(ids.shape, bool)
    return (ids >= classes.start) & (ids < classes.stop)


def _class_supers(labels: np.ndarray, supers: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """i32[num_classes]: the super-class of each class, from the (label, super-class) of its records."""
    pairs = np.unique(np.stack([labels, supers], axis=1), axis=0)
    if len(pairs) != num_classes or not np.array_equal(pairs[:, 0], np.arange(num_classes)):
        raise data.DataError(f"{what}: some class has records with different super-classes (or none); the data is "
                         "inconsistent.")
    return pairs[:, 1].astype(np.int32)


def tfds_splits(name: str, builder: tfds.core.DatasetBuilder, shuffle_buffer: int):
    """The class-disjoint splits of a TFDS benchmark, from its labels: one pass over the records the first time,
    the label cache beside the data after that (`split_columns`).

    Returns (train: TfdsExamples, evals: {split: TfdsExamples}, train_super_labels, test_super_labels), the
    super-label maps i32[num classes] or None.
    """
    benchmark = BENCHMARKS[name]
    if name == "cars":
        names = list(builder.info.features["label"].names)
        if names != [class_name for class_name, _ in cars_makes.CLASS_MAKES]:
            raise ValueError("TFDS cars196's class names differ from hpl_jax/data/cars_makes.py; the make map must be "
                             "checked again for this TFDS version.")
    features = (benchmark.label_key,) + ((benchmark.super_key,) if benchmark.super_key else ())
    tfds_split_names = list(dict.fromkeys(
        split for names, _ in (benchmark.train,) + tuple(benchmark.evals.values()) for split in names))
    columns = {split: split_columns(builder, split, features) for split in tfds_split_names}

    vocabulary = None
    if benchmark.super_key and columns[tfds_split_names[0]][benchmark.super_key].dtype.kind in "OSU":
        vocabulary = np.unique(np.concatenate([columns[split][benchmark.super_key] for split in columns]))

    def examples_and_supers(parts, table):
        record_labels, labels, supers = {}, [], []
        for names, classes in parts:
            for split in names:
                ids = columns[split][benchmark.label_key]
                record_labels[split] = np.where(_kept(ids, classes), table[ids], -1).astype(np.int32)
                kept = record_labels[split] >= 0
                labels.append(record_labels[split][kept])
                if benchmark.super_key:
                    supers.append(_ids_of(columns[split][benchmark.super_key][kept], vocabulary))
                elif benchmark.class_supers:
                    supers.append(np.asarray(benchmark.class_supers)[ids[kept]])
        examples = TfdsExamples(builder, benchmark.label_key, record_labels, table, shuffle_buffer)
        return examples, np.concatenate(labels), (np.concatenate(supers) if supers else None)

    train_table = _label_space(columns, benchmark.label_key, [benchmark.train])
    test_table = _label_space(columns, benchmark.label_key, list(benchmark.evals.values()))
    train, train_labels, train_supers = examples_and_supers([benchmark.train], train_table)
    evals, test_labels, test_supers = {}, [], []
    for split, part in benchmark.evals.items():
        evals[split], labels, supers = examples_and_supers([part], test_table)
        test_labels.append(labels)
        test_supers.append(supers)
    train_super_labels = test_super_labels = None
    if train_supers is not None:
        what = f"TFDS {benchmark.tfds_name}"
        train_super_labels = _class_supers(train_labels, train_supers, train.num_classes, what)
        test_super_labels = _class_supers(np.concatenate(test_labels), np.concatenate(test_supers),
                                          evals[split].num_classes, what)
    return train, evals, train_super_labels, test_super_labels


# ----------------------------------------------------------------------------------------------------------
# Image folders.

def _read_class_list(path: str, known: Sequence[str]) -> Optional[List[str]]:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        names = [line.strip() for line in f if line.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise data.DataError(f"{path} names classes without a folder of images: {unknown[:5]}; fix the names or "
                         "add the folders.")
    return names


def _read_hierarchy(path: str) -> Optional[Dict[str, str]]:
    """{class: super_class} from `class,super_class` rows (a header row with these names is allowed)."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        rows = [row for row in csv.reader(io.StringIO(f.read())) if row]
    if rows and [cell.strip() for cell in rows[0]] == ["class", "super_class"]:
        rows = rows[1:]
    hierarchy = {}
    for row in rows:
        if len(row) != 2:
            raise data.DataError(f"{path}: the row {row} should be 'class,super_class'.")
        hierarchy[row[0].strip()] = row[1].strip()
    return hierarchy


def image_folder_class_split(root: str, classes: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(train classes, test classes): from ROOT/train_classes.txt and/or ROOT/test_classes.txt (a missing one
    is the rest), else the first half of the sorted classes (rounded up) trains."""
    train = _read_class_list(os.path.join(root, TRAIN_CLASSES_FILE), classes)
    test = _read_class_list(os.path.join(root, TEST_CLASSES_FILE), classes)
    if train is None and test is None:
        half = (len(classes) + 1) // 2
        return list(classes[:half]), list(classes[half:])
    if train is None:
        train = [name for name in classes if name not in set(test)]
    if test is None:
        test = [name for name in classes if name not in set(train)]
    shared = sorted(set(train) & set(test))
    if shared:
        raise data.DataError(f"{root}: {TRAIN_CLASSES_FILE} and {TEST_CLASSES_FILE} share classes {shared[:5]}; "
                         "train and test classes must be disjoint.")
    return sorted(train), sorted(test)


def image_folder_splits(root: str):
    """The class-disjoint splits of ROOT/<class>/<images>.

    Returns (train: FileExamples, test: FileExamples, train_super_labels, test_super_labels); labels follow the
    sorted class names; super-labels (from ROOT/hierarchy.csv, ids of the sorted super-class names) or None.
    """
    if not root or not tf.io.gfile.isdir(root):
        raise data.DataError(f"config.dataset.data_dir={root!r} is not a directory; for dataset.name='image_folder' "
                         "set it to ROOT with one folder of images per class (ROOT/<class>/<images>).")
    files = {}
    for entry in sorted(tf.io.gfile.listdir(root)):
        name = entry.rstrip("/")
        folder = os.path.join(root, name)
        if tf.io.gfile.isdir(folder):
            images = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if images:
                files[name] = [os.path.join(folder, image) for image in images]
    if len(files) < 4:
        raise data.DataError(f"config.dataset.data_dir={root!r} has {len(files)} class folders with images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); an image folder needs at least 4 (2 train, 2 test).")
    train_classes, test_classes = image_folder_class_split(root, sorted(files))
    hierarchy = _read_hierarchy(os.path.join(root, HIERARCHY_FILE))
    if hierarchy is not None:
        missing = sorted(set(train_classes + test_classes) - set(hierarchy))
        if missing:
            raise data.DataError(f"{os.path.join(root, HIERARCHY_FILE)} has no row for the classes {missing[:5]}; add "
                             "a 'class,super_class' row for every class.")
        vocabulary = sorted(set(hierarchy.values()))

    def split(classes):
        paths = [path for name in classes for path in files[name]]
        labels = [label for label, name in enumerate(classes) for _ in files[name]]
        supers = None if hierarchy is None else np.array([vocabulary.index(hierarchy[c]) for c in classes],
                                                         np.int32)
        return FileExamples(np.array(paths), np.array(labels, np.int32), tuple(classes)), supers

    (train, train_supers), (test, test_supers) = split(train_classes), split(test_classes)
    return train, test, train_supers, test_supers


# ----------------------------------------------------------------------------------------------------------
# The decoded cache (config.dataset.cache_decoded).

def cached_shape(shape: tf.Tensor, shorter_side: int) -> tf.Tensor:
    """i32[2]: the (height, width) an image of shape i32[2] is cached at: the shorter side `shorter_side`, the aspect
    ratio kept (rounded); an image whose shorter side is no longer is kept as it is."""
    factor = tf.minimum(shorter_side / tf.cast(tf.reduce_min(shape), tf.float32), 1.0)
    return tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * factor), tf.int32), 1)


def decode_for_cache(image_bytes: tf.Tensor, shorter_side: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """(u8[h', w', 3] the whole image resized to `cached_shape`, i32[2] its encoded (height, width))."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    shape = tf.shape(image)[:2]
    size = cached_shape(shape, shorter_side)
    resized = tf.cond(tf.reduce_all(size == shape), lambda: image,
                      lambda: resize_window(image, whole(image), (size[0], size[1])))
    return resized, shape


@dataclasses.dataclass(frozen=True)
class DecodedImages:
    """The training images a host reads, decoded once and resized to `cached_shape`, in host memory.

    pixels: u8[total bytes], the images one after the other, each row-major u8[h', w', 3]; offsets: i64[n] where
    each starts; shapes, full_shapes: i32[n, 2], (height, width) as cached and as encoded; labels: i32[n];
    slots: i64[records], the image of each record of `cached_records` (-1: it failed to decode).
    """

    pixels: tf.Tensor
    offsets: np.ndarray
    shapes: np.ndarray
    full_shapes: np.ndarray
    labels: np.ndarray
    slots: np.ndarray

    @property
    def num_bytes(self) -> int:
        return int(self.pixels.shape[0])


def decode_into_cache(records: tf.data.Dataset, num_records: int, *, shorter_side: int, max_bytes: int,
                      what: str) -> DecodedImages:
    """Every record's image decoded and resized to `cached_shape` (in parallel, in the records' order), packed
    into one buffer; a data.DataError as soon as the images exceed `max_bytes`, before any more are decoded."""
    def decoded(position, record):
        image, full_shape = decode_for_cache(_encoded_image(record), shorter_side)
        return {"position": position, "image": image, "full_shape": full_shape, "label": record["label"]}

    stream = records.enumerate().map(decoded, num_parallel_calls=AUTOTUNE).ignore_errors().prefetch(AUTOTUNE)
    images, positions, full_shapes, labels, total = [], [], [], [], 0
    for example in numpy_batches(stream):
        total += example["image"].nbytes
        if total > max_bytes:
            count = len(images) + 1
            raise data.DataError(
                f"config.dataset.cache_decoded: the {num_records} training images {what} reads, decoded with the "
                f"shorter side at most config.dataset.cache_shorter_side = {shorter_side} px, need more than "
                f"config.dataset.cache_max_gb = {max_bytes / 1e9:g} GB ({total / 1e9:.2f} GB for the first {count}, "
                f"about {total / count * num_records / 1e9:.1f} GB for all); raise cache_max_gb if the host has the "
                "memory, lower cache_shorter_side, or set cache_decoded=False.")
        images.append(example["image"])
        positions.append(example["position"])
        full_shapes.append(example["full_shape"])
        labels.append(example["label"])
    shapes = np.array([image.shape[:2] for image in images], np.int32).reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum([image.size for image in images])]).astype(np.int64)
    # TensorFlow's kernels need 64-byte aligned buffers; NumPy's allocator aligns to 16.
    buffer = np.empty(total + 64, np.uint8)
    pixels = buffer[-buffer.ctypes.data % 64:][:total]
    for index, image in enumerate(images):  # copied one by one and let go: the peak stays near `total`
        pixels[offsets[index]:offsets[index + 1]] = image.ravel()
        images[index] = None
    slots = np.full(num_records, -1, np.int64)
    slots[np.array(positions, np.int64)] = np.arange(len(positions))
    # DLPack hands the buffer to TensorFlow without a copy (tf.constant would hold two).
    pixels = tf.experimental.dlpack.from_dlpack(pixels.__dlpack__()) if total else tf.zeros([0], tf.uint8)
    return DecodedImages(pixels, offsets[:-1], shapes, np.array(full_shapes, np.int32).reshape(-1, 2),
                         np.array(labels, np.int32), slots)


def cached_train_image(cache: DecodedImages, slot: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                       crop_scale: Tuple[float, float], crop_ratio: Tuple[float, float],
                       horizontal_flip: bool) -> tf.Tensor:
    """`train_image` of the cached image `slot` (i64 scalar), drawn from seed i64[2]: u8[image_size, image_size, 3].

    The crop window is drawn on the encoded image's shape with the same seed, so it covers the same part of the
    picture as `train_image`'s; it is cut from the cached pixels, scaled to their size (fractional), and resized
    from them. An image the cache kept as it was gives `train_image`'s pixels exactly (a crop below twice
    image_size a side); a resized one, the same crop resampled from the resized image (docs/datasets.md).
    """
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    shape = tf.gather(cache.shapes, slot)
    full_shape = tf.gather(cache.full_shapes, slot)
    window = tf.cast(random_crop_window(full_shape, crop_seed, scale=crop_scale, ratio=crop_ratio), tf.float32)
    factor = tf.cast(shape, tf.float32) / tf.cast(full_shape, tf.float32)
    top, left, height, width = tf.unstack(window * tf.concat([factor, factor], axis=0))
    first_row = tf.cast(tf.floor(top), tf.int64)
    last_row = tf.minimum(tf.cast(tf.math.ceil(top + height), tf.int64), tf.cast(shape[0], tf.int64))
    first_column = tf.cast(tf.floor(left), tf.int32)
    last_column = tf.minimum(tf.cast(tf.math.ceil(left + width), tf.int32), shape[1])
    row_bytes = tf.cast(shape[1], tf.int64) * 3
    start = tf.gather(cache.offsets, slot) + first_row * row_bytes
    rows = tf.reshape(cache.pixels[start:start + (last_row - first_row) * row_bytes], [-1, shape[1], 3])
    pixels = rows[:, first_column:last_column]
    inside = tf.stack([top - tf.cast(first_row, tf.float32), left - tf.cast(first_column, tf.float32), height, width])
    return crop_to_pixels(pixels, inside, flip_seed, image_size=image_size, horizontal_flip=horizontal_flip)


# ----------------------------------------------------------------------------------------------------------
# Batches.

# Every NumPy stream this module hands out that may still hold a tf.data iterator (`numpy_batches`).
_OPEN_STREAMS: "weakref.WeakSet" = weakref.WeakSet()


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[Dict[str, np.ndarray]]:
    """The elements of `dataset` as NumPy, from a tf.data iterator that is let go of when the stream closes
    (exhausted, closed, collected, or at the interpreter's exit: `_close_open_streams`)."""
    stream = _numpy_stream(dataset)
    _OPEN_STREAMS.add(stream)
    return stream


def _numpy_stream(dataset: tf.data.Dataset) -> Iterator[Dict[str, np.ndarray]]:
    iterator = dataset.as_numpy_iterator()
    try:
        yield from iterator
    finally:
        del iterator  # the pipeline's threads stop here, while Python still runs their NumPy calls


@atexit.register
def _close_open_streams() -> None:
    """Closes the streams still open when the interpreter exits (a run stopped early, an error, an epoch drawn
    ahead): a tf.data iterator freed later, at interpreter teardown, can wait forever for a thread of its pipeline
    that waits for the GIL to call PIL (`resize_window`). atexit runs after Python's own threads are joined."""
    for stream in list(_OPEN_STREAMS):
        try:
            stream.close()
        except ValueError:  # running on a thread that is still alive (a daemon): it is that thread's to close
            pass


def _one_thread_per_op() -> tf.data.Options:
    """tf.data options that run each op of an image's map on one thread: the map's parallel calls already use
    every core, and an op that splits one small image over threads only adds synchronisation."""
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    return options


def train_dataset(records: tf.data.Dataset, *, epoch_seed_value: int, local_batch_size: int, num_steps: int,
                  start_step: int, transform, sampler: str, samples_per_class: int) -> tf.data.Dataset:
    """Batches {'image': u8[local_batch, H, W, 3], 'label': i32[local_batch], 'index': i64[local_batch]}.

    records: this host's records in the epoch's order; transform(record, seed i64[2]) makes a record's image.
    'index' is each image's position in the stream (after class-balanced grouping), the seed of its augmentation
    together with the epoch seed; gaps in it are images that failed to decode. 'class_balanced' groups
    `samples_per_class` images of one class together (tf.data group_by_window over the repeated stream; each host's
    batches hold whole groups).
    """
    records = records.repeat()
    if sampler == "class_balanced":
        records = records.group_by_window(
            key_func=lambda record: tf.cast(record["label"], tf.int64),
            reduce_func=lambda _, window: window.batch(samples_per_class),
            window_size=samples_per_class).unbatch()
    needed = num_steps * local_batch_size

    def example(index, record):
        seed = tf.stack([tf.constant(epoch_seed_value, tf.int64), index])
        return {"image": transform(record, seed), "label": record["label"], "index": index}

    examples = records.enumerate().take(MAX_READ_FACTOR * needed).skip(start_step * local_batch_size)
    examples = examples.map(example, num_parallel_calls=AUTOTUNE).ignore_errors()
    examples = examples.take((num_steps - start_step) * local_batch_size)
    return examples.batch(local_batch_size, drop_remainder=True).prefetch(AUTOTUNE).with_options(_one_thread_per_op())


def eval_dataset(records: tf.data.Dataset, *, num_batches: int, local_batch_size: int, transform,
                 image_shape: Tuple[int, int, int]) -> tf.data.Dataset:
    """Exactly `num_batches` batches {'image', 'label', 'mask', 'index'}: this host's images, then padding (mask
    False, index -1). records carry each example's 'index' within the split."""
    examples = records.map(
        lambda record: {"image": transform(_encoded_image(record)), "label": record["label"],
                        "mask": tf.constant(True), "index": record["index"]},
        num_parallel_calls=AUTOTUNE).ignore_errors()
    padding = tf.data.Dataset.from_tensors({"image": tf.zeros(image_shape, tf.uint8), "label": tf.constant(0),
                                            "mask": tf.constant(False),
                                            "index": tf.constant(-1, tf.int64)}).repeat()
    examples = examples.concatenate(padding).take(num_batches * local_batch_size)
    return examples.batch(local_batch_size).prefetch(AUTOTUNE)


class EpochAhead:
    """The first batch of an epoch's training pipeline, drawn on a thread of its own as soon as it is made:
    building the pipeline and filling its shuffle buffer then overlap whatever the host does meanwhile.

    Not a daemon thread: a process that ends meanwhile (early stopping, a preemption at an epoch's end) waits for
    it (a buffer fill: docs/benchmarks.md, section "The input") rather than tearing TensorFlow down under it.
    """

    def __init__(self, epoch: int, make_iterator: Callable[[], Iterator[Dict[str, np.ndarray]]]):
        self.epoch = epoch
        self._outcome: Dict[str, object] = {}
        self._thread = threading.Thread(target=self._draw, args=(make_iterator,), name=f"train-epoch-{epoch}-ahead")
        self._thread.start()

    def _draw(self, make_iterator) -> None:
        try:
            iterator = make_iterator()
            self._outcome["first"] = list(itertools.islice(iterator, 1))
            self._outcome["iterator"] = iterator
        except Exception as error:  # Raised where the batches are asked for, on the caller's thread.
            self._outcome["error"] = error

    def batches(self) -> Iterator[Dict[str, np.ndarray]]:
        """Every batch of the pipeline, the first one drawn ahead (waits for it if it is not there yet)."""
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return itertools.chain(self._outcome["first"], self._outcome["iterator"])


class TfDataset:
    """A TFDS benchmark or an image folder behind the `data.Dataset` protocol, for one host."""

    def __init__(self, config, info: data.DatasetInfo, splits: Mapping[str, Examples], *, local_batch_size: int,
                 local_eval_batch_size: int, process_index: int, process_count: int):
        dataset = config.dataset
        self.info = info
        self.num_skipped_images = 0
        self._splits = splits
        self._seed = config.seed
        self._sampler = dataset.sampler
        self._samples_per_class = dataset.samples_per_class
        self._local_batch_size = local_batch_size
        self._local_eval_batch_size = local_eval_batch_size
        self._process_index = process_index
        self._process_count = process_count
        self._steps_per_epoch = data.steps_per_epoch(info.num_train_examples, local_batch_size * process_count,
                                                     config.steps_per_epoch)
        self._num_epochs = config.num_epochs
        self._ahead: Optional[EpochAhead] = None  # the next epoch's batches, drawn ahead
        # u8 pixels: the device normalises them (data.normalize_pixels).
        self._augmentation = dict(image_size=dataset.image_size, crop_scale=tuple(dataset.crop_scale),
                                  crop_ratio=tuple(dataset.crop_ratio), horizontal_flip=dataset.horizontal_flip)
        self._cache_decoded = dataset.cache_decoded
        self._cache_shorter_side = dataset.cache_shorter_side
        self._cache_max_bytes = int(dataset.cache_max_gb * 1e9)
        self._cache: Optional[DecodedImages] = None  # filled by the first epoch asked for
        self._cache_lock = threading.Lock()
        self._eval_transform = lambda image_bytes: eval_image(
            image_bytes, image_size=dataset.image_size, resize_size=dataset.resize_size)

    def _count_skipped(self, what: str, num_skipped: int) -> None:
        if num_skipped:
            self.num_skipped_images += num_skipped
            logging.log_every_n_seconds(
                logging.WARNING, "%s: %d image(s) failed to decode and were skipped (host %d, %d so far).", 60,
                what, num_skipped, self._process_index, self.num_skipped_images)

    def decoded_images(self) -> DecodedImages:
        """This host's training images decoded (config.dataset.cache_decoded): filled by the first call, in
        parallel, every later epoch reads them from memory."""
        with self._cache_lock:
            if self._cache is None:
                records, count = self._splits["train"].cached_records(self._process_index, self._process_count)
                what = f"of {self.info.name} host {self._process_index}"
                self._cache = decode_into_cache(records, count, shorter_side=self._cache_shorter_side,
                                                max_bytes=self._cache_max_bytes, what=what)
                self._count_skipped(f"{self.info.name} decoded cache", int(np.sum(self._cache.slots < 0)))
                logging.info("%s: %d training images decoded into %.2f GB of host memory (host %d).",
                             self.info.name, len(self._cache.offsets), self._cache.num_bytes / 1e9,
                             self._process_index)
            return self._cache

    def _train_iterator(self, epoch: int, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
        """The batches of `epoch` from `start_step` on, with their 'index', from a pipeline built for the epoch:
        its order, shuffle buffer and augmentation follow (config.seed, epoch) alone (resumption needs it).

        With the decoded cache, the records are cache slots and every crop is cut from the cached pixels, in the
        epoch that fills the cache as in the later ones, so a resumed run sees the uninterrupted run's images."""
        seed = epoch_seed(self._seed, epoch)
        train = self._splits["train"]
        if self._cache_decoded:
            cache = self.decoded_images()
            slots = cache.slots[train.epoch_slots(self._process_index, self._process_count, seed)]
            slots = slots[slots >= 0]
            records = tf.data.Dataset.from_tensor_slices({"slot": slots, "label": cache.labels[slots]})
            transform = lambda record, seed: cached_train_image(cache, record["slot"], seed, **self._augmentation)
        else:
            records, _ = train.host_records(self._process_index, self._process_count, seed)
            transform = lambda record, seed: train_image(_encoded_image(record), seed, **self._augmentation)
        return numpy_batches(train_dataset(
            records, epoch_seed_value=seed, local_batch_size=self._local_batch_size,
            num_steps=self._steps_per_epoch, start_step=start_step, transform=transform,
            sampler=self._sampler, samples_per_class=self._samples_per_class))

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[data.Batch]:
        """See data.Dataset.train_batches.

        Each epoch has a pipeline of its own (TFDS takes the file order's seed when the pipeline is built), but
        once this host yields an epoch's last batch, the next epoch's pipeline is built and its shuffle buffer
        filled on a background thread (`EpochAhead`), while the host works at the epoch boundary (refresh,
        evaluation, checkpoint): the fill (16,384 records of ~70 KB; measured in docs/benchmarks.md, section "The
        input") is then off the critical path.
        """
        if not 0 <= start_step <= self._steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside the epoch's {self._steps_per_epoch} steps.")
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.epoch == epoch and start_step == 0:
            batches = ahead.batches()
        else:
            batches = self._train_iterator(epoch, start_step)
        step, attempted = start_step, start_step * self._local_batch_size
        for batch in batches:
            # Positions missing from 'index' are the images that failed to decode.
            last_attempted, attempted = attempted, int(batch.pop("index")[-1]) + 1
            self._count_skipped(f"{self.info.name} train epoch {epoch}",
                                attempted - last_attempted - self._local_batch_size)
            step += 1
            if step == self._steps_per_epoch and epoch + 1 < self._num_epochs:
                self._ahead = EpochAhead(epoch + 1, lambda: self._train_iterator(epoch + 1, 0))
            yield batch
        if step < self._steps_per_epoch:
            raise data.DataError(f"{self.info.name}: more than half of the images read in epoch {epoch} failed to "
                             "decode; check the dataset's files.")

    def eval_batches(self, split: str) -> Iterator[data.Batch]:
        """See data.Dataset.eval_batches."""
        if split not in self.info.num_eval_examples:
            raise ValueError(f"Unknown eval split {split!r}; {self.info.name} has "
                             f"{tuple(self.info.num_eval_examples)}.")
        records, count = self._splits[split].host_records(self._process_index, self._process_count, None)
        ids = tf.constant(self._splits[split].host_ids(self._process_index, self._process_count))
        records = records.enumerate().map(lambda position, record: {**record, "index": tf.gather(ids, position)})
        num_batches = data.num_eval_batches(self.info.num_eval_examples[split],
                                            self._local_eval_batch_size * self._process_count)
        batches = eval_dataset(records, num_batches=num_batches, local_batch_size=self._local_eval_batch_size,
                               transform=self._eval_transform, image_shape=self.info.image_shape)
        decoded = 0
        for batch in numpy_batches(batches):
            decoded += int(batch["mask"].sum())
            yield batch
        self._count_skipped(f"{self.info.name} eval split {split!r}", count - decoded)


def _only_classes(examples: Examples, classes: np.ndarray) -> Examples:
    """The examples of `classes` (sorted ids of the label space), relabelled 0..len(classes)-1."""
    # One more entry, -1 -> -1, so the records of other label spaces (-1) stay out.
    table = np.concatenate([data.relabelling(classes, examples.num_classes), np.array([-1], np.int32)])
    if isinstance(examples, FileExamples):
        rows = np.isin(examples.labels, classes)
        names = tuple(examples.class_names[c] for c in classes) if examples.class_names else ()
        return FileExamples(examples.paths[rows], table[examples.labels[rows]], names)
    return dataclasses.replace(
        examples, record_labels={split: table[labels] for split, labels in examples.record_labels.items()},
        label_table=table[examples.label_table])


def create_dataset(config, *, local_batch_size: int, local_eval_batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> TfDataset:
    """This host's view of `config.dataset.name` (a TFDS benchmark or 'image_folder'); see the module doc.

    Reads the labels (TFDS) or the file list (image folder) now and stops with a ValueError that says what to
    download or place where if the data is missing; images are read only while batches are drawn.
    """
    dataset = config.dataset
    name = dataset.name
    if dataset.sampler == "class_balanced" and local_batch_size % dataset.samples_per_class:
        raise ValueError(f"config.dataset.samples_per_class={dataset.samples_per_class} must divide the "
                         f"per-host batch size {local_batch_size}; change it or config.batch_size.")
    if name == "image_folder":
        train, test, train_supers, test_supers = image_folder_splits(dataset.data_dir)
        evals = {"test": test}
    elif name in BENCHMARKS:
        builder = prepared_builder(name, dataset.data_dir, dataset.manual_dir)
        train, evals, train_supers, test_supers = tfds_splits(name, builder, dataset.shuffle_buffer)
    else:
        raise ValueError(f"config.dataset.name={name!r} has no input pipeline; use one of "
                         f"{tuple(BENCHMARKS) + ('image_folder',)}.")
    val_supers = None
    if data.holds_out_classes(dataset):
        data.check_held_out_classes(dataset, train.num_classes, name)
        train_classes, val_classes = data.held_out_classes(dataset, train.num_classes)
        if train_supers is not None:
            train_supers, val_supers = train_supers[train_classes], train_supers[val_classes]
        train, evals["val"] = (_only_classes(train, classes) for classes in (train_classes, val_classes))
    splits = dict(evals, train=train)
    info = data.DatasetInfo(
        name=name,
        num_train_classes=train.num_classes,
        num_train_examples=train.num_examples,
        image_shape=(dataset.image_size, dataset.image_size, 3),
        eval_splits=tuple(split for split in evals if split != "val"),
        num_eval_examples={split: examples.num_examples for split, examples in splits.items()},
        train_super_labels=train_supers,
        test_super_labels=test_supers,
        val_super_labels=val_supers,
        train_class_names=train.class_names if isinstance(train, FileExamples) else None,
    )
    if data.steps_per_epoch(info.num_train_examples, local_batch_size * process_count) < 1:
        raise ValueError(f"config.batch_size={local_batch_size * process_count} exceeds the "
                         f"{info.num_train_examples} training images of {name}; lower it.")
    logging.info("%s: %d train classes, %d train images; eval splits %s; super-classes: %s.", name,
                 info.num_train_classes, info.num_train_examples, info.num_eval_examples,
                 "yes" if train_supers is not None else "no")
    return TfDataset(config, info, splits, local_batch_size=local_batch_size,
                     local_eval_batch_size=local_eval_batch_size, process_index=process_index,
                     process_count=process_count)
