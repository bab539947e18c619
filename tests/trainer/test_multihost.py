"""Multi-process training on CPU: 2 processes x 2 devices joined by jax.distributed (gloo), started by
launch/local_multiprocess.sh, against 1 process x 4 devices with the same global batch; SIGTERM and resume; one
process killed (where its death shows up first in the other: a train step's gather, an evaluation's gather, a
save's barrier, between steps), or failing on its own, stops the other with one line, and a rerun resumes exactly.
tests/trainer/test_peer_death.py kills processes of 3 the same way (`_kill_in_turn`).

Every run is a subprocess of a tiny default config: 1 epoch of 5 steps of 8 images with the backbone
training, a checkpoint every 2 steps.
"""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from hpl_jax.trainer import checkpointing
from hpl_jax.trainer import distributed
from hpl_jax.trainer import preemption
from tests import once
from tests import xla

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
STEPS_PER_EPOCH = 5  # 40 training images (4 classes x 10; 2 more held out for validation) // 8
FLAGS = ["--config=configs/default.py", "--config.dataset.image_size=16", "--config.dataset.resize_size=18",
         "--config.dataset.synthetic.num_families=3", "--config.dataset.synthetic.classes_per_family=4",
         "--config.dataset.synthetic.images_per_class=10", "--config.model.width=0.125",
         "--config.model.embedding_dim=16", "--config.hpl.num_coarse=(3,)", "--config.batch_size=8",
         "--config.eval.batch_size=16", "--config.eval.nmi=False", "--config.num_epochs=1",
         "--config.optim.warmup_epochs=0", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
         "--config.dataset.num_val_classes=2"]
TIMEOUT_S = 900  # generous: the CPU is shared


def _two_processes(workdir, log_dir) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), XLA_FLAGS=xla.FAST_COMPILE)
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


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_match_one_process_and_resume_exactly_after_sigterm(tmp_path, uninterrupted):
    # One test, not two: the SIGTERM half compares with the same uninterrupted run.
    straight, single = uninterrupted, str(tmp_path / "one_process")
    logs = "".join(open(path).read() for path in sorted(glob.glob(os.path.join(straight, os.pardir, "logs",
                                                                              "process_*.log"))))
    assert "JAX process 1/2" in logs and "on 4 devices (2 processes)" in logs
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla.flags(4))
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
    # The metrics are functions of those parameters: relative to their own size, not absolute (a norm of 3.39
    # differed by 3.3e-7 relative on another machine; float32 sums in another order differ by ~1e-7 relative
    # per operation, and the steps above amplify that to the ~1e-4 the parameters are held to). A retrieval count
    # that differs moves a metric by 1 / queries, far beyond it.
    for epoch in history_one:
        for name, value in history_one[epoch].items():
            assert history_two[epoch][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (epoch, name)
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


# ----------------------------------------------------------------------------------- one process stops
# Two processes started directly, as a cluster without a supervising launcher starts them (launch/ would stop the
# others itself); what JAX's coordination service does is what a pod's hosts see.
HEARTBEAT_TIMEOUT_S = 10
MARGIN_S = 30  # a heartbeat every timeout/5 s, the checks, and a loaded CPU
# Fails process 0's save of checkpoints/4 as a full disk does (as tests/trainer/test_train.py's FULL_DISK), then runs main.
FULL_DISK_AT_4 = """
import errno, orbax.checkpoint as ocp
from absl import app
from hpl_jax import main
from hpl_jax.trainer import cli
write = ocp.type_handlers.NumpyHandler._open_and_write
async def full_disk(self, value, tspec, context):
    if "/checkpoints/4.orbax-checkpoint-tmp" in str(tspec):
        raise OSError(errno.ENOSPC, "No space left on device")
    return await write(self, value, tspec, context)
ocp.type_handlers.NumpyHandler._open_and_write = full_disk
app.run(main.main, flags_parser=cli.parse_flags)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, log_dir, *flags, num_processes=2, devices=2, code_0=None, fault=None):
    """The processes of a run, each logging to log_dir/process_<i>.log over `devices` CPU devices; process 0 runs
    `code_0` if given; `fault` is HPL_JAX_FAULT, the same in every process (hpl_jax/trainer/distributed.py)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=xla.flags(devices))
    env.pop(distributed.FAULT_ENV, None)
    if fault:
        env[distributed.FAULT_ENV] = fault
    processes = []
    for i in range(num_processes):
        entry = ["-c", code_0] if i == 0 and code_0 else ["-m", "hpl_jax.main"]
        log = open(log_dir / f"process_{i}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, *entry, f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
             f"--process_id={i}", *FLAGS, f"--workdir={workdir}", *flags], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT))
    return processes


