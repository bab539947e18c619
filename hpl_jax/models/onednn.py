"""Convolutions computed by oneDNN on a CPU: `onednn_conv`, with its gradients (model.conv_impl 'onednn', and
'auto' on a CPU where it is faster: layers.cpu_conv).

XLA:CPU's own convolutions run at 1.5-2.1x PyTorch's time on ResNet-18's shapes (docs/benchmarks.md, "CPU
convolutions"); PyTorch runs oneDNN's. Here each pass of a convolution (forward, input gradient, kernel gradient)
is an XLA FFI custom call into oneDNN (onednn_conv.cc), and `jax.custom_vjp` ties them together; the parameters
are flax nn.Conv's, so checkpoints move freely between conv_impls.

The library is compiled on first use: onednn_conv.cc with the C++ compiler ($CXX, else g++ or c++) against
jaxlib's FFI headers and the oneDNN in this Python environment (the `onednn-cpu-gomp` and `onednn-devel-cpu-gomp`
wheels of requirements.txt put libdnnl and its headers under sys.prefix; $HPL_ONEDNN_ROOT names another install),
into $HPL_JAX_CACHE_DIR (default ~/.cache/hpl_jax), named by a hash of everything that goes into it, and written
atomically, so processes that build it at once do not see each other's half-written files. oneDNN's threads are
OpenMP's (OMP_NUM_THREADS, default: every core).

`status()` says whether it is available and, if not, why (no compiler, no oneDNN, a failed build); nothing is
built or loaded before it is first called.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("onednn_conv.cc")
# FFI target names and the handler symbols onednn_conv.cc exports for them.
TARGETS = {"hpl_onednn_conv_forward": "HplOnednnConvForward",
           "hpl_onednn_conv_input_grad": "HplOnednnConvInputGrad",
           "hpl_onednn_conv_kernel_grad": "HplOnednnConvKernelGrad"}


@dataclasses.dataclass(frozen=True)
class OnednnStatus:
    available: bool
    detail: str  # the oneDNN version and library path, or why it is unavailable


def cache_dir() -> Path:
    if os.environ.get("HPL_JAX_CACHE_DIR"):
        return Path(os.environ["HPL_JAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpl_jax"


def find_onednn() -> Optional[Path]:
    """The root of a oneDNN install (include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.*): $HPL_ONEDNN_ROOT, else this
    Python environment's prefix (where the pip wheels put it); None if neither has it."""
    roots = [os.environ["HPL_ONEDNN_ROOT"]] if os.environ.get("HPL_ONEDNN_ROOT") else [sys.prefix]
    for root in map(Path, roots):
        if (root / "include/oneapi/dnnl/dnnl.hpp").is_file() and any((root / "lib").glob("libdnnl.*")):
            return root
    return None


def find_compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_command(compiler: str, root: Path, output: Path) -> list:
    return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC",
            # -isystem: the headers' own warnings are not ours.
            "-isystem", jax.ffi.include_dir(), "-isystem", str(root / "include"),
            str(SOURCE), "-L", str(root / "lib"), "-ldnnl", f"-Wl,-rpath,{root / 'lib'}", "-o", str(output)]


def build_library(compiler: str, root: Path) -> Path:
    """The compiled onednn_conv.cc for this compiler, oneDNN and jaxlib, built now unless already in cache_dir()."""
    libraries = sorted(str(p.resolve()) for p in (root / "lib").glob("libdnnl.*"))
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, str(root), jaxlib.__version__,
                                    *libraries, *(str(os.stat(p).st_size) for p in libraries)]).encode())
    target = cache_dir() / f"onednn_conv-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(build_command(compiler, root, built), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({compiler}):\n{result.stderr[-2000:]}")
        os.replace(built, target)
    return target


@functools.lru_cache(maxsize=None)
def status() -> OnednnStatus:
    """Builds (if needed) and loads the library and registers its FFI targets, once per process."""
    root, compiler = find_onednn(), find_compiler()
    if root is None:
        return OnednnStatus(False, f"no oneDNN in {sys.prefix} (pip install onednn-cpu-gomp onednn-devel-cpu-gomp, "
                                   f"or set HPL_ONEDNN_ROOT)")
    if compiler is None:
        return OnednnStatus(False, "no C++ compiler (set CXX, or install g++)")
    try:
        path = build_library(compiler, root)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as error:
        return OnednnStatus(False, str(error))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    library.hpl_onednn_version.restype = ctypes.c_int64
    version = library.hpl_onednn_version()
    return OnednnStatus(True, f"oneDNN {version // 10000}.{version // 100 % 100}.{version % 100} ({path})")


def _attributes(strides: Tuple[int, int], padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> dict:
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    return {name: np.int64(value) for name, value in zip(("sh", "sw", "pt", "pb", "pl", "pr"),
                                                           (sh, sw, pt, pb, pl, pr))}


def _result_type(shape, like: jax.Array):
    # Inside shard_map a value's type says which mesh axes it varies over; a result varies as the operand it
    # stands for (the output and dx as x; dkernel as the kernel, which shard_map has already made per-device).
    return jax.typeof(like).update(shape=tuple(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    batch, height, width, _ = x.shape
    kh, kw, _, features = kernel.shape
    out = _result_type((batch, (height + pt + pb - kh) // sh + 1, (width + pl + pr - kw) // sw + 1, features), x)
    return jax.ffi.ffi_call("hpl_onednn_conv_forward", out)(x, kernel, **_attributes(strides, padding))


def _conv_forward(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_backward(strides, padding, residuals, dy):
    x, kernel = residuals
    attributes = _attributes(strides, padding)
    dx = jax.ffi.ffi_call("hpl_onednn_conv_input_grad", _result_type(x.shape, x))(x, kernel, dy, **attributes)
    dkernel = jax.ffi.ffi_call("hpl_onednn_conv_kernel_grad", _result_type(kernel.shape, kernel))(
        x, kernel, dy, **attributes)
    return dx, dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def onednn_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: Sequence[Tuple[int, int]]) -> jax.Array:
    """A convolution computed by oneDNN, differentiable (its gradients are oneDNN's too).

    Args:
      x: f32[batch, H, W, C_in].
      kernel: f32[kh, kw, C_in, C_out].
      strides: (sh, sw); padding: ((top, bottom), (left, right)).

    Returns:
      f32[batch, (H + top + bottom - kh) // sh + 1, (W + left + right - kw) // sw + 1, C_out], as
      `lax.conv_general_dilated` with NHWC / HWIO dimension numbers.
    """
    assert x.dtype == kernel.dtype == jnp.float32, (x.dtype, kernel.dtype)
    state = status()
    if not state.available:
        raise RuntimeError(f"model.conv_impl 'onednn': oneDNN is unavailable here: {state.detail}")
    strides = tuple(int(s) for s in strides)
    # oneDNN takes the bottom/right padding the last output reads. Where that is negative (a stride-2 1x1
    # convolution of an even map), no output reads the input's last rows: they are cropped.
    crop, pads = [], []
    for axis in range(2):
        size, taps, stride, (low, high) = x.shape[1 + axis], kernel.shape[axis], strides[axis], padding[axis]
        out = (size + low + high - taps) // stride + 1
        read = (out - 1) * stride + taps - size - low
        crop.append(size + min(read, 0))
        pads.append((int(low), max(read, 0)))
    if tuple(crop) != x.shape[1:3]:
        x = x[:, :crop[0], :crop[1], :]
    return _conv(x, kernel, strides, tuple(pads))
