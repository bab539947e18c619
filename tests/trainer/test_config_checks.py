"""hpl_jax/trainer/config_checks.py: one checker per section of configs/default.py, and a bad value of every field
stops the run with `config.<field>: ...`."""
import inspect
import re

import ml_collections
import pytest

from configs import default
from hpl_jax.trainer import config_checks

LAYOUT = {"device_count": 2, "process_count": 1}

# field: (bad value, other overrides it needs, the field the message names where it differs). configs/default.py's
# other values are good, so each case holds one bad value.
BAD_VALUES = {
    "seed": (-1,),
    "batch_size": (15,),
    "num_epochs": (0,),
    "steps_per_epoch": (-1,),
    "log_every_steps": (0,),
    "export_backbone": (None,),
    "compilation_cache_dir": (__file__,),
    "dataset.name": ("imagenet",),
    "dataset.seed": (-1,),
    "dataset.num_val_classes": (-1,),
    "dataset.num_folds": (1,),
    "dataset.val_fold": (4, {"dataset.num_folds": 4, "dataset.num_val_classes": 0}),
    "dataset.data_dir": ("/no/such/dir", {"dataset.name": "image_folder"}),
    "dataset.manual_dir": ("/no/such/dir",),
    "dataset.image_size": (4,),
    "dataset.resize_size": (8,),
    "dataset.crop_scale": ((0.5, 0.25),),
    "dataset.crop_ratio": ((0.0, 1.0),),
    "dataset.horizontal_flip": (None,),
    "dataset.mean": ((0.5, 0.5), {}, "dataset.mean/std"),
    "dataset.std": ((0.2, 0.2, 0.0), {}, "dataset.mean/std"),
    "dataset.color_order": ("hsv",),
    "dataset.pixel_scale": (0.0,),
    "dataset.sampler": ("hard_negatives",),
    "dataset.samples_per_class": (3, {"dataset.sampler": "class_balanced"}),
    "dataset.shuffle_buffer": (0,),
    "dataset.cache_decoded": (None,),
    "dataset.cache_shorter_side": (20,),
    "dataset.cache_max_gb": (0.0,),
    "dataset.synthetic.num_families": (1,),
    "dataset.synthetic.classes_per_family": (1,),
    "dataset.synthetic.images_per_class": (1,),
    "dataset.synthetic_sop.num_super_classes": (1,),
    "dataset.synthetic_sop.sub_families_per_super_class": (0,),
    "dataset.synthetic_sop.classes_per_sub_family": (1,),
    "dataset.synthetic_sop.images_per_class": ((6, 5),),
    "dataset.synthetic_sop.image_count_decay": (0.0,),
    "dataset.synthetic_sop.super_level": ("products",),
    "dataset.synthetic_source.sop_seeds": ((1, 1), {}, "dataset.synthetic_source"),
    "dataset.synthetic_source.default_seeds": ((-1,), {}, "dataset.synthetic_source"),
    "model.backbone": ("vgg",),
    "model.width": (0.0,),
    "model.embedding_dim": (1,),
    "model.pooling": ("gem",),
    "model.bn_frozen": (None,),
    "model.dtype": ("float16",),
    "model.pretrained": ("/no/such/dir",),
    "model.conv_impl": ("winograd",),
    "model.patch_size": (0,),
    "loss.base": ("triplet",),
    "loss.alpha": (0.0,),
    "loss.delta": (-0.1,),
    "loss.temperature": (0.0,),
    "loss.exclude_positive": (None,),
    "hpl.weights": ((0.0, 0.1),),
    "hpl.num_coarse": ((1,),),
    "hpl.first_grouping": ("labels",),
    "hpl.refresh_every_steps": (-1,),
    "hpl.coarse_policy": ("keep",),
    "hpl.coarse_norm": ("max",),
    "hpl.kmeans_restarts": (0,),
    "hpl.kmeans_backend": ("faiss",),
    "hpl.ground_truth_level1": (True, {"hpl.weights": (1.0, 0.1, 0.1), "hpl.num_coarse": (8, 4)}),
    "hier.weight": (-1.0,),
    "hier.num_proxies": (1,),
    "hier.curvature": (-0.1,),
    "hier.clip_r": (0.0,),
    "hier.margin": (-0.1,),
    "hier.temperature": (0.0,),
    "hier.top_k": (2,),
    "optim.name": ("sgd",),
    "optim.momentum": (1.0,),
    "optim.lr": (0.0,),
    "optim.weight_decay": (-1.0,),
    "optim.lr_mults": ((("proxies/(", 100.0),),),
    "optim.warmup_epochs": (13,),
    "optim.warmup_trainable": (("proxies/[",),),
    "optim.frozen": (("model/(",),),
    "optim.grad_clip_value": (-1.0,),
    "optim.skip_nonfinite_steps": (None,),
    "optim.decay_epochs": (0,),
    "optim.decay_gamma": (0.0,),
    "eval.every_epochs": (0,),
    "eval.early_stopping_patience": (3, {"dataset.num_val_classes": 0}),
    "eval.batch_size": (7,),
    "eval.recall_at": ((0, 1),),
    "eval.nmi": (None,),
    "eval.super_metrics": (None,),
    "eval.costly_metrics_every_epochs": (0,),
    "eval.chunk_size": (0,),
    "checkpoint.keep": (0,),
    "checkpoint.best_metric": ("recall@3",),
    "checkpoint.every_steps": (-1,),
}


