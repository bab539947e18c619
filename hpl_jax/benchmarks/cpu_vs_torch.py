"""The train step on a CPU against its PyTorch peer, and where the JAX step's time goes (issue 25).

    python -m hpl_jax.benchmarks.cpu_vs_torch [--conv_impls auto,xla] [--steps 8] [--repeats 2]
    python -m hpl_jax.benchmarks.cpu_vs_torch --width 0.25 --embedding_dim 64 --image_size 32  # the embedded default

JAX: `train.train_step` of configs/default.py with ResNet-18 at width 1.0, a 512-d embedding, 64 x 64 images,
batch 64 (each flag changes one; width 0.25, 64-d, 32 px is the embedded default's model), HPL on
Proxy-Anchor, float32, under pmap on the local devices (one CPU device by default), once per
`model.conv_impl` asked for ('xla': XLA's convolution op, as on GPUs and TPUs and before issue 25; 'auto': the
CPU choice, see hpl_jax/models/layers.py).
PyTorch (benchmark-only imports; skipped with a line when torch or pytorch-metric-learning is absent): the
official Proxy-Anchor step on the same shapes: ResNet-18 in torchvision's layout (every layer's channels scaled by
the width as the JAX model scales them), written out below since
torchvision may not be importable beside the installed torch (same layers, same parameter count, printed),
average + max pooling summed, a linear layer to the embedding, pytorch-metric-learning's ProxyAnchorLoss (alpha 32,
margin 0.1), AdamW (weight decay 1e-4) with the proxies at 100x, gradients clipped to [-10, 10].
PyTorch runs in a process of its own (TorchPeer: in one process the two frameworks' OpenMP runtimes slowed
PyTorch's step by 15-20%), as a user runs it. Both sides train in train-mode BatchNorm on one fixed random batch
(no data loading), `steps` timed steps after two warm-up steps; the sides take turns within each repeat, so load
from other processes hits them alike. Printed: how each conv_impl computes the convolutions, images/s per side and
repeat, the medians, and the ratio JAX / PyTorch.

The profile times jitted pieces of the JAX step one by one, on one device: every convolution of the model
(forward; the backward's input gradient and kernel gradient, with the implementation the model uses for it),
every BatchNorm (train mode, forward and backward), the HPL loss (value and gradient w.r.t. the embeddings and
the proxies), and the optimiser (AdamW update + apply). What the pieces leave of the step is ReLU, pooling,
residual adds, the head and the copies between the pieces. Where torch is installed, each convolution pass is also
timed in PyTorch (in its process) on the same convolutions (its forward, input gradient and weight gradient), beside
ours.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hpl_jax import data
from hpl_jax import models
from hpl_jax.core import losses
from hpl_jax.trainer import optim
from hpl_jax.trainer import sharding
from hpl_jax.trainer import train
from hpl_jax.trainer import train_state
from configs import default

NUM_CLASSES = 32  # the default dataset's training classes (40, less 8 held out for validation)
WARMUP_STEPS = 2


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conv_impls", default="auto,xla", help="model.conv_impl values to time, comma-separated")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18's width multiplier (model.width)")
    parser.add_argument("--embedding_dim", type=int, default=512)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--no_profile", action="store_true", help="skip the profile of the JAX step")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # TorchPeer's process
    args = parser.parse_args()
    if not args.width > 0 or args.embedding_dim < 1:
        parser.error(f"--width must be above 0 and --embedding_dim at least 1 (got {args.width} and "
                     f"{args.embedding_dim})")
    return args


def benchmark_config(conv_impl: str, batch: int, image_size: int, width: float = 1.0, embedding_dim: int = 512):
    """configs/default.py at the issue's shapes (ResNet-18 x1.0, 512-d) or others, HPL-PA, float32."""
    config = default.get_config()
    config.model.width = width
    config.model.embedding_dim = embedding_dim
    config.model.conv_impl = conv_impl
    config.dataset.image_size = image_size
    config.batch_size = batch
    return config


def random_batch(batch: int, image_size: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """{'image': f32[batch, size, size, 3] N(0, 1), 'label': i32[batch] uniform over the classes}."""
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}


