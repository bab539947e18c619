"""Checks of every config field, run before any compile or data read.

A bad value stops the run with one `ConfigError` whose message names the field and what to do. `validate_config`
runs one checker per section of configs/default.py: `check_top_level`, `check_dataset` (and its subsections
`check_dataset_synthetic`, `check_dataset_synthetic_sop`, `check_dataset_synthetic_source`), `check_model`,
`check_loss`, `check_hpl`, `check_hier`, `check_optim`, `check_eval`, `check_checkpoint`. `validate_against_dataset` holds the
checks that need the dataset's sizes.
"""
from __future__ import annotations

import numbers
import os
import re
from typing import Optional, Sequence

import jax
import numpy as np

from hpl_jax import data
from hpl_jax import errors
from hpl_jax import grouping
from hpl_jax import models
from hpl_jax.core import hierarchy
from hpl_jax.core import losses
from hpl_jax.models import convert as convert_weights
from hpl_jax.models import onednn
from hpl_jax.trainer import pretraining

BASE_LOSSES = tuple(losses.BASE_LOSSES)
BACKBONES = models.BACKBONES
DTYPES = tuple(models.DTYPES)
FIRST_GROUPINGS = ("class_means", "proxies")
COARSE_POLICIES = grouping.REFRESH_POLICIES
SAMPLERS = ("random", "class_balanced")
SUPER_LEVELS = ("sub_family", "super_class")  # of the synthetic_sop dataset
OPTIMIZERS = ("adamw", "rmsprop")
POOLINGS = models.POOLINGS
CONV_IMPLS = models.CONV_IMPLS
METRIC_NAMES = ("precision@1", "r_precision", "map@r", "nmi")


