"""The training loop: one run from its config to its last checkpoint, top to bottom.

`train_and_evaluate` checks the config, builds the dataset and the model, creates (or restores) the train
state, and then, epoch by epoch: train_step on every device (sharding.over_devices) over the batches ->
refresh of the coarse groupings -> evaluation -> checkpoint. The pieces other entry points also need (the train
state, the optimiser, evaluation, reporting, checkpoints) live in modules of their own.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from hpl_jax import data
from hpl_jax import grouping
from hpl_jax import models
from hpl_jax.core import hier as hier_lib
from hpl_jax.core import hierarchy as hierarchy_lib
from hpl_jax.core import losses
from hpl_jax.data import datasets
from hpl_jax.models import convert as convert_weights
from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import config_checks
from hpl_jax.trainer import distributed
from hpl_jax.trainer import evaluation
from hpl_jax.trainer import faults
from hpl_jax.trainer import guards
from hpl_jax.trainer import optim
from hpl_jax.trainer import preemption as preemption_lib
from hpl_jax.trainer import pretraining
from hpl_jax.trainer import reporting
from hpl_jax.trainer.sharding import as_global, device_mesh, over_devices
from hpl_jax.trainer.sharding import replicate, unreplicate
from hpl_jax.trainer.train_state import TrainState
from hpl_jax.trainer.train_state import create_train_state, host_copy, trainable, with_trained_proxies

AXIS = "batch"  # the device axis of the steps; collectives span every device of every host


# --------------------------------------------------------------------------------------------- the loss
def create_base_loss(loss_config) -> Callable:
    """The base loss `config.loss` names (core.losses.BASE_LOSSES), its hyperparameters bound."""
    return losses.get_base_loss(loss_config.base, **loss_config)


# --------------------------------------------------------------------------------------------- steps
def create_loss_fn(config) -> Callable:
    """(embeddings f32[B, d], labels i32[B], hierarchy, key) -> (loss f32[], {name: f32[]}) of `config`: L_HPL
    (core.losses.hierarchical_proxy_loss with the base loss and the level weights bound), regularised by HIER
    (core.hier.hier_regularised_loss, mined with `key`) when `hier.weight` > 0. The named terms are the step's
    metrics: 'loss/level_<l>' (each level's unweighted base loss) and, with HIER, 'loss/hier' (unweighted).

    The embeddings are the model's L2-normalised ones, or its un-normalised ones with HIER
    (`embeds_normalized(config)`), which HIER maps into its ball."""
    proxy_loss = functools.partial(losses.hierarchical_proxy_loss, base_loss=create_base_loss(config.loss),
                                   weights=tuple(config.hpl.weights))

    def level_terms(per_level):
        return {f"loss/level_{level}": per_level[level] for level in range(len(config.hpl.weights))}

    if config.hier.weight <= 0:
        def hpl_loss(embeddings, labels, hierarchy, key):
            del key  # nothing is sampled
            total, per_level = proxy_loss(embeddings, labels, hierarchy)
            return total, level_terms(per_level)
        return hpl_loss

    hier = config.hier
    regularised = functools.partial(
        hier_lib.hier_regularised_loss, proxy_loss=proxy_loss, hier_weight=hier.weight, curvature=hier.curvature,
        clip_r=hier.clip_r, margin=hier.margin, temperature=hier.temperature, top_k=hier.top_k)

    def hier_regularised(embeddings, labels, hierarchy, key):
        total, per_level, regulariser = regularised(embeddings, labels, hierarchy, key)
        return total, {**level_terms(per_level), "loss/hier": regulariser}
    return hier_regularised


def embeds_normalized(config) -> bool:
    """Whether the loss takes the model's L2-normalised embeddings (True), or, with HIER, its un-normalised ones."""
    return config.hier.weight <= 0


# kmeans_seed folds the step into the run's key itself; the steps' keys come from this fold of it, which no step
# count reaches.
_STEP_KEY_STREAM = 0x48494552


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step `state` is about to take (HIER's mining): the same on every device, and the same when
    the run resumes, as it depends only on the run's key and the step."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_KEY_STREAM), state.step)


def loss_and_gradients(state: TrainState, batch, *, model, loss_fn, normalize_fn, waiting=None, normalized=True):
    """The loss of one global batch and its gradient on the trainable tree; runs on every device
    (sharding.over_devices, or pmap).

    The loss is computed on the *global* batch (embeddings gathered from every device of every host):
    Proxy-Anchor's per-proxy log-sum-exp and its 1/|P+| depend on the whole batch, so N devices with global
    batch B get the gradient 1 device with batch B gets. Every device mines HIER's triplets with the same key
    (`step_key`) from the same gathered batch, so they agree.

    Args:
      batch: {'image': u8[per_device, H, W, 3] (or f32 in 0..255), 'label': i32[per_device]} on this device;
        `normalize_fn` makes the network's input of its pixels, on the device (data.normalize_pixels).
      loss_fn: (embeddings, labels, hierarchy, key) -> (loss, named terms) (`create_loss_fn`).
      waiting: None, or bool per trainable parameter (optim.waiting_in_warmup): the True ones are held constant,
        so their gradient is zero and the backbone's backward pass is not even computed (the warm-up).
      normalized: the model's L2-normalised embeddings (True) or its un-normalised ones (`embeds_normalized`).

    Returns:
      (loss f32[], named terms {name: f32[]}, new BatchNorm statistics, gradients like `trainable(...)`).
    """
    images = normalize_fn(batch["image"])
    key = step_key(state)

    def objective(tree):
        if waiting is not None:
            tree = jax.tree_util.tree_map(lambda leaf, wait: jax.lax.stop_gradient(leaf) if wait else leaf,
                                          tree, waiting)
        embeddings, new_model_state = model.apply(
            {"params": tree["model"], "batch_stats": state.batch_stats}, images, train=True, normalize=normalized,
            mutable=["batch_stats"])
        global_embeddings = jax.lax.all_gather(embeddings, AXIS, tiled=True)
        global_labels = jax.lax.all_gather(batch["label"], AXIS, tiled=True)
        total, terms = loss_fn(global_embeddings, global_labels, with_trained_proxies(state.hierarchy, tree), key)
        return total, (terms, new_model_state["batch_stats"])

    tree = trainable(state.params, state.hierarchy)
    (total, (terms, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(tree)
    # Every device computed the same loss of the gathered batch; all_gather's transpose sums each device's
    # share N times, so the mean over devices is the exact gradient of the global-batch loss.
    grads = jax.lax.pmean(grads, AXIS)
    return total, terms, batch_stats, grads


def train_step(state: TrainState, batch, *, model, loss_fn, normalize_fn, optimizer, learning_rate_fn,
               waiting=None, skip_nonfinite: bool = False, normalized: bool = True):
    """One optimiser step on one global batch (see `loss_and_gradients`); runs on every device (over_devices or
    pmap). The functions it uses come in built (`create_train_step`), as the Flax ImageNet example's do.

    Args:
      optimizer: optim.create_optimizer's; its update takes `in_warmup`.
      learning_rate_fn: epoch -> base learning rate (optim.create_learning_rate_fn).
      waiting: None after the warm-up; during it (static), bool per trainable parameter: the parameters that wait
        (optim.waiting_in_warmup) get no gradient and no update.
      skip_nonfinite: a step that is not `finite` leaves the state as it was, but for the step counter
        (guards.py).
      normalized: see `loss_and_gradients`.

    Returns:
      (the new state, {'loss', 'loss/level_<l>', ('loss/hier'), 'lr': f32[], 'finite': bool[]}); `finite`: the
      loss, the gradients and the updated parameters are finite.
    """
    total, terms, batch_stats, grads = loss_and_gradients(state, batch, model=model, loss_fn=loss_fn,
                                                          normalize_fn=normalize_fn, waiting=waiting,
                                                          normalized=normalized)
    tree = trainable(state.params, state.hierarchy)
    learning_rate = learning_rate_fn(state.epoch)
    opt_state = optim.set_learning_rate(state.opt_state, learning_rate)
    # Under over_devices (shard_map) the state, passed with a device axis, is typed as varying over the devices
    # and the pmean-ed gradients as invariant; the branches of optax's conditionally_mask (the warm-up) mix the
    # two and must agree, so the gradients are typed varying too (a type, no data moves).
    grads = jax.lax.pcast(grads, AXIS, to="varying")
    updates, opt_state = optimizer.update(grads, opt_state, tree, in_warmup=waiting is not None)
    tree = optax.apply_updates(tree, updates)
    new_state = state.replace(
        step=state.step + 1, params=tree["model"], batch_stats=batch_stats, opt_state=opt_state,
        hierarchy=with_trained_proxies(state.hierarchy, tree))
    # The same on every device (the gradients are pmean-ed); the host reads it with the metrics (guards.py).
    finite = guards.all_finite((total, grads, tree))
    if skip_nonfinite:
        new_state = optax.tree_utils.tree_where(finite, new_state, state.replace(step=state.step + 1))
    return new_state, {"loss": total, "lr": learning_rate, "finite": finite, **terms}


def create_train_step(config, model, labels, groups, *, in_warmup: bool) -> Callable:
    """The per-device step of the run `config` describes, during the warm-up or after it: `train_step` with its
    loss, optimiser, learning-rate schedule and waiting parameters bound, built once (labels, groups:
    optim.parameter_groups of the trainable tree).

    A run compiles the two steps and runs each in its epochs. One step choosing its gradient by the epoch
    (jax.lax.cond) would put the backbone's gradient convolutions inside a conditional, where XLA:CPU (jaxlib
    0.10.2) runs them an order of magnitude slower than outside one: the default config's step went from 36 to
    404 ms on a 2-core CPU.
    """
    return functools.partial(
        train_step, model=model, loss_fn=create_loss_fn(config),
        normalize_fn=functools.partial(data.normalize_pixels, dataset_config=config.dataset),
        optimizer=optim.create_optimizer(labels, groups, config.optim),
        learning_rate_fn=optim.create_learning_rate_fn(config.optim),
        waiting=optim.waiting_in_warmup(labels, groups) if in_warmup else None,
        skip_nonfinite=config.optim.skip_nonfinite_steps, normalized=embeds_normalized(config))


def kmeans_seed(state: TrainState, step: int) -> int:
    return int(jax.random.randint(jax.random.fold_in(state.rng, step), (), 0, 2 ** 31 - 1))


def refresh_groupings(state: TrainState, config, *, level1_vectors=None,
                      policy: Optional[str] = None) -> TrainState:
    """Host side: re-cluster the coarse levels (k-means); a coarse level whose proxies were reset gets a
    fresh optimiser state (its own AdamW group: moments and step count).

    Process 0 alone computes the groupings and broadcasts them: the other hosts wait at the broadcast instead of
    repeating the k-means, and cannot disagree in the last bit (k-means sums in thread order) on a point between
    two clusters.
    """
    if state.hierarchy.num_levels == 1 or config.hpl.ground_truth_level1:
        return state
    seed = kmeans_seed(state, int(state.step))
    if jax.process_index() == 0:
        hierarchy, reset = grouping.refresh_hierarchy(
            jax.device_get(state.hierarchy), seed=seed, policy=policy or config.hpl.coarse_policy,
            level1_vectors=level1_vectors, n_init=config.hpl.kmeans_restarts, coarse_norm=config.hpl.coarse_norm,
            backend=config.hpl.kmeans_backend)
    else:
        # The broadcast's template: process 0's values replace it.
        hierarchy = jax.tree_util.tree_map(np.asarray, jax.device_get(state.hierarchy))
        reset = tuple(np.zeros(size, bool) for size in state.hierarchy.level_sizes[1:])
    if jax.process_count() > 1:
        hierarchy, reset = multihost_utils.broadcast_one_to_all((hierarchy, reset))
        hierarchy = jax.tree_util.tree_map(jnp.asarray, hierarchy)
    tree = trainable(state.params, state.hierarchy)
    labels, groups = optim.parameter_groups(tree, config.optim)
    reset_groups = [optim.proxy_group(labels, level) for level, mask in enumerate(reset, start=1) if np.any(mask)]
    opt_state = optim.reset_group_states(state.opt_state, reset_groups, tree, labels, groups, config.optim)
    return state.replace(hierarchy=hierarchy, opt_state=opt_state)


def observe_hierarchy(reporter: reporting.Reporter, state: TrainState, info: data.DatasetInfo, config, *,
                      previous=None) -> Dict[str, float]:
    """Records what the groupings now in `state` (host copy) mean: hierarchy.hierarchy_metrics against the
    training classes' true super-classes where the dataset has them, and against the `previous` hierarchy; and where
    HIER's proxies lie in its ball."""
    if state.hierarchy.num_levels == 1 and state.hierarchy.hier_proxies is None:
        return {}
    values = {f"hierarchy/{name}": value for name, value in grouping.hierarchy_metrics(
        state.hierarchy, super_labels=info.train_super_labels, previous=previous,
        hier_curvature=config.hier.curvature, hier_clip_r=config.hier.clip_r).items()}
    reporter.refresh(int(state.epoch), int(state.step), values)
    return values


def refresh_on_host(replicated_state: TrainState, config, reporter, info, *, end_of_epoch: bool,
                    mesh=None) -> Tuple[TrainState, TrainState, Dict[str, float]]:
    """The loop's refresh: on the host, identically on every host; at an epoch's end also counts the epoch.

    Returns (the replicated new state, its host copy, the hierarchy scalars recorded); replicated over the local
    devices, or as global arrays over `mesh` where given (sharding.as_global).
    """
    state = jax.device_get(unreplicate(replicated_state))
    previous = state.hierarchy
    # NumPy again: the broadcast groupings and reset optimiser states come back as jax.Arrays on one device,
    # which orbax refuses to save in a multi-process run.
    state = jax.device_get(refresh_groupings(state, config))
    if end_of_epoch:
        state = state.replace(epoch=state.epoch + 1)
    hierarchies_agree(state.hierarchy)
    # NumPy leaves: orbax saves them from process 0 alone (it refuses the host-local jax.Arrays a refresh makes).
    state = jax.device_get(state)
    values = observe_hierarchy(reporter, state, info, config, previous=previous)
    replicated = replicate(state, AXIS)
    return (replicated if mesh is None else as_global(replicated, mesh)), state, values


def report_progress(reporter: reporting.Reporter, config, lines) -> None:
    """Progress lines of the steps guards.StepMetrics.fetch returned: [(step, epoch from 1, values)]."""
    for step, epoch, values in lines:
        reporter.progress(epoch - 1, config.num_epochs, step, config.batch_size, values)


def hierarchies_agree(hierarchy) -> None:
    """Fails loudly if the hosts hold different groupings."""
    if jax.process_count() == 1:
        return
    parents = np.concatenate([np.asarray(p).ravel() for p in hierarchy.parents] or [np.zeros(0, np.int32)])
    gathered = multihost_utils.process_allgather(parents)
    if not np.all(gathered == gathered[0]):
        raise RuntimeError("The hosts hold different coarse groupings after a refresh.")


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


# --------------------------------------------------------------------------------------------- the run
def due(count: int, period: int) -> bool:
    """The loop's one cadence: True at every `period`-th step or epoch (count % period == 0); period 0 = never."""
    return period > 0 and count % period == 0


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Trains and evaluates per `config`, checkpointing to and resuming from `workdir` (local or gs://).

    A SIGTERM makes every host save a checkpoint at the next step boundary and return; a later call on the
    same workdir resumes there and ends in the state an uninterrupted run ends in. A non-finite step
    (guards.NonFiniteError) or a failed save (checkpointing.WorkdirError) stops the run with one error after
    the saves in flight complete; nothing non-finite is saved, so the latest checkpoint is the resume point.
    With `eval.early_stopping_patience`, the run ends before `num_epochs` once the validation metric stops
    improving.

    Returns {'last': metrics, 'best': metrics, 'history': {epoch: metrics}, 'preempted': bool,
    'skipped_images': int, 'skipped_steps': int}.
    """
    # Whatever stops the run, the saves in flight complete and SIGTERM gets its previous handler back.
    with contextlib.ExitStack() as on_exit:
        return _train_and_evaluate(config, workdir, on_exit)


def use_compilation_cache(directory: str) -> None:
    """Keeps compiled programs in `directory` (local or gs://; '' = off), where a restarted run finds them instead of
    compiling again (config.compilation_cache_dir). Set before the first compile of the process."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)


def _train_and_evaluate(config, workdir: str, on_exit: contextlib.ExitStack) -> Dict[str, Any]:
    device_count, process_count = jax.device_count(), jax.process_count()
    config_checks.validate_config(config, device_count=device_count, process_count=process_count)
    use_compilation_cache(config.compilation_cache_dir)
    config = with_pretrained_preprocessing(config)
    workdir = checkpointing.prepare_workdir(workdir, config)
    local_batch = config.batch_size // process_count
    dataset = datasets.get_dataset(config, local_batch_size=local_batch,
                               local_eval_batch_size=config.eval.batch_size // process_count,
                               process_index=jax.process_index(), process_count=process_count)
    info = dataset.info
    config_checks.validate_against_dataset(config, info)
    if jax.process_index() == 0:
        checkpointing.write_config(workdir, config)
    # From here on a SIGTERM (before the first step too) ends the run at a step boundary with a checkpoint.
    preemption = preemption_lib.Preemption()
    on_exit.callback(preemption.close)
    steps_per_epoch = data.steps_per_epoch(info.num_train_examples, config.batch_size, config.steps_per_epoch)
    total_steps = steps_per_epoch * config.num_epochs
    logging.info("%s: %d training classes, %d training images, %d steps/epoch of %d images on %d devices "
                 "(%d processes)", info.name, info.num_train_classes, info.num_train_examples, steps_per_epoch,
                 config.batch_size, device_count, process_count)

    model = models.create_model(config.model, bn_axis_name=None if config.model.bn_frozen else AXIS)
    if not model.is_vit:
        logging.info("Convolutions (model.conv_impl %r): %s", config.model.conv_impl,
                     models.describe_conv_impl(model.conv_impl))
    state = create_train_state(jax.random.PRNGKey(config.seed), config, model, info)
    labels, groups = optim.parameter_groups(trainable(state.params, state.hierarchy), config.optim)

    selected_on = evaluation.selection_metric(config, info)
    checkpoints = checkpointing.Checkpoints(workdir, config, is_lead=jax.process_index() == 0)
    on_exit.callback(checkpoints.finish_quietly)

    # jit + shard_map over every device of every process, the per-device steps written as for pmap: pmap would
    # convert every leaf of the train state between host-local and global arrays at every step of a
    # multi-process run (docs/scaling.md).
    mesh = device_mesh(AXIS)
    p_embed = evaluation.embed_on_devices(model, mesh, config.dataset)
    step_fns = {warm: over_devices(create_train_step(config, model, labels, groups, in_warmup=warm), mesh,
                                   donate_argnums=(0,))
                for warm in (True, False)}

    untrained = None
    resumed = checkpoints.latest_step() is not None
    if resumed:
        state = checkpoints.restore(checkpoints.latest_step(), jax.device_get(state))
    # What came after the resume point is redone: metrics.json and TensorBoard forget it.
    reporter = reporting.Reporter(workdir, total_steps, selected_on,
                                  resumed_step=int(state.step) if resumed else None, resumed_epoch=int(state.epoch))
    on_exit.callback(reporter.close)
    if resumed:
        logging.info("Resumed from %s at step %d (epoch %d).", checkpoints.directory, int(state.step),
                     int(state.epoch))
        # The step this run starts from, told before compiling: a SIGTERM from now on stops at the first step.
        preemption.reached(int(state.step))
        untrained = reporter.history.get(0)
        if checkpoints.best is not None and reporter.history:
            best = reporter.summary()["best"]
            checkpoints.reconcile_best(
                best_epoch=best["epoch"], best_metrics={k: v for k, v in best.items() if isinstance(v, float)},
                steps_per_epoch=steps_per_epoch, resumed_step=int(state.step), template=jax.device_get(state))
    else:
        replicated = as_global(replicate(state, AXIS), mesh)
        untrained = evaluation.evaluate(p_embed, replicated, dataset, config, mesh=mesh)
        # The first grouping (the ground-truth level 1 is already in place: create_train_state).
        if state.hierarchy.num_levels > 1 and not config.hpl.ground_truth_level1:
            level1_vectors = None
            if config.hpl.first_grouping == "class_means":
                embeddings, train_labels = evaluation.embed_split(p_embed, replicated, dataset, "train")
                data.require_every_train_class(train_labels, info)
                level1_vectors = hierarchy_lib.class_means(embeddings, train_labels, info.num_train_classes)
            # Also for 'proxies': the grouping is recomputed once on process 0 and broadcast to every host.
            state = refresh_groupings(state, config, level1_vectors=level1_vectors, policy="reset")
        untrained.update(observe_hierarchy(reporter, state, info, config))
        reporter.evaluation(0, 0, untrained)
        del replicated
    hierarchies_agree(state.hierarchy)

    start_epoch = int(state.epoch)
    start_step = int(state.step) - start_epoch * steps_per_epoch
    state = as_global(replicate(state, AXIS), mesh)
    # Every step's metrics, with its `finite` flag, are fetched before the host reads or saves the state; the
    # progress lines read them one step behind (guards.StepMetrics).
    step_metrics_seen = guards.StepMetrics(skip_nonfinite=config.optim.skip_nonfinite_steps)
    preempted = False
    for epoch in range(start_epoch, config.num_epochs):
        # Asked before each epoch, so a run that stopped early and is started again stays stopped.
        if reporting.stops_early(reporter.history, selected_on, config.eval.early_stopping_patience):
            logging.info("Early stopping before epoch %d: %s was best at epoch %d, more than %d epochs ago.",
                         epoch + 1, selected_on, reporting.best_epoch(reporter.history, selected_on),
                         config.eval.early_stopping_patience)
            break
        step_fn = step_fns[epoch < config.optim.warmup_epochs]
        batches = data.prefetch_to_devices(dataset.train_batches(epoch, start_step))
        for step_in_epoch in range(start_step, steps_per_epoch):
            faults.reached("train_gather")
            state, step_metrics = step_fn(state, as_global(next(batches), mesh))
            step = epoch * steps_per_epoch + step_in_epoch + 1
            distributed.at_step(step)
            if step_in_epoch == start_step:
                # Compiling (after warm-up, after a resume) and the epoch boundary's host work are behind us:
                # the speed and ETA count from here.
                reporter.restart_clock(step)
            last_of_epoch = step_in_epoch == steps_per_epoch - 1
            step_metrics_seen.add(step, epoch + 1, step_metrics,
                                  report=due(step, config.log_every_steps) or last_of_epoch)
            checkpoints.raise_if_a_save_failed()
            # A log step's line is written once the next step is dispatched: the host reads metrics one step behind
            # and never drains the device queue to log. At an epoch's end it waits for the state anyway.
            report_progress(reporter, config, step_metrics_seen.fetch(behind=0 if last_of_epoch else 1))
            # Mid-epoch work (a refresh, a checkpoint) leaves an epoch's last step to the epoch boundary's own.
            if due(step, config.hpl.refresh_every_steps) and not last_of_epoch:
                report_progress(reporter, config, step_metrics_seen.fetch())
                state, _, _ = refresh_on_host(state, config, reporter, info, end_of_epoch=False, mesh=mesh)
            # The last step of an epoch is asked after the epoch's checkpoint, so a stop there needs no save.
            preempted = not last_of_epoch and preemption.reached(step)
            if preempted or (due(step, config.checkpoint.every_steps) and not last_of_epoch):
                report_progress(reporter, config, step_metrics_seen.fetch())
                checkpoints.save(step, host_copy(state))
            if preempted:
                break
        if preempted:
            break
        start_step = 0

        state, host_state, hierarchy_values = refresh_on_host(state, config, reporter, info, end_of_epoch=True,
                                                              mesh=mesh)
        values = None
        if due(epoch + 1, config.eval.every_epochs) or epoch + 1 == config.num_epochs:
            values = {**evaluation.evaluate(p_embed, state, dataset, config,
                                            costly=evaluation.costly_metrics_due(config, epoch + 1), mesh=mesh),
                      **hierarchy_values}
            reporter.evaluation(epoch + 1, int(host_state.step), values)
        checkpoints.save(int(host_state.step), host_state)
        reporter.flush()
        # Saved only when this epoch becomes metrics.json's best, so best/ holds that epoch also on a tie.
        if (checkpoints.best is not None and values is not None
                and reporting.best_epoch(reporter.history, selected_on) == epoch + 1):
            checkpoints.save_best(int(host_state.step), host_state,
                                  metrics={k: v for k, v in values.items() if isinstance(v, float)})
        preempted = epoch + 1 < config.num_epochs and preemption.reached(int(host_state.step))
        if preempted:
            break
    checkpoints.wait()
    if config.export_backbone and not preempted:
        exported = pretraining.export_backbone(host_copy(state), config, workdir, info=info)
        logging.info("Backbone written to %s (use it with --config.model.pretrained=%s).", exported, exported)

    summary = reporter.summary()
    notes = {"skipped_images": data.total_over_hosts(dataset.num_skipped_images),
             "skipped_steps": step_metrics_seen.num_skipped}
    if checkpoints.best is not None and summary:
        notes["best_checkpoint_epoch"] = checkpoints.held_best_epoch(steps_per_epoch)
    reporter.annotate(notes)
    if preempted:
        logging.warning("Stopped for preemption at step %d with a checkpoint in %s; run again with the same "
                        "workdir to resume.", checkpoints.latest_step(), checkpoints.directory)
    elif reporter.is_lead:
        print("\n".join([evaluation.format_table(summary, untrained), *reporting.format_notes(summary, notes)]),
              flush=True)
    reporter.close()
    return {**summary, "history": reporter.history, "preempted": preempted, **notes}
