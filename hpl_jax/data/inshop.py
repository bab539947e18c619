"""TFDS builder `inshop_clothes`: DeepFashion's In-Shop Clothes Retrieval benchmark, read from a manual directory.

The benchmark's files cannot be downloaded by a script (DeepFashion asks for an agreement), so the builder reads
them from TFDS's `manual_dir` (`config.dataset.manual_dir`):

  MANUAL_DIR/list_eval_partition.txt      from the benchmark's Eval/ folder
  MANUAL_DIR/img/<GENDER>/<Category>/id_XXXXXXXX/<view>.jpg    unzipped from Img/img.zip

and writes three splits: 'train' (3,997 items, 25,882 images), 'query' (14,218 images) and 'gallery' (12,612
images) of the same 3,985 test items (docs/method.md, "Benchmarks and class splits"). Each example keeps its JPEG
bytes as they are, the item number (`id_00000123` -> 123) and the category from the image path
('WOMEN/Dresses'), the super-class of the hierarchy ablation.

Importing this module registers the builder with TFDS; `hpl_jax.input_pipeline` imports it. To prepare it
once outside a training run:
  tfds build --imports=hpl_jax.inshop inshop_clothes --manual_dir=MANUAL_DIR [--data_dir=DIR]
"""
import os
from typing import Dict, Iterator, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

PARTITION_FILE = "list_eval_partition.txt"
SPLITS = ("train", "query", "gallery")


def item_number(item_id: str) -> int:
    """'id_00000123' -> 123."""
    return int(item_id.rsplit("_", 1)[-1])


def category(image_path: str) -> str:
    """'img/WOMEN/Dresses/id_00000002/02_1_front.jpg' -> 'WOMEN/Dresses'."""
    parts = image_path.split("/")
    return "/".join(parts[1:3])


def read_partition(text: str) -> Dict[str, List[Tuple[str, str]]]:
    """Rows of list_eval_partition.txt by split: {'train': [(image_path, item_id), ...], 'query': ..., ...}.

    The file holds the number of images, a header line, then one `image_name item_id evaluation_status` row
    per image.
    """
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0][0].isdigit():
        raise ValueError(f"{PARTITION_FILE} should start with the number of images and a header line.")
    rows = lines[2:]
    if int(lines[0][0]) != len(rows):
        raise ValueError(f"{PARTITION_FILE} announces {lines[0][0]} images but lists {len(rows)}; "
                         "the file is truncated, download it again.")
    by_split = {split: [] for split in SPLITS}
    for row in rows:
        if len(row) != 3 or row[2] not in by_split:
            raise ValueError(f"{PARTITION_FILE}: cannot read the row {' '.join(row)!r}; expected "
                             "'image_name item_id train|query|gallery'.")
        by_split[row[2]].append((row[0], row[1]))
    return by_split


class InshopClothes(tfds.core.GeneratorBasedBuilder):
    """In-Shop Clothes Retrieval (Liu et al., CVPR 2016) from the official files in `manual_dir`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train, query and gallery splits of list_eval_partition.txt."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Get the In-Shop Clothes Retrieval Benchmark of DeepFashion
    (https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html), unzip Img/img.zip into
    manual_dir so that manual_dir/img/WOMEN/Dresses/id_00000002/02_1_front.jpg exists, and copy
    Eval/list_eval_partition.txt to manual_dir/list_eval_partition.txt.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="DeepFashion In-Shop Clothes Retrieval: train items, and query/gallery test images.",
            homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "item_id": np.int64,
                "category": tfds.features.Text(),
            }),
            supervised_keys=("image", "item_id"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = dl_manager.manual_dir
        partition_path = root / PARTITION_FILE
        if not partition_path.exists():
            raise ValueError(f"{partition_path} does not exist.{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        by_split = read_partition(partition_path.read_text())
        return {split: self._generate_examples(os.fspath(root), rows) for split, rows in by_split.items()}

    def _generate_examples(self, root: str, rows: List[Tuple[str, str]]) -> Iterator[Tuple[str, dict]]:
        for image_path, item_id in rows:
            yield image_path, {
                "image": os.path.join(root, image_path),
                "image/filename": image_path,
                "item_id": item_number(item_id),
                "category": category(image_path),
            }
