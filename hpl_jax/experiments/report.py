"""Collects a sweep's results: a CSV of every run, a Markdown table over seeds, paired differences, plots.

  python -m hpl_jax.report ROOT [--metrics=map@r,recall@1] [--baseline='hpl.weights=(1.0,0.0)']

ROOT holds one workdir per run (as `hpl_jax.sweep` makes them). For each finished run it reads config.json and
metrics.json and takes the metrics of one epoch: the validation-selected epoch (metrics.json's `best`) when
the run selected on validation classes (`selected_on` starts with 'val/'), else its last epoch; never an
epoch selected on test. Writes:
  ROOT/results.csv  one row per run: run, the swept fields, seed, data seed, epoch, selection, every metric;
  ROOT/results.md   per setting (the swept values) the mean +- sample std over its runs and their number; for
                    each other setting the difference to the baseline setting paired over the runs with the
                    same seeds, with a 95% t-interval (and per data seed, when the runs have several);
                    which epoch counted;
  ROOT/<metric>.png for a 1-D sweep: each --metrics entry against the swept value, mean +- std over seeds.
The swept fields are the config fields that differ between the runs (seeds aside). The baseline setting is
the one `--baseline KEY=VALUE` (repeatable) names, else the first in the sweep's order.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.stats
from absl import app
from absl import flags
from matplotlib.figure import Figure

FLAGS = flags.FLAGS
SEED_KEYS = ("seed", "dataset.seed")
# Fields that say how a run ran, not what it trained: runs that differ only in them are one setting (a sweep resumed
# with a compilation cache, say).
HOW_IT_RAN = ("compilation_cache_dir", "log_every_steps", "checkpoint.keep", "checkpoint.every_steps",
              "dataset.data_dir", "dataset.manual_dir", "model.conv_impl")
# Fields added after runs were recorded, each with the value a run that predates it ran under (what the code did
# before the field existed): a config.json without the field reads as having that value, so a sweep resumed across
# the change stays one setting per grid point.
ADDED_FIELDS = {"dataset.cache_decoded": False, "dataset.cache_shorter_side": 288, "dataset.cache_max_gb": 32.0}
# Names of docs/method.md for the swept components that Figure 5 plots.
AXIS_NAMES = {"hpl.weights[1]": "w_1 (weight of level 1)", "hpl.num_coarse[0]": "K_1 (coarse proxies of level 1)"}
DPI = 80


def define_flags() -> None:
    flags.DEFINE_list("metrics", ["recall@1", "map@r"], "Metrics of results.md and of the plots (keys of "
                      "metrics.json, e.g. map@r, recall@1, r_precision, super/map@r).")
    flags.DEFINE_multi_string("baseline", [], "KEY=VALUE naming the setting the others are compared with "
                              "(repeatable); default: the first setting.")


# ----------------------------------------------------------------------------------------------- reading
def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': [1, 2]}} -> {'a.b': (1, 2)}: dotted keys, JSON lists as tuples."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = as_tuple(value)
    return flat


def as_tuple(value):
    return tuple(as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run's counted epoch.

    selection: 'last' or the validation key it was selected on ('val/recall@1').
    metrics: every float metric of that epoch.
    """

    name: str
    config: Dict[str, Any]
    epoch: int
    selection: str
    metrics: Dict[str, float]
    finished: bool

    @property
    def seeds(self) -> Tuple:
        return tuple(self.config.get(key) for key in SEED_KEYS)


