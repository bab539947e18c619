"""The host work of one epoch boundary at a dataset's scale, without the dataset or an accelerator.

  python -m hpl_jax.benchmarks.epoch_boundary --config=configs/sop.py [--pieces=refresh,metrics]

Planted data of the dataset's sizes (SOP: 11,318 training classes; 60,502 test images of 11,316 classes in 12
super-classes; d 512; hpl_jax.benchmarks.retrieval.planted_embeddings) and the config's model shapes (a ResNet-50
train state with its AdamW moments, zeros). Each piece the training loop runs between the last step of an epoch
and the first step of the next is run once, as the loop runs it, with the config's fields:
- refresh: train.refresh_on_host (state to the host, k-means of the coarse groupings, hierarchy metrics, state
  back to the devices);
- embed-transfer: evaluation.embed_examples over the test split's eval batches with a stand-in embedding step
  (a mean pool and one matrix product: the backbone's cost is not host work and is left out);
- metrics: the retrieval metrics without super-classes or NMI; super metrics: what `eval.super_metrics` adds,
  the difference of the metrics with and without (with them, self-retrieval searches query chunks against the
  whole gallery instead of symmetric blocks, so a column of the difference can be below zero); NMI: what
  `eval.nmi` adds (metrics.retrieval_metrics);
- checkpoint save: Checkpoints.save of the host state (the loop waits for the call; the write that follows runs
  in the background, shown apart);
- logging: the epoch's progress lines and its evaluation and refresh records (Reporter, TensorBoard + metrics.json).
For each piece it prints the host-only seconds (wall time outside the device programs: time during which no
device work is queued, the devices idle) beside the device seconds (time inside the device programs, each call
run to completion). On a CPU-only machine the "device" is the CPU too, so device seconds are CPU seconds of
the device programs; the host-only column is what an accelerator would wait for. The sum is the epoch
boundary's critical path; `--eval_batches` times fewer eval batches and scales embed-transfer to the split.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from hpl_jax import data
from hpl_jax import models
from hpl_jax.benchmarks.retrieval import planted_embeddings
from hpl_jax.core import hierarchy as hierarchy_lib
from hpl_jax.core import kmeans as kmeans_lib
from hpl_jax.core import metrics as metrics_lib
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import optim
from hpl_jax.trainer import reporting
from hpl_jax.trainer import train
from hpl_jax.trainer.sharding import replicate
from hpl_jax.trainer.train_state import TrainState, trainable

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sop.py", "Config file.", lock_config=True)
PIECES = ("refresh", "embed-transfer", "metrics", "super metrics", "NMI", "checkpoint save", "logging")
flags.DEFINE_list("pieces", list(PIECES), f"Pieces to time, of {PIECES}.")
flags.DEFINE_enum("eval_pixels", "uint8", ("uint8", "float32"),
                  "What eval batches carry to the devices: u8 pixels (the input pipeline since issue 20) or float32 "
                  "(before it), to measure the difference.")
flags.DEFINE_integer("eval_batches", 0, "Eval batches timed (0 = all); embed-transfer is scaled to the split.")
flags.DEFINE_integer("num_train_classes", 0, "Override the dataset's training classes (0 = its size).")
flags.DEFINE_integer("num_test_images", 0, "Override the test images (0 = the dataset's).")
flags.DEFINE_integer("num_test_classes", 0, "Override the test classes (0 = the dataset's).")
flags.DEFINE_enum("rank_on_device", "auto", ("auto", "true", "false"),
                  "Where the super-class level is ranked (metrics.retrieval_metrics): auto = as a run on this "
                  "platform does; true shows on a CPU what an accelerator run does.")

# name: (training classes, training images, test images, test classes, super-classes, class sizes (min, max))
SIZES = {
    "sop": (11318, 59551, 60502, 11316, 12, (2, 12)),
    "cub": (100, 5864, 5924, 100, 0, (40, 80)),
    "cars": (98, 8054, 8131, 98, 0, (60, 100)),
}


class DeviceClock:
    """Seconds spent inside the device programs it wraps, each call run to completion (block_until_ready), so
    that the wall time outside them is the time the host alone works."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(function(*args, **kwargs))
            self.seconds += time.perf_counter() - start
            return out
        return timed

    def wrap_factory(self, factory: Callable) -> Callable:
        """`factory` whose returned programs are timed (for factories that compile a program and cache it)."""
        @functools.wraps(factory)
        def timed_factory(*args, **kwargs):
            return self.wrap(factory(*args, **kwargs))
        return timed_factory

    @contextlib.contextmanager
    def patched(self, targets, factories=()):
        """Within the block, every (module, attribute) of `targets` is timed, and every program that the
        (module, attribute) factories of `factories` return."""
        originals = [(module, name, getattr(module, name)) for module, name in (*targets, *factories)]
        for (module, name, function), wrap in zip(originals, [self.wrap] * len(targets)
                                                  + [self.wrap_factory] * len(factories)):
            setattr(module, name, wrap(function))
        try:
            yield self
        finally:
            for module, name, function in originals:
                setattr(module, name, function)


