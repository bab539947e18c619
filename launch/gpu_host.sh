#!/usr/bin/env bash
# One host, all its GPUs: a single hpl_jax.main process whose pmap spans every visible GPU. No
# jax.distributed is needed for one process.
#
# Needs: NVIDIA GPUs with a CUDA 12 driver, and the project's environment with the GPU build of JAX:
#          pip install -r requirements.txt "jax[cuda12]>=0.10.2,<0.11"
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
