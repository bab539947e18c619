#!/usr/bin/env bash
# N processes of hpl_jax.main on this machine, each over its own simulated CPU devices, joined by
# jax.distributed with gloo CPU collectives: the multi-host code path without a cluster.
#
# Needs: the project's Python environment (set PYTHON if `python3` is not it) and a free local TCP port.
# Usage:   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [hpl_jax.main flags...]
# Example: launch/local_multiprocess.sh 2 2 --config=configs/default.py --workdir=/tmp/hpl_2x2
#          (the same global batch and trajectory as one process over 4 devices)
# Environment:
#   PYTHON   the interpreter (default: python3)
#   PORT     the coordinator's port on localhost (default: a free one)
#   LOG_DIR  where process_<i>.log and process_<i>.pid go (default: a new temporary directory);
#            process 0 also prints to this terminal.
# Each process runs from the repository root. SIGTERM or SIGINT to this script is passed on to every
# process (a whole-machine preemption: they save a checkpoint at the next step and exit 0). If one process
# fails or dies, the others stop on their own, each with the one line that names it and the checkpoint to
# resume from (hpl_jax/trainer/distributed.py), within --heartbeat_timeout_s (give it as --heartbeat_timeout_s=N;
# default 100); any still running a minute after that are killed. The exit status is 0 only if every process
# exited 0.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
shift 2
heartbeat_timeout_s=100
for arg in "$@"; do
  if [[ $arg =~ ^--heartbeat_timeout_s=([0-9]+)$ ]]; then
    heartbeat_timeout_s=${BASH_REMATCH[1]}
  fi
done
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t hpl_local_multiprocess.XXXXXX)}
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)
cd "$(dirname "$0")/.."

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}"
# gloo is JAX 0.10's default for CPU collectives across processes; named so the intent survives other versions.
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo

pids=()
for ((i = 0; i < num_processes; i++)); do
  log="${log_dir}/process_${i}.log"
  command=("$python" -m hpl_jax.main --coordinator_address="localhost:${port}" --num_processes="$num_processes"
           --process_id="$i" "$@")
  if ((i == 0)); then
    "${command[@]}" > >(tee "$log") 2>&1 &
  else
    "${command[@]}" >"$log" 2>&1 &
  fi
  pids+=("$!")
  echo "$!" >"${log_dir}/process_${i}.pid"
done
echo "${num_processes} processes x ${devices_per_process} CPU devices, coordinator localhost:${port}, logs in ${log_dir}"

forward() {
  kill "-$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
kill_at=
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  # A background sleep: `wait` returns at once when a trapped signal arrives, a foreground sleep would not.
  sleep 1 &
  wait "$!" || true
  if [[ -n $kill_at ]] && ((SECONDS >= kill_at)); then
    echo "processes still running $((heartbeat_timeout_s + 60)) s after the first failure; killing them" >&2
    forward KILL
    kill_at=
  fi
  still_running=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still_running+=("$pid")
      continue
    fi
    code=0
    wait "$pid" || code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      echo "process ${pid} exited with status ${code}; the others stop within ${heartbeat_timeout_s} s" \
        "(logs in ${log_dir})" >&2
      kill_at=$((SECONDS + heartbeat_timeout_s + 60))
    fi
  done
  running=("${still_running[@]}")
done
exit "$status"
