"""ImageNet-pretrained PyTorch weights -> the Flax backbone of `models.Embedder` (issues 6 and 32).

  python -m hpl_jax.convert_weights --arch resnet50 --input resnet50-11ad3fa6.pth --output weights/resnet50
  python -m hpl_jax.convert_weights --arch vit_small --input model.safetensors --preprocessing inception \
      --output weights/vit_small_augreg

reads a state dict in torchvision's ResNet layout (ResNet-18/34/50; timm's `resnet50.tv_in1k` safetensors
use the same names), in the layout of the PyTorch BN-Inception port (`bn_inception-52deb4733.pth`) or in timm's
ViT layout (timm's `vit_{tiny,small,base}_patch16_224.*`, the `.dino` ones included, `deit_*_patch16_224.fb_in1k`; any
patch size: it is read off the weights), maps every tensor onto `params['backbone']` / `batch_stats['backbone']`, and
writes an orbax checkpoint plus `metadata.json` naming the architecture, the source and the input preprocessing the
weights expect. A `.safetensors` file needs only NumPy; a `.pth` file needs torch.

A ViT's preprocessing is not in its weights file, so --preprocessing names it: 'inception' (mean = std = 0.5:
timm's augreg weights and Google's original ViTs) or 'imagenet' (ImageNet mean/std: DINO, DeiT); the hub page of
the weights (its `pretrained_cfg`) says which. The CNNs default to their own (torchvision's ImageNet statistics;
BN-Inception's BGR 0-255 Caffe means).

Every tensor the backbone needs must be present and every tensor present must be used, else the conversion
stops naming the key; the classifier (`fc.*`, `last_linear.*`, `head.*`) is dropped by design and BatchNorm's
`num_batches_tracked` counters are ignored. A ViT's position embeddings are stored on the grid they were learned
on; `load_pretrained` resamples them to the run's image size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from hpl_jax import models

# What the weights expect of an image, in the terms of the PyTorch ports' settings: pixels in
# `input_range`, channels in `input_space` order, then (pixel - mean) / std with mean and std listed in
# that same channel order.
TORCHVISION_PREPROCESSING = {
    "input_space": "RGB",
    "input_range": [0, 1],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# The Caffe-trained BN-Inception: BGR, 0-255, per-channel means subtracted (docs/method.md, "Training recipe").
BN_INCEPTION_PREPROCESSING = {
    "input_space": "BGR",
    "input_range": [0, 255],
    "mean": [104, 117, 128],
    "std": [1, 1, 1],
}
# timm's IMAGENET_INCEPTION_MEAN / _STD, which its augreg ViTs (and Google's original ViTs) expect.
INCEPTION_PREPROCESSING = {
    "input_space": "RGB",
    "input_range": [0, 1],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}
# The preprocessing of each CNN's published weights; a ViT's depends on how its weights were trained (--preprocessing).
PREPROCESSING = {
    "resnet18": TORCHVISION_PREPROCESSING,
    "resnet34": TORCHVISION_PREPROCESSING,
    "resnet50": TORCHVISION_PREPROCESSING,
    "bn_inception": BN_INCEPTION_PREPROCESSING,
}
# --preprocessing's choices.
NAMED_PREPROCESSING = {"imagenet": TORCHVISION_PREPROCESSING, "inception": INCEPTION_PREPROCESSING}

# The ImageNet classifier, which the embedding head replaces.
CLASSIFIER_PREFIXES = ("fc.", "last_linear.", "head.")
# The keys under which training scripts save a model's state dict beside other things (DeiT's release files: 'model').
WRAPPED_STATE_DICT_KEYS = ("model", "state_dict")
CHECKPOINT_SUBDIR = "checkpoint"
METADATA_FILE = "metadata.json"

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Tensors of a .safetensors file: u64 little-endian header size, JSON header, raw little-endian data."""
    with open(path, "rb") as file:
        data = file.read()
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_size])
    header.pop("__metadata__", None)
    buffer = memoryview(data)[8 + header_size:]
    tensors = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        flat = np.frombuffer(buffer[begin:end], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        tensors[key] = flat.reshape(entry["shape"]).copy()
    return tensors


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Tensors of a PyTorch state dict saved with torch.save (needs torch), or of the one a checkpoint holds under
    'model' or 'state_dict' (WRAPPED_STATE_DICT_KEYS)."""
    try:
        import torch
    except ImportError as error:
        raise ValueError(
            f"--input {path} is a PyTorch file and torch is not installed; install torch (CPU build) or "
            "use the same weights as .safetensors."
        ) from error
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping):
        wrapped = [key for key in WRAPPED_STATE_DICT_KEYS if isinstance(state_dict.get(key), Mapping)]
        state_dict = state_dict[wrapped[0]] if wrapped else state_dict
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"--input {path} is not a flat state dict of tensors (name -> tensor); save "
                         "model.state_dict() itself.")
    return {key: value.detach().float().numpy() if value.is_floating_point() else value.numpy()
            for key, value in state_dict.items()}


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Tensors of a weights file by its suffix: .safetensors, else a torch.save file."""
    if not os.path.isfile(path):
        raise ValueError(f"--input {path} does not exist; give the path of a .pth or .safetensors file.")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_state_dict(path)


def torch_module_name(flax_module_path: Sequence[str]) -> str:
    """PyTorch name of a backbone layer from its Flax path (BN-Inception's names are kept verbatim)."""
    name = ".".join(flax_module_path)
    name = re.sub(r"^layer(\d)_(\d+)", r"layer\1.\2", name)
    name = re.sub(r"^blocks_(\d+)", r"blocks.\1", name)
    name = re.sub(r"^patch_embed$", "patch_embed.proj", name)
    return name.replace("downsample_conv", "downsample.0").replace("downsample_bn", "downsample.1")


# Flax leaf name -> PyTorch tensor name, per collection; other leaves (a ViT's cls_token, pos_embed) keep theirs.
TORCH_LEAF_NAMES = {
    "params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
    "batch_stats": {"mean": "running_mean", "var": "running_var"},
}


def torch_key(flax_path: Sequence[str], collection: str) -> str:
    """PyTorch name of the tensor at `flax_path` ('blocks_0', 'attn', 'qkv', 'kernel') in `collection`."""
    leaf = TORCH_LEAF_NAMES[collection].get(flax_path[-1], flax_path[-1])
    return ".".join(name for name in (torch_module_name(flax_path[:-1]), leaf) if name)


def backbone_variable_shapes(arch: str, width: float = 1.0, patch_size: int = 16,
                             image_size: int = 224) -> Dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} of `arch` at `width` (1.0: the published one), as ShapeDtypeStructs; a ViT's
    with `patch_size` and position embeddings for `image_size` ({} for its batch_stats: it has no BatchNorm)."""
    model = models.Embedder(arch, embedding_dim=1, width=width, patch_size=patch_size)
    image = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
    return {collection: shapes.get(collection, {}).get("backbone", {}) for collection in ("params", "batch_stats")}


def vit_geometry(state_dict: Mapping[str, np.ndarray], arch: str) -> Tuple[int, int]:
    """(patch size, image size) of timm ViT weights: the patch kernel's side, and the side of the square grid their
    position embeddings were learned on times it.

    Raises:
      ValueError naming the tensor if it is missing or not shaped as a timm ViT's.
    """
    for key, rank in (("patch_embed.proj.weight", 4), ("pos_embed", 3)):
        if key not in state_dict:
            raise ValueError(f"the weights have no tensor {key!r}, which {arch} needs; check --arch and that the file "
                             "is a complete timm ViT state dict.")
        if np.ndim(state_dict[key]) != rank:
            raise ValueError(f"tensor {key!r} has shape {np.shape(state_dict[key])}, not a timm ViT's; check --arch.")
    patch_size = np.shape(state_dict["patch_embed.proj.weight"])[-1]
    grid_tokens = np.shape(state_dict["pos_embed"])[1] - 1
    side = math.isqrt(max(grid_tokens, 0))
    if side * side != grid_tokens:
        raise ValueError(f"tensor 'pos_embed' holds {grid_tokens} patch positions, not a square grid (extra prefix "
                         f"tokens, as in distilled DeiT or register ViTs, are not supported); check --arch.")
    return patch_size, side * patch_size


def flax_array(key: str, tensor: np.ndarray, expected_shape: Tuple[int, ...]) -> np.ndarray:
    """The PyTorch tensor `key` in Flax layout: OIHW kernels -> HWIO, Linear [out, in] -> [in, out]; float32."""
    if tensor.ndim == 4:
        tensor = tensor.transpose(2, 3, 1, 0)
    elif len(expected_shape) == 2 and tensor.ndim == 2:
        tensor = tensor.T
    elif len(expected_shape) == 1 and tensor.ndim == 2 and tensor.shape[0] == 1:
        # The BN-Inception port stores BatchNorm vectors as [1, C].
        tensor = tensor[0]
    if tensor.shape != tuple(expected_shape):
        raise ValueError(f"tensor {key!r} has shape {tensor.shape} in Flax layout where the backbone needs "
                         f"{tuple(expected_shape)}; check --arch.")
    return np.asarray(tensor, np.float32)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str
                       ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Map a PyTorch state dict onto the Flax backbone of `arch`.

    Args:
      state_dict: PyTorch tensor name -> array in PyTorch layout (conv weights OIHW, Linear weights [out, in]).
      arch: one of `models.BACKBONES`.

    Returns:
      (params, batch_stats, report): the backbone's trees of float32 arrays ({} batch_stats for a ViT), and a
      report with the PyTorch keys 'converted', 'unused_by_design' (the classifier) and 'ignored'
      (num_batches_tracked); for a ViT also 'patch_size' and 'image_size' (the side its position embeddings were
      learned for).

    Raises:
      ValueError naming the key if a tensor the backbone needs is missing, one present is not used, or a
      shape does not match.
    """
    if arch not in models.BACKBONES:
        raise ValueError(f"--arch {arch!r} is not a backbone; use one of {models.BACKBONES}.")
    geometry = {}
    if arch in models.VIT_BACKBONES:
        geometry = dict(zip(("patch_size", "image_size"), vit_geometry(state_dict, arch)))
    shapes = backbone_variable_shapes(arch, **geometry)
    converted: Dict[str, Any] = {}
    used = set()
    for collection, tree in shapes.items():
        leaves = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(entry.key for entry in path)
            key = torch_key(names, collection)
            if key not in state_dict:
                raise ValueError(f"the weights have no tensor {key!r}, which {arch} needs; check --arch and "
                                 "that the file is a complete state dict.")
            leaves[names] = flax_array(key, np.asarray(state_dict[key]), leaf.shape)
            used.add(key)
        converted[collection] = unflatten(leaves)
    ignored = sorted(key for key in state_dict if key.endswith(".num_batches_tracked"))
    unused_by_design = sorted(key for key in state_dict if key.startswith(CLASSIFIER_PREFIXES))
    unused = sorted(set(state_dict) - used - set(ignored) - set(unused_by_design))
    if unused:
        raise ValueError(f"the weights have {len(unused)} tensor(s) that {arch} does not use, first "
                         f"{unused[0]!r}; check --arch.")
    report = {"converted": sorted(used), "unused_by_design": unused_by_design, "ignored": ignored, **geometry}
    return converted["params"], converted["batch_stats"], report


