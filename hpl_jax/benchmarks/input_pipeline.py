"""How many training images per second the input pipeline makes per CPU core, from JPEG files and from the decoded
cache, against torchvision's DataLoader on the same files, and how many host cores feed one accelerator.

  python -m hpl_jax.benchmarks.input_pipeline --config=configs/cub.py [--num_images=1500] [--images=photos]

Writes `num_images` JPEGs of 500 x 375 pixels (CUB's usual size) as an image folder in a temporary directory:
`--images=photos` cuts them from the two photographs scikit-learn ships (random windows, flips and brightness, so
every file differs and compresses like a photo), `--images=synthetic` draws smooth colour fields plus noise. Then,
for each pipeline, draws `--epochs` epochs of the config's training batches (`config.batch_size` images at
`config.dataset.image_size`: random resized crop, flip, u8 pixels), then with `--rounds` above 1 one more epoch of
each pipeline per round, in turn (a machine whose speed drifts moves every pipeline alike), and prints per epoch:
- steady-state images/s (every batch after the epoch's first), in all and per core of this process's CPU set;
- images per CPU-second over the whole epoch (this process's CPU time, and its DataLoader workers'), a figure a
  loaded machine disturbs less than the wall-clock rates;
- the first batch's wait (epoch 0 of the cache: the fill, every training image decoded once).
The pipelines: `files` (config.dataset.cache_decoded=False: fused JPEG decode and crop, at a reduced DCT scale
for crops at least twice the output a side), `cache` (cache_decoded=True at config.dataset.cache_shorter_side), and,
where PyTorch is installed, `torch`: a DataLoader with one worker per core, shuffled, over the same files read as
the official Proxy-Anchor code reads them (PIL, then torchvision's RandomResizedCrop(image_size),
RandomHorizontalFlip, ToTensor, Normalize; where torchvision does not import beside the installed torch, the same
PIL calls written out below). Last, each pipeline's ratio to torch per round (each round's last epoch) and their
median, and the host cores one accelerator needs at the train-step speeds docs/benchmarks.md records
(`--step_images_per_s`), at the median rate. Nothing is asserted; the figures are printed.
"""
import math
import os
import random
import resource
import shutil
import tempfile
import time
from typing import Callable, Iterable, List, Sequence, Tuple

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax.data import input_pipeline
from hpl_jax.trainer import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/cub.py", "A dataset config; its batch size, image size, cache.")
flags.DEFINE_integer("num_images", 1500, "JPEGs to write (all but one class's train).")
flags.DEFINE_integer("num_classes", 20, "Class folders to spread them over.")
flags.DEFINE_integer("width", 500, "Width of the JPEGs.")
flags.DEFINE_integer("height", 375, "Height of the JPEGs.")
flags.DEFINE_integer("quality", 90, "JPEG quality of the files written.")
flags.DEFINE_enum("images", "photos", ["photos", "synthetic"], "Cut from real photographs, or drawn.")
flags.DEFINE_integer("epochs", 2, "Epochs drawn per pipeline in the first round (the cache fills in epoch 0).")
flags.DEFINE_integer("rounds", 1, "Rounds over the pipelines: each later round draws one more epoch of each, in "
                     "turn, so every ratio compares rates taken minutes apart at most; medians over the rounds.")