def _wait_for_exits(processes):
    """{index: (exit status, time.monotonic() of the exit)} once every process has exited."""
    exits, deadline = {}, time.monotonic() + TIMEOUT_S
    while len(exits) < len(processes):
        assert time.monotonic() < deadline, "a process never exited"
        for i, process in enumerate(processes):
            if i not in exits and process.poll() is not None:
                exits[i] = (process.returncode, time.monotonic())
        time.sleep(0.1)
    return exits


def _finish_all(processes, log_dir) -> None:
    """Waits for the processes of `_start`; checks that every one exited 0."""
    exits = _wait_for_exits(processes)
    assert all(status == 0 for status, _ in exits.values()), [
        (log_dir / f"process_{i}.log").read_text()[-3000:] for i in exits]


def _last_line(log_dir, i) -> str:
    log = (log_dir / f"process_{i}.log").read_text()
    # One line, nothing after it: no traceback, no abort dump from JAX or Python's faulthandler.
    for noise in ("Traceback", "Fatal Python error", "Check failure stack trace", "Terminating process"):
        assert noise not in log, log[-3000:]
    return log.strip().splitlines()[-1]


def _resume_exactly(workdir, log_dir, straight, step):
    """Reruns both processes on `workdir`: they resume at `step` and end as the uninterrupted run `straight`."""
    logs = _finish(_two_processes(workdir, log_dir), log_dir)
    assert logs.count(f"Resumed from {workdir}/checkpoints at step {step} ") == 2, logs[-3000:]
    (_, resumed), (_, uninterrupted) = _final_state(str(workdir)), _final_state(straight)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(resumed)[0],
                            jax.tree_util.tree_leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert _history(str(workdir)) == _history(straight)


@pytest.fixture(scope="module")
@once.shared
def uninterrupted(tmp_path_factory):
    """The workdir of a 2-process run of FLAGS that nothing interrupted (its logs in ../logs): the reference of
    three tests, run once per session whichever worker asks first (tests/once.py)."""
    def run(root):
        _finish(_two_processes(root / "run", root / "logs"), root / "logs")
    return str(once.made_once(tmp_path_factory, "uninterrupted_2_processes", run) / "run")


def _kill_in_turn(workdir, log_root, uninterrupted, faults, *flags, num_processes=2, devices=2):
    """Runs the processes again and again on `workdir`, each time killing one where `faults` says (one
    HPL_JAX_FAULT each: its process kills itself with SIGKILL there), then once without a fault.

    After each death every other process exits 1 within the heartbeat timeout with the one line that names the
    dead process and the latest complete checkpoint, nothing after it; the next run resumes from that checkpoint,
    and the last one ends bit for bit as the uninterrupted run. Returns each fault's survivors' line and how long
    they took to stop after the death.
    """
    flags = (f"--heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}", *flags)
    checkpoints, resume, stops = workdir / "checkpoints", None, []
    for run, fault in enumerate([*faults, None]):
        log_dir = log_root / f"run_{run}"
        log_dir.mkdir(parents=True)
        processes = _start(workdir, log_dir, *flags, num_processes=num_processes, devices=devices, fault=fault)
        exits = _wait_for_exits(processes)
        logs = [(log_dir / f"process_{i}.log").read_text() for i in range(num_processes)]
        resumed = [f"Resumed from {checkpoints} at step {resume} " in log for log in logs]
        assert resumed == [resume is not None] * num_processes, (fault, resume, logs[0][-3000:])
        if fault is None:
            assert all(status == 0 for status, _ in exits.values()), [log[-3000:] for log in logs]
            break
        victim, point = int(fault.split(":")[0]), fault.split(":")[1].split("@")[0]
        assert exits[victim][0] == -signal.SIGKILL, logs[victim][-3000:]
        # It died where it was told to, the others being there too.
        assert logs[victim].strip().splitlines()[-1] == (
            f"{distributed.FAULT_ENV}: process {victim} kills itself at {point}"), logs[victim][-3000:]
        resume = checkpointing.latest_complete_step(checkpoints)
        resume_point = f"{checkpoints}/{resume}" if resume is not None else "the start (no checkpoint was complete)"
        survivors = [i for i in range(num_processes) if i != victim]
        lines = {_last_line(log_dir, i) for i in survivors}
        assert len(lines) == 1, lines  # every survivor prints the same line
        line = lines.pop()
        assert re.fullmatch(
            rf"Distributed error: process {victim} stopped sending heartbeats \(it died or was preempted, or its host "
            rf"was lost\) at about step \d+; every process stops\. Run the same command on every host to resume from "
            rf"{re.escape(resume_point)}\.", line), (fault, line)
        if point != "between_steps":
            # The death showed up first as an error of the collective or barrier, not as missing heartbeats (in one
            # survivor at least: with 3 processes the other may as well wait inside the collective).
            assert any("asking the other processes whether they are alive" in logs[i] for i in survivors), fault
        assert all(exits[i][0] == 1 for i in survivors), exits
        stopped_s = max(exits[i][1] for i in survivors) - exits[victim][1]
        # The victim's last heartbeat may have been read up to one interval (timeout/5) before its death.
        assert 0.8 * HEARTBEAT_TIMEOUT_S <= stopped_s < HEARTBEAT_TIMEOUT_S + MARGIN_S, (fault, stopped_s)
        stops.append((fault, line, stopped_s))

    (_, resumed_state), (_, uninterrupted_state) = _final_state(str(workdir)), _final_state(uninterrupted)
    assert jax.tree_util.tree_structure(resumed_state) == jax.tree_util.tree_structure(uninterrupted_state)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(resumed_state)[0],
                            jax.tree_util.tree_leaves(uninterrupted_state)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert _history(str(workdir)) == _history(uninterrupted)
    for fault, line, stopped_s in stops:
        print(f"{fault}: the others stopped {stopped_s:.1f} s after the death (timeout {HEARTBEAT_TIMEOUT_S} s) "
              f"with: {line}")
    return stops


