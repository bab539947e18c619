#!/usr/bin/env bash
# One host, all its GPUs: a single hpl_jax.main process whose train step, jax.jit of jax.shard_map, runs on a
# mesh of every visible GPU (hpl_jax/trainer/sharding.py). No jax.distributed is needed for one process.
#
# Needs: NVIDIA GPUs, and the project's environment with the CUDA build of JAX that matches the driver:
#          pip install -r requirements.txt "jax[cuda13]>=0.10.2,<0.11"   (jax[cuda12] for a CUDA 12 driver;
#        the recorded H200 runs used jax 0.11.2 with CUDA 13: docs/scaling.md, "Installing JAX for an accelerator")
#        config.batch_size and config.eval.batch_size must divide by the number of GPUs.
# Usage:   launch/gpu_host.sh --config=CONFIG --workdir=WORKDIR [more hpl_jax.main flags...]
# Example: launch/gpu_host.sh --config=configs/cub.py --workdir=/data/runs/cub_r50 \
#            --config.dataset.data_dir=/data/tensorflow_datasets --config.model.pretrained=/data/weights/resnet50
# Environment:
#   PYTHON                the interpreter (default: python3)
#   CUDA_VISIBLE_DEVICES  which GPUs (default: all)
# All arguments go to hpl_jax.main unchanged. The process replaces this shell, so a SIGTERM (spot-instance
# preemption, `docker stop`, `kill`) reaches it directly: it saves a checkpoint at the next step and exits 0;
# the same command resumes from the workdir.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m hpl_jax.main "$@"