def device_programs():
    """The jit-compiled programs of the epoch boundary's pieces (module, attribute)."""
    names = [(kmeans_lib, "_kmeans")]
    names += [(metrics_lib, name) for name in ("_diagonal_block", "_off_diagonal_block", "_query_chunk",
                                               "_ranked_chunk", "_cluster_label_counts")
              if hasattr(metrics_lib, name)]
    return names


def device_program_factories():
    """The functions that compile (and cache) a device program of the boundary's pieces and return it: the
    metrics' one device program (an accelerator's default path, `rank_on_device`)."""
    return [(metrics_lib, name) for name in ("_sharded_scorer",) if hasattr(metrics_lib, name)]


def timed(function: Callable) -> Tuple[float, float, object]:
    """(host-only seconds, device seconds, result) of one call."""
    clock = DeviceClock()
    with clock.patched(device_programs(), device_program_factories()):
        start = time.perf_counter()
        result = function(clock)
        wall = time.perf_counter() - start
    return wall - clock.seconds, clock.seconds, result


def sizes_of(config):
    if config.dataset.name not in SIZES:
        raise app.UsageError(f"config.dataset.name = {config.dataset.name!r}: sizes are known for {tuple(SIZES)}.")
    train_classes, train_images, test_images, test_classes, supers, class_sizes = SIZES[config.dataset.name]
    return (FLAGS.num_train_classes or train_classes, train_images, FLAGS.num_test_images or test_images,
            FLAGS.num_test_classes or test_classes, supers, class_sizes)


def host_train_state(config, num_classes: int, proxies: np.ndarray) -> TrainState:
    """A host train state of the config's model shapes (zeros) with `proxies` as level 0 and a placeholder
    grouping (the refresh replaces it)."""
    model = models.create_model(config.model, bn_axis_name=None)
    image = jnp.zeros((1, config.dataset.image_size, config.dataset.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), image)
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    num_coarse = tuple(config.hpl.num_coarse)[:len(config.hpl.weights) - 1]
    dim = proxies.shape[1]
    parents, coarse, below = [], [], num_classes
    for size in num_coarse:
        parents.append(np.arange(below, dtype=np.int32) % size)
        coarse.append(np.zeros((size, dim), np.float32))
        below = size
    hierarchy = hierarchy_lib.ProxyHierarchy(proxies=(proxies, *coarse), parents=tuple(parents))
    labels, groups = optim.parameter_groups(trainable(variables["params"], hierarchy), config.optim)
    opt_state = optim.create_optimizer(labels, groups, config.optim).init(trainable(variables["params"], hierarchy))
    return jax.device_get(TrainState(
        step=np.int32(0), epoch=np.int32(0), params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), hierarchy=hierarchy, opt_state=opt_state,
        rng=jax.random.PRNGKey(config.seed)))


