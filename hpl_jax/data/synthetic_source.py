"""The embedded pretraining source: more draws of the embedded generators, disjoint from the targets.

ImageNet is to CUB what this dataset is to the embedded targets (`synthetic`, configs/default.py, and
`synthetic_sop`, configs/synthetic_sop.py): bigger data of the same visual domain, with none of the target's
classes. It is the union of independent draws of the two generators, each draw made with its own data seed
(`dataset.synthetic_source.sop_seeds`, `.default_seeds`) and the generators' settings of `config.dataset`
(`dataset.synthetic_sop`, `dataset.synthetic`: the targets' own, unless a config changes them).

What the source shares with a target: the generators' laws, i.e. how a product or a pattern is drawn (part
layouts, palettes, materials, stripes and blobs), how it is photographed (viewpoint, crop, light, background,
noise), the image size and the 8-bit pixels. What it does not share: its catalogues. Every draw's super-classes,
sub-families, families and classes come from its own seed, so no product, sub-family, super-class or family of a
target drawn with another seed appears in it. (A target drawn with one of the source's own seeds *would* share all
of them: `pretraining.source_overlap` refuses to fine-tune on such a target.)

The splits: every draw's training classes train here and every draw's test classes are the source's test split
(retrieval on unseen source classes, the pretraining's own check); labels run draw after draw. Each class's
super-class is its sub-family (SOP-like draws) or family (default draws), numbered globally. With the defaults
(6 SOP-like and 6 default draws): 6,000 training classes and about 36,000 training photos, 7.5x the training
photos of one SOP-like target and 30x those of the default one.
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
from absl import logging

from hpl_jax import data
from hpl_jax.data import synthetic
from hpl_jax.data import synthetic_sop


def _draw_splits(dataset_config, generator: str, seed: int):
    """One draw's ({split: u8 images}, {split: i32 labels}, {split: i32 super label per class})."""
    config = dataset_config.copy_and_resolve_references()
    config.seed = seed
    if generator == "synthetic":
        default = config.synthetic
        images, labels, supers, _ = synthetic.generate_splits(
            seed, num_families=default.num_families, classes_per_family=default.classes_per_family,
            images_per_class=default.images_per_class, size=config.resize_size)
        return images, labels, supers
    config.synthetic_sop.super_level = "sub_family"
    catalogue, images, classes = synthetic_sop.generate(config)
    split_images, split_labels, super_labels = {}, {}, {}
    for name, members in synthetic_sop.split_classes(catalogue.num_classes,
                                                     config.synthetic_sop.classes_per_sub_family).items():
        rows = np.isin(classes, members)
        split_images[name] = images[rows]
        split_labels[name] = np.searchsorted(members, classes[rows]).astype(np.int32)
        super_labels[name] = catalogue.sub_family[members].astype(np.int32)
    return split_images, split_labels, super_labels


def generate(dataset_config) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Every draw of `dataset_config.synthetic_source`, concatenated.

    Returns:
      ({'train', 'test': u8[n, R, R, 3]}, {'train', 'test': i32[n]} labels, draw after draw,
       {'train', 'test': i32[C]} each class's super-class (sub-family or family), numbered over all draws).
    """
    images: Dict[str, list] = {"train": [], "test": []}
    labels: Dict[str, list] = {"train": [], "test": []}
    supers: Dict[str, list] = {"train": [], "test": []}
    class_offset = {"train": 0, "test": 0}
    super_offset = 0
    for generator, seed in data.embedded_draws(dataset_config):
        draw_images, draw_labels, draw_supers = _draw_splits(dataset_config, generator, seed)
        num_supers = 1 + max(int(draw_supers[name].max()) for name in images)
        for name in images:
            images[name].append(draw_images[name])
            labels[name].append(draw_labels[name] + class_offset[name])
            supers[name].append(draw_supers[name] + super_offset)
            class_offset[name] += len(draw_supers[name])
        super_offset += num_supers
    return ({name: np.concatenate(parts) for name, parts in images.items()},
            {name: np.concatenate(parts).astype(np.int32) for name, parts in labels.items()},
            {name: np.concatenate(parts).astype(np.int32) for name, parts in supers.items()})


class SyntheticSourceDataset(synthetic.SyntheticDataset):
    """The pretraining source behind the `data.Dataset` protocol (batches as the default dataset's)."""

    def _generate(self):
        start = time.perf_counter()
        images, labels, supers = generate(self._config.dataset)
        logging.info("synthetic_source: %d draws, %d training photos of %d classes generated in %.1f s.",
                     len(data.embedded_draws(self._config.dataset)), len(labels["train"]), len(supers["train"]),
                     time.perf_counter() - start)
        return images, labels, supers, None
