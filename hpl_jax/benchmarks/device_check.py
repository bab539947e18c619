"""What only an accelerator can show, side by side with the PyTorch peer, in one command that fits a short lease.

    python -m hpl_jax.benchmarks.device_check --out=DIR            # one GPU: the full sizes (about 5 minutes)
    python -m hpl_jax.benchmarks.device_check --out=DIR --dry_run  # any machine: tiny shapes, every stage

(launch/device_check.sh wraps it for a GPU machine.) Stages, in this order, each timed on the default device:
- `env`: versions, devices.
- `train_cub_{jax,torch}`: the train step of configs/cub.py's recipe, run as the trainer runs it (jit + shard_map,
  sharding.over_devices; `train_cub_jax_pmap`: the same step under jax.pmap) (ResNet-50, 224 px, bfloat16, batch 120,
  frozen BatchNorm, AdamW with proxies at 100x, value clipping) on HPL-PA over 100 + 8 proxies, against the
  official Proxy-Anchor training step in PyTorch (torchvision ResNet-50, GAP + GMP head, 512-d linear layer, the
  official loss, AdamW with proxies at 100x, value clipping, BatchNorm frozen, bf16 autocast, channels_last) on the
  same GPU. Images are random (no data needed), already on the device: this is the step, not the input pipeline.
  Reported: images/s, ms/step (steady state, `--steps` steps dispatched back to back), compile seconds (first
  call minus one steady step), peak device memory.
- `train_sop_{jax,torch}`, `train_sop_b360_{jax,torch}`: the same recipe with SOP's 11,318 + 512 proxies, at batch
  120 and 360 (three steps' worth): where the loss starts to matter.
- `loss_sop`: HPL-PA forward + backward alone at SOP scale (batch 120) against its bare matrix products
  (hpl_jax.benchmarks.losses).
- `retrieval_sop`: `retrieval_metrics` at SOP test scale (60,502 x 512 planted embeddings,
  hpl_jax.benchmarks.retrieval; R@1/10/100/1000, P@1, R-Precision, MAP@R, no NMI), each timed twice (the first
  call compiles): `host_preparation` (inputs checked and normalised, class lists: every path's host share);
  `device` (rank_on_device=True: one device program over query chunks, only sums back; the default on an
  accelerator); `host_path` (rank_on_device=False: symmetric blocks, one call per block pair, the accelerator's path
  before issue 35); `device_super` (with the super-class metrics, ranked by lax.top_k) and `device_super_approx`
  (by approx_max_k, recall target 0.95, and whether its metrics equal the exact ones); `approx_max_k_recall` (its
  share of the exact top-k at k = 1001 on 1,024 queries); then an exact k-NN (matmul + top-k, k = 1000 besides
  the query itself, Recall@1 only) in JAX (`jax_knn`: lax.top_k) and in PyTorch (`torch_knn`: torch.topk) on the
  same device, and each path's ratio to PyTorch's (second calls).
- `kmeans_sop`: `hpl_jax.kmeans` of an SOP refresh (11,318 proxies into 512, one restart), and of the NMI of
  the test set (60,502 into 11,316).
- `default_end_to_end`: `python -m hpl_jax.main --config=configs/default.py`, wall time of the whole process.

Results are written after every stage to DIR/device_check.json and DIR/device_check.md, so a run cut short
keeps what it measured; a stage that fails is recorded with its error and the next one runs. A stage is skipped
(and says so) once `--budget_s` has passed. PyTorch stages are skipped with a line when torch is absent (or
torchvision, at full sizes; a dry run then stands in a two-convolution trunk). On a GPU set XLA_PYTHON_CLIENT_PREALLOCATE=false (the launch script does), so that JAX and PyTorch
share the device's memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np

from hpl_jax.benchmarks import losses as losses_benchmark
from hpl_jax.benchmarks import retrieval as retrieval_benchmark

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of every stage; FULL is what the issue asks of a GPU, DRY the same stages in seconds on a CPU."""

    backbone: str
    width: float
    image_size: int
    dim: int
    batch: int
    big_batch: int
    cub_classes: int
    cub_coarse: int
    sop_classes: int
    sop_coarse: int
    steps: int
    test_items: int
    test_classes: int
    knn_k: int
    end_to_end_overrides: tuple


