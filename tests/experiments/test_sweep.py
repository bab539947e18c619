"""Sweeps: run names from the overrides, skipping finished runs, resuming stopped ones, the printed commands."""
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from hpl_jax.experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stands in for hpl_jax.main: trains "epochs" by writing metrics.json, resuming from the last one recorded.
# Behaviour per workdir name: 'stop' stops (exit 0, as on preemption) after one epoch the first time;
# 'fail' exits 1 the first time; anything else runs to the end.
FAKE_MAIN = textwrap.dedent("""
    import json, os, sys
    workdir, num_epochs = sys.argv[1], int(sys.argv[2])
    os.makedirs(workdir, exist_ok=True)
    calls = os.path.join(workdir, "calls")
    first = not os.path.exists(calls)
    path = os.path.join(workdir, "metrics.json")
    start = json.load(open(path))["last"]["epoch"] if os.path.exists(path) else 0
    open(calls, "a").write(f"started at epoch {start}\\n")
    if first and "fail" in workdir:
        sys.exit(1)
    stop = 1 if first and "stop" in workdir else num_epochs
    for epoch in range(start + 1, stop + 1):
        json.dump({"last": {"epoch": epoch}}, open(path, "w"))
""")


def test_names_come_from_the_overrides_and_are_filesystem_safe():
    grids = [sweep.parse_grid("hpl.weights=(1.0,0.0),(1.0, 0.1)"), sweep.parse_grid("config.hpl.num_coarse=(4,),(8,)")]
    assert grids[0] == ("hpl.weights", ["(1.0,0.0)", "(1.0, 0.1)"])
    runs = sweep.plan_runs(grids, ["0", "1"], None, [("num_epochs", "3")])
    assert [run.name for run in runs[:3]] == ["hpl.weights=1.0,0.0__hpl.num_coarse=4__seed=0",
                                              "hpl.weights=1.0,0.0__hpl.num_coarse=4__seed=1",
                                              "hpl.weights=1.0,0.0__hpl.num_coarse=8__seed=0"]
    assert len(runs) == 8 and len({run.name for run in runs}) == 8
    assert runs[4].name == "hpl.weights=1.0,0.1__hpl.num_coarse=4__seed=0"
    assert runs[4].overrides == (("num_epochs", "3"), ("hpl.weights", "(1.0, 0.1)"), ("hpl.num_coarse", "(4,)"),
                                 ("seed", "0"))
    with_data = sweep.plan_runs([("optim.lr", ["1e-3"])], ["2"], ["5", "6"], [])
    assert [run.name for run in with_data] == ["optim.lr=1e-3__seed=2__data_seed=5", "optim.lr=1e-3__seed=2__data_seed=6"]
    assert with_data[1].overrides[-1] == ("dataset.seed", "6")
    assert sweep.safe_value("'a b/c'") == "ab_c"

    with pytest.raises(sweep.SweepError, match="share a directory name"):
        sweep.plan_runs([("hpl.weights", ["(1.0,0.1)", "(1.0, 0.1)"])], ["0"], None, [])
    with pytest.raises(sweep.SweepError, match="balanced brackets"):
        sweep.parse_grid("hpl.weights=(1.0,0.1")
    with pytest.raises(sweep.SweepError, match="seed is set by --seeds"):
        sweep.plan_runs([("seed", ["1"])], ["0"], None, [])


def test_overrides_are_parsed_as_main_parses_them(monkeypatch):
    monkeypatch.chdir(REPO)
    config = sweep.resolve_config("configs/default.py", [("hpl.weights", "(1.0,0.01)"), ("num_epochs", "3")])
    assert tuple(config.hpl.weights) == (1.0, 0.01) and config.num_epochs == 3
    with pytest.raises(sweep.SweepError, match="hpl.weigths is not a field of configs/default.py; did you mean "
                                               "hpl.weights"):
        sweep.resolve_config("configs/default.py", [("hpl.weigths", "(1.0,)")])
    with pytest.raises(sweep.SweepError, match="num_epochs=x.*invalid literal"):
        sweep.resolve_config("configs/default.py", [("num_epochs", "x")])


