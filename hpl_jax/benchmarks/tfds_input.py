"""What a start and an epoch boundary cost the TFDS input, on a prepared TFDS dataset of JPEG records.

  python -m hpl_jax.benchmarks.tfds_input [--num_records=20000] [--pause_s=8]

Prepares (in a temporary directory) a TFDS dataset of `num_records` JPEGs of 400 x 400 pixels (smooth colour
fields plus noise, about 70 KB each, like product photos), then prints:
- the label pass a start makes: every record's label read (`input_pipeline.read_columns`), against the label cache
  beside the data (`input_pipeline.split_columns`: the first start scans and writes it, the next ones read it);
- the first training batch of each of 3 epochs of `configs/sop.py`'s pipeline (batch 120, 224 px, a shuffle buffer
  of 16,384 records), `pause_s` seconds apart (a stand-in for the epoch boundary's host work: refresh, evaluation,
  checkpoint): built when the epoch is asked for, and drawn ahead during the pause (`TfDataset.train_batches`);
- the bytes of one training batch sent to the devices: u8 pixels against float32.
Nothing is asserted; the figures are printed.
"""
import io
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

from configs import sop as sop_config
from hpl_jax import data
from hpl_jax.data import input_pipeline
from hpl_jax.trainer import cli

# TensorFlow and TFDS come through input_pipeline, the one module that imports them (it hides the accelerators first).
tfds = input_pipeline.tfds
FLAGS = flags.FLAGS
flags.DEFINE_integer("num_records", 20000, "Records of the prepared TFDS dataset.")
flags.DEFINE_integer("num_labels", 5000, "Labels of the records (record i has label i % num_labels).")
flags.DEFINE_float("pause_s", 8.0, "Seconds between epochs: the stand-in for the epoch boundary's host work.")
flags.DEFINE_integer("steps", 6, "Training steps drawn per epoch.")

_DISTINCT_IMAGES = 100  # JPEGs encoded once and repeated: the records' bytes, not their content, are timed


class HplBenchmarkRecords(tfds.core.GeneratorBasedBuilder):
    """{'image': JPEG, 'label': int64} records, one 'train' split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"), "label": np.int64}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        jpegs = [input_pipeline.encode_jpeg(photo_like(rng, 400, 400)) for _ in range(_DISTINCT_IMAGES)]
        for index in range(FLAGS.num_records):
            yield index, {"image": io.BytesIO(jpegs[index % _DISTINCT_IMAGES]), "label": index % FLAGS.num_labels}


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """u8[height, width, 3]: a blocky random colour field plus pixel noise (benchmarks/input_pipeline.py's)."""
    coarse = rng.uniform(0, 255, size=(height // 25 + 1, width // 25 + 1, 3))
    field = np.repeat(np.repeat(coarse, 25, axis=0), 25, axis=1)[:height, :width]
    return np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv):
    del argv
    cli.quiet_library_logs()
    root = tempfile.mkdtemp(prefix="hpl_tfds_input_benchmark_")
    try:
        builder = HplBenchmarkRecords(data_dir=root)
        builder.download_and_prepare()
        num_bytes = sum(os.path.getsize(path) for path in builder.info.splits["train"].filepaths)
        print(f"{FLAGS.num_records} records, {num_bytes / FLAGS.num_records / 1024:.0f} KiB each, "
              f"{builder.info.splits['train'].num_shards} files (local disk, read through the page cache)")

        scan_s, columns = timed(lambda: input_pipeline.read_columns(builder, "train", ("label",)))
        first_s, _ = timed(lambda: input_pipeline.split_columns(builder, "train", ("label",)))
        cached_s, cached = timed(lambda: input_pipeline.split_columns(builder, "train", ("label",)))
        assert np.array_equal(cached["label"], columns["label"])
        print(f"labels: every record read {scan_s:.2f} s; first start (read + cache written) {first_s:.2f} s; "
              f"next start (cache) {cached_s * 1e3:.1f} ms")

        config = sop_config.get_config()
        config.steps_per_epoch = FLAGS.steps
        config.num_epochs = 3  # nothing is drawn ahead after the last epoch timed
        labels = (np.arange(FLAGS.num_records) % FLAGS.num_labels).astype(np.int32)
        examples = input_pipeline.TfdsExamples(builder, "label", {"train": labels},
                                               np.arange(FLAGS.num_labels, dtype=np.int32),
                                               config.dataset.shuffle_buffer)
        info = data.DatasetInfo(name="sop", num_train_classes=FLAGS.num_labels,
                                num_train_examples=FLAGS.num_records, image_shape=(224, 224, 3),
                                eval_splits=("test",), num_eval_examples={"test": 0})
        dataset = input_pipeline.TfDataset(config, info, {"train": examples}, local_batch_size=config.batch_size,
                                           local_eval_batch_size=config.eval.batch_size, process_index=0,
                                           process_count=1)

        def built_when_asked_for(epoch):
            return dataset._train_iterator(epoch, 0)

        for name, epoch_batches in (("built when asked for", built_when_asked_for),
                                    ("drawn ahead", dataset.train_batches)):
            waits = []
            for epoch in range(3):
                batches = epoch_batches(epoch)
                wait_s, batch = timed(lambda: next(batches))
                waits.append(wait_s)
                for batch in batches:  # the epoch's other steps; the last one starts the next epoch's pipeline
                    pass
                time.sleep(FLAGS.pause_s)
            print(f"first batch of epochs 0, 1, 2 ({name}, {FLAGS.pause_s:.0f} s apart): "
                  + ", ".join(f"{s:.2f} s" for s in waits))
        pixels = int(np.prod(batch["image"].shape))
        print(f"one batch of {config.batch_size} at 224 px to the devices: {pixels / 2 ** 20:.1f} MiB as u8 "
              f"({batch['image'].dtype}), {4 * pixels / 2 ** 20:.1f} MiB as float32")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    app.run(main)