FULL = Sizes(backbone="resnet50", width=1.0, image_size=224, dim=512, batch=120, big_batch=360, cub_classes=100,
             cub_coarse=8, sop_classes=11318, sop_coarse=512, steps=30, test_items=60502, test_classes=11316,
             knn_k=1001, end_to_end_overrides=())
DRY = Sizes(backbone="resnet18", width=0.125, image_size=32, dim=32, batch=8, big_batch=16, cub_classes=10,
            cub_coarse=2, sop_classes=60, sop_coarse=6, steps=1, test_items=300, test_classes=60, knn_k=11,
            end_to_end_overrides=("--config.num_epochs=1", "--config.model.width=0.125",
                                  "--config.dataset.synthetic.images_per_class=8", "--config.hpl.kmeans_restarts=1",
                                  "--config.dataset.num_val_classes=0", "--config.eval.nmi=False"))


# --------------------------------------------------------------------------------------------- helpers
def _device_peak_gib() -> Optional[float]:
    """Peak bytes in use on the default JAX device so far (GPU/TPU), or None where the backend keeps none."""
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in stats else None


def _torch():
    """(torch, device name) or raises ImportError with the reason the PyTorch side is skipped."""
    import torch

    return torch, "cuda" if torch.cuda.is_available() else "cpu"


def _torch_trunk(torch, sizes: Sizes, dry_run: bool):
    """(trunk NCHW -> feature map, its channels, its name): torchvision's backbone; in a dry run without
    torchvision (CI installs torch alone) a two-convolution stand-in, so the rest of the step still runs."""
    try:
        import torchvision
    except ImportError:
        if not dry_run:
            raise
        trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16),
                                    torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1))
        return trunk, 32, "two-convolution stand-in (torchvision absent)"
    backbone = getattr(torchvision.models, sizes.backbone)(weights=None)
    return (torch.nn.Sequential(*list(backbone.children())[:-2]), backbone.fc.in_features,
            f"torchvision {torchvision.__version__} {sizes.backbone}")


def _steady_ms(run_steps: Callable[[int], None], steps: int) -> float:
    """Milliseconds per step of `run_steps(steps)` (which dispatches steps back to back and waits at the end)."""
    start = time.perf_counter()
    run_steps(steps)
    return 1e3 * (time.perf_counter() - start) / steps


# --------------------------------------------------------------------------------------------- train steps
def _recipe_config(sizes: Sizes, num_coarse: int, batch: int):
    """configs/cub.py's recipe at the given coarse proxy count and batch (cub.py is the base; only sizes change)."""
    sys.path.insert(0, REPO_ROOT)
    from configs import cub

    config = cub.get_config()
    config.dataset.name = "synthetic"
    config.dataset.image_size = sizes.image_size
    config.model.backbone = sizes.backbone
    config.model.width = sizes.width
    config.model.embedding_dim = sizes.dim
    config.hpl.num_coarse = (num_coarse,)
    # The first grouping's k-means on the device, one restart: the benchmark times the step, not the init.
    config.hpl.kmeans_backend = "jax"
    config.hpl.kmeans_restarts = 1
    config.batch_size = batch
    return config


