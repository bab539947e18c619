"""How many training images per second the input pipeline makes, in all and per CPU core, on JPEG files.

  python -m hpl_jax.benchmarks.input_pipeline --config=configs/cub.py [--num_images=1500]

Writes `num_images` JPEGs of 500 x 375 pixels (CUB's usual size; smooth colour fields plus noise, so that they
compress like photos) as an image folder in a temporary directory, then draws one epoch of training batches of
the config (`config.batch_size` images at `config.dataset.image_size`: fused JPEG decode and random crop,
resize, flip, round to u8 pixels; the device normalises them) and times every batch after the first. Divide the images/s one accelerator trains at
by the per-core figure to know how many CPU cores keep it fed. Nothing is asserted; the figures are printed.
"""
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax.data import input_pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/cub.py", "A dataset config; its batch size and image size.")
flags.DEFINE_integer("num_images", 1500, "JPEGs to write (all but one class's train).")
flags.DEFINE_integer("num_classes", 20, "Class folders to spread them over.")
flags.DEFINE_integer("width", 500, "Width of the JPEGs.")
flags.DEFINE_integer("height", 375, "Height of the JPEGs.")


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """u8[height, width, 3]: a blocky random colour field, smoothed by the block size, plus pixel noise."""
    coarse = rng.uniform(0, 255, size=(height // 25 + 1, width // 25 + 1, 3))
    field = np.repeat(np.repeat(coarse, 25, axis=0), 25, axis=1)[:height, :width]
    return np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)


def write_image_folder(root: str, num_images: int, num_classes: int, height: int, width: int) -> int:
    """Writes root/class_XX/NNNN.jpg and a test_classes.txt naming the last class; returns the bytes written."""
    rng = np.random.default_rng(0)
    total = 0
    for index in range(num_images):
        folder = os.path.join(root, f"class_{index % num_classes:02d}")
        os.makedirs(folder, exist_ok=True)
        encoded = input_pipeline.encode_jpeg(photo_like(rng, height, width))
        with open(os.path.join(folder, f"{index:05d}.jpg"), "wb") as f:
            f.write(encoded)
        total += len(encoded)
    with open(os.path.join(root, input_pipeline.TEST_CLASSES_FILE), "w") as f:
        f.write(f"class_{num_classes - 1:02d}\n")
    return total


def main(argv):
    del argv
    config = FLAGS.config
    root = tempfile.mkdtemp(prefix="hpl_input_benchmark_")
    try:
        num_bytes = write_image_folder(root, FLAGS.num_images, FLAGS.num_classes, FLAGS.height, FLAGS.width)
        config.dataset.name = "image_folder"
        config.dataset.data_dir = root
        dataset = input_pipeline.create_dataset(config, local_batch_size=config.batch_size,
                                                local_eval_batch_size=config.eval.batch_size)
        times = []
        for _ in dataset.train_batches(epoch=0):
            times.append(time.perf_counter())
        images_per_second = (len(times) - 1) * config.batch_size / (times[-1] - times[0])
        cores = len(os.sched_getaffinity(0))
        size = config.dataset.image_size
        config_file = config_flags.get_config_filename(FLAGS["config"])
        print(f"train input pipeline of {config_file}: {size}x{size}, batch {config.batch_size}, "
              f"{FLAGS.num_images} JPEGs of {FLAGS.width}x{FLAGS.height} "
              f"({num_bytes / FLAGS.num_images / 1024:.0f} KiB each)")
        print(f"images/s: {images_per_second:.1f} over {len(times) - 1} batches after the first")
        print(f"CPU cores this process may use: {cores}; images/s per core: {images_per_second / cores:.1f}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    app.run(main)
