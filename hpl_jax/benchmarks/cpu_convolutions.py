"""ResNet-18's convolutions on a CPU, one at a time: XLA's op against oneDNN's (and im2col's), forward and both
gradients, the figures behind `models.layers.cpu_conv_choice` (which 'auto' uses on a CPU).

    python -m hpl_jax.benchmarks.cpu_convolutions [--batch 64] [--repeats 15] [--widths 1,0.25]

Every distinct 3x3 and 7x7 convolution of ResNet-18 at width 1 (64 px images) and 0.25 (32 px, the embedded
default's model) whose feature maps are not smaller than its kernel (those go to im2col in 'auto'), and the 1x1
downsampling convolutions; each timed as jit(grad(sum(conv(x, k)^2))) w.r.t. x and k, the implementations taking
turns `repeats` times, so the machine's drift between minutes hits them alike. Printed: the median ms of each,
oneDNN's time over XLA's, and what 'auto' picks.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hpl_jax import models
from hpl_jax.models import layers, onednn

# (input side, C_in, C_out, kernel, stride, padding) at width 1 and 64 px; scaled by the width and image size.
RESNET18_CONVOLUTIONS = [(64, 3, 64, 7, 2, 3), (16, 64, 64, 3, 1, 1), (16, 64, 128, 3, 2, 1), (16, 64, 128, 1, 2, 0),
                         (8, 128, 128, 3, 1, 1), (8, 128, 256, 3, 2, 1), (8, 128, 256, 1, 2, 0),
                         (4, 256, 256, 3, 1, 1), (4, 256, 512, 1, 2, 0)]


def geometries(width: float) -> List[Tuple[int, int, int, int, int, int]]:
    """ResNet-18's convolutions at `width` (64 px at width 1, 32 px below it, as the embedded default)."""
    scale = 1 if width >= 1 else 2
    out = []
    for side, c_in, c_out, kernel, stride, padding in RESNET18_CONVOLUTIONS:
        c_in = c_in if c_in == 3 else models.scaled_channels(c_in, width)
        out.append((side // scale, c_in, models.scaled_channels(c_out, width), kernel, stride, padding))
    return [g for g in out if not layers.smaller_than_kernel((1, g[0], g[0], g[1]), (g[3], g[3]), (g[4], g[4]),
                                                             ((g[5], g[5]), (g[5], g[5])))]


def time_turns(functions: Dict[str, Callable], args, repeats: int) -> Dict[str, float]:
    """Median ms of each function on `args`, after one untimed call each, the functions taking turns."""
    for fn in functions.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def compare(batch: int, geometry, repeats: int) -> Dict[str, float]:
    side, c_in, c_out, kernel, stride, padding = geometry
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, side, side, c_in)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out)) * 0.05, jnp.float32)
    conv_args = ((stride, stride), ((padding, padding), (padding, padding)))
    implementations = {"xla": lax.conv_general_dilated, "onednn": models.onednn_conv, "im2col": models.im2col_conv}
    functions = {name: jax.jit(jax.grad(
        lambda x, k, conv=conv: jnp.sum(conv(x, k, *conv_args, dimension_numbers=models.NHWC_DIMENSION_NUMBERS) ** 2),
        argnums=(0, 1))) for name, conv in implementations.items()}
    return time_turns(functions, (x, k), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--widths", default="1,0.25", help="ResNet-18 width multipliers, comma-separated")
    args = parser.parse_args()
    state = onednn.status()
    if not state.available:
        parser.error(f"oneDNN is unavailable here: {state.detail}")
    print(f"{state.detail}; JAX {jax.__version__}, batch {args.batch}, medians of {args.repeats} turns, ms of "
          f"forward + both gradients")
    for width in (float(w) for w in args.widths.split(",")):
        for geometry in geometries(width):
            ms = compare(args.batch, geometry, args.repeats)
            side, c_in, c_out, kernel, stride, padding = geometry
            choice = layers.cpu_conv_choice((args.batch, side, side, c_in), (kernel, kernel, c_in, c_out),
                                            (stride, stride), ((padding, padding), (padding, padding)))
            picks = {"onednn": "oneDNN", "xla": "XLA", "im2col": "im2col"}[choice]
            print(f"  width {width:g}: {kernel}x{kernel}/{stride} {c_in:3d} -> {c_out:3d} on {side:2d}x{side:<2d}  "
                  + "  ".join(f"{name} {value:7.2f}" for name, value in ms.items())
                  + f"   oneDNN/XLA {ms['onednn'] / ms['xla']:.2f}   auto: {picks}", flush=True)


if __name__ == "__main__":
    main()