class EvalBatches:
    """Stands in for a Dataset's eval batches: `num_batches` batches of the config's eval batch, images as the
    input pipeline hands them to the loop (pixels in 0..255 as `pixels`: u8 or float32), the last one partly
    masked."""

    def __init__(self, config, num_examples: int, num_batches: int, pixels: str = "uint8"):
        self.batch_size = config.eval.batch_size
        size = config.dataset.image_size
        self.image = np.random.default_rng(0).integers(0, 256, (self.batch_size, size, size, 3)).astype(pixels)
        self.num_examples = num_examples
        self.num_batches = num_batches

    def eval_batches(self, split: str):
        del split
        for b in range(self.num_batches):
            index = b * self.batch_size + np.arange(self.batch_size)
            yield {"image": self.image, "label": (index % 7).astype(np.int32), "index": index,
                   "mask": index < self.num_examples}


def stand_in_embed_step(state, batch, *, kernel, dataset_config):
    """f32[per_device, 512]: the mean normalised pixel of each image times a fixed matrix (a negligible device
    step that normalises its pixels as evaluation.embed_step does)."""
    del state
    return jnp.mean(data.normalize_pixels(batch["image"], dataset_config), axis=(1, 2)) @ kernel


def main(argv):
    del argv
    config = FLAGS.config
    unknown = set(FLAGS.pieces) - set(PIECES)
    if unknown:
        raise app.UsageError(f"--pieces: {sorted(unknown)} unknown; use some of {PIECES}.")
    num_classes, num_train_images, num_test, num_test_classes, num_supers, (low, high) = sizes_of(config)
    dim = config.model.embedding_dim
    print(f"{config.dataset.name}: {num_classes} training classes, {num_test} test images of {num_test_classes} "
          f"classes, {num_supers} super-classes, d {dim}; {config.model.backbone} state; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    proxies, _, train_supers = planted_embeddings(num_classes, num_classes, max(num_supers, 2), dim, 1, 1, 2.3,
                                                  config.seed)
    proxies *= np.sqrt(2.0 / num_classes)
    embeddings, labels, test_supers = planted_embeddings(num_test, num_test_classes, max(num_supers, 2), dim, low,
                                                         high, 2.3, config.seed + 1)
    info = data.DatasetInfo(name=config.dataset.name, num_train_classes=num_classes,
                            num_train_examples=num_train_images,
                            image_shape=(config.dataset.image_size,) * 2 + (3,), eval_splits=("test",),
                            num_eval_examples={"test": num_test},
                            train_super_labels=train_supers if num_supers else None,
                            test_super_labels=test_supers if num_supers else None)
    host_state = host_train_state(config, num_classes, proxies)
    steps_per_epoch = data.steps_per_epoch(num_train_images, config.batch_size, config.steps_per_epoch)
    workdir = checkpointing.workdir_path(tempfile.mkdtemp(prefix="epoch_boundary_"))
    reporter = reporting.Reporter(workdir, steps_per_epoch * config.num_epochs)
    rows: List[Tuple[str, float, float, Optional[float]]] = []

    def report(name, host, device, background=None):
        rows.append((name, host, device, background))
        extra = "" if background is None else f", {background:.2f} s in the background"
        print(f"  {name}: host-only {host:.2f} s, device {device:.2f} s{extra}", flush=True)

    recall_at = tuple(config.eval.recall_at)
    options = dict(recall_at=recall_at, chunk_size=config.eval.chunk_size, seed=config.seed,
                   rank_on_device={"auto": None, "true": True, "false": False}[FLAGS.rank_on_device])
    if "refresh" in FLAGS.pieces:
        replicated = replicate(host_state, train.AXIS)
        host, device, _ = timed(lambda clock: train.refresh_on_host(replicated, config, reporter, info,
                                                                    end_of_epoch=True))
        report(f"refresh (k-means {config.hpl.kmeans_backend}, {config.hpl.kmeans_restarts} restart(s))",
               host, device)
        del replicated
    if "embed-transfer" in FLAGS.pieces:
        total_batches = data.num_eval_batches(num_test, config.eval.batch_size)
        num_batches = min(FLAGS.eval_batches or total_batches, total_batches)
        batches = EvalBatches(config, num_test, num_batches, FLAGS.eval_pixels)
        kernel = jnp.ones((3, dim), jnp.float32)
        clock = DeviceClock()
        step = functools.partial(stand_in_embed_step, kernel=kernel, dataset_config=config.dataset)
        device_step = clock.wrap(jax.pmap(step, axis_name=train.AXIS))

        def p_embed(state, batch):
            # The copy to the devices is host work the loop waits for; the step alone is device time.
            return device_step(state, jax.block_until_ready(jax.device_put(batch)))
        replicated = replicate({"step": np.int32(0)}, train.AXIS)
        evaluation.embed_examples(p_embed, replicated, batches, "test")  # compiles
        clock.seconds = 0.0
        start = time.perf_counter()
        evaluation.embed_examples(p_embed, replicated, batches, "test")
        wall = time.perf_counter() - start
        scale = total_batches / num_batches
        report(f"embed-transfer ({total_batches} batches of {config.eval.batch_size}, {FLAGS.eval_pixels}"
               f"{'' if scale == 1 else f', {num_batches} timed'})", (wall - clock.seconds) * scale,
               clock.seconds * scale)
    if "metrics" in FLAGS.pieces or "super metrics" in FLAGS.pieces:
        host, device, _ = timed(lambda clock: metrics_lib.retrieval_metrics(embeddings, labels, nmi=False,
                                                                            **options))
        if "metrics" in FLAGS.pieces:
            report("metrics", host, device)
        if "super metrics" in FLAGS.pieces and num_supers and config.eval.super_metrics:
            super_host, super_device, _ = timed(lambda clock: metrics_lib.retrieval_metrics(
                embeddings, labels, nmi=False, super_labels=test_supers, **options))
            on_device = options["rank_on_device"]
            on_device = jax.devices()[0].platform != "cpu" if on_device is None else on_device
            report(f"super metrics (added; ranked on the {'device' if on_device else 'host'})",
                   super_host - host, super_device - device)
    if "NMI" in FLAGS.pieces and config.eval.nmi:
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        host, device, _ = timed(lambda clock: metrics_lib._kmeans_nmi(unit, labels, config.seed))
        report(f"NMI ({num_test} into {num_test_classes})", host, device)
    if "checkpoint save" in FLAGS.pieces:
        checkpoints = checkpointing.Checkpoints(workdir, config, is_lead=True)
        start = time.perf_counter()
        checkpoints.save(1, host_state)
        blocking = time.perf_counter() - start
        checkpoints.wait()
        report("checkpoint save", blocking, 0.0, time.perf_counter() - start - blocking)
    if "logging" in FLAGS.pieces:
        num_lines = -(-steps_per_epoch // config.log_every_steps)
        values = {"loss": 1.0, "lr": 1e-4, **{f"loss/level_{level}": 1.0 for level in range(len(config.hpl.weights))}}
        evaluated = {f"recall@{k}": 0.5 for k in recall_at}
        start = time.perf_counter()
        for line in range(num_lines):
            reporter.progress(0, config.num_epochs, (line + 1) * config.log_every_steps, config.batch_size, values)
        reporter.refresh(1, steps_per_epoch, {"hierarchy/level_1_nmi": 0.5})
        reporter.evaluation(1, steps_per_epoch, evaluated)
        report(f"logging ({num_lines} progress lines, a refresh and an evaluation record)",
               time.perf_counter() - start, 0.0)
    reporter.close()
    host_total = sum(row[1] for row in rows)
    device_total = sum(row[2] for row in rows)
    print("\n| piece | host-only s | device s |\n|---|---|---|")
    for name, host, device, background in rows:
        print(f"| {name} | {host:.2f} | {device:.2f}" + ("" if background is None else
                                                        f" (+{background:.2f} s write in the background)") + " |")
    print(f"| **epoch boundary** | **{host_total:.2f}** | **{device_total:.2f}** |")
    every = config.eval.costly_metrics_every_epochs
    if every > 1:
        costly = [row for row in rows if row[0].startswith(("super metrics", "NMI"))]
        saved_host = sum(row[1] for row in costly) * (1 - 1 / every)
        saved_device = sum(row[2] for row in costly) * (1 - 1 / every)
        print(f"| epoch boundary on average (NMI and super metrics every {every} epochs: "
              f"eval.costly_metrics_every_epochs) | {host_total - saved_host:.2f} | "
              f"{device_total - saved_device:.2f} |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    app.run(main)
