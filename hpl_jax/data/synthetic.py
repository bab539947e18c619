"""The embedded default dataset: procedurally generated images with a known two-level hierarchy.

Made in memory from `config.dataset.seed` with NumPy alone (no files, no download, no TensorFlow), so training
seeds (`config.seed`) vary on the same data. Each coarse *family* fixes a palette and a stripe orientation; each fine *class* inside it adds its own stripe frequency, a colour
shift and a blob at its own place. Every image is its class's pattern under a random phase, shift, contrast
and noise. As in the real benchmarks, the classes are split disjointly: the first half of each family's classes
trains, the other half is the unseen test set, so the test measures what the embedding learned about the
families' shared structure. With `dataset.num_val_classes` or `dataset.num_folds`, some training classes
(`data.held_out_classes`) form a 'val' split instead.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from hpl_jax import data


def _class_patterns(rng: np.random.Generator, num_families: int, classes_per_family: int):
    """Random parameters of every class: a family fixes palette, orientation and blob colour; its classes
    differ in stripe frequency, blob position and a small colour shift."""
    classes = []
    for family in range(num_families):
        palette = rng.uniform(0.15, 0.85, size=(2, 3))
        blob_colour = rng.uniform(0.0, 1.0, size=3)
        orientation = np.pi * family / num_families + rng.uniform(-0.1, 0.1)
        for _ in range(classes_per_family):
            classes.append(dict(
                family=family,
                colours=np.clip(palette + rng.normal(0.0, 0.08, size=(2, 3)), 0.0, 1.0),
                orientation=orientation + rng.normal(0.0, 0.05),
                frequency=rng.uniform(1.5, 5.0),
                blob_centre=rng.uniform(0.25, 0.75, size=2),
                blob_colour=np.clip(blob_colour + rng.normal(0.0, 0.15, size=3), 0.0, 1.0),
            ))
    return classes


def render_images(rng: np.random.Generator, pattern: dict, num_images: int, size: int) -> np.ndarray:
    """Images of one class, f32[num_images, size, size, 3] in [0, 1]."""
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((num_images, size, size, 3), np.float32)
    for i in range(num_images):
        shift = rng.uniform(-0.12, 0.12, size=2)
        theta = pattern["orientation"] + rng.normal(0.0, 0.05)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        along = (x - shift[1]) * np.cos(theta) + (y - shift[0]) * np.sin(theta)
        stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * pattern["frequency"] * along + phase)
        low, high = pattern["colours"]
        image = low + stripes[..., None] * (high - low)
        centre = pattern["blob_centre"] + shift
        blob = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * 0.12 ** 2))
        image = image * (1.0 - 0.7 * blob[..., None]) + 0.7 * blob[..., None] * pattern["blob_colour"]
        # Per-image contrast, colour cast and pixel noise.
        image = rng.uniform(0.8, 1.2) * (image - 0.5) + 0.5 + rng.normal(0.0, 0.04, size=3)
        images[i] = np.clip(image + rng.normal(0.0, 0.05, size=image.shape), 0.0, 1.0)
    return images


def random_resized_crop(rng: np.random.Generator, images: np.ndarray, out_size: int, scale, ratio,
                        flip: bool, keep: slice = slice(None)) -> np.ndarray:
    """Inception-style random resized crop (bilinear) and horizontal flip, [n, S, S, 3] -> f32[n', out, out, 3].

    The random draws are made for all n images and then only the rows `keep` are cropped, so a host's share of
    a global batch gets the same crops whichever hosts share it.
    """
    n, height, width, _ = images.shape
    area = height * width * rng.uniform(scale[0], scale[1], size=n)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=n))
    crop_h = np.clip(np.sqrt(area / aspect), 1.0, height)
    crop_w = np.clip(np.sqrt(area * aspect), 1.0, width)
    top = rng.uniform(0.0, 1.0, size=n) * (height - crop_h)
    left = rng.uniform(0.0, 1.0, size=n) * (width - crop_w)
    steps = (np.arange(out_size) + 0.5) / out_size
    ys = np.clip(top[:, None] + steps[None] * crop_h[:, None] - 0.5, 0.0, height - 1.0)  # [n, out]
    xs = np.clip(left[:, None] + steps[None] * crop_w[:, None] - 0.5, 0.0, width - 1.0)
    if flip:
        flipped = rng.uniform(size=n) < 0.5
        xs = np.where(flipped[:, None], xs[:, ::-1], xs)
    images, ys, xs = images[keep].astype(np.float32), ys[keep], xs[keep]
    n = len(images)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]
    idx = np.arange(n)[:, None, None]

    def gather(yy, xx):
        return images[idx, yy[:, :, None], xx[:, None, :]]

    top_row = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
    bottom_row = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    return (top_row * (1 - wy) + bottom_row * wy).astype(np.float32)


def center_crop(images: np.ndarray, out_size: int) -> np.ndarray:
    top = (images.shape[1] - out_size) // 2
    left = (images.shape[2] - out_size) // 2
    return images[:, top:top + out_size, left:left + out_size]


def epoch_order(seed: int, epoch: int, num_examples: int, length: int) -> np.ndarray:
    """The first `length` training indices of `epoch`: one permutation per pass over the examples, as many
    passes as `length` needs (`config.steps_per_epoch` may ask for more or fewer steps than one pass).

    The first pass is drawn from (seed, epoch) alone, so a one-pass epoch keeps the order it always had.
    """
    passes = [np.random.default_rng([seed, epoch] if p == 0 else [seed, epoch, p, 0]).permutation(num_examples)
              for p in range(-(-length // num_examples))]
    return np.concatenate(passes)[:length]


def generate_splits(seed: int, *, num_families: int = 8, classes_per_family: int = 10, images_per_class: int = 30,
                    size: int = 36):
    """The embedded dataset's images and labels (the module docstring says what they are), from `seed` alone.

    Returns:
      ({'train', 'test': u8[n, size, size, 3]}, {'train', 'test': i32[n]} labels 0..C-1 of each split,
       {'train', 'test': i32[C]} the family of each class, None): the first half of each family's classes
      trains, the other half is the class-disjoint test set.
    """
    rng = np.random.default_rng(seed)
    patterns = _class_patterns(rng, num_families, classes_per_family)
    num_train_per_family = classes_per_family // 2
    splits = {"train": ([], [], []), "test": ([], [], [])}
    for index, pattern in enumerate(patterns):
        split = "train" if index % classes_per_family < num_train_per_family else "test"
        images, labels, families = splits[split]
        # Stored as 8-bit pixels, like decoded image files (and 4x smaller than float32).
        rendered = render_images(rng, pattern, images_per_class, size)
        images.append(np.round(rendered * 255.0).astype(np.uint8))
        labels.append(np.full(images_per_class, len(families), np.int32))
        families.append(pattern["family"])
    return ({name: np.concatenate(s[0]) for name, s in splits.items()},
            {name: np.concatenate(s[1]) for name, s in splits.items()},
            {name: np.asarray(s[2], np.int32) for name, s in splits.items()}, None)


class SyntheticDataset:
    """The embedded default behind the `data.Dataset` protocol (see data.py for the batch format).

    Another in-memory dataset (synthetic_sop.py) overrides `_generate` and keeps the batching.
    """

    num_skipped_images = 0  # its images are generated: none fails to decode

    def __init__(self, config, *, local_batch_size: int, local_eval_batch_size: int,
                 process_index: int = 0, process_count: int = 1):
        self._config = config
        self._local_batch_size = local_batch_size
        self._local_eval_batch_size = local_eval_batch_size
        self._process_index = process_index
        self._process_count = process_count

        self._images, self._labels, super_labels, super_parents = self._generate()
        if data.holds_out_classes(config.dataset):
            self._hold_out_validation_classes(super_labels)

        size = config.dataset.image_size
        self.info = data.DatasetInfo(
            name=config.dataset.name,
            num_train_classes=len(super_labels["train"]),
            num_train_examples=len(self._labels["train"]),
            image_shape=(size, size, 3),
            eval_splits=("test",),
            num_eval_examples={name: len(labels) for name, labels in self._labels.items()},
            train_super_labels=super_labels["train"],
            test_super_labels=super_labels["test"],
            val_super_labels=super_labels.get("val"),
            super_parents=super_parents,
        )
        self._global_batch_size = local_batch_size * process_count
        self._steps_per_epoch = data.steps_per_epoch(self.info.num_train_examples, self._global_batch_size,
                                                     config.steps_per_epoch)

    def _generate(self):
        """The images, as 8-bit pixels, and labels of 'train' and 'test', each class's family, and no level
        above the families (see `generate_splits`)."""
        synthetic = self._config.dataset.synthetic
        return generate_splits(self._config.dataset.seed, num_families=synthetic.num_families,
                               classes_per_family=synthetic.classes_per_family,
                               images_per_class=synthetic.images_per_class, size=self._config.dataset.resize_size)

    def _hold_out_validation_classes(self, super_labels) -> None:
        """Moves the training classes `config.dataset` holds out (data.held_out_classes) to a 'val' split."""
        dataset = self._config.dataset
        num_classes = len(super_labels["train"])
        data.check_held_out_classes(dataset, num_classes, dataset.name)
        images, labels, supers = self._images["train"], self._labels["train"], super_labels["train"]
        split = data.held_out_classes(dataset, num_classes)
        for name, classes in zip(("train", "val"), split):
            rows = np.isin(labels, classes)
            self._images[name] = images[rows]
            self._labels[name] = data.relabelling(classes, num_classes)[labels[rows]]
            super_labels[name] = supers[classes]

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[data.Batch]:
        """Global batches in the order `epoch_order` gives (seed, epoch); this host yields its slice of each.

        The crops interpolate between pixels: they stay f32 in 0..255 (rounding them to u8 would change every
        run's numbers); the device normalises them (data.normalize_pixels)."""
        dataset = self._config.dataset
        order = epoch_order(self._config.seed, epoch, self.info.num_train_examples,
                            self._steps_per_epoch * self._global_batch_size).reshape(self._steps_per_epoch, -1)
        mine = slice(self._process_index * self._local_batch_size,
                     (self._process_index + 1) * self._local_batch_size)
        for step in range(start_step, self._steps_per_epoch):
            # Augmentation randomness depends on (seed, epoch, step) only, not on the host layout.
            rng = np.random.default_rng([self._config.seed, epoch, step])
            images = random_resized_crop(rng, self._images["train"][order[step]], dataset.image_size,
                                         dataset.crop_scale, dataset.crop_ratio, dataset.horizontal_flip, mine)
            yield {"image": images, "label": self._labels["train"][order[step][mine]]}

    def eval_batches(self, split: str) -> Iterator[data.Batch]:
        """Centre crops of the stored 8-bit images, u8 (see data.py for the batch format)."""
        if split not in self._labels:
            raise ValueError(f"Unknown eval split {split!r}; the synthetic dataset has {tuple(self._labels)}.")
        num = len(self._labels[split])
        global_batch = self._local_eval_batch_size * self._process_count
        num_batches = data.num_eval_batches(num, global_batch)
        mine = data.host_shard(num, self._process_index, self._process_count)
        padded = np.zeros(num_batches * self._local_eval_batch_size, np.int64)
        mask = np.zeros(padded.shape, bool)
        padded[:len(mine)], mask[:len(mine)] = mine, True
        for start in range(0, len(padded), self._local_eval_batch_size):
            rows = padded[start:start + self._local_eval_batch_size]
            images = center_crop(self._images[split][rows], self._config.dataset.image_size)
            yield {"image": images, "label": self._labels[split][rows],
                   "mask": mask[start:start + self._local_eval_batch_size], "index": rows}