def jax_side(config, batch) -> Callable[[], None]:
    """One pmapped train step (after warm-up: the backbone trains) per call, over the local devices."""
    info = data.DatasetInfo(name="synthetic", num_train_classes=NUM_CLASSES, num_train_examples=10 * config.batch_size,
                            image_shape=(config.dataset.image_size,) * 2 + (3,), eval_splits=("test",),
                            num_eval_examples={"test": config.batch_size})
    model = models.create_model(config.model, bn_axis_name=train.AXIS)
    state = train_state.create_train_state(jax.random.PRNGKey(0), config, model, info)
    labels, groups = optim.parameter_groups(train_state.trainable(state.params, state.hierarchy), config.optim)
    step_fn = jax.pmap(train.create_train_step(config, model, labels, groups, in_warmup=False),
                       axis_name=train.AXIS, donate_argnums=(0,))
    sharded = data.shard_for_devices(batch, jax.local_device_count())
    holder = {"state": sharding.replicate(state, train.AXIS)}

    def step():
        holder["state"], metrics = step_fn(holder["state"], sharded)
        jax.block_until_ready(metrics)

    return step


def torch_side(batch, embedding_dim: int = 512, width: float = 1.0):
    """(one step of the official Proxy-Anchor recipe in PyTorch per call, the model it trains); raises ImportError
    without torch/pml."""
    import torch  # benchmark-only: not a dependency of the project
    from pytorch_metric_learning import losses as pml_losses

    torch.manual_seed(0)
    model = torch_embedder(torch, embedding_dim, width)
    model.train()
    loss_fn = pml_losses.ProxyAnchorLoss(NUM_CLASSES, embedding_dim, margin=0.1, alpha=32)
    lr = default.get_config().optim.lr
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                                   {"params": loss_fn.parameters(), "lr": 100 * lr}], weight_decay=1e-4)
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(batch["label"].astype(np.int64))

    def step():
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 10)
        torch.nn.utils.clip_grad_value_(loss_fn.parameters(), 10)
        optimizer.step()

    return step, model


def torch_embedder(torch, embedding_dim: int, width: float = 1.0):
    """torchvision's resnet18 (v1.5, kaiming-normal fan-out convs, BN weight 1 / bias 0) without its fc, its channels
    scaled by `width` (models.scaled_channels), then the official Proxy-Anchor head: adaptive avg + max pooling
    summed, Linear to d (kaiming fan-out, bias 0)."""
    tnn = torch.nn

    def conv_bn(cin, cout, kernel, stride, padding):
        conv = tnn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        tnn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return tnn.Sequential(conv, tnn.BatchNorm2d(cout))

    class BasicBlock(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.branch = tnn.Sequential(conv_bn(cin, cout, 3, stride, 1), tnn.ReLU(inplace=True),
                                         conv_bn(cout, cout, 3, 1, 1))
            self.downsample = conv_bn(cin, cout, 1, stride, 0) if stride != 1 or cin != cout else tnn.Identity()

        def forward(self, x):
            return torch.relu(self.branch(x) + self.downsample(x))

    class Embedder(tnn.Module):
        def __init__(self):
            super().__init__()
            cin = models.scaled_channels(64, width)
            layers = [conv_bn(3, cin, 7, 2, 3), tnn.ReLU(inplace=True), tnn.MaxPool2d(3, 2, 1)]
            for stage in range(4):
                cout = models.scaled_channels(64 * 2**stage, width)
                layers += [BasicBlock(cin, cout, 2 if stage else 1), BasicBlock(cout, cout, 1)]
                cin = cout
            self.backbone = tnn.Sequential(*layers)
            self.embedding = tnn.Linear(cin, embedding_dim)
            tnn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")
            tnn.init.zeros_(self.embedding.bias)

        def forward(self, x):
            x = self.backbone(x)
            return self.embedding(torch.amax(x, dim=(2, 3)) + torch.mean(x, dim=(2, 3)))

    return Embedder()


def trunk_size(config) -> int:
    """The number of parameters of the JAX model's backbone (what torchvision's resnet18 has without its fc)."""
    model = models.create_model(config.model)
    images = jnp.zeros((1, config.dataset.image_size, config.dataset.image_size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]["backbone"]))