flags.DEFINE_list("pipelines", ["files", "cache", "torch"], "Which pipelines to time, in this order.")
# One H200, ResNet-50 at 224 px, bf16, batch 120 and 360 (docs/benchmarks.md, "On a GPU").
flags.DEFINE_list("step_images_per_s", ["6478", "7906"], "Train-step images/s of one accelerator to feed.")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """u8[height, width, 3]: a blocky random colour field, smoothed by the block size, plus pixel noise."""
    coarse = rng.uniform(0, 255, size=(height // 25 + 1, width // 25 + 1, 3))
    field = np.repeat(np.repeat(coarse, 25, axis=0), 25, axis=1)[:height, :width]
    return np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)


def photo_window(rng: np.random.Generator, photos: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """u8[height, width, 3]: a random window of one of `photos`, flipped or not, brightness shifted by up to 8%."""
    photo = photos[rng.integers(len(photos))]
    top = rng.integers(photo.shape[0] - height + 1)
    left = rng.integers(photo.shape[1] - width + 1)
    window = photo[top:top + height, left:left + width].astype(np.float32)
    if rng.random() < 0.5:
        window = window[:, ::-1]
    return np.clip(window * rng.uniform(0.92, 1.08), 0, 255).astype(np.uint8)


def write_image_folder(root: str, num_images: int, num_classes: int, height: int, width: int, *, images: str,
                       quality: int) -> Tuple[List[str], List[int], int]:
    """Writes root/class_XX/NNNNN.jpg and a test_classes.txt naming the last class; returns the training files'
    paths and labels (the sorted classes but the last) and the bytes written."""
    rng = np.random.default_rng(0)
    photos = []
    if images == "photos":
        from sklearn.datasets import load_sample_images  # benchmark-only: two 427 x 640 photographs
        photos = [image for image in load_sample_images().images
                  if image.shape[0] >= height and image.shape[1] >= width]
        if not photos:
            raise app.UsageError(f"--height={height} --width={width} is larger than the sample photos (427 x 640).")
    paths, labels, total = [], [], 0
    for index in range(num_images):
        label = index % num_classes
        folder = os.path.join(root, f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        pixels = photo_window(rng, photos, height, width) if photos else photo_like(rng, height, width)
        encoded = input_pipeline.encode_jpeg(pixels, quality=quality)
        path = os.path.join(folder, f"{index:05d}.jpg")
        with open(path, "wb") as f:
            f.write(encoded)
        total += len(encoded)
        if label != num_classes - 1:
            paths.append(path)
            labels.append(label)
    with open(os.path.join(root, input_pipeline.TEST_CLASSES_FILE), "w") as f:
        f.write(f"class_{num_classes - 1:02d}\n")
    return paths, labels, total


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that ended (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_epoch(batches: Iterable, batch_size: int) -> Tuple[float, float, float, int]:
    """(first batch s, steady-state images/s after it, images per CPU-second of the whole epoch, batches)."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    times = []
    for _ in batches:
        times.append(time.perf_counter())
    cpu = cpu_seconds() - cpu_start  # after the loop: a DataLoader's workers are joined by then
    steady = (len(times) - 1) * batch_size / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] - start, steady, len(times) * batch_size / cpu, len(times)


class ProxyAnchorTrainTransform:
    """The official Proxy-Anchor training transform on a PIL image, as torchvision runs it: RandomResizedCrop(size)
    (area 0.08-1, log-uniform ratio 3/4-4/3, 10 draws, then a centre crop), PIL crop + bilinear resize,
    RandomHorizontalFlip, ToTensor (f32 CHW / 255), Normalize. For a torch beside which torchvision does not
    import."""

    def __init__(self, size: int):
        self.size = size

    def window(self, width: int, height: int) -> Tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target_area = area * random.uniform(0.08, 1.0)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        ratio = width / height
        w, h = (width, int(round(width / (4 / 3)))) if ratio > 4 / 3 else (
            (int(round(height * 3 / 4)), height) if ratio < 3 / 4 else (width, height))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image):
        import torch
        from PIL import Image

        top, left, h, w = self.window(*image.size)
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = tensor.float().div(255)
        return tensor.sub_(torch.tensor(MEAN)[:, None, None]).div_(torch.tensor(STD)[:, None, None])


def torch_epochs(paths: Sequence[str], labels: Sequence[int], *, batch_size: int, image_size: int,
                 workers: int) -> Tuple[str, Callable[[], Iterable]]:
    """(what runs, a function that returns one epoch's batches): the official Proxy-Anchor DataLoader over the
    files; raises ImportError without torch."""
    import torch  # benchmark-only: not a dependency of the project
    from PIL import Image

    try:
        from torchvision import transforms
        transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(MEAN, STD)])
        what = "torchvision transforms"
    except Exception as error:  # an import error, or torchvision's operators failing to load beside this torch
        transform = ProxyAnchorTrainTransform(image_size)
        what = f"torchvision's PIL calls written out (torchvision: {type(error).__name__})"

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            image = Image.open(paths[index])
            if len(list(image.split())) == 1:
                image = image.convert("RGB")
            return transform(image), labels[index]

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    return f"torch {torch.__version__} DataLoader, {workers} workers, {what}", lambda: iter(loader)


def main(argv):
    del argv
    cli.quiet_library_logs()
    config = FLAGS.config
    cores = len(os.sched_getaffinity(0))
    root = tempfile.mkdtemp(prefix="hpl_input_benchmark_")
    try:
        paths, labels, num_bytes = write_image_folder(root, FLAGS.num_images, FLAGS.num_classes, FLAGS.height,
                                                      FLAGS.width, images=FLAGS.images, quality=FLAGS.quality)
        config.dataset.name = "image_folder"
        config.dataset.data_dir = root
        config.num_epochs = 1  # nothing drawn ahead on a thread: each epoch's CPU time is its own
        size = config.dataset.image_size
        config_file = config_flags.get_config_filename(FLAGS["config"])
        print(f"train input of {config_file}: {size}x{size}, batch {config.batch_size}; {len(paths)} training JPEGs "
              f"({FLAGS.images}) of {FLAGS.width}x{FLAGS.height}, quality {FLAGS.quality}, "
              f"{num_bytes / FLAGS.num_images / 1024:.0f} KiB each; {cores} CPU cores in this process's set; "
              f"load average {os.getloadavg()[0]:.1f} at the start")
        epoch_functions = {}
        for pipeline in FLAGS.pipelines:
            if pipeline == "torch":
                try:
                    what, epoch_batches = torch_epochs(paths, labels, batch_size=config.batch_size,
                                                       image_size=size, workers=cores)
                except ImportError as error:
                    print(f"torch: skipped ({error})")
                    continue
                epoch_functions[pipeline] = lambda epoch, epoch_batches=epoch_batches: epoch_batches()
            else:
                config.dataset.cache_decoded = pipeline == "cache"
                dataset = input_pipeline.create_dataset(config, local_batch_size=config.batch_size,
                                                        local_eval_batch_size=config.eval.batch_size)
                epoch_functions[pipeline] = dataset.train_batches
                if pipeline == "cache":
                    cache_dataset = dataset
                what = ("tf.data from the JPEG files" if pipeline == "files" else
                        f"tf.data from the decoded cache, shorter side {config.dataset.cache_shorter_side}")
            print(f"{pipeline}: {what}")
        per_core = {pipeline: [] for pipeline in epoch_functions}  # the last epoch of each round
        for round_index in range(FLAGS.rounds):
            epochs = range(FLAGS.epochs) if round_index == 0 else [FLAGS.epochs - 1 + round_index]
            for pipeline, epoch_batches in epoch_functions.items():
                for epoch in epochs:
                    first_s, steady, per_cpu_s, count = time_epoch(epoch_batches(epoch), config.batch_size)
                    print(f"  {pipeline} epoch {epoch}: {steady:.1f} images/s = {steady / cores:.1f} per core over "
                          f"{count - 1} batches after the first; {per_cpu_s:.1f} images per CPU-second over the "
                          f"epoch; first batch {first_s:.2f} s")
                per_core[pipeline].append(steady / cores)
                if pipeline == "cache" and round_index == 0:
                    decoded = cache_dataset.decoded_images()
                    print(f"  cache: {decoded.num_bytes / 1e9:.2f} GB for {len(decoded.offsets)} images")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        median = {pipeline: float(np.median(rates)) for pipeline, rates in per_core.items()}
        if "torch" in per_core:
            for pipeline in ("files", "cache"):
                if pipeline in per_core:
                    ratios = np.array(per_core[pipeline]) / np.array(per_core["torch"])
                    print(f"{pipeline} / torch, per core at steady state (each round's last epoch): "
                          f"{' '.join(f'{ratio:.2f}x' for ratio in ratios)}; median {np.median(ratios):.2f}x")
        for pipeline, rate in median.items():
            needed = ", ".join(f"{math.ceil(float(step) / rate)} cores for {float(step):,.0f} images/s"
                               for step in FLAGS.step_images_per_s)
            print(f"host cores to feed one accelerator from {pipeline} (median of the rounds' last epochs, "
                  f"{rate:.1f} images/s per core): {needed}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    app.run(main)
