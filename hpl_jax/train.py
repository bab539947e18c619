"""Training and evaluation: train state, optimiser, pmap train/eval steps, and the epoch loop.

One run, top to bottom: `train_and_evaluate` checks the config, builds the dataset and the model, creates
(or restores) the train state, and then, epoch by epoch: pmap(train_step) over the batches -> (host) refresh
of the coarse groupings -> evaluation -> checkpoint.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax.jax_utils
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from hpl_jax import config_checks
from hpl_jax import convert_weights
from hpl_jax import data
from hpl_jax import hierarchy as hierarchy_lib
from hpl_jax import losses
from hpl_jax import metrics as metrics_lib
from hpl_jax import models

AXIS = "batch"  # pmap axis over the local devices; collectives span every device of every host
FROZEN = "frozen"


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; saved whole in every checkpoint.

    Attributes:
      step: i32[], optimiser steps taken.
      epoch: i32[], the epoch in progress (= epochs completed, at an epoch boundary).
      params: the model's parameters {'backbone': ..., 'embedding': ...}.
      batch_stats: the model's BatchNorm running statistics.
      hierarchy: proxies of every level (trained with the model) and the parent maps (set by refreshes).
      opt_state: the optimiser state over `trainable(state)`.
      rng: the run's PRNG key; k-means seeds are folded out of it.
    """

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    hierarchy: hierarchy_lib.ProxyHierarchy
    opt_state: optax.OptState
    rng: jax.Array


def unreplicate(tree):
    """Device 0's copy of a pmap-replicated pytree, [devices, ...] -> [...]."""
    return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]), tree)


def trainable(params, hierarchy: hierarchy_lib.ProxyHierarchy) -> Dict[str, Any]:
    """The tree the optimiser updates; its paths ('model/...', 'proxies/<level>') are what config regexes match."""
    return {"model": params, "proxies": hierarchy.proxies}


def parameter_path(path) -> str:
    names = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
    return "/".join(names)


# --------------------------------------------------------------------------------------------- optimiser
def _first_match(patterns, path: str, default):
    for pattern, value in patterns:
        if re.fullmatch(pattern, path):
            return value
    return default


def parameter_groups(tree, optim_config) -> Tuple[Any, Dict[str, Tuple[float, bool]]]:
    """Labels every parameter by (learning-rate multiplier, trains during warm-up), or FROZEN.

    Returns the label tree (same structure as `tree`) and {label: (lr multiplier, trains during warm-up)}.
    """
    groups = {}

    def label(path, _):
        name = parameter_path(path)
        if any(re.fullmatch(pattern, name) for pattern in optim_config.frozen):
            return FROZEN
        multiplier = float(_first_match(optim_config.lr_mults, name, 1.0))
        in_warmup = any(re.fullmatch(pattern, name) for pattern in optim_config.warmup_trainable)
        group = f"lr_x{multiplier:g}" + ("" if in_warmup else "_after_warmup")
        groups[group] = (multiplier, in_warmup)
        return group

    labels = jax.tree_util.tree_map_with_path(label, tree)
    return labels, groups


def create_optimizer(labels, groups, optim_config) -> optax.GradientTransformation:
    """AdamW per group (decoupled weight decay), after element-wise clipping, as the Proxy-Anchor code.

    The learning rates are hyperparameters in the state, set every step by `set_learning_rates`.
    """
    def adamw():
        return optax.inject_hyperparams(optax.adamw)(learning_rate=optim_config.lr,
                                                     weight_decay=optim_config.weight_decay)

    transforms = {group: adamw() for group in groups}
    transforms[FROZEN] = optax.set_to_zero()
    steps = [optax.multi_transform(transforms, labels)]
    if optim_config.grad_clip_value > 0:
        # torch.nn.utils.clip_grad_value_: each gradient entry clipped to [-c, c] before AdamW.
        steps.insert(0, optax.clip(optim_config.grad_clip_value))
    return optax.chain(*steps)


