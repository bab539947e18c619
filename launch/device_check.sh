#!/usr/bin/env bash
# One GPU, a few minutes: the figures only an accelerator can show, side by side with the PyTorch peer
# (hpl_jax/benchmarks/device_check.py says what each stage measures). Writes OUT/device_check.json and
# OUT/device_check.md after every stage, so a run cut short keeps what it measured.
#
# Needs: one NVIDIA GPU; JAX with CUDA, flax, optax, orbax-checkpoint, scikit-learn, torch + torchvision (the
#        peer). ml-collections and tensorboardX, if missing, are installed from wheels in WHEELS (no network).
# Usage:   launch/device_check.sh OUT [more device_check flags, e.g. --dry_run or --budget_s=300]
# Example: launch/device_check.sh /tmp/device_check && cat /tmp/device_check/device_check.md
# Environment:
#   PYTHON   the interpreter (default: python3)
#   WHEELS   a folder of wheels to install first into a private --target (default: .whl, if it exists)
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
out="$1"
shift
python="${PYTHON:-python3}"
wheels="${WHEELS:-.whl}"
if compgen -G "${wheels}/*.whl" >/dev/null; then
  "${python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/hpl-device-check-site "${wheels}"/*.whl
  export PYTHONPATH="/tmp/hpl-device-check-site${PYTHONPATH:+:${PYTHONPATH}}"
fi
# JAX and PyTorch share the GPU: JAX takes memory as it needs it instead of 75% at start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
mkdir -p "${out}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"${out}/nvidia_smi.csv" 2>&1 || true
exec "${python}" -m hpl_jax.benchmarks.device_check --out="${out}" "$@"