def images_per_second(step: Callable[[], None], batch: int, steps: int) -> float:
    """batch / the median wall time of `steps` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def median_ms(fn: Callable, *args, repeats: int = 3) -> float:
    """Median wall time of fn(*args) in ms after one untimed (compiling) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def recorded_layers(model, images) -> List[tuple]:
    """The convolutions and BatchNorms a training forward pass calls, in order: ('conv', nn.Conv, input
    ShapeDtypeStruct) and ('bn', nn.BatchNorm, input ShapeDtypeStruct), read from an abstract (eval_shape) pass."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.BatchNorm)):
            kind = "conv" if isinstance(context.module, nn.Conv) else "bn"
            calls.append((kind, context.module, jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
    return calls


def conv_times(module: nn.Conv, x_shape, needs_input_grad: bool) -> Dict[str, float]:
    """ms of one convolution's forward, input gradient and kernel gradient, computed as `module` computes it."""
    conv_fn = functools.partial(module.conv_general_dilated, window_strides=module.strides, padding=module.padding,
                                dimension_numbers=models.NHWC_DIMENSION_NUMBERS)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape.shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=module.kernel_size + (x_shape.shape[-1], module.features)) * 0.05, jnp.float32)
    y = jax.eval_shape(conv_fn, x, w)
    ct = jnp.ones(y.shape, jnp.float32)
    forward = jax.jit(conv_fn)
    input_grad = jax.jit(lambda x, w, ct: jax.vjp(lambda x: conv_fn(x, w), x)[1](ct)[0])
    kernel_grad = jax.jit(lambda x, w, ct: jax.vjp(lambda w: conv_fn(x, w), w)[1](ct)[0])
    return {"forward": median_ms(forward, x, w),
            "input_grad": median_ms(input_grad, x, w, ct) if needs_input_grad else 0.0,
            "kernel_grad": median_ms(kernel_grad, x, w, ct)}


def conv_geometry(module: nn.Conv, x_shape) -> dict:
    """What the PyTorch peer needs to time the same convolution: plain numbers, sent to its process as JSON."""
    (top, bottom), (left, right) = module.padding
    assert top == bottom and left == right, module.padding  # the backbones pad as PyTorch does (models/layers.py)
    return {"x_shape": list(x_shape.shape), "features": module.features, "kernel_size": list(module.kernel_size),
            "strides": list(module.strides), "padding": [top, left]}


def torch_conv_times(torch, geometry: dict, needs_input_grad: bool) -> Dict[str, float]:
    """ms of a convolution's (conv_geometry) forward, input gradient and weight gradient in PyTorch (NCHW, its own
    kernels: torch.ops.aten.convolution_backward), on PyTorch's threads."""
    rng = np.random.default_rng(0)
    n, h, w, c = geometry["x_shape"]
    x = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32))
    weight = torch.from_numpy((rng.normal(size=[geometry["features"], c] + geometry["kernel_size"]) * 0.05)
                              .astype(np.float32))
    strides, padding = geometry["strides"], geometry["padding"]
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, weight, stride=strides, padding=padding)
        ct = torch.ones_like(y)

        def backward(input_grad: bool, weight_grad: bool):
            return torch.ops.aten.convolution_backward(ct, x, weight, None, strides, padding, [1, 1], False, [0, 0],
                                                       1, [input_grad, weight_grad, False])

        return {"forward": median_ms(lambda: torch.nn.functional.conv2d(x, weight, stride=strides, padding=padding)),
                "input_grad": median_ms(lambda: backward(True, False)) if needs_input_grad else 0.0,
                "kernel_grad": median_ms(lambda: backward(False, True))}


def batch_norm_times(x_shape) -> Dict[str, float]:
    """ms of a train-mode BatchNorm's forward (with its running-statistics update) and backward."""
    bn = models.batch_norm(None, jnp.float32, "bn")
    x = jnp.asarray(np.random.default_rng(0).normal(size=x_shape.shape), jnp.float32)
    variables = bn.init(jax.random.key(0), x, use_running_average=True)

    def apply(params, x):
        return bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, use_running_average=False,
                        mutable=["batch_stats"])

    y, _ = jax.eval_shape(apply, variables["params"], x)
    ct = jnp.ones(y.shape, jnp.float32)
    forward = jax.jit(apply)
    backward = jax.jit(lambda p, x, ct: jax.vjp(lambda p, x: apply(p, x)[0], p, x)[1](ct))
    return {"forward": median_ms(forward, variables["params"], x),
            "backward": median_ms(backward, variables["params"], x, ct)}