def learning_rate(optim_config, epoch):
    """Step decay per epoch, counted from epoch 0: lr * gamma^(epoch // decay_epochs)."""
    return optim_config.lr * optim_config.decay_gamma ** (epoch // optim_config.decay_epochs)


def _partition_state(opt_state) -> optax.MultiTransformState:
    return opt_state[-1]


def set_learning_rates(opt_state, groups, base_lr):
    partition = _partition_state(opt_state)
    inner = dict(partition.inner_states)
    for group, (multiplier, _) in groups.items():
        masked = inner[group]
        hyper = dict(masked.inner_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(base_lr * multiplier, jnp.float32)
        inner[group] = masked._replace(inner_state=masked.inner_state._replace(hyperparams=hyper))
    return opt_state[:-1] + (partition._replace(inner_states=inner),)


def keep_waiting_groups(new_opt_state, old_opt_state, groups):
    """During warm-up, the groups that wait keep their optimiser state untouched (no step, no decay)."""
    new_partition, old_partition = _partition_state(new_opt_state), _partition_state(old_opt_state)
    inner = dict(new_partition.inner_states)
    for group, (_, in_warmup) in groups.items():
        if not in_warmup:
            inner[group] = old_partition.inner_states[group]
    return new_opt_state[:-1] + (new_partition._replace(inner_states=inner),)


def reset_proxy_moments(opt_state, levels):
    """Zeroes the AdamW moments of the proxies of the given levels (after they were reset to centres)."""
    def reset(path, leaf):
        names = parameter_path(path).split("/")
        for i in range(len(names) - 1):
            if names[i] == "proxies" and names[i + 1] in levels and ("mu" in names or "nu" in names):
                return jnp.zeros_like(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(reset, opt_state)


# --------------------------------------------------------------------------------------------- the loss
def create_base_loss(loss_config) -> Callable:
    if loss_config.base == "proxy_anchor":
        return functools.partial(losses.proxy_anchor_loss, alpha=loss_config.alpha, delta=loss_config.delta)
    return functools.partial(losses.proxy_nca_loss, temperature=loss_config.temperature,
                             exclude_positive=loss_config.exclude_positive)


# --------------------------------------------------------------------------------------------- steps
def train_step(state: TrainState, batch, *, model, config, labels, groups, in_warmup: bool):
    """One AdamW step on one global batch; runs under pmap on every device.

    The loss is computed on the *global* batch (embeddings gathered from every device of every host):
    Proxy-Anchor's per-proxy log-sum-exp and its 1/|P+| depend on the whole batch, so N devices with global
    batch B take the same step as 1 device with batch B.

    Args:
      batch: {'image': f32[per_device, H, W, 3], 'label': i32[per_device]} on this device.
      in_warmup: static; True during the first `optim.warmup_epochs` epochs, when only the groups that train
        during warm-up move and the backbone's backward pass is not even computed.
    """
    base_loss = create_base_loss(config.loss)
    weights = tuple(config.hpl.weights)

    def objective(tree):
        if in_warmup:
            tree = jax.tree_util.tree_map(
                lambda leaf, group: leaf if groups.get(group, (0, True))[1] else jax.lax.stop_gradient(leaf),
                tree, labels)
        embeddings, new_model_state = model.apply(
            {"params": tree["model"], "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"])
        global_embeddings = jax.lax.all_gather(embeddings, AXIS, tiled=True)
        global_labels = jax.lax.all_gather(batch["label"], AXIS, tiled=True)
        hierarchy = state.hierarchy.replace(proxies=tree["proxies"])
        total, per_level = losses.hierarchical_proxy_loss(global_embeddings, global_labels, hierarchy,
                                                          base_loss=base_loss, weights=weights)
        return total, (per_level, new_model_state["batch_stats"])

    tree = trainable(state.params, state.hierarchy)
    (total, (per_level, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(tree)
    # Every device computed the same loss of the gathered batch; all_gather's transpose sums each device's
    # share N times, so the mean over devices is the exact gradient of the global-batch loss.
    grads = jax.lax.pmean(grads, AXIS)

    opt_state = set_learning_rates(state.opt_state, groups, learning_rate(config.optim, state.epoch))
    optimizer = create_optimizer(labels, groups, config.optim)
    updates, new_opt_state = optimizer.update(grads, opt_state, tree)
    if in_warmup:
        new_opt_state = keep_waiting_groups(new_opt_state, opt_state, groups)
        updates = jax.tree_util.tree_map(
            lambda update, group: update if groups.get(group, (0, True))[1] else jnp.zeros_like(update),
            updates, labels)
    tree = optax.apply_updates(tree, updates)

    new_state = state.replace(
        step=state.step + 1, params=tree["model"], batch_stats=batch_stats, opt_state=new_opt_state,
        hierarchy=state.hierarchy.replace(proxies=tree["proxies"]))
    step_metrics = {"loss": total, "lr": learning_rate(config.optim, state.epoch)}
    for level in range(len(weights)):
        step_metrics[f"loss/level_{level}"] = per_level[level]
    return new_state, step_metrics


def embed_step(state: TrainState, batch, *, model):
    """Embeddings of one eval batch on one device: f32[per_device, embedding_dim]."""
    return model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)


# --------------------------------------------------------------------------------------------- state
def create_train_state(rng, config, model, info: data.DatasetInfo) -> TrainState:
    """Fresh parameters, proxies (coarse levels grouped from the initial fine proxies) and optimiser."""
    model_rng, proxy_rng, run_rng = jax.random.split(rng, 3)
    image = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(model_rng, image)
    num_coarse = tuple(config.hpl.num_coarse)[:len(config.hpl.weights) - 1]
    hierarchy = hierarchy_lib.init_hierarchy(proxy_rng, info.num_train_classes, num_coarse,
                                             config.model.embedding_dim, seed=config.seed,
                                             n_init=config.hpl.kmeans_restarts)
    params = variables["params"]
    if config.model.pretrained:
        backbone_params, backbone_stats, _ = convert_weights.load_pretrained(config.model.pretrained, config.model.backbone)
        params = {**params, "backbone": backbone_params}
        variables = {**variables, "batch_stats": {**variables["batch_stats"], "backbone": backbone_stats}}
    labels, groups = parameter_groups(trainable(params, hierarchy), config.optim)
    optimizer = create_optimizer(labels, groups, config.optim)
    return TrainState(
        step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), hierarchy=hierarchy,
        opt_state=optimizer.init(trainable(params, hierarchy)), rng=run_rng)


def kmeans_seed(state: TrainState, step: int) -> int:
    return int(jax.random.randint(jax.random.fold_in(state.rng, step), (), 0, 2 ** 31 - 1))


def refresh_groupings(state: TrainState, config, *, level1_vectors=None,
                      policy: Optional[str] = None) -> TrainState:
    """Host side: re-cluster the coarse levels (k-means) and reset the moments of re-initialised proxies.

    Process 0 computes the groupings and broadcasts them: k-means sums in thread order, so two hosts could
    otherwise disagree in the last bit on a point between two clusters.
    """
    if state.hierarchy.num_levels == 1 or config.hpl.ground_truth_level1:
        return state
    hierarchy, reset = hierarchy_lib.refresh_hierarchy(
        jax.device_get(state.hierarchy), seed=kmeans_seed(state, int(state.step)),
        policy=policy or config.hpl.coarse_policy, level1_vectors=level1_vectors,
        n_init=config.hpl.kmeans_restarts)
    if jax.process_count() > 1:
        hierarchy, reset = multihost_utils.broadcast_one_to_all((hierarchy, reset))
        hierarchy = jax.tree_util.tree_map(jnp.asarray, hierarchy)
    reset_levels = {str(level) for level, mask in enumerate(reset, start=1) if np.any(mask)}
    opt_state = reset_proxy_moments(state.opt_state, reset_levels) if reset_levels else state.opt_state
    return state.replace(hierarchy=hierarchy, opt_state=opt_state)


def hierarchies_agree(hierarchy) -> None:
    """Fails loudly if the hosts hold different groupings."""
    if jax.process_count() == 1:
        return
    parents = np.concatenate([np.asarray(p).ravel() for p in hierarchy.parents] or [np.zeros(0, np.int32)])
    gathered = multihost_utils.process_allgather(parents)
    if not np.all(gathered == gathered[0]):
        raise RuntimeError("The hosts hold different coarse groupings after a refresh.")


# --------------------------------------------------------------------------------------------- evaluation
def embed_split(p_embed, state, dataset: data.Dataset, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every example of `split`, from every host, each exactly once."""
    embeddings, labels, masks = [], [], []
    for batch in dataset.eval_batches(split):
        sharded = data.shard_for_devices(batch, jax.local_device_count())
        out = p_embed(state, {"image": sharded["image"]})
        embeddings.append(np.asarray(out).reshape(-1, out.shape[-1]))
        labels.append(batch["label"])
        masks.append(batch["mask"])
    embeddings, labels, masks = map(np.concatenate, (embeddings, labels, masks))
    if jax.process_count() > 1:
        embeddings, labels, masks = (
            np.asarray(x).reshape((-1,) + x.shape[2:])
            for x in multihost_utils.process_allgather((embeddings, labels, masks)))
    return embeddings[masks], labels[masks]


def evaluate(p_embed, state, dataset: data.Dataset, config) -> Dict[str, float]:
    """The dataset's retrieval protocol on the unseen test classes (METHOD.md, "Benchmarks")."""
    info = dataset.info
    super_labels = info.test_super_labels if config.eval.super_metrics else None
    options = dict(recall_at=tuple(config.eval.recall_at), super_labels=super_labels,
                   nmi=config.eval.nmi, chunk_size=config.eval.chunk_size, seed=config.seed)
    if "query" in info.eval_splits:
        gallery, gallery_labels = embed_split(p_embed, state, dataset, "gallery")
        queries, query_labels = embed_split(p_embed, state, dataset, "query")
        return metrics_lib.retrieval_metrics(gallery, gallery_labels, query_embeddings=queries,
                                             query_labels=query_labels, **options)
    embeddings, labels = embed_split(p_embed, state, dataset, "test")
    return metrics_lib.retrieval_metrics(embeddings, labels, **options)


# --------------------------------------------------------------------------------------------- logging
class Reporter:
    """Progress lines, TensorBoard scalars (tensorboardX: no TensorFlow) and metrics.json; process 0 only."""

    def __init__(self, workdir: epath.Path, total_steps: int):
        self.is_lead = jax.process_index() == 0
        self.total_steps = total_steps
        self.metrics_path = workdir / "metrics.json"
        self.history = {}
        if self.metrics_path.exists():
            self.history = {int(k): v for k, v in json.loads(self.metrics_path.read_text())["history"].items()}
        self.writer = None
        if self.is_lead:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(workdir / "tensorboard"))
        self._last_time, self._last_step = time.time(), None

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
        if self.writer:
            for name, value in values.items():
                # TensorBoard tag names allow no '@'.
                self.writer.add_scalar((prefix + name).replace("@", "_at_"), float(value), step)
            self.writer.flush()

    def progress(self, epoch: int, num_epochs: int, step: int, images_per_step: int, values: Dict[str, float]):
        now = time.time()
        if self._last_step is None or step <= self._last_step:
            speed, eta = float("nan"), "?"
        else:
            steps_per_s = (step - self._last_step) / (now - self._last_time)
            speed = steps_per_s * images_per_step
            eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / steps_per_s))
        self._last_time, self._last_step = now, step
        levels = " ".join(f"{values[k]:.4f}" for k in sorted(values) if k.startswith("loss/level_"))
        logging.info("epoch %d/%d step %d/%d loss %.4f (levels %s) lr %.2e %.1f img/s ETA %s",
                     epoch + 1, num_epochs, step, self.total_steps, values["loss"], levels, values["lr"],
                     speed, eta)
        self.scalars(step, values if np.isnan(speed) else {**values, "images_per_second": speed})

    def evaluation(self, epoch: int, step: int, values: Dict[str, float]) -> None:
        self.history[epoch] = values
        logging.info("eval after epoch %d: %s", epoch,
                     " ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)))
        self.scalars(step, values, prefix="eval/")
        self._write_json()

    def _write_json(self) -> None:
        if self.is_lead:
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            tmp.write_text(json.dumps({"history": self.history, **self.summary()}, indent=2))
            tmp.replace(self.metrics_path)

    def summary(self, metric: str = "recall@1") -> Dict[str, Any]:
        """The last and the best epoch's metrics (METHOD.md: report both; the published ones are the best)."""
        if not self.history:
            return {}
        last = max(self.history)
        # Epoch 0 is the untrained model: not a candidate for the best epoch.
        trained = [epoch for epoch in self.history if epoch > 0] or [last]
        best = max(trained, key=lambda e: self.history[e].get(metric, -1.0))
        return {"last": {"epoch": last, **self.history[last]}, "best": {"epoch": best, **self.history[best]}}

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def format_table(summary: Dict[str, Any], untrained: Optional[Dict[str, float]]) -> str:
    columns = [("epoch 0 (untrained)", untrained)] if untrained else []
    columns += [(f"last (epoch {summary['last']['epoch']})", summary["last"]),
                (f"best (epoch {summary['best']['epoch']})", summary["best"])]
    names = [k for k, v in summary["last"].items() if k != "epoch" and isinstance(v, float)]
    width = max(len(n) for n in names) + 2
    lines = ["metric".ljust(width) + "".join(title.rjust(22) for title, _ in columns)]
    for name in names:
        lines.append(name.ljust(width) + "".join(f"{values.get(name, float('nan')):22.4f}" for _, values in columns))
    return "\n".join(lines)


def _on_host(replicated_state: TrainState, update: Callable[[TrainState], TrainState]) -> TrainState:
    """Applies a host-side update (k-means, counters) to the replicated state, identically on every host."""
    state = update(jax.device_get(unreplicate(replicated_state)))
    hierarchies_agree(state.hierarchy)
    return flax.jax_utils.replicate(state)


def with_pretrained_preprocessing(config):
    """The config with the input normalisation that `model.pretrained`'s metadata names, so weights are never
    fed images normalised for other weights."""
    if not config.model.pretrained:
        return config
    try:
        preprocessing = convert_weights.read_metadata(config.model.pretrained)["preprocessing"]
    except ValueError as error:
        raise config_checks.ConfigError(str(error)) from None
    config = config.copy_and_resolve_references()
    config.dataset.mean = tuple(preprocessing["mean"])
    config.dataset.std = tuple(preprocessing["std"])
    config.dataset.color_order = preprocessing["input_space"].lower()
    config.dataset.pixel_scale = float(preprocessing["input_range"][1])
    logging.info("Input normalisation from %s: %s", config.model.pretrained, preprocessing)
    return config


# --------------------------------------------------------------------------------------------- preemption
class Preemption:
    """Says at a step boundary whether to save and stop because a SIGTERM arrived, the same on every host.

    SIGTERM is how TPU and spot-GPU preemption (and SLURM before its time limit) announces itself. With
    jax.distributed, JAX's preemption service catches it on whichever host gets it and agrees with every
    host on a step: the largest step any host has reported, plus one; `reached` turns True at that step on
    all hosts at once. A single process without jax.distributed catches SIGTERM itself.

    `reached` must be called with every step id in increasing order, the same on every host; once True it
    stays True.
    """

    def __init__(self):
        self._distributed = jax.distributed.is_initialized()
        self._stop = False
        self._previous_handler = None
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True
        # A second SIGTERM then ends the process at once, as it would without this handler.
        signal.signal(signal.SIGTERM, self._previous_handler)

    def reached(self, step: int) -> bool:
        if self._distributed:
            self._stop = self._stop or multihost_utils.reached_preemption_sync_point(step)
        return self._stop

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def host_copy(replicated_state: TrainState) -> TrainState:
    """The state as NumPy arrays, what checkpoints hold: orbax writes NumPy leaves from process 0 alone, and
    refuses the host-local jax.Arrays that pmap leaves in a multi-process run."""
    return jax.device_get(unreplicate(replicated_state))


def workdir_path(workdir: str) -> epath.Path:
    """The workdir as a path orbax and the reporter can use: local ones made absolute, gs:// ones kept."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


# --------------------------------------------------------------------------------------------- the run
def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Trains and evaluates per `config`, checkpointing to and resuming from `workdir` (local or gs://).

    A SIGTERM makes every host save a checkpoint at the next step boundary and return; a later call on the
    same workdir resumes there and ends in the state an uninterrupted run ends in.

    Returns {'last': metrics, 'best': metrics, 'history': {epoch: metrics}, 'preempted': bool}.
    """
    device_count, process_count = jax.device_count(), jax.process_count()
    config_checks.validate_config(config, device_count=device_count, process_count=process_count)
    config = with_pretrained_preprocessing(config)
    local_batch = config.batch_size // process_count
    dataset = data.get_dataset(config, local_batch_size=local_batch,
                               local_eval_batch_size=config.eval.batch_size // process_count,
                               process_index=jax.process_index(), process_count=process_count)
    info = dataset.info
    config_checks.validate_against_dataset(config, info)
    # From here on a SIGTERM (before the first step too) ends the run at a step boundary with a checkpoint.
    preemption = Preemption()
    steps_per_epoch = data.steps_per_epoch(info.num_train_examples, config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    logging.info("%s: %d training classes, %d training images, %d steps/epoch of %d images on %d devices "
                 "(%d processes)", info.name, info.num_train_classes, info.num_train_examples, steps_per_epoch,
                 config.batch_size, device_count, process_count)

    model = models.create_model(config.model, bn_axis_name=None if config.model.bn_frozen else AXIS)
    state = create_train_state(jax.random.PRNGKey(config.seed), config, model, info)
    labels, groups = parameter_groups(trainable(state.params, state.hierarchy), config.optim)

    workdir = workdir_path(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True)
    checkpoints = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    best_checkpoint = None
    if config.checkpoint.best_metric:
        best_checkpoint = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[config.checkpoint.best_metric], best_mode="max", create=True,
                # Its saves run beside those of `checkpoints`, at the same steps: the hosts' barriers need
                # other names.
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best")))
    reporter = Reporter(workdir, total_steps)

    p_embed = jax.pmap(functools.partial(embed_step, model=model), axis_name=AXIS)
    step_fns = {
        warm: jax.pmap(functools.partial(train_step, model=model, config=config, labels=labels, groups=groups,
                                         in_warmup=warm), axis_name=AXIS, donate_argnums=(0,))
        for warm in (True, False)}

    untrained = None
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.StandardRestore(jax.device_get(state)))
        logging.info("Resumed from %s at step %d (epoch %d).", checkpoints.directory, int(state.step),
                     int(state.epoch))
        # The step this run starts from, told before compiling: a SIGTERM from now on stops at the first step.
        preemption.reached(int(state.step))
        untrained = reporter.history.get(0)
    else:
        replicated = flax.jax_utils.replicate(state)
        untrained = evaluate(p_embed, replicated, dataset, config)
        reporter.evaluation(0, 0, untrained)
        level1_vectors = None
        if info.train_super_labels is not None and config.hpl.ground_truth_level1:
            state = state.replace(hierarchy=hierarchy_lib.hierarchy_from_super_labels(
                state.hierarchy.proxies[0], info.train_super_labels))
        elif state.hierarchy.num_levels > 1:
            if config.hpl.first_grouping == "class_means":
                embeddings, train_labels = embed_split(p_embed, replicated, dataset, "train")
                level1_vectors = hierarchy_lib.class_means(embeddings, train_labels, info.num_train_classes)
            # Also for 'proxies': the grouping is recomputed once on process 0 and broadcast to every host.
            state = refresh_groupings(state, config, level1_vectors=level1_vectors, policy="reset")
        del replicated
    hierarchies_agree(state.hierarchy)

    start_epoch = int(state.epoch)
    start_step = int(state.step) - start_epoch * steps_per_epoch
    state = flax.jax_utils.replicate(state)
    preempted = False
    for epoch in range(start_epoch, config.num_epochs):
        step_fn = step_fns[epoch < config.optim.warmup_epochs]
        batches = data.prefetch_to_devices(dataset.train_batches(epoch, start_step))
        for step_in_epoch in range(start_step, steps_per_epoch):
            state, step_metrics = step_fn(state, next(batches))
            step = epoch * steps_per_epoch + step_in_epoch + 1
            if step % config.log_every_steps == 0 or step_in_epoch == steps_per_epoch - 1:
                reporter.progress(epoch, config.num_epochs, step, config.batch_size,
                                  jax.device_get(unreplicate(step_metrics)))
            last_of_epoch = step_in_epoch == steps_per_epoch - 1
            if config.hpl.refresh_every_steps and step % config.hpl.refresh_every_steps == 0 and not last_of_epoch:
                state = _on_host(state, lambda s: refresh_groupings(s, config))
            # The last step of an epoch is asked after the epoch's checkpoint, so a stop there needs no save.
            preempted = not last_of_epoch and preemption.reached(step)
            if preempted or (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
                             and not last_of_epoch):
                checkpoints.save(step, args=ocp.args.StandardSave(host_copy(state)))
            if preempted:
                break
        if preempted:
            break
        start_step = 0

        state = _on_host(state, lambda s: refresh_groupings(s, config).replace(epoch=s.epoch + 1))
        host_state = host_copy(state)
        reporter.scalars(int(host_state.step), {
            f"hierarchy/level_{level}_group_size_{stat}": fn(sizes)
            for level, sizes in enumerate(hierarchy_lib.group_sizes(host_state.hierarchy), start=1)
            for stat, fn in (("min", np.min), ("max", np.max), ("mean", np.mean))})
        values = None
        if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
            values = evaluate(p_embed, state, dataset, config)
            reporter.evaluation(epoch + 1, int(host_state.step), values)
        checkpoints.save(int(host_state.step), args=ocp.args.StandardSave(host_state))
        if best_checkpoint is not None and values is not None:
            best_checkpoint.save(int(host_state.step), args=ocp.args.StandardSave(host_state),
                                 metrics={k: v for k, v in values.items() if isinstance(v, float)})
        preempted = epoch + 1 < config.num_epochs and preemption.reached(int(host_state.step))
        if preempted:
            break
    checkpoints.wait_until_finished()
    if best_checkpoint is not None:
        best_checkpoint.wait_until_finished()
    preemption.close()

    summary = reporter.summary(config.checkpoint.best_metric or "recall@1")
    if preempted:
        logging.warning("Stopped for preemption at step %d with a checkpoint in %s; run again with the same "
                        "workdir to resume.", checkpoints.latest_step(), checkpoints.directory)
    elif reporter.is_lead:
        print(format_table(summary, untrained), flush=True)
    reporter.close()
    return {**summary, "history": reporter.history, "preempted": preempted}