def jax_train_step(sizes: Sizes, num_classes: int, num_coarse: int, batch: int,
                   wrapper: str = "over_devices") -> Dict[str, Any]:
    """hpl_jax.train.train_step (out of warm-up) on one device's random batch, run as the trainer runs it
    (`wrapper='over_devices'`: jax.jit of jax.shard_map, sharding.over_devices) or by `jax.pmap`."""
    from hpl_jax import data
    from hpl_jax import models
    from hpl_jax.trainer import optim
    from hpl_jax.trainer import sharding as sharding_lib
    from hpl_jax.trainer import train
    from hpl_jax.trainer import train_state

    config = _recipe_config(sizes, num_coarse, batch)
    devices = jax.local_devices()[:1]
    info = data.DatasetInfo(name="synthetic", num_train_classes=num_classes, num_train_examples=batch,
                            image_shape=(sizes.image_size, sizes.image_size, 3), eval_splits=("test",),
                            num_eval_examples={"test": 0})
    model = models.create_model(config.model, bn_axis_name=None if config.model.bn_frozen else train.AXIS)
    state = train_state.create_train_state(jax.random.PRNGKey(0), config, model, info)
    labels, groups = optim.parameter_groups(train_state.trainable(state.params, state.hierarchy), config.optim)
    per_device = train.create_train_step(config, model, labels, groups, in_warmup=False)
    rng = np.random.default_rng(0)
    # u8 pixels, as the trainer's batches carry them (the step normalises them on the device).
    host_batch = {"image": rng.integers(0, 256, (batch, sizes.image_size, sizes.image_size, 3), dtype=np.uint8),
                  "label": rng.integers(0, num_classes, size=batch).astype(np.int32)}
    device_batch = next(data.prefetch_to_devices(iter([host_batch]), size=1, devices=devices))
    # The state on the one device timed, with the leading device axis both wrappers take.
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (train.AXIS,)),
                                          jax.sharding.PartitionSpec(train.AXIS))
    replicated = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x)[None], sharding), state)
    if wrapper == "over_devices":
        mesh = sharding_lib.device_mesh(train.AXIS, devices)
        step = sharding_lib.over_devices(per_device, mesh, donate_argnums=(0,))
        device_batch, replicated = sharding_lib.as_global((device_batch, replicated), mesh)
    else:
        step = jax.pmap(per_device, axis_name=train.AXIS, devices=devices, donate_argnums=(0,))
    holder = {"state": replicated}

    def run_steps(count: int) -> None:
        metrics = None
        for _ in range(count):
            holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    run_steps(1)
    first_s = time.perf_counter() - start
    run_steps(2)
    ms = _steady_ms(run_steps, sizes.steps)
    loss = float(np.asarray(step(holder["state"], device_batch)[1]["loss"])[0])
    return {"images_per_s": round(batch / ms * 1e3, 1), "ms_per_step": round(ms, 2),
            "compile_s": round(first_s - ms / 1e3, 2), "peak_device_gib": _device_peak_gib(),
            "batch": batch, "proxies": f"{num_classes} + {num_coarse}", "loss_finite": bool(np.isfinite(loss)),
            "wrapper": wrapper}


def torch_proxy_anchor_loss(torch, embeddings, labels, proxies, alpha: float = 32.0, delta: float = 0.1):
    """The official Proxy-Anchor loss (Kim et al., CVPR 2020, code/losses.py), written out as it is there."""
    functional = torch.nn.functional
    cos = functional.linear(functional.normalize(embeddings), functional.normalize(proxies))
    positive = functional.one_hot(labels, proxies.shape[0]).float()
    negative = 1 - positive
    pos_exp = torch.exp(-alpha * (cos - delta))
    neg_exp = torch.exp(alpha * (cos + delta))
    with_positives = torch.nonzero(positive.sum(dim=0) != 0).squeeze(dim=1)
    pos_sum = torch.where(positive == 1, pos_exp, torch.zeros_like(pos_exp)).sum(dim=0)
    neg_sum = torch.where(negative == 1, neg_exp, torch.zeros_like(neg_exp)).sum(dim=0)
    return torch.log(1 + pos_sum).sum() / len(with_positives) + torch.log(1 + neg_sum).sum() / proxies.shape[0]