# Each fault after the save of step 2 is complete (the save of 4 waits for it), so that every run but the first
# resumes; each place is where one process's death shows up first in the other.
FAULTS_2 = ("1:save_barrier@4", "1:train_gather@4", "1:between_steps@4", "1:eval_gather@5")


@pytest.mark.slow
@pytest.mark.long
def test_a_peers_death_is_named_wherever_it_shows_up_first_and_a_rerun_resumes_exactly(tmp_path, uninterrupted):
    _kill_in_turn(tmp_path / "run", tmp_path / "logs", uninterrupted, FAULTS_2)


@pytest.mark.slow
@pytest.mark.long
def test_a_failed_save_on_process_0_stops_both_at_once_and_a_rerun_resumes_exactly(tmp_path, uninterrupted):
    workdir, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    # A timeout far above the time the other process may take to stop: it stops on the announcement, not on it.
    processes = _start(workdir, log_dir, "--heartbeat_timeout_s=300", code_0=FULL_DISK_AT_4)
    failed = None
    while failed is None and processes[0].poll() is None:
        if "Workdir error:" in (log_dir / "process_0.log").read_text():
            failed = time.monotonic()
        time.sleep(0.05)
    exits = _wait_for_exits(processes)
    failed = failed or exits[0][1]
    own, announced = _last_line(log_dir, 0), _last_line(log_dir, 1)
    checkpoints = workdir / "checkpoints"
    resume = checkpointing.latest_complete_step(checkpoints)
    assert resume == 2 and os.path.isdir(checkpoints / "4.orbax-checkpoint-tmp")
    assert own == (f"Workdir error: saving a checkpoint in {checkpoints} failed (No space left on device); "
                   f"{checkpoints}/2 is the resume point: free space or fix the file system, then run the same "
                   "command again.")
    assert re.fullmatch(
        rf"Distributed error: process 0 stopped at about step [45] on its own error \({re.escape(own[:-1])}\); "
        rf"every process stops\. Run the same command on every host to resume from {checkpoints}/2\.",
        announced), announced
    assert exits[0][0] == exits[1][0] == 1
    stopped_s = exits[1][1] - failed
    print(f"process 1 stopped {stopped_s:.1f} s after process 0's error (timeout 300 s)")
    assert stopped_s < 15

    _resume_exactly(workdir, log_dir, uninterrupted, 2)


@pytest.mark.slow
def test_a_heartbeat_timeout_below_the_minimum_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hpl_jax.main", *FLAGS, f"--workdir={tmp_path}",
                             "--heartbeat_timeout_s=2"], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert ("--heartbeat_timeout_s must be at least 5 (seconds): a shorter one could take a compile or a garbage "
            "collection for a dead process.") in result.stderr


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
        "device_check.sh", "embedded_study.sh", "gpu_host.sh", "local_multiprocess.sh", "pretrained_study.sh", "slurm.sbatch",
        "sweep_slurm.sbatch", "tpu_pod.sh"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        header = open(script).read().split("\nset -euo pipefail")[0]
        assert "Needs:" in header and "Example:" in header, script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "--shell=bash", *SCRIPTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
