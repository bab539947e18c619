"""The benchmark scripts run and print their tables (their figures are measured, never asserted)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_epoch_boundary_times_every_piece_of_a_tiny_sop_boundary():
    # SOP's config with a tiny model and planted data of a few classes: every piece runs as at SOP scale.
    command = [sys.executable, "-m", "hpl_jax.benchmarks.epoch_boundary", "--config=configs/sop.py",
               "--config.model.backbone=resnet18", "--config.model.width=0.125", "--config.model.embedding_dim=16",
               "--config.dataset.image_size=16", "--config.dataset.resize_size=18", "--config.hpl.num_coarse=(4,)",
               "--config.eval.batch_size=16", "--num_train_classes=24", "--num_test_images=120",
               "--num_test_classes=30", "--eval_batches=2"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^\| ([^|*]+?) \| (-?[0-9.]+) \| ", result.stdout, flags=re.M))
    names = [name.split(" (")[0] for name in rows]
    assert names == ["refresh", "embed-transfer", "metrics", "super metrics", "NMI", "checkpoint save", "logging",
                     "epoch boundary on average"], result.stdout
    assert "embed-transfer (8 batches of 16, uint8, 2 timed)" in rows
    total = float(re.search(r"^\| \*\*epoch boundary\*\* \| \*\*([0-9.]+)\*\*", result.stdout, flags=re.M)[1])
    pieces = [float(seconds) for name, seconds in rows.items() if not name.startswith("epoch boundary")]
    assert abs(total - sum(pieces)) < 0.01 * len(pieces)