def torch_train_step(sizes: Sizes, num_classes: int, batch: int, dry_run: bool) -> Dict[str, Any]:
    """The official Proxy-Anchor training step (flat PA) in PyTorch, with bf16 autocast and channels_last."""
    torch, device = _torch()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    trunk, feature_dim, trunk_name = _torch_trunk(torch, sizes, dry_run)
    embedding = torch.nn.Linear(feature_dim, sizes.dim)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.embedding = trunk, embedding

        def forward(self, x):
            features = self.trunk(x)
            pooled = (torch.nn.functional.adaptive_avg_pool2d(features, 1)
                      + torch.nn.functional.adaptive_max_pool2d(features, 1))
            return self.embedding(pooled.flatten(1))

    model = Net().to(device).to(memory_format=torch.channels_last)
    model.train()
    # bn_freeze as in the official code for CUB/Cars: running statistics, affine parameters not trained.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)
    proxies = torch.nn.Parameter(torch.randn(num_classes, sizes.dim, device=device))
    torch.nn.init.kaiming_normal_(proxies, mode="fan_out")
    lr = 1e-4
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trained, "lr": lr}, {"params": [proxies], "lr": lr * 100}],
                                  lr=lr, weight_decay=1e-4)
    images = torch.randn(batch, 3, sizes.image_size, sizes.image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    autocast_dtype = torch.bfloat16

    def run_steps(count: int) -> None:
        for _ in range(count):
            with torch.autocast(device_type=device, dtype=autocast_dtype):
                embeddings = model(images)
            loss = torch_proxy_anchor_loss(torch, embeddings.float(), labels, proxies)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(trained, 10)
            torch.nn.utils.clip_grad_value_([proxies], 10)
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_steps(1)
    first_s = time.perf_counter() - start
    run_steps(3)  # cudnn.benchmark settles its algorithm choice
    ms = _steady_ms(run_steps, sizes.steps)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None
    return {"images_per_s": round(batch / ms * 1e3, 1), "ms_per_step": round(ms, 2),
            "first_step_s": round(first_s, 2), "peak_device_gib": peak, "batch": batch,
            "proxies": f"{num_classes}", "torch": torch.__version__, "trunk": trunk_name}


# --------------------------------------------------------------------------------------------- the rest
def loss_alone(sizes: Sizes) -> Dict[str, Any]:
    times = losses_benchmark.time_against_bound(batch=sizes.batch, dim=sizes.dim, num_classes=sizes.sop_classes,
                                                num_coarse=sizes.sop_coarse, repeats=max(3, sizes.steps // 2))
    return {name: round(ms, 3) for name, ms in times.items()} | {
        "hpl_over_bound": round(times["hpl"] / times["bound_2"], 2), "unit": "ms, median, forward + backward"}


# approx_max_k's recall target in the retrieval stage (jax's default).
APPROX_RECALL_TARGET = 0.95


def retrieval(sizes: Sizes) -> Dict[str, Any]:
    """The retrieval metrics at SOP test scale, each path twice (the first call compiles), against an exact k-NN
    (matmul + top-k, Recall@1 only) in JAX and in PyTorch on the same device."""
    from hpl_jax.core import metrics as metrics_lib

    embeddings, labels, super_labels = retrieval_benchmark.planted_embeddings(
        sizes.test_items, sizes.test_classes, 12, sizes.dim, 2, 12, 2.3, 0)
    recall_at = tuple(k for k in retrieval_benchmark.RECALL_AT if k < sizes.knn_k)
    result: Dict[str, Any] = {"items": sizes.test_items, "dim": sizes.dim, "knn_k": sizes.knn_k}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            value = fn()
            seconds.append(time.perf_counter() - start)
        result[f"{name}_s"] = [round(s, 3) for s in seconds]
        return value

    # What every path spends on the host before any search: inputs checked and normalised, class lists.
    timed("host_preparation", functools.partial(metrics_lib._prepared, embeddings, labels, None, None, recall_at,
                                                None, 1024))
    paths = {"device": {"rank_on_device": True}, "host_path": {"rank_on_device": False},
             "device_super": {"rank_on_device": True, "super_labels": super_labels},
             "device_super_approx": {"rank_on_device": True, "super_labels": super_labels,
                                     "top_k_recall_target": APPROX_RECALL_TARGET}}
    values = {}
    for name, options in paths.items():
        values[name] = timed(name, functools.partial(metrics_lib.retrieval_metrics, embeddings, labels,
                                                     recall_at=recall_at, nmi=False, **options))
        result[f"{name}_recall@1"] = round(values[name]["recall@1"], 4)
    # The two paths' similarities come from different matrix-product shapes: near-ties may differ in float32.
    largest = max(abs(values["device"][key] - values["host_path"][key]) for key in values["host_path"])
    result["device_vs_host_path_largest_difference"] = float(f"{largest:.2g}")
    result["device_super_approx_equals_exact"] = all(
        values["device_super_approx"][key] == value for key, value in values["device_super"].items())
    result["approx_max_k_recall"] = round(retrieval_benchmark.approx_top_k_recall(
        embeddings, sizes.knn_k, APPROX_RECALL_TARGET), 4)
    result["jax_knn_recall@1"] = round(timed("jax_knn", functools.partial(
        retrieval_benchmark.exact_knn_recall_at_1, embeddings, labels, sizes.knn_k - 1)), 4)
    try:
        torch, device = _torch()
    except ImportError as error:
        result["torch_knn"] = f"skipped: {error}"
        return result
    gallery = torch.nn.functional.normalize(torch.from_numpy(embeddings).to(device), dim=1)
    gallery_labels = torch.from_numpy(labels.astype(np.int64)).to(device)

    def torch_knn() -> float:
        hits = 0
        for begin in range(0, len(gallery), 4096):
            queries = gallery[begin:begin + 4096]
            similarities = queries @ gallery.T
            rows = torch.arange(len(queries), device=device)
            similarities[rows, rows + begin] = -float("inf")  # the query itself
            _, neighbours = similarities.topk(sizes.knn_k - 1, dim=1)
            hits += int((gallery_labels[neighbours[:, 0]] == gallery_labels[begin:begin + 4096]).sum())
        if device == "cuda":
            torch.cuda.synchronize()
        return hits / len(gallery)

    result["torch_knn_recall@1"] = round(timed("torch_knn", torch_knn), 4)
    for name in ("device", "device_super", "host_path", "jax_knn"):
        result[f"ratio_{name}_over_torch_knn"] = round(result[f"{name}_s"][1] / result["torch_knn_s"][1], 2)
    return result


def kmeans_refresh(sizes: Sizes) -> Dict[str, Any]:
    from hpl_jax.core import kmeans

    embeddings, labels, _ = retrieval_benchmark.planted_embeddings(
        sizes.test_items, sizes.test_classes, 12, sizes.dim, 2, 12, 2.3, 1)
    proxies = np.random.default_rng(0).normal(size=(sizes.sop_classes, sizes.dim)).astype(np.float32)
    result: Dict[str, Any] = {}
    for name, points, k in (("refresh", proxies, sizes.sop_coarse), ("nmi", embeddings, sizes.test_classes)):
        seconds = []
        for seed in range(2):  # the first call compiles
            start = time.perf_counter()
            clustering = kmeans.kmeans(points, k, seed=seed)
            jax.block_until_ready(clustering.assignment)
            seconds.append(time.perf_counter() - start)
        result[f"{name}_s"] = [round(s, 3) for s in seconds]
        result[f"{name}_shape"] = f"{len(points)} into {k}"
        result[f"{name}_iterations"] = int(clustering.num_iterations)
    return result


def end_to_end(sizes: Sizes) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "hpl_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
                   *sizes.end_to_end_overrides]
        start = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    output = (finished.stdout + finished.stderr).strip().splitlines()
    if finished.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} exited {finished.returncode}: " + " | ".join(output[-5:]))
    table = [line for line in output if line.split()[:1] in (["recall@1"], ["map@r"], ["metric"])]
    return {"wall_s": round(seconds, 1), "command": " ".join(command[1:]), "final_table": table}


def environment() -> Dict[str, Any]:
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "ml_collections", "tensorboardX",
                 "sklearn", "torch", "torchvision"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            versions[name] = None
    return {"python": platform.python_version(), "versions": versions,
            "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
            "host_cpus": os.cpu_count()}


def stages(sizes: Sizes, dry_run: bool) -> List[tuple]:
    """(name, function) in run order: the step comparisons first, the long end-to-end run last."""
    torch_train = functools.partial(torch_train_step, dry_run=dry_run)
    return [
        ("env", environment),
        ("train_cub_jax", functools.partial(jax_train_step, sizes, sizes.cub_classes, sizes.cub_coarse, sizes.batch)),
        ("train_cub_torch", functools.partial(torch_train, sizes, sizes.cub_classes, sizes.batch)),
        ("train_cub_jax_pmap", functools.partial(jax_train_step, sizes, sizes.cub_classes, sizes.cub_coarse,
                                                 sizes.batch, wrapper="pmap")),
        ("train_sop_jax", functools.partial(jax_train_step, sizes, sizes.sop_classes, sizes.sop_coarse, sizes.batch)),
        ("train_sop_torch", functools.partial(torch_train, sizes, sizes.sop_classes, sizes.batch)),
        ("train_sop_b360_jax", functools.partial(jax_train_step, sizes, sizes.sop_classes, sizes.sop_coarse,
                                                 sizes.big_batch)),
        ("train_sop_b360_torch", functools.partial(torch_train, sizes, sizes.sop_classes, sizes.big_batch)),
        ("loss_sop", functools.partial(loss_alone, sizes)),
        ("retrieval_sop", functools.partial(retrieval, sizes)),
        ("kmeans_sop", functools.partial(kmeans_refresh, sizes)),
        ("default_end_to_end", functools.partial(end_to_end, sizes)),
    ]


# --------------------------------------------------------------------------------------------- the report
def markdown(results: Dict[str, Any]) -> str:
    """The results as a Markdown page: the JAX / PyTorch pairs as a table, then each other stage."""
    lines = ["# Device check", "", f"Written by `python -m hpl_jax.benchmarks.device_check` "
             f"({'dry run' if results['dry_run'] else 'full sizes'}), {results['finished_stages']} of "
             f"{results['total_stages']} stages done in {results['elapsed_s']} s.", ""]
    env = results["stages"].get("env", {})
    if "devices" in env:
        lines += [f"Devices: {', '.join(env['devices'])}; host CPUs {env['host_cpus']}; Python {env['python']}; "
                  + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), ""]
    lines += ["| train step | JAX images/s | JAX ms/step | JAX compile s | JAX peak GiB | PyTorch images/s | "
              "PyTorch ms/step | PyTorch peak GiB | JAX / PyTorch |", "|---|---|---|---|---|---|---|---|---|"]
    for pair in ("train_cub", "train_sop", "train_sop_b360"):
        ours = results["stages"].get(f"{pair}_jax", {})
        theirs = results["stages"].get(f"{pair}_torch", {})
        if "images_per_s" not in ours:
            lines.append(f"| {pair} | {ours.get('error') or ours.get('skipped') or 'not run'} | | | | | | | |")
            continue
        label = f"{pair} (batch {ours['batch']}, proxies {ours['proxies']})"
        if "images_per_s" in theirs:
            ratio = f"{ours['images_per_s'] / theirs['images_per_s']:.2f}"
            torch_cells = f"{theirs['images_per_s']} | {theirs['ms_per_step']} | {theirs['peak_device_gib']}"
        else:
            ratio, torch_cells = "", f"{theirs.get('error') or theirs.get('skipped') or 'not run'} | |"
        lines.append(f"| {label} | {ours['images_per_s']} | {ours['ms_per_step']} | {ours['compile_s']} | "
                     f"{ours['peak_device_gib']} | {torch_cells} | {ratio} |")
    lines.append("")
    for name in ("train_cub_jax_pmap", "loss_sop", "retrieval_sop", "kmeans_sop", "default_end_to_end"):
        if name in results["stages"]:
            lines += [f"## {name}", "", "```", json.dumps(results["stages"][name], indent=1), "```", ""]
    return "\n".join(lines)


