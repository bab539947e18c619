"""Steady-state training throughput of a config, and where the time goes.

  python -m hpl_jax.benchmarks.train_step --config=configs/default.py
  python -m hpl_jax.benchmarks.train_step --config=configs/cub.py --config.dataset.name=synthetic \
      --steps=20   # ResNet-50 at 224x224 on a GPU host without the dataset: synthetic images

Prints images/s of the pmapped train step (compile excluded) after the warm-up and, where the config has one
(`optim.warmup_epochs` > 0), of the warm-up's step (train.create_train_step); the time per step spent producing
the host batch (data), in the step itself (device), and in the host-side k-means refresh of the coarse
groupings. The synthetic dataset is generated at the config's image size, so any
backbone/size can be timed without data.
"""
import time

import flax.jax_utils
import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax import data
from hpl_jax import models
from hpl_jax.data import datasets
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import optim
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps after two warm-up steps.")


def main(argv):
    del argv
    config = FLAGS.config
    config_checks.validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    if config.dataset.name == data.SYNTHETIC:
        # Enough images for the timed steps at any batch size (half the classes train, less those held out).
        synthetic = config.dataset.synthetic
        train_classes = synthetic.num_families * synthetic.classes_per_family // 2 - config.dataset.num_val_classes
        synthetic.images_per_class = max(synthetic.images_per_class,
                                         -(-config.batch_size * (FLAGS.steps + 2) // train_classes))
    dataset = datasets.get_dataset(config, local_batch_size=config.batch_size // jax.process_count(),
                               local_eval_batch_size=config.eval.batch_size // jax.process_count(),
                               process_index=jax.process_index(), process_count=jax.process_count())
    model = models.create_model(config.model, bn_axis_name=None if config.model.bn_frozen else train.AXIS)
    state = train_state.create_train_state(jax.random.PRNGKey(config.seed), config, model, dataset.info)
    labels, groups = optim.parameter_groups(train_state.trainable(state.params, state.hierarchy), config.optim)

    host_state = jax.device_get(state)
    train.refresh_groupings(host_state, config)  # the first call also pays for imports and thread pools
    start = time.perf_counter()
    train.refresh_groupings(host_state, config)
    refresh_seconds = time.perf_counter() - start

    print(f"backbone {config.model.backbone} width {config.model.width} dtype {config.model.dtype}, "
          f"image {config.dataset.image_size}px, global batch {config.batch_size} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {dataset.info.num_train_classes} classes, "
          f"levels {len(config.hpl.weights)}")
    data_seconds = []
    for in_warmup in (True, False) if config.optim.warmup_epochs else (False,):
        step_fn = jax.pmap(train.create_train_step(config, model, labels, groups, in_warmup=in_warmup),
                           axis_name=train.AXIS, donate_argnums=(0,))
        batches = dataset.train_batches(0)
        replicated = flax.jax_utils.replicate(state)
        step_seconds = []
        for step in range(FLAGS.steps + 2):
            start = time.perf_counter()
            batch = next(batches)
            data_seconds.append(time.perf_counter() - start)
            sharded = data.shard_for_devices(batch, jax.local_device_count())
            start = time.perf_counter()
            replicated, step_metrics = step_fn(replicated, sharded)
            jax.block_until_ready(step_metrics)
            step_seconds.append(time.perf_counter() - start)
        per_step = np.median(step_seconds[2:])
        phase = "warm-up" if in_warmup else "after warm-up"
        print(f"train step ({phase}): {per_step * 1e3:.1f} ms median over {FLAGS.steps} steps -> "
              f"{config.batch_size / per_step:.1f} images/s (compile excluded)")
    print(f"host data:  {np.median(data_seconds) * 1e3:.1f} ms per batch (synchronous here; the trainer "
          "prefetches it while the device runs)")
    print(f"host k-means refresh: {refresh_seconds:.2f} s per refresh "
          f"(once per epoch = {refresh_seconds / max(1, data.steps_per_epoch(dataset.info.num_train_examples, config.batch_size)) * 1e3:.1f} ms per step)")


if __name__ == "__main__":
    app.run(main)