def test_finished_runs_are_skipped_and_stopped_or_failed_ones_rerun_in_their_workdir(tmp_path, capsys):
    root = str(tmp_path)
    fake = tmp_path / "fake_main.py"
    fake.write_text(FAKE_MAIN)
    runs = sweep.plan_runs([("mode", ["ok", "stop", "fail", "done"])], ["0"], None, [])
    commands = [[sys.executable, str(fake), os.path.join(root, run.name), "3"] for run in runs]
    os.makedirs(os.path.join(root, runs[3].name))
    with open(os.path.join(root, runs[3].name, "metrics.json"), "w") as f:
        json.dump({"last": {"epoch": 3}}, f)

    assert sweep.run_local(runs, commands, root, [3] * 4) == 2
    out = capsys.readouterr().out
    assert "[1/4] mode=ok__seed=0: finished in" in out
    assert "[2/4] mode=stop__seed=0: stopped with a checkpoint; see the log" in out
    assert "[3/4] mode=fail__seed=0: failed (exit status 1); see the log" in out
    assert "[4/4] mode=done__seed=0: finished before, skipped" in out
    assert open(os.path.join(root, runs[0].name, sweep.LOG_FILE)).read().startswith("$ " + shlex.join(commands[0]))

    # Run again: the finished ones are skipped, the stopped one resumes from its epoch 1, the failed one reruns.
    assert sweep.run_local(runs, commands, root, [3] * 4) == 0
    calls = {run.name: open(os.path.join(root, run.name, "calls")).read().splitlines()
             for run in runs[:3]}
    assert calls == {"mode=ok__seed=0": ["started at epoch 0"],
                     "mode=stop__seed=0": ["started at epoch 0", "started at epoch 1"],
                     "mode=fail__seed=0": ["started at epoch 0", "started at epoch 0"]}
    assert not os.path.exists(os.path.join(root, runs[3].name, "calls"))
    # A run asked for more epochs than it finished is not finished.
    assert not sweep.is_finished(os.path.join(root, runs[0].name), 4)


def test_print_writes_one_main_command_per_unfinished_run_and_sweep_json(tmp_path):
    root = str(tmp_path / "sweep")
    args = [sys.executable, "-m", "hpl_jax.sweep", "--config=configs/default.py", f"--workdir={root}",
            "--grid=hpl.num_coarse=(4,),(8,)", "--seeds=0,1", "--set=num_epochs=2", "--run=print"]
    finished = os.path.join(root, "hpl.num_coarse=8__seed=1")
    os.makedirs(finished)
    with open(os.path.join(finished, "metrics.json"), "w") as f:
        json.dump({"last": {"epoch": 2}}, f)
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and "3 of 4 runs to do; 1 finished." in result.stderr
    assert shlex.split(lines[0]) == [
        "python", "-m", "hpl_jax.main", "--config=configs/default.py",
        f"--workdir={root}/hpl.num_coarse=4__seed=0", "--config.num_epochs=2", "--config.hpl.num_coarse=(4,)",
        "--config.seed=0"]
    with open(os.path.join(root, sweep.SWEEP_FILE)) as f:
        described = json.load(f)
    assert described["grid"] == {"hpl.num_coarse": ["(4,)", "(8,)"]} and described["set"] == {"num_epochs": "2"}
    assert [run["name"] for run in described["runs"]][-1] == "hpl.num_coarse=8__seed=1"

    result = subprocess.run(args[:-3] + ["--grid=hpl.wieghts=(1.0,)", "--run=print"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "Sweep error: hpl.wieghts is not a field of configs/default.py; did you mean hpl.weights?"]


def test_a_run_that_early_stopping_ended_is_finished(tmp_path):
    from configs import default
    from hpl_jax.trainer import checkpointing
    config = default.get_config()
    config.num_epochs, config.eval.early_stopping_patience = 10, 2
    checkpointing.save_config(checkpointing.workdir_path(str(tmp_path)), config)

    def write_history(val_map_at_r):
        history = {str(e): {"val/map@r": v} for e, v in enumerate(val_map_at_r)}
        last = len(val_map_at_r) - 1
        with open(tmp_path / "metrics.json", "w") as f:
            json.dump({"selected_on": "val/map@r", "history": history, "last": {"epoch": last}}, f)

    write_history([0.1, 0.5, 0.4, 0.4])  # best at epoch 1, 2 epochs after it: may still improve
    assert not sweep.is_finished(str(tmp_path), 10)
    write_history([0.1, 0.5, 0.4, 0.4, 0.3])  # 3 epochs after the best > patience 2: the run has ended
    assert sweep.is_finished(str(tmp_path), 10)
