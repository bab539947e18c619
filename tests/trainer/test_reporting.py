"""What a run reports: TensorBoard after a resume, the speed and ETA around compiles."""
import glob
import os
import struct
import subprocess
import sys
import time

from tensorboardX.proto import event_pb2

from hpl_jax.trainer import reporting


def _events(logdir):
    """Every event of every event file, oldest file first (TFRecord framing: length, crc, data, crc)."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            content = f.read()
        offset = 0
        while offset < len(content):
            (length,) = struct.unpack("<Q", content[offset:offset + 8])
            events.append(event_pb2.Event.FromString(content[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def _as_tensorboard_shows(events):
    """(tag, step) -> the values TensorBoard shows: a session START at step s hides the earlier events of
    steps >= s (TensorBoard's purge of orphaned data)."""
    shown = []
    for event in events:
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            shown = [(tag, step, value) for tag, step, value in shown if step < event.step]
        for value in event.summary.value:
            shown.append((value.tag, event.step, value.simple_value))
    points = {}
    for tag, step, value in shown:
        points.setdefault((tag, step), []).append(value)
    return points


def test_a_resume_shows_each_step_and_evaluation_once(tmp_path):
    first = reporting.Reporter(tmp_path, total_steps=6)
    for step in range(1, 6):  # 2 steps per epoch; killed after step 5; the latest checkpoint is at step 3
        first.progress(step // 2, 3, step, 8, {"loss": 10.0 - step, "lr": 0.1})
        if step % 2 == 0:
            first.evaluation(step // 2, step, {"recall@1": 0.5})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    resumed = reporting.Reporter(tmp_path, total_steps=6, resumed_step=3, resumed_epoch=1)
    assert sorted(resumed.history) == [1]  # the evaluation after epoch 2 (step 4) is redone
    for step in range(4, 7):
        resumed.progress(step // 2, 3, step, 8, {"loss": 100.0 + step, "lr": 0.1})
    resumed.close()

    points = _as_tensorboard_shows(_events(tmp_path / "tensorboard"))
    losses = {step: values for (tag, step), values in points.items() if tag == "loss"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(len(values) == 1 for values in losses.values())
    assert losses[3] == [7.0] and losses[4] == [104.0]  # before the checkpoint: kept; after it: redone


def test_speed_and_eta_leave_out_what_happened_before_the_clock_restarted(tmp_path, monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(reporting.time, "time", lambda: clock[0])
    reporter = reporting.Reporter(tmp_path, total_steps=110)
    clock[0] = 1.0
    reporter.progress(0, 2, 10, 8, {"loss": 1.0, "lr": 0.1})
    clock[0] = 2.0  # 10 steps per second
    reporter.progress(0, 2, 20, 8, {"loss": 1.0, "lr": 0.1})
    clock[0] = 302.0  # the epoch ends: evaluation, then the next epoch's step function compiles for 5 minutes
    reporter.restart_clock(21)
    clock[0] = 302.5
    caplog.set_level("INFO")
    reporter.progress(1, 2, 30, 8, {"loss": 1.0, "lr": 0.1})
    line = caplog.records[-1].getMessage()
    # Steps 21..30 in 0.5 s (the clock restarts once step 21 is dispatched): 20 steps/s of 8 images; (110 - 30)
    # steps to go.
    assert "160.0 img/s ETA 00:00:04" in line, line
    reporter.close()


def test_an_epochs_first_line_has_a_rate_when_it_reports_the_step_the_clock_restarted_at(tmp_path, monkeypatch,
                                                                                        caplog):
    clock = [0.0]
    monkeypatch.setattr(reporting.time, "time", lambda: clock[0])
    reporter = reporting.Reporter(tmp_path, total_steps=100)
    reporter.restart_clock(51)  # the epoch's first step, dispatched
    clock[0] = 0.25
    caplog.set_level("INFO")
    reporter.progress(1, 2, 51, 8, {"loss": 1.0, "lr": 0.1})  # log_every_steps = 1, or 51 is due
    line = caplog.records[-1].getMessage()
    assert "nan" not in line and "?" not in line, line
    assert "32.0 img/s ETA 00:00:12" in line, line  # 1 step in 0.25 s; 49 steps to go
    reporter.progress(1, 2, 51, 8, {"loss": 1.0, "lr": 0.1})  # the same step again: no rate, and no NaN
    assert "- img/s ETA -" in caplog.records[-1].getMessage()
    reporter.close()



def test_progress_lines_queue_tensorboard_scalars_and_epoch_ends_flush_them(tmp_path, monkeypatch):
    reporter = reporting.Reporter(tmp_path, total_steps=20)
    flushes = []
    flush = reporter.writer.flush
    monkeypatch.setattr(reporter.writer, "flush", lambda: flushes.append(1) or flush())
    for step in range(1, 11):
        reporter.progress(0, 2, step, 8, {"loss": float(step), "lr": 0.1})
    assert flushes == []
    reporter.flush()  # the loop's epoch end
    assert len(flushes) == 1
    reporter.evaluation(1, 10, {"recall@1": 0.5})
    assert len(flushes) == 2
    reporter.progress(1, 2, 11, 8, {"loss": 11.0, "lr": 0.1})
    reporter.close()
    points = _as_tensorboard_shows(_events(tmp_path / "tensorboard"))
    assert sorted(step for tag, step in points if tag == "loss") == list(range(1, 12))
    assert points[("eval/recall_at_1", 10)] == [0.5]


def test_a_run_writes_tensorboard_without_loading_pytorch(tmp_path):
    # tensorboardX imports torch wherever it is installed (about 3 CPU-seconds in every training process); the
    # Reporter's writer is imported without it, and torch, where installed, still imports afterwards.
    code = f"""
import importlib.util, sys
from etils import epath
from hpl_jax.trainer import reporting
reporter = reporting.Reporter(epath.Path({str(tmp_path)!r}), total_steps=10)
reporter.scalars(1, {{"loss": 1.0}})
reporter.close()
assert "torch" not in sys.modules, "tensorboardX loaded torch"
if importlib.util.find_spec("torch") is not None:
    import torch
    print("torch", torch.__version__)
"""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_events(os.path.join(tmp_path, "tensorboard"))) >= 2  # the file version and the scalar