def unflatten(leaves: Mapping[Tuple[str, ...], np.ndarray]) -> Dict[str, Any]:
    """Nested dict from {('a', 'b', 'c'): leaf}."""
    tree: Dict[str, Any] = {}
    for names, leaf in leaves.items():
        node = tree
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return tree


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_converted(output_dir, params: Dict[str, Any], batch_stats: Dict[str, Any],
                   metadata: Mapping[str, Any], *, write_metadata: bool = True) -> None:
    """Write `output_dir/checkpoint` (orbax) and then `output_dir/metadata.json` (local or gs://; in a
    multi-process run every process calls it and one writes the metadata)."""
    output_dir = _weights_dir(str(output_dir))
    if output_dir.exists() and list(output_dir.iterdir()):
        raise ValueError(f"--output {output_dir} exists and is not empty; choose a new directory.")
    output_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(output_dir / CHECKPOINT_SUBDIR, {"params": params, "batch_stats": batch_stats})
    if write_metadata:
        (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def convert_file(arch: str, input_path: str, output_dir: str, preprocessing: Optional[str] = None
                 ) -> Dict[str, Any]:
    """Read, convert and write; returns the metadata written (with the conversion report).

    `preprocessing` is a key of NAMED_PREPROCESSING; None = the architecture's own (PREPROCESSING), which a ViT
    has not.
    """
    if preprocessing is None and arch not in PREPROCESSING:
        raise ValueError(f"--preprocessing is needed for {arch}: 'inception' for weights trained on mean = std = 0.5 "
                         "(timm's augreg ViTs), 'imagenet' for ImageNet mean/std (DINO, DeiT); the weights' "
                         "pretrained_cfg on their hub page says which.")
    params, batch_stats, report = convert_state_dict(read_state_dict(input_path), arch)
    metadata = {
        "architecture": arch,
        "source": os.path.abspath(input_path),
        "source_sha256": file_sha256(input_path),
        "preprocessing": NAMED_PREPROCESSING[preprocessing] if preprocessing else PREPROCESSING[arch],
        **{key: report[key] for key in ("patch_size", "image_size") if key in report},
        "converted_tensors": len(report["converted"]),
        "unused_by_design": report["unused_by_design"],
        "ignored": report["ignored"],
    }
    save_converted(output_dir, params, batch_stats, metadata)
    return metadata


def _weights_dir(path: str) -> epath.Path:
    """A converted-weights directory, local (made absolute) or on a remote file system (gs://...)."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def read_metadata(path: str) -> Dict[str, Any]:
    """The metadata.json of converted weights: architecture, source, and the input preprocessing they expect.

    Raises:
      ValueError if `path` is not a directory written by this module.
    """
    metadata_path = _weights_dir(path) / METADATA_FILE
    if not metadata_path.exists():
        raise ValueError(f"config.model.pretrained = {path!r} is not a converted weights directory (no "
                         f"{METADATA_FILE}); create it with python -m hpl_jax.convert_weights.")
    return json.loads(metadata_path.read_text())


def load_pretrained(path: str, backbone: str, width: float = 1.0, *, patch_size: Optional[int] = None,
                    image_size: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Converted (or pretrained here: pretraining.export_backbone) weights for the trainer: (backbone params,
    backbone batch_stats, metadata).

    The trees replace `variables['params']['backbone']` and `variables['batch_stats']['backbone']` of an
    `Embedder(backbone, ..., width=width, patch_size=patch_size)`; `metadata['preprocessing']` says how images must
    be normalised. A ViT has no batch_stats ({}); its position embeddings are resampled to the grid of `image_size`
    (`models.resample_pos_embed`, timm's resampling) and kept on the grid they were learned on where it is None.

    Raises:
      ValueError if `path` is not a directory written by this module, or holds another architecture, width or
      (a ViT's) patch size.
    """
    metadata = read_metadata(path)
    if metadata["architecture"] != backbone:
        raise ValueError(f"config.model.pretrained = {path!r} holds {metadata['architecture']} weights but "
                         f"config.model.backbone is {backbone!r}; make them agree.")
    if float(metadata.get("width", 1.0)) != width:
        raise ValueError(f"config.model.pretrained = {path!r} holds a backbone of width {metadata.get('width', 1.0)} "
                         f"but config.model.width is {width}; make them agree.")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(_weights_dir(path) / CHECKPOINT_SUBDIR)
    restored = {collection: restored.get(collection, {}) for collection in ("params", "batch_stats")}
    geometry = {}
    if backbone in models.VIT_BACKBONES:
        geometry = _vit_weights_geometry(path, restored["params"], patch_size)
    expected = backbone_variable_shapes(backbone, width, **geometry)
    for collection in ("params", "batch_stats"):
        got = jax.tree.map(np.shape, restored[collection])
        want = jax.tree.map(lambda leaf: leaf.shape, expected[collection])
        if got != want:
            raise ValueError(f"config.model.pretrained = {path!r} does not match the {backbone} "
                             f"{collection} tree; convert the weights again with this version.")
    params = restored["params"]
    if geometry and image_size:
        grid = (image_size // geometry["patch_size"],) * 2
        params = {**params, "pos_embed": np.asarray(models.resample_pos_embed(params["pos_embed"], grid))}
    return params, restored["batch_stats"], metadata


def _vit_weights_geometry(path: str, params: Mapping[str, Any], patch_size: Optional[int]) -> Dict[str, int]:
    """{'patch_size', 'image_size'} of restored ViT params (read off their shapes), checked against `patch_size`."""
    weights_patch = np.shape(params["patch_embed"]["kernel"])[0]
    if patch_size is not None and weights_patch != patch_size:
        raise ValueError(f"config.model.pretrained = {path!r} holds a ViT with {weights_patch}-pixel patches but "
                         f"config.model.patch_size is {patch_size}; set it to {weights_patch}.")
    side = math.isqrt(np.shape(params["pos_embed"])[1] - 1)
    return {"patch_size": weights_patch, "image_size": side * weights_patch}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=models.BACKBONES)
    parser.add_argument("--input", required=True, help="a .pth (needs torch) or .safetensors state dict")
    parser.add_argument("--output", required=True, help="a new directory for the checkpoint and metadata")
    parser.add_argument("--preprocessing", choices=tuple(NAMED_PREPROCESSING),
                        help="the input normalisation the weights were trained with: 'inception' (mean = std = 0.5; "
                             "timm's augreg ViTs) or 'imagenet' (ImageNet mean/std; DINO, DeiT, torchvision). Needed "
                             "for a ViT; a CNN defaults to its own.")
    args = parser.parse_args(argv)
    try:
        metadata = convert_file(args.arch, args.input, args.output, args.preprocessing)
    except ValueError as error:
        sys.exit(f"error: {error}")
    geometry = (f" ({metadata['patch_size']}-pixel patches, position embeddings learned at {metadata['image_size']} px)"
                if "patch_size" in metadata else "")
    print(f"converted {metadata['converted_tensors']} tensors of {args.arch}{geometry} from {args.input}; "
          f"unused by design: {', '.join(metadata['unused_by_design']) or 'none'}; "
          f"ignored: {len(metadata['ignored'])} num_batches_tracked")
    print(f"wrote {os.path.join(args.output, CHECKPOINT_SUBDIR)} and {os.path.join(args.output, METADATA_FILE)}")
    print(f"input preprocessing these weights expect: {json.dumps(metadata['preprocessing'])}")


if __name__ == "__main__":
    main()
