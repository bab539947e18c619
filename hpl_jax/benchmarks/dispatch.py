"""Per-step dispatch overhead of a multi-process run: `jax.pmap` against `jax.jit` of `jax.shard_map` on a global mesh.

  python -m hpl_jax.benchmarks.dispatch [--num_processes=2 --devices_per_process=1 --steps=200]

Starts `--num_processes` local CPU processes joined by jax.distributed (gloo collectives, as
launch/local_multiprocess.sh does). In each, one step function with a negligible body (a psum of the batch over
every device of every process, and each state leaf nudged by it: the train step's collective, not its work) runs
`--steps` times over a state of one of two shapes:
- small: 10 leaves;
- resnet50: the tree of a ResNet-50 + embedding train state with its AdamW moments and 2 proxy levels (the
  leaf count of configs/sop.py), every leaf of 8 floats, so that only the per-leaf cost shows;
each wrapped two ways, with the state donated and the batch prepared from host-local NumPy at every step, as the
loop does:
- pmap: the state replicated over the local devices ([local_devices, ...], sharding.replicate), the batch put
  on the local devices (data.prefetch_to_devices's layout);
- jit + shard_map: the state a global array replicated over a Mesh of every device, the batch a global array
  made from each process's rows (jax.make_array_from_process_local_data); the same body by axis name.
Process 0 prints the median over 5 rounds of the milliseconds per step of each (after 10 warm-up steps).
"""
from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import subprocess
import sys
import time


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--process_id", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--port", type=int, default=0, help="set by the launcher")
    return parser.parse_args(argv)


def launch(args) -> int:
    """Runs every process of the measurement on this machine; returns the first non-zero exit code, else 0."""
    sock = socket.socket()
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={args.devices_per_process}".strip())
    processes = [subprocess.Popen(
        [sys.executable, "-m", "hpl_jax.benchmarks.dispatch", f"--num_processes={args.num_processes}",
         f"--devices_per_process={args.devices_per_process}", f"--steps={args.steps}", f"--rounds={args.rounds}",
         f"--process_id={i}", f"--port={port}"], env=env,
        stdout=None if i == 0 else subprocess.DEVNULL, stderr=None if i == 0 else subprocess.DEVNULL)
        for i in range(args.num_processes)]
    codes = [p.wait() for p in processes]
    return next((code for code in codes if code), 0)


def state_trees(jax, np):
    """{'small': 10 leaves, 'resnet50': the leaf structure of configs/sop.py's train state}, leaves f32[8]."""
    import jax.numpy as jnp
    from configs import sop
    from hpl_jax import models
    from hpl_jax.core import hierarchy as hierarchy_lib
    from hpl_jax.trainer import optim
    from hpl_jax.trainer.train_state import trainable

    config = sop.get_config()
    model = models.create_model(config.model, bn_axis_name=None)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, 32, 32, 3), jnp.float32))
    hierarchy = hierarchy_lib.ProxyHierarchy(proxies=(np.zeros((4, 8), np.float32), np.zeros((2, 8), np.float32)),
                                             parents=(np.zeros(4, np.int32),))
    tree = trainable(shapes["params"], hierarchy)
    labels, groups = optim.parameter_groups(tree, config.optim)
    opt_shapes = jax.eval_shape(optim.create_optimizer(labels, groups, config.optim).init, tree)
    full = {"params": shapes["params"], "batch_stats": shapes["batch_stats"], "hierarchy": hierarchy,
            "opt_state": opt_shapes}
    tiny = lambda _: np.zeros(8, np.float32)  # noqa: E731
    return {"small": [np.zeros(8, np.float32) for _ in range(10)],
            "resnet50": jax.tree_util.tree_map(tiny, full)}


def body(state, batch, *, axis_name):
    """The per-device step: one collective over every device, every leaf touched."""
    import jax
    total = jax.lax.psum(batch.sum(), axis_name)
    return jax.tree_util.tree_map(lambda x: x * 0.999 + total * 1e-9, state), total


def measure(args) -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
    from hpl_jax import data
    from hpl_jax.trainer.sharding import replicate

    lead = jax.process_index() == 0
    local_devices = jax.local_device_count()
    local_batch = np.ones((local_devices * 4, 16), np.float32)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    local_sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("devices",)), P("devices"))

    def run_pmap(tree):
        step = jax.pmap(functools.partial(body, axis_name="batch"), axis_name="batch", donate_argnums=(0,))
        state = replicate(tree, "batch")

        def one(state):
            batch = jax.device_put(data.shard_for_devices(local_batch, local_devices), local_sharding)
            return step(state, batch)
        return state, one

    def run_shard_map(tree):
        step = jax.jit(jax.shard_map(functools.partial(body, axis_name="batch"), mesh=mesh,
                                     in_specs=(P(), P("batch")), out_specs=(P(), P())), donate_argnums=(0,))
        state = jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(replicated, x), tree)

        def one(state):
            batch = jax.make_array_from_process_local_data(rows, local_batch)
            return step(state, batch)
        return state, one

    for name, tree in state_trees(jax, np).items():
        num_leaves = len(jax.tree_util.tree_leaves(tree))
        for wrapper, make in (("pmap", run_pmap), ("jit + shard_map", run_shard_map)):
            state, one = make(tree)
            for _ in range(10):
                state, total = one(state)
            jax.block_until_ready(total)
            per_step = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.steps):
                    state, total = one(state)
                jax.block_until_ready((state, total))
                per_step.append((time.perf_counter() - start) / args.steps * 1e3)
            if lead:
                print(f"{name} state ({num_leaves} leaves), {wrapper}: {statistics.median(per_step):.2f} ms/step "
                      f"(rounds: {' '.join(f'{t:.2f}' for t in per_step)})", flush=True)
            del state
    if lead:
        print(f"{jax.process_count()} processes x {local_devices} CPU device(s); load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def main() -> None:
    args = _parse_args()
    if args.process_id < 0:
        sys.exit(launch(args))
    measure(args)


if __name__ == "__main__":
    main()