def profile(config, batch, step_ms: float, peer: Optional["TorchPeer"] = None) -> None:
    """Prints where the time of one JAX train step goes (see the module docstring); with the PyTorch `peer`, each
    convolution pass beside PyTorch's time for the same convolutions."""
    model = models.create_model(config.model)
    images = jnp.asarray(batch["image"])
    totals = {"conv forward": 0.0, "conv backward (input grad)": 0.0, "conv backward (kernel grad)": 0.0,
              "BatchNorm forward": 0.0, "BatchNorm backward": 0.0}
    torch_totals = {name: 0.0 for name in totals if name.startswith("conv")}
    cache = {}
    for index, (kind, module, x_shape) in enumerate(recorded_layers(model, images)):
        # The first layer's input is the image, which the step never differentiates.
        key = (kind, x_shape.shape, getattr(module, "kernel_size", None), getattr(module, "strides", None),
               getattr(module, "features", None), index == 0)
        if key not in cache:
            cache[key] = (conv_times(module, x_shape, needs_input_grad=index > 0) if kind == "conv"
                          else batch_norm_times(x_shape))
            if kind == "conv" and peer is not None:
                cache[key + ("torch",)] = peer.conv_times(conv_geometry(module, x_shape), needs_input_grad=index > 0)
        times = cache[key]
        if kind == "conv":
            for sums, side in ((totals, times), (torch_totals, cache.get(key + ("torch",)))):
                if side is not None:
                    sums["conv forward"] += side["forward"]
                    sums["conv backward (input grad)"] += side["input_grad"]
                    sums["conv backward (kernel grad)"] += side["kernel_grad"]
        else:
            totals["BatchNorm forward"] += times["forward"]
            totals["BatchNorm backward"] += times["backward"]

    info = data.DatasetInfo(name="synthetic", num_train_classes=NUM_CLASSES, num_train_examples=10 * config.batch_size,
                            image_shape=images.shape[1:], eval_splits=("test",), num_eval_examples={"test": 1})
    state = train_state.create_train_state(jax.random.PRNGKey(0), config, model, info)
    embeddings = jax.random.normal(jax.random.key(1), (config.batch_size, config.model.embedding_dim))
    base_loss = train.create_base_loss(config.loss)
    loss_grad = jax.jit(jax.value_and_grad(
        lambda e, proxies, labels: losses.hierarchical_proxy_loss(
            e, labels, state.hierarchy.replace(proxies=proxies), base_loss=base_loss,
            weights=tuple(config.hpl.weights))[0], argnums=(0, 1)))
    totals["HPL loss (value + grad)"] = median_ms(loss_grad, embeddings, state.hierarchy.proxies,
                                                 jnp.asarray(batch["label"]))
    tree = train_state.trainable(state.params, state.hierarchy)
    labels, groups = optim.parameter_groups(tree, config.optim)
    optimizer = optim.create_optimizer(labels, groups, config.optim)
    grads = jax.tree_util.tree_map(lambda leaf: jnp.full_like(leaf, 1e-3), tree)

    def optimiser_step(grads, opt_state, tree):
        updates, opt_state = optimizer.update(grads, opt_state, tree, in_warmup=False)
        return optax.apply_updates(tree, updates), opt_state

    totals["optimiser (AdamW update + apply)"] = median_ms(jax.jit(optimiser_step), grads, state.opt_state, tree)
    pieces = sum(totals.values())
    print(f"  profile of the JAX step, conv_impl {config.model.conv_impl!r} (pieces jitted and timed alone, ms, "
          "share of their sum):")
    for name, ms in totals.items():
        beside = (f"   PyTorch {torch_totals[name]:7.1f} ms: ours {ms / torch_totals[name]:.1f}x its time"
                  if peer is not None and name in torch_totals else "")
        print(f"    {name:34s} {ms:8.1f}  {100 * ms / pieces:5.1f}%{beside}")
    # Timed alone, a piece misses the fusions and overlap it has inside the step, and sees other load.
    print(f"    {'sum of the pieces':34s} {pieces:8.1f}   against the step's {step_ms:.1f} ms (median above); the "
          f"difference, {step_ms - pieces:.1f} ms, is ReLU, pooling, adds, the head, copies, and timing noise")


