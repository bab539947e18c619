"""The report's aggregation on fabricated run directories, checked against hand computations."""
import csv
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest

from hpl_jax.experiments import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# t quantile 0.975 with 2 degrees of freedom, from a t table.
T_975_2 = 4.302652729749464


def fake_run(root, name, *, weights, seed, recall, map_r, num_epochs=4, last_epoch=4, selected_on=None,
             best=None, data_seed=None):
    """A run directory as hpl_jax.main leaves it: config.json and metrics.json (last epoch = `recall`, `map_r`)."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    config = {"seed": seed, "num_epochs": num_epochs, "hpl": {"weights": list(weights), "num_coarse": [8]},
              "optim": {"lr": 0.001}}
    if data_seed is not None:
        config["dataset"] = {"seed": data_seed}
    last = {"epoch": last_epoch, "recall@1": recall, "map@r": map_r, "num_queries": 100}
    metrics = {"history": {str(last_epoch): last}, "last": last, "best": best or last}
    if selected_on:
        metrics["selected_on"] = selected_on
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f)


@pytest.fixture
def w1_sweep(tmp_path):
    root = str(tmp_path)
    for seed, recall, map_r in ((0, 0.50, 0.20), (1, 0.60, 0.30), (2, 0.70, 0.40)):
        fake_run(root, f"w0__seed={seed}", weights=(1.0, 0.0), seed=seed, recall=recall, map_r=map_r)
    for seed, recall, map_r in ((0, 0.55, 0.25), (1, 0.62, 0.30), (2, 0.78, 0.41)):
        fake_run(root, f"w01__seed={seed}", weights=(1.0, 0.1), seed=seed, recall=recall, map_r=map_r)
    for seed, recall, map_r in ((0, 0.40, 0.10), (1, 0.46, 0.12)):
        fake_run(root, f"w1__seed={seed}", weights=(1.0, 1.0), seed=seed, recall=recall, map_r=map_r)
    # Stopped after 2 of 4 epochs: left out.
    fake_run(root, "w1__seed=2", weights=(1.0, 1.0), seed=2, recall=0.99, map_r=0.99, last_epoch=2)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"grid": {"hpl.weights": ["(1.0,0.0)", "(1.0,0.1)", "(1.0,1.0)"]}}, f)
    return root


def test_means_stds_and_paired_intervals_match_a_hand_computation(w1_sweep):
    written = report.report(w1_sweep, ["recall@1", "map@r"])
    assert written["keys"] == ["hpl.weights"]
    settings = written["settings"]
    assert [s.values for s in settings] == [((1.0, 0.0),), ((1.0, 0.1),), ((1.0, 1.0),)]
    assert [len(s.runs) for s in settings] == [3, 3, 2]

    mean, std, n = report.mean_std(list(settings[0].per_seed("recall@1").values()))
    assert (n, mean, std) == (3, pytest.approx(0.6), pytest.approx(0.1))
    mean, std, n = report.mean_std(list(settings[2].per_seed("recall@1").values()))
    assert (n, mean, std) == (2, pytest.approx(0.43), pytest.approx(0.06 / math.sqrt(2)))

    # (1.0, 0.1) - (1.0, 0.0): differences 0.05, 0.02, 0.08 -> mean 0.05, sd 0.03, half width t * 0.03 / sqrt(3).
    mean, low, high, n = report.paired_difference(settings[1].per_seed("recall@1"), settings[0].per_seed("recall@1"))
    half = T_975_2 * 0.03 / math.sqrt(3)
    assert n == 3 and mean == pytest.approx(0.05)
    assert (low, high) == (pytest.approx(0.05 - half), pytest.approx(0.05 + half))
    # Only seeds 0 and 1 are shared with the 2-run setting: differences -0.10, -0.14.
    mean, low, high, n = report.paired_difference(settings[2].per_seed("recall@1"), settings[0].per_seed("recall@1"))
    half = 12.706204736174707 * (0.04 / math.sqrt(2)) / math.sqrt(2)  # t quantile 0.975, 1 degree of freedom
    assert n == 2 and mean == pytest.approx(-0.12) and low == pytest.approx(-0.12 - half)

    text = open(written["markdown"]).read()
    assert "| (1.0, 0.0) | 3 | 0.6000 ± 0.1000 | 0.3000 ± 0.1000 |" in text
    assert f"| hpl.weights = (1.0, 0.1) | recall@1 | 3 | +0.0500 | [{0.05 - T_975_2 * 0.03 / 3 ** 0.5:+.4f}, " in text
    assert "each run's last epoch" in text and "Not finished (left out): w1__seed=2." in text
    assert "per data seed" not in text

    rows = list(csv.DictReader(open(written["csv"])))
    assert len(rows) == 8 and {r["run"] for r in rows} == {n for n in os.listdir(w1_sweep) if "__" in n} - {"w1__seed=2"}
    row = next(r for r in rows if r["run"] == "w01__seed=2")
    assert (row["hpl.weights"], row["seed"], row["epoch"], row["selection"]) == ("(1.0, 0.1)", "2", "4", "last")
    assert float(row["recall@1"]) == 0.78 and "num_queries" not in row

    # One plot per metric, of the size the figure asks for (5 x 3.6 inches at 80 dpi).
    assert [os.path.basename(p) for p in written["plots"]] == ["recall_at_1.png", "map_at_r.png"]
    for path in written["plots"]:
        assert matplotlib.image.imread(path).shape[:2] == (288, 400)


def test_baseline_flag_picks_the_setting_and_errors_name_the_choices(w1_sweep):
    written = report.report(w1_sweep, ["map@r"], ["hpl.weights=(1.0, 1.0)"])
    assert written["baseline"].values == ((1.0, 1.0),)
    assert "against hpl.weights = (1.0, 1.0)" in open(written["markdown"]).read()
    with pytest.raises(ValueError, match=r"matches no setting.*hpl.weights = \(1.0, 0.1\)"):
        report.report(w1_sweep, ["map@r"], ["hpl.weights=(1.0,0.5)"])
    with pytest.raises(ValueError, match=r"--baseline 'optim.lr=1'.*\['hpl.weights'\]"):
        report.report(w1_sweep, ["map@r"], ["optim.lr=1"])
    with pytest.raises(ValueError, match=r"--metrics \['nmi'\] are not in"):
        report.report(w1_sweep, ["nmi"])


def test_runs_on_several_data_seeds_pool_the_pairs_and_show_each_data_seed(tmp_path):
    root = str(tmp_path)
    # map@r of (flat, HPL) per (data seed, seed): differences +0.01, +0.03, +0.02 on data seed 1 and -0.02, 0.0,
    # -0.04 on data seed 2.
    values = {(1, 0): (0.30, 0.31), (1, 1): (0.32, 0.35), (1, 2): (0.34, 0.36),
              (2, 0): (0.20, 0.18), (2, 1): (0.22, 0.22), (2, 2): (0.26, 0.22)}
    for (data_seed, seed), (flat, hpl) in values.items():
        for weights, map_r in (((1.0,), flat), ((1.0, 0.1), hpl)):
            fake_run(root, f"w={len(weights)}__seed={seed}__data_seed={data_seed}", weights=weights, seed=seed,
                     data_seed=data_seed, recall=0.5, map_r=map_r)
    written = report.report(root, ["map@r"])
    text = open(written["markdown"]).read()
    pooled = [0.01, 0.03, 0.02, -0.02, 0.0, -0.04]
    mean, sd = sum(pooled) / 6, math.sqrt(sum((d - sum(pooled) / 6) ** 2 for d in pooled) / 5)
    half = 2.570581835636314 * sd / math.sqrt(6)  # t quantile 0.975, 5 degrees of freedom
    assert f"| hpl.weights = (1.0, 0.1) | map@r | 6 | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" in text
    # Per data seed: differences with sd 0.01 and 0.02 around +0.02 and -0.02, 2 degrees of freedom each.
    for data_seed, mean, sd in ((1, 0.02, 0.01), (2, -0.02, 0.02)):
        half = T_975_2 * sd / math.sqrt(3)
        assert (f"| hpl.weights = (1.0, 0.1) | map@r | {data_seed} | 3 | {mean:+.4f} | "
                f"[{mean - half:+.4f}, {mean + half:+.4f}] |") in text


def test_validation_selected_runs_count_their_best_epoch(tmp_path):
    root = str(tmp_path)
    for seed in (0, 1):
        best = {"epoch": 2, "recall@1": 0.9, "map@r": 0.5, "val/recall@1": 0.8}
        fake_run(root, f"a{seed}", weights=(1.0,), seed=seed, recall=0.7, map_r=0.3,
                 selected_on="val/recall@1", best=best)
    written = report.report(root, ["recall@1"])
    assert written["keys"] == [] and written["plots"] == []
    rows = list(csv.DictReader(open(written["csv"])))
    assert {(r["epoch"], r["selection"], r["recall@1"]) for r in rows} == {("2", "val/recall@1", "0.9")}
    assert "validation-selected epoch (the best by `val/recall@1`)" in open(written["markdown"]).read()


def test_sweep_axis_uses_the_varying_component_and_log_scale_when_values_span_decades():
    label, xs, numeric = report.sweep_axis("hpl.weights", [(1.0, 0.0), (1.0, 0.01), (1.0, 0.1), (1.0, 1.0)])
    assert label.startswith("w_1") and xs == [0.0, 0.01, 0.1, 1.0] and numeric
    assert report.spans_decades(xs)
    label, xs, numeric = report.sweep_axis("hpl.num_coarse", [(4,), (8,), (16,)])
    assert label.startswith("K_1") and xs == [4, 8, 16] and not report.spans_decades(xs)
    label, xs, numeric = report.sweep_axis("hpl.weights", [(1.0,), (1.0, 0.1)])
    assert label == "hpl.weights" and not numeric


def test_report_command_prints_the_table_and_a_missing_root_is_one_line(w1_sweep):
    result = subprocess.run([sys.executable, "-m", "hpl_jax.report", w1_sweep, "--metrics=map@r"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| (1.0, 0.1) | 3 | 0.3200 ± 0.0819 |" in result.stdout
    result = subprocess.run([sys.executable, "-m", "hpl_jax.report", w1_sweep + "/nothing"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"Report error: {w1_sweep}/nothing is not a directory; give the ROOT a sweep wrote into."]


def test_fields_that_say_how_a_run_ran_do_not_split_a_setting(w1_sweep):
    # A run resumed with a compilation cache (or other logging) is the same setting as the others.
    path = os.path.join(w1_sweep, "w0__seed=1", "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(compilation_cache_dir="/tmp/cache", log_every_steps=5)
    with open(path, "w") as f:
        json.dump(config, f)
    written = report.report(w1_sweep, ["map@r"])
    assert written["keys"] == ["hpl.weights"]
    assert [len(s.runs) for s in written["settings"]] == [3, 3, 2]
    # A field that changes what is trained still does.
    config["optim"] = {"lr": 0.01}
    with open(path, "w") as f:
        json.dump(config, f)
    assert report.report(w1_sweep, ["map@r"])["keys"] == ["hpl.weights", "optim.lr"]


def test_a_run_that_predates_a_field_reads_as_having_the_value_it_ran_under(w1_sweep):
    # Runs recorded before dataset.cache_* existed and runs after, with the values that reproduce the old input,
    # are one setting; another value of an added field is another setting.
    path = os.path.join(w1_sweep, "w0__seed=1", "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dataset"] = {"cache_decoded": False, "cache_shorter_side": 288, "cache_max_gb": 32.0}
    with open(path, "w") as f:
        json.dump(config, f)
    written = report.report(w1_sweep, ["map@r"])
    assert written["keys"] == ["hpl.weights"]
    assert [len(s.runs) for s in written["settings"]] == [3, 3, 2]
    config["dataset"]["cache_decoded"] = True
    with open(path, "w") as f:
        json.dump(config, f)
    assert report.report(w1_sweep, ["map@r"])["keys"] == ["hpl.weights", "dataset.cache_decoded"]