def write(results: Dict[str, Any], out: str) -> None:
    """Both files, each replaced atomically (a run killed mid-write keeps the previous stage's)."""
    for name, text in (("device_check.json", json.dumps(results, indent=1)), ("device_check.md", markdown(results))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)


def run(out: str, dry_run: bool, budget_s: float, only: Optional[List[str]] = None) -> Dict[str, Any]:
    sizes = DRY if dry_run else FULL
    selected = [(name, fn) for name, fn in stages(sizes, dry_run) if not only or name in only or name == "env"]
    os.makedirs(out, exist_ok=True)
    results: Dict[str, Any] = {"dry_run": dry_run, "sizes": dataclasses.asdict(sizes), "stages": {},
                               "total_stages": len(selected), "finished_stages": 0, "elapsed_s": 0.0}
    start = time.perf_counter()
    for name, fn in selected:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            results["stages"][name] = {"skipped": f"--budget_s {budget_s:.0f} s passed ({elapsed:.0f} s)"}
        else:
            stage_start = time.perf_counter()
            try:
                results["stages"][name] = fn()
                results["finished_stages"] += 1
            except ImportError as error:
                results["stages"][name] = {"skipped": f"{type(error).__name__}: {error}"}
            except Exception as error:  # noqa: BLE001  (a stage's failure is a result; the next stage runs)
                results["stages"][name] = {"error": f"{type(error).__name__}: {error}",
                                           "traceback": traceback.format_exc().splitlines()[-6:]}
            results["stages"][name]["stage_s"] = round(time.perf_counter() - stage_start, 1)
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        print(f"[device_check {results['elapsed_s']:7.1f} s] {name}: {json.dumps(results['stages'][name])}",
              flush=True)
        write(results, out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for device_check.json and device_check.md")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes: every stage in seconds on a CPU")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="stages that would start after this many seconds are skipped")
    parser.add_argument("--only", default="", help="comma-separated stage names (env always runs)")
    args = parser.parse_args()
    run(args.out, args.dry_run, args.budget_s, [s for s in args.only.split(",") if s] or None)


if __name__ == "__main__":
    main()