class TorchPeer:
    """The PyTorch side in a process of its own (`--peer`), driven over its stdin and stdout one JSON line at a time.

    Why not in this process: both frameworks run oneDNN on OpenMP threads, each with its own OpenMP runtime, and
    beside the JAX side's loaded oneDNN PyTorch's step lost 15-20% of its speed (139 -> 115 images/s at the bench
    size); a user runs one of them per process. Idle, the peer waits on a read and takes no CPU from the JAX side.
    """

    def __init__(self, batch: int, image_size: int, width: float, embedding_dim: int):
        command = [sys.executable, "-m", "hpl_jax.benchmarks.cpu_vs_torch", "--peer", f"--batch={batch}",
                   f"--image_size={image_size}", f"--width={width}", f"--embedding_dim={embedding_dim}"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.ready = self._receive()  # {'torch': version, 'threads': n, 'trunk': parameters} or {'error': why}

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch peer process ended (exit status {self.process.wait()})")
        return json.loads(line)

    def _ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._receive()

    def warm_up(self, steps: int) -> None:
        self._ask(op="warm_up", steps=steps)

    def images_per_second(self, steps: int) -> float:
        return self._ask(op="rate", steps=steps)["images_per_second"]

    def conv_times(self, geometry: dict, needs_input_grad: bool) -> Dict[str, float]:
        return self._ask(op="conv_times", geometry=geometry, needs_input_grad=needs_input_grad)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def serve_peer(args) -> None:
    """`--peer`: the PyTorch side, answering TorchPeer's requests until its stdin closes."""
    try:
        import torch  # benchmark-only: not a dependency of the project
        step, model = torch_side(random_batch(args.batch, args.image_size), args.embedding_dim, args.width)
    except ImportError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "trunk": sum(p.numel() for p in model.backbone.parameters())}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "warm_up":
            for _ in range(request["steps"]):
                step()
            answer = {}
        elif request["op"] == "rate":
            answer = {"images_per_second": images_per_second(step, args.batch, request["steps"])}
        else:
            answer = torch_conv_times(torch, request["geometry"], request["needs_input_grad"])
        print(json.dumps(answer), flush=True)


def load_average() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    args = _parse_args()
    if args.peer:
        serve_peer(args)
        return
    batch = random_batch(args.batch, args.image_size)
    sides = {}  # name -> (config or None, warm_up(steps), images_per_second(steps))
    for conv_impl in args.conv_impls.split(","):
        config = benchmark_config(conv_impl, args.batch, args.image_size, args.width, args.embedding_dim)
        step = jax_side(config, batch)
        sides[f"jax conv_impl={conv_impl}"] = (config, functools.partial(_repeat, step),
                                               functools.partial(images_per_second, step, args.batch))
    peer = None
    if args.no_torch:
        print("PyTorch peer: skipped (--no_torch)")
    else:
        peer = TorchPeer(args.batch, args.image_size, args.width, args.embedding_dim)
        if "error" in peer.ready:
            print(f"PyTorch peer: skipped ({peer.ready['error']}; pip install torch pytorch-metric-learning to run "
                  f"it)")
            peer.close()
            peer = None
        else:
            print(f"PyTorch {peer.ready['torch']} peer in its own process, {peer.ready['threads']} threads; its "
                  f"ResNet-18 trunk has {peer.ready['trunk']:,} parameters (ours: {trunk_size(config):,}; "
                  f"torchvision's resnet18 without fc, width 1: {11_689_512 - 513_000:,})")
            sides["pytorch"] = (None, peer.warm_up, peer.images_per_second)

    print(f"ResNet-18 x{args.width:g}, {args.embedding_dim}-d, {args.image_size} px, batch {args.batch}, HPL-PA, "
          f"float32; JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); {args.steps} "
          f"timed steps after {WARMUP_STEPS} warm-up steps, {args.repeats} repeats taking turns")
    for config, _, _ in sides.values():
        if config is not None:
            print(f"  jax conv_impl={config.model.conv_impl}: "
                  f"{models.describe_conv_impl(models.resolve_conv_impl(config.model.conv_impl))}")
    for _, warm_up, _ in sides.values():
        warm_up(WARMUP_STEPS)
    rates = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, (_, _, rate) in sides.items():
            rates[name].append(rate(args.steps))
            print(f"  repeat {repeat}: {name:24s} {rates[name][-1]:7.1f} images/s   ({load_average()})", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        line = f"{name:24s} {value:7.1f} images/s (median)"
        if "pytorch" in medians and name != "pytorch":
            per_repeat = " / ".join(f"{a / b:.2f}" for a, b in zip(rates[name], rates["pytorch"]))
            line += f"  = {value / medians['pytorch']:.2f}x PyTorch (per repeat {per_repeat})"
        print(line)
    if not args.no_profile:
        for name, (config, _, _) in sides.items():
            if config is not None:
                profile(config, batch, 1e3 * args.batch / medians[name], peer)
    if peer is not None:
        peer.close()
    print(f"({load_average()} at the end)")


def _repeat(step: Callable[[], None], times: int) -> None:
    for _ in range(times):
        step()


if __name__ == "__main__":
    main()
