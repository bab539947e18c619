"""What a run tells: progress lines, TensorBoard scalars (tensorboardX: no TensorFlow) and metrics.json."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from hpl_jax.trainer import checkpointing


def best_epoch(history: Dict[int, Dict[str, float]], metric: str) -> int:
    """The evaluated epoch with the highest `metric` (the earliest on a tie). Epoch 0 is the untrained model:
    not a candidate unless it is the only epoch evaluated."""
    trained = sorted(epoch for epoch in history if epoch > 0) or [max(history)]
    return max(trained, key=lambda epoch: history[epoch].get(metric, -1.0))


def stops_early(history: Dict[int, Dict[str, float]], metric: str, patience: int) -> bool:
    """Whether training stops: the last evaluated epoch is more than `patience` epochs after the best epoch by
    `metric` (the rule of "A Metric Learning Reality Check", pytorch-metric-learning's `patience_remaining`:
    stop when epoch - best_epoch > patience). patience 0 = never; the untrained epoch 0 starts no count."""
    trained = [epoch for epoch in history if epoch > 0]
    return bool(patience and trained) and max(trained) - best_epoch(history, metric) > patience


def run_has_ended(workdir: str) -> bool:
    """Whether the run in `workdir` has ended: it evaluated its last epoch, or early stopping ended it (a run
    started again would stop at once). False for a run without metrics.json or config.json."""
    metrics_path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(metrics_path) or not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
        return False
    config = checkpointing.load_config(workdir)
    with open(metrics_path) as f:
        saved = json.load(f)
    history = {int(epoch): values for epoch, values in saved.get("history", {}).items()}
    if not history:
        return False
    return max(history) >= config.num_epochs or stops_early(
        history, saved.get("selected_on", "recall@1"), config.eval.get("early_stopping_patience", 0))


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch where PyTorch is installed but not loaded: tensorboardX
    imports torch for one isinstance check of tensors this project never passes (about 3 CPU seconds in every
    process that trains, measured in the test suite's runs)."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # while set, `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Reporter:
    """Progress lines, TensorBoard scalars (tensorboardX: no TensorFlow) and metrics.json; process 0 only.

    A run resumed at `resumed_step` (in epoch `resumed_epoch`) redoes what came after it: metrics.json drops
    the evaluations after that epoch and the refreshes after that step, and TensorBoard hides the events after
    that step (purge_step), so the redone steps are not shown twice. A fresh start (`resumed_step` None) redoes
    everything.
    """

    def __init__(self, workdir: epath.Path, total_steps: int, selection_metric: str = "recall@1",
                 resumed_step: Optional[int] = None, resumed_epoch: int = 0):
        """`selection_metric`: the metrics key the best epoch is chosen on ('val/...' when there is a
        validation split; see evaluation.selection_metric)."""
        self.is_lead = jax.process_index() == 0
        self.total_steps = total_steps
        self.selection_metric = selection_metric
        self.metrics_path = workdir / "metrics.json"
        self.history = {}
        self.refreshes = []
        self.notes: Dict[str, Any] = {}
        if self.metrics_path.exists():
            saved = json.loads(self.metrics_path.read_text())
            self.history = {int(k): v for k, v in saved["history"].items() if int(k) <= resumed_epoch}
            self.refreshes = [r for r in saved.get("refreshes", [])
                              if resumed_step is not None and r["step"] <= resumed_step]
        self.writer = None
        if self.is_lead:
            SummaryWriter = _summary_writer_class()
            # TensorBoard drops the events of steps >= purge_step written before this one.
            self.writer = SummaryWriter(str(workdir / "tensorboard"),
                                        purge_step=0 if resumed_step is None else resumed_step + 1)
        self._last_time, self._last_step = time.time(), None

    def restart_clock(self, step: int) -> None:
        """Measures the speed from `step` on, called once `step` is dispatched: what came before (compiling,
        evaluation) is not a training step. The clock counts `step` itself, so a line reported for it already has
        a rate (the time until its metrics are fetched, one step)."""
        self._last_time, self._last_step = time.time(), step - 1

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
        """Queues TensorBoard scalars: tensorboardX's own thread writes them to the event file (and flushes it every
        120 s); `flush` (each epoch's end, each evaluation) and `close` flush it from here. No flush per line: with
        a gs:// workdir each flush re-uploads the event file synchronously while the devices wait."""
        if self.writer:
            for name, value in values.items():
                # TensorBoard tag names allow no '@'.
                self.writer.add_scalar((prefix + name).replace("@", "_at_"), float(value), step)

    def flush(self) -> None:
        """Flushes the TensorBoard event file (the loop calls it at every epoch's end)."""
        if self.writer:
            self.writer.flush()

    def progress(self, epoch: int, num_epochs: int, step: int, images_per_step: int, values: Dict[str, float]):
        now = time.time()
        if self._last_step is None or step <= self._last_step:
            # No step ran since the last line (the same step reported twice): no rate to give.
            speed, rate, eta = float("nan"), "-", "-"
        else:
            steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
            speed = steps_per_s * images_per_step
            rate = f"{speed:.1f}"
            eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / steps_per_s))
        self._last_time, self._last_step = now, step
        levels = " ".join(f"{values[k]:.4f}" for k in sorted(values) if k.startswith("loss/level_"))
        hier = f" hier {values['loss/hier']:.4f}" if "loss/hier" in values else ""
        logging.info("epoch %d/%d step %d/%d loss %.4f (levels %s%s) lr %.2e %s img/s ETA %s",
                     epoch + 1, num_epochs, step, self.total_steps, values["loss"], levels, hier, values["lr"],
                     rate, eta)
        self.scalars(step, values if np.isnan(speed) else {**values, "images_per_second": speed})

    def evaluation(self, epoch: int, step: int, values: Dict[str, float]) -> None:
        self.history[epoch] = values
        logging.info("eval after epoch %d: %s", epoch,
                     " ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)))
        self.scalars(step, values, prefix="eval/")
        self.flush()
        self._write_json()

    def refresh(self, epoch: int, step: int, values: Dict[str, float]) -> None:
        """Records what a refresh of the groupings found (hierarchy.hierarchy_metrics, keys 'hierarchy/...'):
        one line in the log, TensorBoard scalars, and an entry of metrics.json's 'refreshes'."""
        self.refreshes = [r for r in self.refreshes if r["step"] < step] + [{"epoch": epoch, "step": step, **values}]

        def get(name, fmt="{:.3f}"):
            return fmt.format(values[name]) if name in values else "-"

        if "hierarchy/level_1_group_size_min" in values:  # HPL's coarse levels (a flat run with HIER has none)
            logging.info(
                "hierarchy after step %d: level 1 vs true super-classes NMI %s ARI %s purity %s (min %s); stability "
                "ARI %s; group sizes %s-%s; coarse norm %s (children %s); before the refresh: cos(proxy, children "
                "mean) %s (min %s)",
                step, get("hierarchy/level_1_nmi"), get("hierarchy/level_1_ari"), get("hierarchy/level_1_purity"),
                get("hierarchy/level_1_purity_min"), get("hierarchy/level_1_stability_ari"),
                get("hierarchy/level_1_group_size_min", "{:.0f}"), get("hierarchy/level_1_group_size_max", "{:.0f}"),
                get("hierarchy/level_1_norm_mean"), get("hierarchy/level_0_norm_mean"),
                get("hierarchy/level_1_child_cosine_before_mean"), get("hierarchy/level_1_child_cosine_before_min"))
        if "hierarchy/hier_radius_mean" in values:
            logging.info("HIER's proxies after step %d: radius in the ball %s (min %s, max %s of 1)", step,
                         get("hierarchy/hier_radius_mean"), get("hierarchy/hier_radius_min"),
                         get("hierarchy/hier_radius_max"))
        self.scalars(step, values)
        self._write_json()

    def annotate(self, notes: Dict[str, Any]) -> None:
        """Adds top-level entries to metrics.json (e.g. skipped_images)."""
        self.notes.update(notes)
        self._write_json()

    def _write_json(self) -> None:
        if self.is_lead:
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            content = {"selected_on": self.selection_metric, "history": self.history, **self.summary(),
                       "refreshes": self.refreshes, **self.notes}
            try:
                tmp.write_text(json.dumps(content, indent=2))
                tmp.replace(self.metrics_path)
            except OSError as error:
                raise checkpointing.WorkdirError(f"cannot write {self.metrics_path} ({error.strerror or error}); "
                                                 "free space or fix the file system, then run the same command "
                                                 "again to resume.") from None

    def summary(self) -> Dict[str, Any]:
        """The last and the best epoch's metrics (docs/method.md: report both; the published ones are the best).

        The best epoch is chosen on `selection_metric`: on the validation classes when there are any.
        """
        if not self.history:
            return {}
        last, best = max(self.history), best_epoch(self.history, self.selection_metric)
        return {"last": {"epoch": last, **self.history[last]}, "best": {"epoch": best, **self.history[best]}}

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def format_notes(summary: Dict[str, Any], notes: Dict[str, Any]) -> List[str]:
    """The lines under the final table: what the metrics alone do not tell."""
    lines = []
    if notes.get("skipped_images"):
        lines.append(f"images that failed to decode and were skipped: {notes['skipped_images']} "
                     "(counted at every read, in every epoch and evaluation)")
    if notes.get("skipped_steps"):
        lines.append(f"non-finite steps skipped (optim.skip_nonfinite_steps): {notes['skipped_steps']}")
    best = summary["best"]["epoch"] if summary else 0
    if "best_checkpoint_epoch" in notes and best >= 1 and notes["best_checkpoint_epoch"] != best:
        held = notes["best_checkpoint_epoch"]
        lines.append(f"best/ {'is empty' if held is None else f'holds epoch {held}'}, not epoch {best}: that "
                     "epoch's checkpoint was lost when the run stopped")
    return lines
