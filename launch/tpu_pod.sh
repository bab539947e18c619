#!/usr/bin/env bash
# Cloud TPU VM pod slice: create the slice (or reuse it; a preempted Spot slice is recreated), install the
# committed HEAD of this repository on every worker, and run hpl_jax.main on all workers at once with
# --distributed (JAX reads the slice's layout from the TPU metadata). The workdir is on GCS.
#
# Needs: the gcloud CLI, logged in, with TPU quota in the zone; a GCS bucket that the TPU VMs' service account
#        can write (the workdir, and prepared TFDS data if the config reads any); git. config.batch_size and
#        config.eval.batch_size must divide by the slice's chip count (v4-16: 8 chips on 2 hosts; v4-32: 16
#        chips on 4 hosts).
# Usage:   [TPU_NAME=NAME] [ZONE=ZONE] launch/tpu_pod.sh --config=CONFIG --workdir=gs://BUCKET/DIR [more flags...]
# Example: TPU_NAME=hpl-v4-16 ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 launch/tpu_pod.sh \
#            --config=configs/sop.py --workdir=gs://my-bucket/hpl_sop \
#            --config.dataset.data_dir=gs://my-bucket/tensorflow_datasets \
#            --config.model.pretrained=gs://my-bucket/resnet50
# Environment:
#   TPU_NAME          the slice's name (default: hpl-jax)
#   ZONE              the TPU zone (default: gcloud's compute/zone)
#   PROJECT           the GCP project (default: gcloud's project)
#   ACCELERATOR_TYPE  the slice to create, e.g. v4-16, v4-32, v5litepod-16 (default: v4-16)
#   RUNTIME_VERSION   the TPU VM software version (default: tpu-ubuntu2204-base)
#   SPOT              1 = create a Spot slice (default: 0)
#   DETACH            1 = start the run in the background on every worker (log: ~/hpl_jax.log) and return;
#                     0 = stream the workers' output here until the run ends (default: 0)
# All arguments go to hpl_jax.main on every worker. Preemption: the workers get SIGTERM; every process saves a
# checkpoint to the workdir at one agreed step and exits 0. Run this script again with the same arguments to
# recreate the slice and resume.
set -euo pipefail

if [[ " $* " != *" --workdir=gs://"* ]]; then
  echo "give --workdir=gs://BUCKET/DIR: every worker reads and writes the same workdir." >&2
  sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" >&2
  exit 2
fi
name=${TPU_NAME:-hpl-jax}
gcloud_args=()
if [[ -n ${ZONE:-} ]]; then
  gcloud_args+=(--zone="$ZONE")
fi
if [[ -n ${PROJECT:-} ]]; then
  gcloud_args+=(--project="$PROJECT")
fi
cd "$(dirname "$0")/.."

state=$(gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}" --format='value(state)' 2>/dev/null || true)
if [[ $state == PREEMPTED || $state == TERMINATED ]]; then
  echo "TPU ${name} is ${state}; deleting it to create it again"
  gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet
  state=
fi
if [[ -z $state ]]; then
  create_args=(--accelerator-type="${ACCELERATOR_TYPE:-v4-16}" --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}")
  if [[ ${SPOT:-0} == 1 ]]; then
    create_args+=(--spot)
  fi
  gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" "${create_args[@]}"
fi

# Every worker gets the same committed tree; the run's code is then a commit, not a working copy.
commit=$(git rev-parse HEAD)
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
archive=${staging}/hpl-jax.tar.gz
git archive --format=tar.gz -o "$archive" HEAD
echo "installing ${commit} on every worker of ${name}"
gcloud compute tpus tpu-vm scp "$archive" "${name}:hpl-jax.tar.gz" "${gcloud_args[@]}" --worker=all
# JAX 0.10 needs Python >= 3.11, newer than the TPU image's; uv provides one. google-cloud-storage lets
# TensorBoard (tensorboardX) write to the gs:// workdir.
gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command="$(cat <<'INSTALL'
set -euo pipefail
rm -rf ~/hpl-jax && mkdir -p ~/hpl-jax && tar -xzf ~/hpl-jax.tar.gz -C ~/hpl-jax
python3 -m pip install --quiet --user uv
~/.local/bin/uv venv --quiet --allow-existing --python 3.11 ~/hpl-venv
~/.local/bin/uv pip install --quiet --python ~/hpl-venv/bin/python -r ~/hpl-jax/requirements.txt \
  "jax[tpu]>=0.10.2,<0.11" google-cloud-storage \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
INSTALL
)"

# Run from ~/hpl-jax on the workers, with the flags quoted for their shell.
run="../hpl-venv/bin/python -m hpl_jax.main $(printf '%q ' --distributed "$@")"
if [[ ${DETACH:-0} == 1 ]]; then
  run="nohup ${run} > ~/hpl_jax.log 2>&1 < /dev/null &"
fi
echo "running on every worker of ${name}: ${run}"
gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command="cd ~/hpl-jax && ${run}"
if [[ ${DETACH:-0} == 1 ]]; then
  echo "started; follow worker 0 with: gcloud compute tpus tpu-vm ssh ${name} ${gcloud_args[*]} --worker=0 --command='tail -f ~/hpl_jax.log'"
fi