# Re-exported: callers catch config_checks.ConfigError.
ConfigError = errors.ConfigError
_require = errors.require


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_regex_and_multiplier(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and _is_str(value[0]) and _is_number(value[1])


# Tuple fields and what each element must be: ml_collections checks a scalar field's type but not the
# elements of a tuple (`--config.hpl.weights='(1.0,abc)'` arrives as the one-string tuple ('(1.0,abc)',)).
TUPLE_FIELDS = {
    "dataset.crop_scale": (_is_number, "a number", "(0.08, 1.0)"),
    "dataset.crop_ratio": (_is_number, "a number", "(0.75, 1.3333)"),
    "dataset.mean": (_is_number, "a number", "(0.485, 0.456, 0.406)"),
    "dataset.std": (_is_number, "a number", "(0.229, 0.224, 0.225)"),
    "hpl.weights": (_is_number, "a number", "(1.0, 0.1)"),
    "hpl.num_coarse": (_is_int, "an integer", "(8,)"),
    "optim.lr_mults": (_is_regex_and_multiplier, "a (regex, multiplier) pair", "(('proxies/.*', 100.0),)"),
    "optim.warmup_trainable": (_is_str, "a regex string", "('model/embedding/.*', 'proxies/.*')"),
    "optim.frozen": (_is_str, "a regex string", "('model/backbone/.*',)"),
    "eval.recall_at": (_is_int, "an integer", "(1, 2, 4, 8)"),
}


def _check_tuple_elements(config, section: str) -> None:
    """The TUPLE_FIELDS of `section` ('dataset', 'hpl', ...): each element of the right type."""
    for field, (is_valid, what, example) in TUPLE_FIELDS.items():
        if field.rsplit(".", 1)[0] != section:
            continue
        value = config
        for name in field.split("."):
            value = value[name]
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        bad = [v for v in values if not is_valid(v)]
        if bad:
            raise ConfigError(f"config.{field}: {values!r} holds {bad[0]!r}, which is not {what}; e.g. "
                              f"--config.{field}=\"{example}\".")


def _require_bool(value, field: str) -> None:
    _require(isinstance(value, bool), field, f"{value!r}: True or False.")


def _require_seed(value, field: str) -> None:
    _require(_is_int(value) and value >= 0, field, f"{value!r} must be an integer >= 0.")


def unknown_field(error: BaseException, argv: Sequence[str]) -> Optional[str]:
    """The one-line message for ml_collections' error on a `--config.<field>` override that names no field
    (a KeyError or AttributeError that may suggest the right name), or None if `error` is another one."""
    text = str(error)
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    quoted = re.search(r"'(\w+)", text)
    name = suggestion.group(2) if suggestion else quoted.group(1) if quoted else None
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--config.") and name in flag[len("--config."):].split("."):
            hint = f"did you mean {suggestion.group(1)!r}?" if suggestion else "see configs/default.py for the fields."
            return f"{flag[2:]}: no such field ({name!r}); {hint}"
    return None


def _check_regexes(patterns, field: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"config.{field}: {pattern!r} is not a valid regex ({error}).") from None


def validate_config(config, *, device_count: int, process_count: int) -> None:
    """Checks each field on its own and against the device layout, one section of configs/default.py after the
    other; raises ConfigError. The top-level fields go first: the sections' checks compare against them."""
    check_top_level(config, device_count=device_count, process_count=process_count)
    check_dataset(config)
    check_dataset_synthetic(config)
    check_dataset_synthetic_sop(config)
    check_dataset_synthetic_source(config)
    check_model(config)
    check_loss(config)
    check_hpl(config)
    check_hier(config)
    check_optim(config)
    check_eval(config, device_count=device_count)
    check_checkpoint(config)


def check_top_level(config, *, device_count: int, process_count: int) -> None:
    """config.seed, batch_size, num_epochs, steps_per_epoch, log_every_steps, export_backbone,
    compilation_cache_dir."""
    _require_seed(config.seed, "seed")
    _require(config.num_epochs >= 1, "num_epochs", "must be >= 1.")
    _require(isinstance(config.steps_per_epoch, int) and config.steps_per_epoch >= 0, "steps_per_epoch",
             f"{config.steps_per_epoch!r} must be an integer >= 0 (0 = one pass over the training images).")
    _require(config.batch_size >= device_count and config.batch_size % device_count == 0, "batch_size",
             f"{config.batch_size} is not divisible by the {device_count} devices; use a multiple of "
             f"{device_count}.")
    _require(config.batch_size % process_count == 0, "batch_size",
             f"{config.batch_size} is not divisible by the {process_count} processes.")
    _require(config.log_every_steps >= 1, "log_every_steps", "must be >= 1.")
    _require_bool(config.export_backbone, "export_backbone")
    cache = config.compilation_cache_dir
    _require(not cache or cache.startswith("gs://") or not os.path.isfile(cache), "compilation_cache_dir",
             f"{cache!r} is a file; give a directory (it is created if missing) or '' (off).")


def check_dataset(config) -> None:
    """config.dataset's own fields (its synthetic* subsections have checkers of their own)."""
    _check_tuple_elements(config, "dataset")
    dataset = config.dataset
    _require(dataset.name in data.DATASETS, "dataset.name",
             f"{dataset.name!r} is unknown; use one of {', '.join(data.DATASETS)}.")
    _require_seed(dataset.seed, "dataset.seed")
    if dataset.name == "image_folder":
        _require(bool(dataset.data_dir), "dataset.data_dir",
                 "is empty; set it to the image folder root (ROOT/<class>/<images>).")
        if not dataset.data_dir.startswith("gs://"):
            _require(os.path.isdir(dataset.data_dir), "dataset.data_dir",
                     f"{dataset.data_dir!r} is not a directory; point it at the image folder root.")
    if dataset.manual_dir and not dataset.manual_dir.startswith("gs://"):
        _require(os.path.isdir(dataset.manual_dir), "dataset.manual_dir",
                 f"{dataset.manual_dir!r} is not a directory; point it at the folder with the dataset files.")
    _require(dataset.image_size >= 8, "dataset.image_size", f"{dataset.image_size} is too small; use >= 8.")
    _require(dataset.resize_size >= dataset.image_size, "dataset.resize_size",
             f"{dataset.resize_size} must be >= dataset.image_size ({dataset.image_size}).")
    low, high = dataset.crop_scale
    _require(0 < low <= high <= 1, "dataset.crop_scale", f"{dataset.crop_scale} must satisfy 0 < min <= max <= 1.")
    low, high = dataset.crop_ratio
    _require(0 < low <= high, "dataset.crop_ratio", f"{dataset.crop_ratio} must satisfy 0 < min <= max.")
    _require_bool(dataset.horizontal_flip, "dataset.horizontal_flip")
    _require(len(dataset.mean) == 3 and len(dataset.std) == 3 and min(dataset.std) > 0, "dataset.mean/std",
             "need three values each, std > 0.")
    _require(dataset.color_order in ("rgb", "bgr"), "dataset.color_order",
             f"{dataset.color_order!r}; use 'rgb' or 'bgr'.")
    _require(dataset.pixel_scale > 0, "dataset.pixel_scale", "must be > 0 (1 or 255).")
    _require(dataset.sampler in SAMPLERS, "dataset.sampler", f"{dataset.sampler!r}; use one of {SAMPLERS}.")
    if dataset.sampler == "class_balanced":
        _require(dataset.samples_per_class >= 2 and config.batch_size % dataset.samples_per_class == 0,
                 "dataset.samples_per_class",
                 f"{dataset.samples_per_class} must be >= 2 and divide config.batch_size ({config.batch_size}).")
    _require(dataset.shuffle_buffer >= 1, "dataset.shuffle_buffer", "must be >= 1.")
    _require_bool(dataset.cache_decoded, "dataset.cache_decoded")
    _require(_is_int(dataset.cache_shorter_side) and dataset.cache_shorter_side >= dataset.image_size,
             "dataset.cache_shorter_side",
             f"{dataset.cache_shorter_side!r} must be an integer >= dataset.image_size ({dataset.image_size}): a "
             "crop resized up from a smaller cache loses detail.")
    _require(isinstance(dataset.cache_max_gb, (int, float)) and dataset.cache_max_gb > 0, "dataset.cache_max_gb",
             f"{dataset.cache_max_gb!r} must be > 0 (GB of host memory the decoded cache may take).")
    _require(isinstance(dataset.num_val_classes, int) and dataset.num_val_classes >= 0, "dataset.num_val_classes",
             f"{dataset.num_val_classes!r} must be an integer >= 0 (0 = no validation classes).")
    _require(isinstance(dataset.num_folds, int) and dataset.num_folds != 1 and dataset.num_folds >= 0,
             "dataset.num_folds", f"{dataset.num_folds!r} must be 0 (off) or an integer >= 2 (MLRC: 4).")
    if dataset.num_folds:
        _require(isinstance(dataset.val_fold, int) and 0 <= dataset.val_fold < dataset.num_folds, "dataset.val_fold",
                 f"{dataset.val_fold!r} must be one of 0..{dataset.num_folds - 1} (the fold that validates).")
        _require(dataset.num_val_classes == 0, "dataset.num_folds",
                 f"{dataset.num_folds} folds and dataset.num_val_classes = {dataset.num_val_classes} both choose the "
                 "validation classes; set --config.dataset.num_val_classes=0 to validate on a fold (or num_folds=0).")


def check_dataset_synthetic(config) -> None:
    """config.dataset.synthetic: the embedded default dataset."""
    synthetic = config.dataset.synthetic
    _require(synthetic.num_families >= 2, "dataset.synthetic.num_families", "must be >= 2.")
    _require(synthetic.classes_per_family >= 2, "dataset.synthetic.classes_per_family",
             "must be >= 2 (half train, half test).")
    _require(synthetic.images_per_class >= 2, "dataset.synthetic.images_per_class", "must be >= 2.")


def check_dataset_synthetic_sop(config) -> None:
    """config.dataset.synthetic_sop: the embedded SOP-like dataset."""
    sop = config.dataset.synthetic_sop
    _require(sop.num_super_classes >= 2, "dataset.synthetic_sop.num_super_classes", "must be >= 2.")
    _require(sop.sub_families_per_super_class >= 1, "dataset.synthetic_sop.sub_families_per_super_class",
             "must be >= 1.")
    _require(sop.classes_per_sub_family >= 2, "dataset.synthetic_sop.classes_per_sub_family",
             "must be >= 2 (half train, half test).")
    _require(len(sop.images_per_class) == 2 and 2 <= sop.images_per_class[0] <= sop.images_per_class[1],
             "dataset.synthetic_sop.images_per_class",
             f"{tuple(sop.images_per_class)} must be (min, max) with 2 <= min <= max (a query needs a match).")
    _require(sop.image_count_decay > 0, "dataset.synthetic_sop.image_count_decay",
             "must be > 0 (< 1: fewer large classes, 1: uniform).")
    _require(sop.super_level in SUPER_LEVELS, "dataset.synthetic_sop.super_level",
             f"{sop.super_level!r}; use one of {SUPER_LEVELS}.")


def check_dataset_synthetic_source(config) -> None:
    """config.dataset.synthetic_source: the embedded pretraining source's draws."""
    source = config.dataset.synthetic_source
    seeds = [*source.sop_seeds, *source.default_seeds]
    _require(all(isinstance(seed, int) and seed >= 0 for seed in seeds), "dataset.synthetic_source",
             f"sop_seeds {tuple(source.sop_seeds)} and default_seeds {tuple(source.default_seeds)} must be integers >= 0.")
    _require(len(set(source.sop_seeds)) == len(source.sop_seeds)
             and len(set(source.default_seeds)) == len(source.default_seeds), "dataset.synthetic_source",
             "lists a seed twice; each draw needs a seed of its own.")
    if config.dataset.name == data.SYNTHETIC_SOURCE:
        _require(len(seeds) >= 1, "dataset.synthetic_source", "has no draws; list at least one seed.")


def check_model(config) -> None:
    """config.model, and the pretrained weights it names against it and the dataset. A ViT's pooling, width and
    patch size are checked against it and dataset.image_size; bn_frozen and conv_impl are checked but do not apply."""
    model = config.model
    _require(model.backbone in BACKBONES, "model.backbone", f"{model.backbone!r}; use one of {BACKBONES}.")
    _require(model.width > 0, "model.width", f"{model.width} must be > 0.")
    _require(model.embedding_dim >= 2, "model.embedding_dim", f"{model.embedding_dim} must be >= 2.")
    _require(model.dtype in DTYPES, "model.dtype", f"{model.dtype!r}; use one of {DTYPES}.")
    _require(model.pooling in POOLINGS, "model.pooling", f"{model.pooling!r}; use one of {POOLINGS}.")
    poolings = models.backbone_poolings(model.backbone)
    _require(model.pooling in poolings, "model.pooling",
             f"{model.pooling!r} is not a pooling of {model.backbone}; use one of {poolings}.")
    _require(model.conv_impl in CONV_IMPLS, "model.conv_impl", f"{model.conv_impl!r}; use one of {CONV_IMPLS}.")
    if model.conv_impl == "onednn" and model.backbone not in models.VIT_BACKBONES:
        _require(jax.default_backend() == "cpu", "model.conv_impl",
                 f"'onednn' runs on CPUs only, not {jax.default_backend()}; use 'auto' (XLA's op there).")
        onednn_status = onednn.status()
        _require(onednn_status.available, "model.conv_impl",
                 f"'onednn' but oneDNN is unavailable here: {onednn_status.detail}; use 'auto' or 'xla'.")
    _require_bool(model.bn_frozen, "model.bn_frozen")
    _require(_is_int(model.patch_size) and model.patch_size >= 1, "model.patch_size",
             f"{model.patch_size!r} must be an integer >= 1 (16 = the published ViTs).")
    if model.backbone in models.VIT_BACKBONES:
        channels, heads = models.vit_width(model.backbone, model.width), models.VIT_LAYOUTS[model.backbone][2]
        _require(channels % heads == 0, "model.width",
                 f"{model.width} gives {model.backbone} {channels} channels, not a multiple of its {heads} heads; "
                 f"choose a width for which it is (e.g. 0.25 or 0.5).")
        image_size = config.dataset.image_size
        _require(model.patch_size <= image_size, "model.patch_size",
                 f"{model.patch_size} is larger than dataset.image_size ({image_size}); use a smaller patch.")
    # The recipe's frozen BatchNorm keeps a pretrained network's statistics; with random weights it would keep
    # their initial ones for the whole run. The embedded datasets' small studies may ask for it deliberately.
    _require(not (model.bn_frozen and not model.pretrained and model.backbone not in models.VIT_BACKBONES
                  and not data.embedded_draws(config.dataset)), "model.bn_frozen",
             f"True freezes BatchNorm at its initial statistics, but model.pretrained is empty, so {model.backbone} "
             "starts from random weights. Pass --config.model.pretrained=DIR (ImageNet weights converted by "
             "`python -m hpl_jax.convert_weights`), or --config.model.bn_frozen=False to train from scratch.")
    problem = pretraining.pretrained_problem(config)
    if problem:
        _require(False, *problem)
    if model.pretrained and model.backbone in models.VIT_BACKBONES:
        patch_size = convert_weights.read_metadata(model.pretrained).get("patch_size", model.patch_size)
        _require(patch_size == model.patch_size, "model.patch_size",
                 f"{model.patch_size}, but model.pretrained holds a ViT with {patch_size}-pixel patches; set it to "
                 f"{patch_size}.")


def check_loss(config) -> None:
    """config.loss: the base loss (core.losses.BASE_LOSSES) and its settings."""
    loss = config.loss
    _require(loss.base in BASE_LOSSES, "loss.base", f"{loss.base!r}; use one of {BASE_LOSSES}.")
    _require(loss.alpha > 0, "loss.alpha", "must be > 0.")
    _require(loss.delta >= 0, "loss.delta", "must be >= 0.")
    _require(loss.temperature > 0, "loss.temperature", "must be > 0.")
    _require_bool(loss.exclude_positive, "loss.exclude_positive")


def check_hpl(config) -> None:
    """config.hpl: the levels' weights and sizes, and how the groupings are made and refreshed."""
    _check_tuple_elements(config, "hpl")
    hpl = config.hpl
    weights = tuple(hpl.weights)
    _require(len(weights) >= 1 and weights[0] > 0 and min(weights) >= 0, "hpl.weights",
             f"{weights}: need at least the level-0 weight, w_0 > 0 and every w_l >= 0.")
    num_coarse = tuple(hpl.num_coarse)[:len(weights) - 1]
    _require(len(num_coarse) == len(weights) - 1, "hpl.num_coarse",
             f"{tuple(hpl.num_coarse)} gives {len(hpl.num_coarse)} coarse level(s) but hpl.weights has "
             f"{len(weights)} entries; give one K_l per level above 0.")
    for level, k in enumerate(num_coarse, start=1):
        _require(k >= 2, "hpl.num_coarse", f"K_{level} = {k} must be >= 2.")
        if level > 1:
            _require(k < num_coarse[level - 2], "hpl.num_coarse",
                     f"K_{level} = {k} must be smaller than K_{level - 1} = {num_coarse[level - 2]}.")
    _require(hpl.first_grouping in FIRST_GROUPINGS, "hpl.first_grouping",
             f"{hpl.first_grouping!r}; use one of {FIRST_GROUPINGS}.")
    _require(hpl.refresh_every_steps >= 0, "hpl.refresh_every_steps", "must be >= 0 (0 = every epoch).")
    _require(hpl.kmeans_restarts >= 1, "hpl.kmeans_restarts", "must be >= 1.")
    _require(hpl.coarse_norm in hierarchy.COARSE_NORMS, "hpl.coarse_norm",
             f"{hpl.coarse_norm!r}; use one of {hierarchy.COARSE_NORMS}.")
    _require(hpl.kmeans_backend in grouping.KMEANS_BACKENDS, "hpl.kmeans_backend",
             f"{hpl.kmeans_backend!r}; use one of {grouping.KMEANS_BACKENDS}.")
    _require(hpl.coarse_policy in COARSE_POLICIES, "hpl.coarse_policy",
             f"{hpl.coarse_policy!r}; use one of {COARSE_POLICIES}.")
    _require_bool(hpl.ground_truth_level1, "hpl.ground_truth_level1")
    if hpl.ground_truth_level1:
        _require(len(weights) == 2, "hpl.ground_truth_level1",
                 "the ground-truth hierarchy has one level above the classes; set hpl.weights to two entries.")


def check_hier(config) -> None:
    """config.hier: HIER's regulariser (off at weight 0) and its hyperparameters; its proxies' learning rate."""
    hier = config.hier
    _require(_is_number(hier.weight) and np.isfinite(hier.weight) and hier.weight >= 0, "hier.weight",
             f"{hier.weight!r} must be a number >= 0 (0 = no HIER; HIER's scripts use 0.5 or 1).")
    _require(_is_int(hier.num_proxies) and hier.num_proxies >= 2, "hier.num_proxies",
             f"{hier.num_proxies!r} must be an integer >= 2 (HIER's scripts use 512).")
    _require(_is_number(hier.curvature) and hier.curvature >= 0, "hier.curvature",
             f"{hier.curvature!r} must be a number >= 0 (0 = the sphere mode; HIER's scripts use 0.1).")
    _require(_is_number(hier.clip_r) and hier.clip_r > 0, "hier.clip_r", f"{hier.clip_r!r} must be a number > 0.")
    _require(_is_number(hier.margin) and hier.margin >= 0, "hier.margin", f"{hier.margin!r} must be a number >= 0.")
    _require(_is_number(hier.temperature) and hier.temperature > 0, "hier.temperature",
             f"{hier.temperature!r} must be a number > 0.")
    _require(_is_int(hier.top_k) and hier.top_k >= 3, "hier.top_k",
             f"{hier.top_k!r} must be an integer >= 3 (a row counts in its own top-k, and an anchor needs two "
             "reciprocal neighbours).")
    if hier.weight > 0:
        _require(any(re.fullmatch(pattern, "hier_proxies") for pattern, _ in config.optim.lr_mults),
                 "optim.lr_mults", "has no rule for HIER's proxies (parameter path 'hier_proxies'), which would "
                 "train at the backbone's rate; add ('hier_proxies', 50.0), HIER's rate (hier/utils.py).")


def check_optim(config) -> None:
    """config.optim: the optimiser, its schedule and the parameter groups (regexes on parameter paths)."""
    _check_tuple_elements(config, "optim")
    optim = config.optim
    _require(optim.name in OPTIMIZERS, "optim.name", f"{optim.name!r}; use one of {OPTIMIZERS}.")
    _require(0 <= optim.momentum < 1, "optim.momentum", f"{optim.momentum} must be in [0, 1).")
    _require(optim.lr > 0, "optim.lr", "must be > 0.")
    _require(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0.")
    for entry in optim.lr_mults:
        _require(len(entry) == 2 and entry[1] >= 0, "optim.lr_mults",
                 f"{entry!r}: each entry is (regex, multiplier >= 0).")
    _check_regexes([entry[0] for entry in optim.lr_mults], "optim.lr_mults")
    _check_regexes(optim.warmup_trainable, "optim.warmup_trainable")
    _check_regexes(optim.frozen, "optim.frozen")
    _require(0 <= optim.warmup_epochs <= config.num_epochs, "optim.warmup_epochs",
             f"{optim.warmup_epochs} must be >= 0 and at most config.num_epochs ({config.num_epochs}).")
    _require(optim.grad_clip_value >= 0, "optim.grad_clip_value", "must be >= 0 (0 = off).")
    _require_bool(optim.skip_nonfinite_steps, "optim.skip_nonfinite_steps")
    _require(optim.decay_epochs >= 1, "optim.decay_epochs", "must be >= 1.")
    _require(0 < optim.decay_gamma <= 1, "optim.decay_gamma", "must be in (0, 1].")


def check_eval(config, *, device_count: int) -> None:
    """config.eval: cadence, batch, metrics, early stopping (which needs validation classes in config.dataset)."""
    _check_tuple_elements(config, "eval")
    evaluation = config.eval
    _require(evaluation.every_epochs >= 1, "eval.every_epochs", "must be >= 1.")
    _require(evaluation.batch_size >= device_count and evaluation.batch_size % device_count == 0,
             "eval.batch_size", f"{evaluation.batch_size} is not divisible by the {device_count} devices.")
    recall_at = tuple(evaluation.recall_at)
    _require(len(recall_at) >= 1 and all(isinstance(k, int) and k >= 1 for k in recall_at), "eval.recall_at",
             f"{recall_at}: give positive integers.")
    _require_bool(evaluation.nmi, "eval.nmi")
    _require_bool(evaluation.super_metrics, "eval.super_metrics")
    _require(evaluation.chunk_size >= 1, "eval.chunk_size", "must be >= 1.")
    _require(_is_int(evaluation.costly_metrics_every_epochs) and evaluation.costly_metrics_every_epochs >= 1,
             "eval.costly_metrics_every_epochs",
             f"{evaluation.costly_metrics_every_epochs!r} must be an integer >= 1 (1 = every evaluation).")
    _require(evaluation.early_stopping_patience >= 0, "eval.early_stopping_patience", "must be >= 0 (0 = off).")
    if evaluation.early_stopping_patience:
        _require(data.holds_out_classes(config.dataset), "eval.early_stopping_patience",
                 f"{evaluation.early_stopping_patience} epochs: early stopping watches the validation classes, and "
                 "there are none; set dataset.num_folds (with dataset.val_fold) or dataset.num_val_classes, or 0.")


def check_checkpoint(config) -> None:
    """config.checkpoint: how many are kept, how often, and the metric best/ is chosen on (one config.eval
    computes)."""
    checkpoint = config.checkpoint
    evaluation = config.eval
    _require(checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1.")
    _require(checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = epoch ends only).")
    valid_metrics = tuple(f"recall@{k}" for k in evaluation.recall_at) + METRIC_NAMES
    if checkpoint.best_metric:
        _require(checkpoint.best_metric in valid_metrics, "checkpoint.best_metric",
                 f"{checkpoint.best_metric!r}; use '' or one of {valid_metrics}.")
        _require(checkpoint.best_metric != "nmi" or evaluation.nmi, "checkpoint.best_metric",
                 "'nmi' needs config.eval.nmi = True.")
        _require(checkpoint.best_metric != "nmi" or evaluation.costly_metrics_every_epochs == 1,
                 "checkpoint.best_metric",
                 "'nmi' is chosen on at every evaluation; set config.eval.costly_metrics_every_epochs = 1.")


def validate_against_dataset(config, info: data.DatasetInfo) -> None:
    """Checks that need the dataset's sizes (known before any image is read)."""
    num_coarse = tuple(config.hpl.num_coarse)[:len(config.hpl.weights) - 1]
    if num_coarse and not config.hpl.ground_truth_level1:
        _require(num_coarse[0] < info.num_train_classes, "hpl.num_coarse",
                 f"K_1 = {num_coarse[0]} must be smaller than the {info.num_train_classes} training classes of "
                 f"{info.name}.")
    if config.hpl.ground_truth_level1:
        _require(info.train_super_labels is not None, "hpl.ground_truth_level1",
                 f"{info.name} has no ground-truth super-classes; set it to False.")
        num_super = len(np.unique(info.train_super_labels))
        _require(2 <= num_super < info.num_train_classes, "hpl.ground_truth_level1",
                 f"the {info.num_train_classes} training classes of {info.name} fall into {num_super} "
                 "super-class(es); a level above the classes needs at least 2 and fewer than the classes.")
    _require(config.batch_size <= info.num_train_examples, "batch_size",
             f"{config.batch_size} exceeds the {info.num_train_examples} training images; lower it.")