def _fields(config, prefix=""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def _sections(config, prefix=""):
    yield prefix.rstrip(".")
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _sections(value, f"{prefix}{name}.")


def _checker_name(section: str) -> str:
    return "check_" + (section.replace(".", "_") or "top_level")


def _check(checker, config):
    """`checker` on `config`, given the device layout where it takes it."""
    parameters = inspect.signature(checker).parameters
    checker(config, **{name: value for name, value in LAYOUT.items() if name in parameters})


def _bad_config(field):
    """configs/default.py with the bad value of `field`, and the field its message names."""
    entry = BAD_VALUES[field]
    value = entry[0]
    overrides = entry[1] if len(entry) > 1 else {}
    named = entry[2] if len(entry) > 2 else field
    config = default.get_config()
    config.update_from_flattened_dict({**overrides, field: value})
    return config, named


def test_every_section_of_the_default_config_has_a_checker_that_passes_it():
    config = default.get_config()
    sections = list(_sections(config))
    for section in sections:
        checker = getattr(config_checks, _checker_name(section), None)
        assert callable(checker), f"no {_checker_name(section)} for config.{section or '<top level>'}"
        _check(checker, config)
    assert sorted(name for name in dir(config_checks) if name.startswith("check_")) == sorted(map(_checker_name,
                                                                                                  sections))


def test_validate_config_runs_each_section_checker_once_in_the_default_configs_order(monkeypatch):
    order = ["check_top_level", "check_dataset", "check_dataset_synthetic", "check_dataset_synthetic_sop",
             "check_dataset_synthetic_source", "check_model", "check_loss", "check_hpl", "check_hier", "check_optim",
             "check_eval", "check_checkpoint"]
    assert sorted(order) == sorted(map(_checker_name, _sections(default.get_config())))
    called = []
    for name in order:
        monkeypatch.setattr(config_checks, name, lambda *args, name=name, **kwargs: called.append(name))
    config_checks.validate_config(default.get_config(), **LAYOUT)
    assert called == order


def test_every_field_of_the_default_config_has_a_bad_value_here():
    assert sorted(BAD_VALUES) == sorted(_fields(default.get_config()))


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_bad_value_stops_its_sections_checker_and_validate_config_naming_the_field(field):
    config, named = _bad_config(field)
    message = rf"^config\.{re.escape(named)}: "
    checker = getattr(config_checks, _checker_name(field.rpartition(".")[0]))
    with pytest.raises(config_checks.ConfigError, match=message):
        _check(checker, config)
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.validate_config(config, **LAYOUT)


def test_the_base_losses_are_the_cores_registry():
    from hpl_jax.core import losses
    assert config_checks.BASE_LOSSES == tuple(losses.BASE_LOSSES)
    for base in losses.BASE_LOSSES:
        config = default.get_config()
        config.loss.base = base
        config_checks.check_loss(config)
