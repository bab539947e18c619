"""Multi-process training on CPU: 2 processes x 2 devices joined by jax.distributed (gloo), started by
launch/local_multiprocess.sh, against 1 process x 4 devices with the same global batch; SIGTERM and resume.

Every run is a subprocess of a tiny default config: 1 epoch of 5 steps of 8 images with the backbone
training, a checkpoint every 2 steps.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from hpl_jax import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
STEPS_PER_EPOCH = 5  # 40 training images (4 classes x 10; 2 more held out for validation) // 8
FLAGS = ["--config=configs/default.py", "--config.dataset.image_size=16", "--config.dataset.resize_size=18",
         "--config.dataset.synthetic.num_families=3", "--config.dataset.synthetic.classes_per_family=4",
         "--config.dataset.synthetic.images_per_class=10", "--config.model.width=0.125",
         "--config.model.embedding_dim=16", "--config.hpl.num_coarse=(3,)", "--config.batch_size=8",
         "--config.eval.batch_size=16", "--config.eval.nmi=False", "--config.num_epochs=1",
         "--config.optim.warmup_epochs=0", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
         "--config.dataset.num_val_classes=2"]
# Compiling dominates these runs; XLA's backend optimisation off halves them. Every run here uses it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT_S = 900  # generous: the CPU is shared


def _two_processes(workdir, log_dir) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), XLA_FLAGS=FAST_COMPILE)
    return subprocess.Popen(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "2", "2", *FLAGS,
                             f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(run: subprocess.Popen, log_dir) -> str:
    """Waits for a launch; checks that every process exited 0; returns the processes' logs, joined."""
    output, _ = run.communicate(timeout=TIMEOUT_S)
    logs = [open(path).read() for path in sorted(glob.glob(os.path.join(log_dir, "process_*.log")))]
    assert run.returncode == 0, output[-3000:] + "".join(log[-3000:] for log in logs)
    return "".join(logs)


def _final_state(workdir):
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.all_steps(), manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())


def _history(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)["history"]


def _assert_same_up_to_rounding(two, one):
    """The same sums in another order (gloo across processes, XLA within one) differ by float rounding,
    which five AdamW steps with clipped gradients amplify to ~1e-4 of a leaf's scale; a wrong batch share or a
    collective that missed a host moves leaves by their whole scale."""
    assert jax.tree_util.tree_structure(two) == jax.tree_util.tree_structure(one)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(two)[0], jax.tree_util.tree_leaves(one)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(a)) if a.size else 0.0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * scale + 1e-7, err_msg=jax.tree_util.keystr(path))


def test_two_processes_match_one_process_and_resume_exactly_after_sigterm(tmp_path):
    # One test, not two: the uninterrupted two-process run is the reference of both halves, and pytest-xdist
    # could otherwise run it once per worker.
    straight, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
    logs = _finish(_two_processes(straight, tmp_path / "logs_straight"), tmp_path / "logs_straight")
    assert "JAX process 1/2" in logs and "on 4 devices (2 processes)" in logs
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-m", "hpl_jax.main", *FLAGS, f"--workdir={single}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 4 devices (1 processes)" in result.stderr

    # 2 processes x 2 devices end where 1 process x 4 devices ends.
    (steps, two), (_, one) = _final_state(straight), _final_state(single)
    assert steps == [2, 4, 5]  # checkpoint.every_steps=2 inside the epoch, and the epoch's end
    assert int(two["step"]) == int(one["step"]) == 5 and int(two["epoch"]) == int(one["epoch"]) == 1
    np.testing.assert_array_equal(two["rng"], one["rng"])
    for parents_two, parents_one in zip(two["hierarchy"]["parents"], one["hierarchy"]["parents"]):
        np.testing.assert_array_equal(parents_two, parents_one)
    _assert_same_up_to_rounding(two, one)
    history_two, history_one = _history(straight), _history(single)
    assert set(history_two) == set(history_one) == {"0", "1"}
    for epoch in history_one:
        for name, value in history_one[epoch].items():
            # rel: the hierarchy scalars (proxy norms, cosines) follow the parameters' float rounding; a count
            # that differs (a retrieval metric) moves by 1 / queries, far beyond it.
            assert history_two[epoch][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (epoch, name)
    # Only process 0 writes TensorBoard events.
    assert len(glob.glob(os.path.join(straight, "tensorboard", "events.*"))) == 1

    # SIGTERM to process 1 alone: both processes save at the same step inside the epoch and exit 0.
    workdir, log_dir = tmp_path / "preempted", tmp_path / "logs_preempted"
    log_dir.mkdir()
    run = _two_processes(workdir, log_dir)
    # Process 1 has joined jax.distributed (whose preemption service then owns SIGTERM) once it logs the layout.
    process_1_log = log_dir / "process_1.log"
    deadline = time.time() + TIMEOUT_S
    while not (process_1_log.exists() and "steps/epoch" in process_1_log.read_text()):
        assert run.poll() is None and time.time() < deadline, "process 1 never started training"
        time.sleep(0.2)
    os.kill(int((log_dir / "process_1.pid").read_text()), signal.SIGTERM)
    logs = _finish(run, log_dir)
    stops = re.findall(r"Stopped for preemption at step (\d+)", logs)
    assert len(stops) == 2 and stops[0] == stops[1], logs[-3000:]
    stop = int(stops[0])
    assert 0 < stop < STEPS_PER_EPOCH, f"expected a stop inside the epoch, got step {stop}"
    steps, stopped = _final_state(str(workdir))
    assert steps[-1] == stop and int(stopped["epoch"]) == 0

    # The next launch resumes mid-epoch and ends bit for bit where the uninterrupted run ended.
    logs = _finish(_two_processes(workdir, log_dir), log_dir)
    assert logs.count(f"Resumed from {workdir}/checkpoints at step {stop}") == 2
    (_, resumed), (_, uninterrupted) = _final_state(str(workdir)), _final_state(straight)
    assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(uninterrupted)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(resumed)[0],
                            jax.tree_util.tree_leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert _history(str(workdir)) == history_two


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be installed from the main thread")
def test_a_single_process_stops_at_the_next_boundary_after_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    sigterm = preemption.Preemption()
    try:
        assert not sigterm.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert sigterm.reached(2) and sigterm.reached(3)
    finally:
        sigterm.close()
    assert signal.getsignal(signal.SIGTERM) is before


SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch")))


def test_launch_scripts_parse_and_say_what_they_need():
    assert {os.path.basename(s) for s in SCRIPTS} == {
        "embedded_study.sh", "gpu_host.sh", "local_multiprocess.sh", "slurm.sbatch", "sweep_slurm.sbatch", "tpu_pod.sh"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        header = open(script).read().split("\nset -euo pipefail")[0]
        assert "Needs:" in header and "Example:" in header, script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "--shell=bash", *SCRIPTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