def counted_epoch(metrics_file: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """The epoch that counts: metrics.json's `best` when it was selected on validation, else its `last`."""
    selected_on = metrics_file.get("selected_on", "")
    if selected_on.startswith("val/"):
        return metrics_file["best"], selected_on
    return metrics_file["last"], "last"


def read_run(workdir: str) -> Optional[RunResult]:
    """The run in `workdir`, or None when it has no config.json or metrics.json (not a run, or not started)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            config = {**ADDED_FIELDS, **flatten(json.load(f))}
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics_file = json.load(f)
    except FileNotFoundError:
        return None
    entry, selection = counted_epoch(metrics_file)
    metrics = {k: float(v) for k, v in entry.items() if k != "epoch" and isinstance(v, (int, float))
               and not k.endswith("num_queries") and not k.endswith("num_queries_without_positive")}
    return RunResult(name=os.path.basename(os.path.normpath(workdir)), config=config, epoch=int(entry["epoch"]),
                     selection=selection, metrics=metrics,
                     finished=int(metrics_file["last"]["epoch"]) >= int(config["num_epochs"]))


def read_runs(root: str) -> List[RunResult]:
    runs = [read_run(os.path.join(root, name)) for name in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, name))]
    return [run for run in runs if run is not None]


def swept_keys(runs: Sequence[RunResult], grid_order: Sequence[str] = ()) -> List[str]:
    """The config fields whose values differ between runs (seeds and HOW_IT_RAN aside), the sweep's grid order
    first."""
    keys = sorted({key for run in runs for key in run.config})
    differing = [key for key in keys if key not in SEED_KEYS and key not in HOW_IT_RAN
                 and len({json.dumps(run.config.get(key)) for run in runs}) > 1]
    return [k for k in grid_order if k in differing] + [k for k in differing if k not in grid_order]


def parse_value(text: str):
    """A value written on the command line, as config.json holds it: '(1.0,0.1)' -> (1.0, 0.1); 'abc' -> 'abc'."""
    try:
        return as_tuple(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return text


def format_value(value) -> str:
    return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")" \
        if isinstance(value, tuple) else str(value)


# ----------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample standard deviation with ddof = 1 (nan for one value), n)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)


def paired_difference(setting: Dict[Tuple, float], baseline: Dict[Tuple, float],
                      confidence: float = 0.95) -> Tuple[float, float, float, int]:
    """Mean of setting - baseline over the seeds both have, and its t-interval (nan below two pairs).

    setting, baseline: {seeds: metric}. Returns (mean, low, high, number of pairs).
    """
    shared = sorted(set(setting) & set(baseline), key=str)
    if not shared:
        return math.nan, math.nan, math.nan, 0
    differences = np.asarray([setting[s] - baseline[s] for s in shared], np.float64)
    mean, sd, n = mean_std(differences)
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


# ----------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class Setting:
    """The runs that share the swept values. values: one per swept key."""

    values: Tuple
    runs: List[RunResult]

    def per_seed(self, metric: str) -> Dict[Tuple, float]:
        return {run.seeds: run.metrics[metric] for run in self.runs if metric in run.metrics}


def group_settings(runs: Sequence[RunResult], keys: Sequence[str],
                   grid: Optional[Dict[str, List[str]]] = None) -> List[Setting]:
    """The runs grouped by their swept values, in the sweep's grid order when known, else by value."""
    settings: Dict[Tuple, Setting] = {}
    for run in runs:
        values = tuple(run.config.get(key) for key in keys)
        settings.setdefault(values, Setting(values, [])).runs.append(run)
    grid = grid or {}

    def order(setting: Setting):
        ranks = []
        for key, value in zip(keys, setting.values):
            listed = [parse_value(v) for v in grid.get(key, [])]
            ranks.append((listed.index(value), value_order(value)) if value in listed
                         else (len(listed), value_order(value)))
        return ranks

    return sorted(settings.values(), key=order)


def find_baseline(settings: Sequence[Setting], keys: Sequence[str], specs: Sequence[str]) -> Setting:
    """The setting `--baseline KEY=VALUE` entries name (each KEY a swept field); the first one without."""
    wanted = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or key not in keys:
            raise ValueError(f"--baseline {spec!r}: write KEY=VALUE with KEY one of the swept fields {list(keys)}.")
        wanted[keys.index(key)] = parse_value(value.strip())
    matches = [s for s in settings if all(s.values[i] == v for i, v in wanted.items())]
    if not matches:
        raise ValueError(f"--baseline {' '.join(specs)} matches no setting; the settings are "
                         f"{[describe(keys, s.values) for s in settings]}.")
    return matches[0]


def value_order(value):
    """A sort key for config values of any type: numbers by value, tuples element-wise, the rest as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    if isinstance(value, tuple):
        return (1, tuple(value_order(v) for v in value))
    return (2, str(value))


def describe(keys: Sequence[str], values: Sequence) -> str:
    return ", ".join(f"{key} = {format_value(value)}" for key, value in zip(keys, values)) or "all runs"


# ----------------------------------------------------------------------------------------------- writing
def write_csv(path: str, runs: Sequence[RunResult], keys: Sequence[str]) -> None:
    metric_names = list(dict.fromkeys(name for run in runs for name in run.metrics))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, "seed", "data_seed", "epoch", "selection", *metric_names])
        for run in runs:
            writer.writerow([run.name, *(format_value(run.config.get(k)) for k in keys), *run.seeds,
                             run.epoch, run.selection, *(run.metrics.get(m, "") for m in metric_names)])


def selection_sentence(runs: Sequence[RunResult]) -> str:
    selections = sorted({run.selection for run in runs})
    if selections == ["last"]:
        return ("Epoch counted: each run's last epoch (the runs hold out no validation classes, so no epoch is "
                "selected; selecting on test would flatter them).")
    if "last" not in selections:
        return (f"Epoch counted: each run's validation-selected epoch (the best by "
                f"{' / '.join(f'`{s}`' for s in selections)}); its test metrics are reported.")
    counts = {s: sum(run.selection == s for run in runs) for s in selections}
    return ("Epoch counted: mixed; " + ", ".join(f"{n} run(s) {'last epoch' if s == 'last' else f'selected on `{s}`'}"
                                                 for s, n in counts.items()) + ".")


def cell(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"


def difference_cells(setting: Dict[Tuple, float], baseline: Dict[Tuple, float]) -> str:
    """'pairs | mean difference | 95% CI' of a results.md row."""
    mean, low, high, n = paired_difference(setting, baseline)
    interval = "n/a (fewer than 2 pairs)" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
    return f"{n} | {'-' if n == 0 else f'{mean:+.4f}'} | {interval}"


def markdown(root: str, runs: Sequence[RunResult], unfinished: Sequence[RunResult], keys: Sequence[str],
             settings: Sequence[Setting], baseline: Optional[Setting], metrics: Sequence[str],
             plots: Sequence[str]) -> str:
    lines = [f"# Results: {root}", "",
             f"{len(runs)} finished runs in {len(settings)} setting(s). {selection_sentence(runs)}",
             "Cells: mean ± sample standard deviation (ddof = 1) over the runs of a setting; n = number of runs "
             "(seeds).", ""]
    header = [*(keys or ["setting"]), "n", *metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        cells = [format_value(v) for v in setting.values] or ["all runs"]
        cells.append(str(len(setting.runs)))
        for metric in metrics:
            values = list(setting.per_seed(metric).values())
            cells.append(cell(*mean_std(values)[:2]) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None and len(settings) > 1:
        lines += ["", f"## Paired differences against {describe(keys, baseline.values)}", "",
                  "Difference = setting - baseline, over the runs of both with the same seeds (training seed, "
                  "data seed); 95% t-interval of the mean difference (scipy.stats.t, n - 1 degrees of freedom).",
                  "", "| setting | metric | pairs | mean difference | 95% CI |", "|---|---|---|---|---|"]
        for setting in settings:
            if setting is baseline:
                continue
            for metric in metrics:
                cells = difference_cells(setting.per_seed(metric), baseline.per_seed(metric))
                lines.append(f"| {describe(keys, setting.values)} | {metric} | {cells} |")
        # Data seeds are other data, not other draws of the same: the pooled interval above treats every
        # (seed, data seed) pair alike, so each data seed's own difference is shown too.
        data_seeds = sorted({run.seeds[1] for run in runs}, key=value_order)
        if len(data_seeds) > 1:
            lines += ["", "### The same per data seed", "",
                      "| setting | metric | data seed | pairs | mean difference | 95% CI |", "|---|---|---|---|---|---|"]
            for setting in settings:
                if setting is baseline:
                    continue
                for metric in metrics:
                    for data_seed in data_seeds:
                        of_seed = [{s: v for s, v in per_seed.items() if s[1] == data_seed}
                                   for per_seed in (setting.per_seed(metric), baseline.per_seed(metric))]
                        lines.append(f"| {describe(keys, setting.values)} | {metric} | {format_value(data_seed)} | "
                                     f"{difference_cells(*of_seed)} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    if unfinished:
        lines += ["", "Not finished (left out): " + ", ".join(run.name for run in unfinished) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plots
def sweep_axis(key: str, values: Sequence) -> Tuple[str, List, bool]:
    """(axis label, x per value, numeric?) of a 1-D sweep. Tuples that differ in one position (w = (1, w_1))
    are plotted against that position."""
    if all(isinstance(v, tuple) for v in values) and len({len(v) for v in values}) == 1:
        varying = [i for i in range(len(values[0])) if len({v[i] for v in values}) > 1]
        if len(varying) == 1:
            label = f"{key}[{varying[0]}]"
            return AXIS_NAMES.get(label, label), [v[varying[0]] for v in values], True
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return AXIS_NAMES.get(key, key), list(values), numeric


def spans_decades(xs: Sequence[float]) -> bool:
    positive = [x for x in xs if x > 0]
    return len(set(xs)) >= 3 and len(positive) >= 2 and max(positive) / min(positive) >= 10.0


def plot_metric(path: str, key: str, settings: Sequence[Setting], metric: str, selection: str) -> None:
    """Mean +- std of `metric` against the swept value: log x when the values span decades (symlog when one is
    0, so w_1 = 0 still shows), categorical when they are not numbers."""
    label, xs, numeric = sweep_axis(key, [s.values[0] for s in settings])
    stats = [mean_std(list(s.per_seed(metric).values())) if s.per_seed(metric) else (math.nan, math.nan, 0)
             for s in settings]
    means, stds = np.array([m for m, _, _ in stats]), np.array([s for _, s, _ in stats])
    positions = np.asarray(xs, np.float64) if numeric else np.arange(len(xs), dtype=np.float64)
    fig = Figure(figsize=(5.0, 3.6), dpi=DPI)
    ax = fig.subplots()
    ax.errorbar(positions, means, yerr=np.nan_to_num(stds), marker="o", capsize=4)
    if numeric and spans_decades(xs):
        if min(xs) <= 0:
            ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
        else:
            ax.set_xscale("log")
    ax.set_xticks(positions, [format_value(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.set_ylabel(metric)
    runs = sorted({n for _, _, n in stats})
    ax.set_title(f"{metric}: mean ± std over {'/'.join(map(str, runs))} seeds ({selection})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def metric_file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric.replace("@", "_at_")) + ".png"


# ----------------------------------------------------------------------------------------------- command
def report(root: str, metrics: Sequence[str], baseline_specs: Sequence[str] = ()) -> Dict[str, Any]:
    """Writes results.csv, results.md and the plots of ROOT; returns what it wrote and the settings."""
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory; give the ROOT a sweep wrote into.")
    every = read_runs(root)
    runs, unfinished = [r for r in every if r.finished], [r for r in every if not r.finished]
    if not runs:
        raise ValueError(f"{root} holds no finished run (a directory with config.json and metrics.json whose "
                         "last epoch is config.num_epochs).")
    grid = {}
    if os.path.exists(os.path.join(root, "sweep.json")):
        with open(os.path.join(root, "sweep.json")) as f:
            grid = json.load(f)["grid"]
    keys = swept_keys(runs, list(grid))
    settings = group_settings(runs, keys, grid)
    baseline = find_baseline(settings, keys, baseline_specs) if baseline_specs else settings[0]
    missing = [m for m in metrics if not any(m in run.metrics for run in runs)]
    if missing:
        known = list(dict.fromkeys(name for run in runs for name in run.metrics))
        raise ValueError(f"--metrics {missing} are not in the runs' metrics.json; they have {known}.")
    ordered = [run for setting in settings for run in sorted(setting.runs, key=lambda r: value_order(r.seeds))]
    write_csv(os.path.join(root, "results.csv"), ordered, keys)
    plots = []
    if len(keys) == 1 and len(settings) > 1:
        selection = "last epoch" if {r.selection for r in runs} == {"last"} else "validation-selected epoch"
        for metric in metrics:
            plots.append(os.path.join(root, metric_file_name(metric)))
            plot_metric(plots[-1], keys[0], settings, metric, selection)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(markdown(root, runs, unfinished, keys, settings, baseline, metrics, plots))
    return dict(csv=os.path.join(root, "results.csv"), markdown=os.path.join(root, "results.md"), plots=plots,
                keys=keys, settings=settings, baseline=baseline)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("Give the sweep's ROOT: python -m hpl_jax.report ROOT [--metrics=...]")
    try:
        written = report(argv[1], FLAGS.metrics, FLAGS.baseline)
    except ValueError as error:
        sys.exit(f"Report error: {error}")
    with open(written["markdown"]) as f:
        print(f.read())
    print("wrote " + ", ".join([written["csv"], written["markdown"], *written["plots"]]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
