"""An embedded SOP-like benchmark: a catalogue of products photographed a few times each, three levels deep.

Stanford Online Products (docs/method.md, "Benchmarks") has many classes with few images each (11,318 training
products of 2-12 photos, 5.3 on average), 12 super-classes (bicycle, chair, kettle, ...), and
test products that are other products of the same super-classes. This module generates a small dataset of that
kind from `config.dataset.seed` with vectorised NumPy, so the data stay fixed while training seeds
(`config.seed`) vary. It was designed from what real product photos share and fixed before any training run on
it (its ranges were set from the pixel statistics below and a look at the photos, never from a training result):

- A **super-class** (a kind of product: chairs, kettles) shares *shape and layout*. Every object is drawn as 3
  parts (superellipses: a body and two attached parts such as legs, a handle, a spout), and the super-class fixes
  the layout of the parts (where each sits relative to the body, its size, its squareness and angle), how large
  the object usually sits in the frame, and how often it is photographed in a studio rather than in a scene
  (sofas are shot in rooms, staplers on white). Its colours are free: chairs come in every colour.
- A **sub-family** (office chairs, dining chairs) shares *more*: its own proportions (the super-class layout
  perturbed, sizes by ~15 %), a palette (a body colour and an accent colour for the attached parts) and a
  material (a grating texture on the body: plain, or grain/fabric-like stripes with a frequency, orientation
  and amplitude of its own).
- A **class** is *one product*: its exact colours (the sub-family palette shifted, sigma 0.15 per channel,
  body and accent independently), its exact proportions (sizes by ~5 %), the phase and exact frequency of its
  texture, and a detail of its own (a logo, a knob, a display: a small disc of its own colour at its own place
  on the body).
- An **image** is one photo of that product: viewpoint (in-plane rotation, sigma ~11 degrees; foreshortening
  of one axis to 70-100 %, as a turn of the object), crop (the object's size in the frame x 0.78-1.28 and an
  offset of up to 7.5 % of the frame, so parts can leave it), lighting (brightness x 0.8-1.15, a colour cast,
  a shading gradient across the object in a random direction), background (a near-white studio backdrop or a
  scene: two random colours blended by a low-frequency gradient) and sensor noise (sigma 0.03).

Nothing of the background depends on the class beyond its super-class's studio frequency, so the photos of one
product are alike only through the object. In mean absolute pixel difference, photos of one product are closer
than photos of two products of one sub-family, those closer than two sub-families of one super-class, and those
closer than two super-classes (0.248 < 0.258 < 0.272 < 0.284 with the defaults, dataset.seed 0; the gaps are
small because viewpoint, crop, light and background change most pixels: nearest-neighbour retrieval on raw
pixels finds a same-product photo first for 17 % of the test photos, a same-sub-family one for 65 %).

The numbers of images per class follow SOP's skew: from `images_per_class` = (min, max), P(n + 1) / P(n) =
`image_count_decay` (the defaults 2..12 and 0.8 give a mean of 5.0, the mode at 2). The split is
class-disjoint and runs *inside* every sub-family: the first half of its classes train, the others are the
unseen test classes, so every test class has its sub-family and super-class among the training classes. With
`dataset.num_val_classes` or `dataset.num_folds`, training classes form a 'val' split (`data.held_out_classes`),
as for the default dataset.

The ground truth has two levels above the classes: class -> sub-family -> super-class. `DatasetInfo` carries one
of them per class (`*_super_labels`), the one `dataset.synthetic_sop.super_level` names: 'sub_family' (the
level just above the classes; `info.super_parents` then maps each sub-family to its super-class, the whole
three-level tree) or 'super_class' (what real SOP gives: only the 12 super-classes; `super_parents` is None).
`hpl.ground_truth_level1`, the `super/` metrics and the `hierarchy/level_1_*` scalars use that level.
Sub-family ids are global (super-class s holds sub-families s * F .. s * F + F - 1 for F sub-families per
super-class), so the same ids name the same sub-families in every split.

Images are rendered at `dataset.resize_size` and kept as 8-bit pixels; batching and crops are the default
dataset's (`synthetic.SyntheticDataset`), and the device normalises them (`data.normalize_pixels`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict

import numpy as np
from absl import logging

from hpl_jax.data import synthetic

NUM_PARTS = 3  # part 0 is the body; the detail disc sits on it
_RENDER_CHUNK = 512  # images rendered at once (bounds the float32 working set to ~60 MB at 36 x 36)


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """Every product (class) of the dataset, in super-class, sub-family, class order; C classes, P parts.

    Object coordinates: the object's own frame, roughly [-1, 1]^2 before the view's scale and pose.

    Attributes:
      super_class: i32[C]; sub_family: i32[C], global ids (see the module docstring).
      part_centre: f32[C, P, 2] (x, y); part_half: f32[C, P, 2], half-width and half-height;
      part_angle: f32[C, P], radians; part_exponent: f32[C, P], 2 = ellipse, large = rectangle.
      part_colour: f32[C, P, 3] in [0, 1] (part 0 the body colour, parts 1.. the accent colour).
      texture: f32[C, 4]: frequency (cycles per object unit), orientation, amplitude, phase of the body grating.
      detail_centre: f32[C, 2]; detail_radius: f32[C]; detail_colour: f32[C, 3].
      frame_scale: f32[C], the object's usual size in the frame (its super-class's layout).
      studio: f32[C], the probability that a photo of it has a studio backdrop (its super-class's).
    """

    super_class: np.ndarray
    sub_family: np.ndarray
    part_centre: np.ndarray
    part_half: np.ndarray
    part_angle: np.ndarray
    part_exponent: np.ndarray
    part_colour: np.ndarray
    texture: np.ndarray
    detail_centre: np.ndarray
    detail_radius: np.ndarray
    detail_colour: np.ndarray
    frame_scale: np.ndarray
    studio: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.super_class)


def make_catalogue(rng: np.random.Generator, num_super: int, subs_per_super: int,
                   classes_per_sub: int) -> Catalogue:
    """Draws the three-level tree: super-class layouts, sub-family proportions and materials, products."""
    S, F, K, P = num_super, subs_per_super, classes_per_sub, NUM_PARTS

    def per_class(x, depth: int):
        """x: [S, ...] (depth 1), [S, F, ...] (2) or [S, F, K, ...] (3) -> [C, ...], broadcast down the tree."""
        x = np.asarray(x)
        x = x.reshape(x.shape[:depth] + (1,) * (3 - depth) + x.shape[depth:])
        return np.broadcast_to(x, (S, F, K) + x.shape[3:]).reshape((S * F * K,) + x.shape[3:])

    # Super-class: the layout. A body near the centre, two parts attached on its outline, pointing outwards.
    body_half = rng.uniform(0.3, 0.6, size=(S, 2))
    attach = rng.uniform(0.0, 2.0 * np.pi, size=(S, P - 1))
    reach = rng.uniform(0.9, 1.3, size=(S, P - 1, 1))
    direction = np.stack([np.cos(attach), np.sin(attach)], axis=-1)  # [S, P-1, 2]
    centre = np.concatenate([np.stack([np.zeros(S), rng.normal(0.0, 0.08, S)], -1)[:, None],
                             direction * body_half[:, None] * reach], axis=1)  # [S, P, 2]
    half = np.concatenate([body_half[:, None], rng.uniform(0.08, 0.3, size=(S, P - 1, 2))], axis=1)
    angle = np.concatenate([rng.normal(0.0, 0.2, size=(S, 1)), attach + rng.normal(0.0, 0.3, size=(S, P - 1))], 1)
    exponent = np.exp(rng.uniform(np.log(1.5), np.log(8.0), size=(S, P)))
    frame_scale = rng.uniform(0.85, 1.25, size=S)
    studio = rng.uniform(0.4, 0.9, size=S)

    # Sub-family: its proportions, palette (body, accent) and material.
    sub_centre = centre[:, None] + rng.normal(0.0, 0.06, size=(S, F, P, 2))
    sub_half = half[:, None] * np.exp(rng.normal(0.0, 0.15, size=(S, F, P, 2)))
    sub_exponent = exponent[:, None] * np.exp(rng.normal(0.0, 0.2, size=(S, F, P)))
    palette = rng.uniform(0.05, 0.95, size=(S, F, 2, 3))
    plain = rng.uniform(size=(S, F)) < 1.0 / 3.0
    material = np.stack([rng.uniform(2.0, 7.0, size=(S, F)), rng.uniform(0.0, np.pi, size=(S, F)),
                         np.where(plain, 0.0, rng.uniform(0.15, 0.4, size=(S, F)))], axis=-1)

    # Class: one product's exact proportions, colours, texture phase and detail.
    part_half = per_class(sub_half[:, :, None] * np.exp(rng.normal(0.0, 0.05, size=(S, F, K, P, 2))), 3)
    part_centre = per_class(sub_centre[:, :, None] + rng.normal(0.0, 0.02, size=(S, F, K, P, 2)), 3)
    # Body and accent shift independently; the attached parts share the accent (one material).
    shift = rng.normal(0.0, 0.15, size=(S, F, K, 2, 3))[:, :, :, [0] + [1] * (P - 1)]
    colours = palette[:, :, [0] + [1] * (P - 1)]  # [S, F, P, 3]: the body colour, then the accent
    part_colour = per_class(np.clip(colours[:, :, None] + shift, 0.0, 1.0), 3)
    frequency = material[:, :, None, 0] * np.exp(rng.normal(0.0, 0.1, size=(S, F, K)))
    texture = np.stack([per_class(frequency, 3), per_class(material[..., 1], 2), per_class(material[..., 2], 2),
                        rng.uniform(0.0, 2.0 * np.pi, size=S * F * K)], axis=1)
    detail_centre = part_centre[:, 0] + part_half[:, 0] * rng.uniform(-0.6, 0.6, size=(S * F * K, 2))
    return Catalogue(
        super_class=per_class(np.arange(S, dtype=np.int32), 1),
        sub_family=per_class(np.arange(S * F, dtype=np.int32).reshape(S, F), 2),
        part_centre=part_centre.astype(np.float32),
        part_half=part_half.astype(np.float32),
        part_angle=per_class(angle, 1).astype(np.float32),
        part_exponent=per_class(sub_exponent, 2).astype(np.float32),
        part_colour=part_colour.astype(np.float32),
        texture=texture.astype(np.float32),
        detail_centre=detail_centre.astype(np.float32),
        detail_radius=rng.uniform(0.1, 0.2, size=S * F * K).astype(np.float32),
        detail_colour=rng.uniform(0.0, 1.0, size=(S * F * K, 3)).astype(np.float32),
        frame_scale=per_class(frame_scale, 1).astype(np.float32),
        studio=per_class(studio, 1).astype(np.float32),
    )


def class_sizes(rng: np.random.Generator, num_classes: int, images_per_class, decay: float) -> np.ndarray:
    """i64[num_classes]: images of each class, n in [min, max] with P(n + 1) / P(n) = decay (SOP's skew)."""
    low, high = images_per_class
    counts = np.arange(low, high + 1)
    weights = decay ** (counts - low)
    return rng.choice(counts, size=num_classes, p=weights / weights.sum())


def draw_views(rng: np.random.Generator, catalogue: Catalogue, classes: np.ndarray) -> Dict[str, np.ndarray]:
    """The photo-taking randomness of each image (viewpoint, crop, light, background); classes: int[n].

    Returns {name: [n, ...] array}, everything `render` needs besides the catalogue and the sensor noise.
    """
    n = len(classes)
    return dict(
        classes=np.asarray(classes),
        rotation=np.clip(rng.normal(0.0, 0.2, n), -0.5, 0.5),
        foreshortening=rng.uniform(0.7, 1.0, n),
        scale=catalogue.frame_scale[classes] * np.exp(rng.uniform(-0.25, 0.25, n)),
        offset=rng.uniform(-0.15, 0.15, size=(n, 2)),
        gain=rng.uniform(0.8, 1.15, n),
        cast=1.0 + rng.normal(0.0, 0.04, size=(n, 3)),
        shading=rng.uniform(0.0, 0.35, n)[:, None] * _unit_vectors(rng, n),
        studio=rng.uniform(size=n) < catalogue.studio[classes],
        studio_colour=rng.uniform(0.8, 1.0, size=(n, 1)) + rng.normal(0.0, 0.02, size=(n, 3)),
        scene_colours=rng.uniform(0.1, 0.9, size=(n, 2, 3)),
        scene_wave=rng.uniform(0.2, 1.0, n)[:, None] * _unit_vectors(rng, n),
        scene_phase=rng.uniform(0.0, 2.0 * np.pi, n),
    )


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def render(rng: np.random.Generator, catalogue: Catalogue, views: Dict[str, np.ndarray],
           size: int) -> np.ndarray:
    """The photos `views` describes, u8[n, size, size, 3], with sensor noise from `rng`; rendered in chunks."""
    n = len(views["classes"])
    images = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, _RENDER_CHUNK):
        chunk = {name: value[start:start + _RENDER_CHUNK] for name, value in views.items()}
        noise = rng.standard_normal((len(chunk["classes"]), size, size, 3), dtype=np.float32) * 0.03
        images[start:start + _RENDER_CHUNK] = np.round(
            np.clip(_render_chunk(catalogue, chunk, size) + noise, 0.0, 1.0) * 255.0)
    return images


def _rotate(x, y, angle):
    """The coordinates of the points (x, y) in axes turned by `angle` (radians)."""
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


def _render_chunk(catalogue: Catalogue, views: Dict[str, np.ndarray], size: int) -> np.ndarray:
    """f32[n, size, size, 3], noiseless and unclipped.

    Masks and coordinates are f32[n, size, size] (or broadcast to it), colours f32[n, 1, 1, 3].
    """
    c = views["classes"]
    n = len(c)

    def per_image(x):
        """[n] -> [n, 1, 1]; [n, 3] -> [n, 1, 1, 3]: broadcasts against the pixels."""
        x = np.asarray(x, np.float32)
        return x.reshape((n, 1, 1) + x.shape[1:])

    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    u, v = grid[None, None, :], grid[None, :, None]  # image x (columns) and y (rows), in [-1, 1]

    # Image -> object coordinates: undo the crop offset, the in-plane rotation, the size in frame, the turn.
    scale = per_image(views["scale"])
    x, y = _rotate(u - per_image(views["offset"][:, 0]), v - per_image(views["offset"][:, 1]),
                   per_image(views["rotation"]))
    x, y = x / (scale * per_image(views["foreshortening"])), y / scale
    pixel = 2.0 / size / scale  # one pixel in object units: the width of the anti-aliased edges

    wave = 0.5 + 0.5 * np.sin(2.0 * np.pi * (u * per_image(views["scene_wave"][:, 0])
                                             + v * per_image(views["scene_wave"][:, 1]))
                              + per_image(views["scene_phase"]))
    low, high = per_image(views["scene_colours"][:, 0]), per_image(views["scene_colours"][:, 1])
    image = np.where(views["studio"][:, None, None, None], per_image(views["studio_colour"]),
                     low + (high - low) * wave[..., None])

    shade = (1.0 + x * per_image(views["shading"][:, 0]) + y * per_image(views["shading"][:, 1]))[..., None]
    for part in range(NUM_PARTS):
        centre, half = catalogue.part_centre[c, part], catalogue.part_half[c, part]
        px, py = _rotate(x - per_image(centre[:, 0]), y - per_image(centre[:, 1]),
                         per_image(catalogue.part_angle[c, part]))
        exponent = per_image(catalogue.part_exponent[c, part])
        radius = (np.abs(px / per_image(half[:, 0])) ** exponent
                  + np.abs(py / per_image(half[:, 1])) ** exponent) ** (1.0 / exponent)
        mask = np.clip((1.0 - radius) * per_image(half.min(axis=1)) / pixel + 0.5, 0.0, 1.0)
        colour = per_image(catalogue.part_colour[c, part]) * shade
        if part == 0:
            body = mask
            frequency, orientation, amplitude, phase = (per_image(catalogue.texture[c, i]) for i in range(4))
            grain = np.sin(2.0 * np.pi * frequency * (x * np.cos(orientation) + y * np.sin(orientation)) + phase)
            colour = colour * (1.0 + amplitude * grain)[..., None]
        image = image + mask[..., None] * (colour - image)
    detail = catalogue.detail_centre[c]
    distance = np.hypot(x - per_image(detail[:, 0]), y - per_image(detail[:, 1]))
    mask = body * np.clip((per_image(catalogue.detail_radius[c]) - distance) / pixel + 0.5, 0.0, 1.0)
    image = image + mask[..., None] * (per_image(catalogue.detail_colour[c]) * shade - image)

    return image * (per_image(views["gain"])[..., None] * per_image(views["cast"]))


def generate(dataset_config):
    """The catalogue `config.dataset` describes and all its photos, from `dataset.seed` alone.

    Returns:
      (catalogue, images: u8[n, R, R, 3] with R = dataset.resize_size, classes: i64[n], the class of each photo,
      sorted).
    """
    sop = dataset_config.synthetic_sop
    tree_rng, count_rng, view_rng = (np.random.default_rng(s)
                                     for s in np.random.SeedSequence(dataset_config.seed).spawn(3))
    catalogue = make_catalogue(tree_rng, sop.num_super_classes, sop.sub_families_per_super_class,
                               sop.classes_per_sub_family)
    sizes = class_sizes(count_rng, catalogue.num_classes, tuple(sop.images_per_class), sop.image_count_decay)
    classes = np.repeat(np.arange(catalogue.num_classes), sizes)
    images = render(view_rng, catalogue, draw_views(view_rng, catalogue, classes), dataset_config.resize_size)
    return catalogue, images, classes


def split_classes(num_classes: int, classes_per_sub_family: int) -> Dict[str, np.ndarray]:
    """{'train': i64[...], 'test': i64[...]}: catalogue ids of the classes of each split; the first half of every
    sub-family's classes train (classes are numbered sub-family by sub-family)."""
    trains = np.arange(num_classes) % classes_per_sub_family < classes_per_sub_family // 2
    return {"train": np.flatnonzero(trains), "test": np.flatnonzero(~trains)}


class SyntheticSopDataset(synthetic.SyntheticDataset):
    """The SOP-like embedded benchmark behind the `data.Dataset` protocol (batches as the default dataset's)."""

    def _generate(self):
        sop = self._config.dataset.synthetic_sop
        start = time.perf_counter()
        catalogue, images, classes = generate(self._config.dataset)
        logging.info("synthetic_sop: %d photos of %d products generated in %.1f s.", len(images),
                     catalogue.num_classes, time.perf_counter() - start)
        by_level = {"sub_family": catalogue.sub_family, "super_class": catalogue.super_class}[sop.super_level]
        split_images, split_labels, super_labels = {}, {}, {}
        for name, members in split_classes(catalogue.num_classes, sop.classes_per_sub_family).items():
            rows = np.isin(classes, members)
            split_images[name] = images[rows]
            split_labels[name] = np.searchsorted(members, classes[rows]).astype(np.int32)
            super_labels[name] = by_level[members].astype(np.int32)
        super_parents = None
        if sop.super_level == "sub_family":
            num_sub_families = sop.num_super_classes * sop.sub_families_per_super_class
            super_parents = np.arange(num_sub_families, dtype=np.int32) // sop.sub_families_per_super_class
        return split_images, split_labels, super_labels, super_parents
