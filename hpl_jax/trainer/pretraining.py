"""Pretrained backbones made here, and what a run checks of the pretrained weights it is given.

A pretraining is a training run with `config.export_backbone = True` (configs/pretrain_synthetic.py): supervised
classification of the source's training classes by a normalised softmax (Proxy-NCA with the positive in the
denominator, `losses.proxy_nca_loss`: cross-entropy over cosine logits / (T / 2), the classifier of "Classification
is a strong baseline for deep metric learning", Zhai & Wu 2019, whose class weights are the proxies), trained and
resumed like any run. At its end `export_backbone` writes WORKDIR/backbone in exactly the format
`hpl_jax.convert_weights` writes for ImageNet weights: an orbax checkpoint of the backbone's params and BatchNorm
statistics, and a metadata.json naming the architecture, its width, the input preprocessing the run fed it, and
the source dataset. `--config.model.pretrained=WORKDIR/backbone` then fine-tunes from it with no other change.

`pretrained_problem` is what `config_checks` asks of such weights before anything is compiled or read: that they
are of the configured backbone and width, and that their source is not the target itself. Weights pretrained on
the dataset a run trains on are refused, not warned about: the source's training classes are then the target's
training *and validation* classes (the held-out classes the run chooses its epoch on), so validation would no
longer measure retrieval of unseen classes, and a pretrained-against-scratch comparison would measure
memorisation. For the embedded datasets "the same dataset" is the same generator drawn with the same data seed
(`data.embedded_draws`); converted ImageNet weights carry no source record and are accepted, as in every
published recipe (ImageNet holds bird and car classes).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
from etils import epath

from hpl_jax import data
from hpl_jax.models import convert as convert_weights

EXPORT_DIR = "backbone"
IMAGE_FOLDER = "image_folder"


def preprocessing(dataset_config) -> Dict[str, Any]:
    """The input normalisation of `dataset_config`, in metadata.json's terms (convert_weights.PREPROCESSING)."""
    return {
        "input_space": dataset_config.color_order.upper(),
        "input_range": [0, float(dataset_config.pixel_scale)],
        "mean": [float(m) for m in dataset_config.mean],
        "std": [float(s) for s in dataset_config.std],
    }


def _folder(data_dir: str) -> str:
    """An image folder's identity: its absolute, normalised path (a gs:// address as given, without a trailing /)."""
    if data_dir.startswith("gs://"):
        return data_dir.rstrip("/")
    return os.path.realpath(os.path.expanduser(data_dir))


def source_description(dataset_config) -> Dict[str, Any]:
    """What metadata.json records of the source data: its name and the data themselves, as far as they identify
    it: an embedded dataset's draws; an image folder's path (its first half of the classes trained); a TFDS
    benchmark's training split (the same whatever data_dir holds it)."""
    description = {"name": dataset_config.name,
                   "draws": [list(draw) for draw in data.embedded_draws(dataset_config)]}
    if dataset_config.name == IMAGE_FOLDER:
        description["folder"] = _folder(dataset_config.data_dir)
    elif not description["draws"]:
        description["split"] = "train"
    return description


def source_overlap(metadata: Dict[str, Any], dataset_config) -> Optional[str]:
    """Why weights with `metadata` may not be fine-tuned on the data `dataset_config` names, or None: the source's
    training classes must not be this run's. Compared are the data, not the dataset's name: the generator draws of
    embedded data, the folder of an image folder, the TFDS name of a benchmark."""
    source = metadata.get("source_dataset")
    if not source:
        return None
    shared = {tuple(draw) for draw in source.get("draws", [])} & set(data.embedded_draws(dataset_config))
    if shared:
        listed = ", ".join(f"{generator} at data seed {seed}" for generator, seed in sorted(shared))
        return (f"they were pretrained on {listed}, which this run's dataset is too: its training and validation "
                f"classes were the pretraining's classes. Fine-tune on another data seed (config.dataset.seed), or "
                f"pretrain without it (dataset.synthetic_source.sop_seeds / default_seeds).")
    if source.get("draws") or source.get("name") != dataset_config.name:
        return None
    if dataset_config.name == IMAGE_FOLDER:
        if "folder" not in source:
            return ("their record names no folder (an export older than the folder record), so whether they saw this run's "
                    "classes cannot be told; export them again, or pass weights of another source.")
        if source["folder"] != _folder(dataset_config.data_dir):
            return None
        return (f"they were pretrained on the image folder {source['folder']}, this run's dataset.data_dir: its "
                "training classes include this run's training and validation classes; pretrain on another folder.")
    return (f"they were pretrained on {dataset_config.name}'s training classes, which include this run's "
            f"training and validation classes; pretrain on another dataset.")


def pretrained_problem(config) -> Optional[Tuple[str, str]]:
    """(field, problem) for the first thing wrong with `config.model.pretrained`, or None (also when it is '')."""
    model = config.model
    if not model.pretrained:
        return None
    if not model.pretrained.startswith("gs://") and not epath.Path(model.pretrained).is_dir():
        return ("model.pretrained", f"{model.pretrained!r} does not exist; convert weights with `python -m "
                "hpl_jax.convert_weights`, or pretrain with export_backbone=True, and pass the output directory.")
    try:
        metadata = convert_weights.read_metadata(model.pretrained)
    except ValueError as error:
        return ("model.pretrained", str(error).removeprefix(f"config.model.pretrained = {model.pretrained!r} "))
    if metadata["architecture"] != model.backbone:
        return ("model.backbone", f"{model.backbone!r}, but model.pretrained holds {metadata['architecture']} "
                "weights; make them agree.")
    width = float(metadata.get("width", 1.0))
    if model.width != width:
        return ("model.width", f"{model.width}, but model.pretrained holds a backbone of width {width}; set it to "
                f"{width}.")
    overlap = source_overlap(metadata, config.dataset)
    if overlap:
        return ("model.pretrained", f"{model.pretrained!r} cannot be fine-tuned here: {overlap}")
    return None


def export_backbone(state, config, workdir, *, info: data.DatasetInfo) -> epath.Path:
    """Writes the backbone of `state` (host copy) to WORKDIR/backbone as `hpl_jax.convert_weights` does; every
    process calls it (orbax's save is collective). metadata.json is written last, so a directory without it is an
    unfinished export, which a rerun replaces; a finished one is kept.

    Returns the directory.
    """
    output = epath.Path(workdir) / EXPORT_DIR
    if (output / convert_weights.METADATA_FILE).exists():
        return output
    if jax.process_index() == 0 and output.exists():
        output.rmtree()
    metadata = {
        "architecture": config.model.backbone,
        "width": float(config.model.width),
        "source": str(workdir),
        "preprocessing": preprocessing(config.dataset),
        "source_dataset": {**source_description(config.dataset), "num_train_classes": info.num_train_classes,
                           "num_train_examples": info.num_train_examples},
        "pretraining": {"epoch": int(state.epoch), "step": int(state.step), "loss": config.loss.base,
                        "temperature": float(config.loss.temperature), "image_size": config.dataset.image_size},
    }
    convert_weights.save_converted(output, state.params["backbone"], state.batch_stats.get("backbone", {}), metadata,
                                   write_metadata=jax.process_index() == 0)
    return output
