"""The benchmark scripts run and print their tables (their figures are measured, never asserted)."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("rank_on_device", ["false", "true"])
def test_epoch_boundary_times_every_piece_of_a_tiny_sop_boundary(rank_on_device):
    # SOP's config with a tiny model and planted data of a few classes: every piece runs as at SOP scale, on the
    # host path of the metrics (a CPU's default) and on their one device program (an accelerator's).
    command = [sys.executable, "-m", "hpl_jax.benchmarks.epoch_boundary", "--config=configs/sop.py",
               "--config.model.backbone=resnet18", "--config.model.width=0.125", "--config.model.embedding_dim=16",
               "--config.dataset.image_size=16", "--config.dataset.resize_size=18", "--config.hpl.num_coarse=(4,)",
               "--config.eval.batch_size=16", "--num_train_classes=24", "--num_test_images=120",
               "--num_test_classes=30", "--eval_batches=2", f"--rank_on_device={rank_on_device}"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    device_s = {name.split(" (")[0]: float(seconds) for name, seconds in re.findall(
        r"^\| ([^|*]+?) \| -?[0-9.]+ \| (-?[0-9.]+)", result.stdout, flags=re.M)}
    if rank_on_device == "true":  # the device program's seconds are the device's, not the host's
        # "super metrics" is a difference of two timings, the second with the first's programs compiled: it can be
        # below zero (CI once printed -0.0x), so the call with super-classes is checked whole.
        assert device_s["metrics"] > 0 and device_s["metrics"] + device_s["super metrics"] > 0, result.stdout
    rows = dict(re.findall(r"^\| ([^|*]+?) \| (-?[0-9.]+) \| ", result.stdout, flags=re.M))
    names = [name.split(" (")[0] for name in rows]
    assert names == ["refresh", "embed-transfer", "metrics", "super metrics", "NMI", "checkpoint save", "logging",
                     "epoch boundary on average"], result.stdout
    assert "embed-transfer (8 batches of 16, uint8, 2 timed)" in rows
    total = float(re.search(r"^\| \*\*epoch boundary\*\* \| \*\*([0-9.]+)\*\*", result.stdout, flags=re.M)[1])
    pieces = [float(seconds) for name, seconds in rows.items() if not name.startswith("epoch boundary")]
    assert abs(total - sum(pieces)) < 0.01 * len(pieces)


def test_retrieval_benchmark_times_the_device_path_and_measures_approx_recall():
    # A tiny planted set on the device program with approx_max_k: the metrics, the timings and the recall line.
    command = [sys.executable, "-m", "hpl_jax.benchmarks.retrieval", "--num_items=600", "--num_classes=120",
               "--dim=16", "--repeats=1", "--rank_on_device=true", "--top_k_recall_target=0.9"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^super metrics: .*super/map@r [0-9.]+, .*top_k_recall_target 0.9000$", result.stdout,
                     flags=re.M), result.stdout
    assert re.search(r"^  retrieval_metrics \+ super +[0-9.]+ ", result.stdout, flags=re.M), result.stdout
    # XLA's CPU falls back to the exact top-k.
    assert re.search(r"^approx_max_k \(recall target 0.9\) against lax.top_k at k = 600 on the first 600 items: "
                     r"recall 1.0000$", result.stdout, flags=re.M), result.stdout


def test_input_pipeline_benchmark_rounds_over_the_pipelines_and_takes_medians():
    # CUB's recipe on tiny JPEGs, files and cache (torch only where it is installed), two rounds.
    command = [sys.executable, "-m", "hpl_jax.benchmarks.input_pipeline", "--config=configs/cub.py",
               "--config.batch_size=8", "--config.eval.batch_size=8", "--config.dataset.image_size=32",
               "--config.dataset.resize_size=40", "--config.dataset.cache_shorter_side=48", "--num_images=60",
               "--num_classes=4", "--width=80", "--height=60", "--rounds=2", "--pipelines=files,cache,torch"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = re.findall(r"^  (files|cache|torch) epoch (\d): [0-9.]+ images/s = [0-9.]+ per core", result.stdout,
                        flags=re.M)
    pipelines = ["files", "cache"] + (["torch"] if "torch epoch" in result.stdout else [])
    # Round 0 draws epochs 0 and 1 of each pipeline in turn, round 1 one more epoch of each.
    assert epochs == [(p, str(e)) for p in pipelines for e in (0, 1)] + [(p, "2") for p in pipelines]
    assert "cache: 0.00 GB for 45 images" in result.stdout
    for pipeline in pipelines:
        assert re.search(rf"^host cores to feed one accelerator from {pipeline} \(median of the rounds' last "
                         r"epochs, [0-9.]+ images/s per core\): \d+ cores for 6,478", result.stdout, flags=re.M)
    if "torch" in pipelines:
        assert re.search(r"^cache / torch, per core at steady state \(each round's last epoch\): [0-9.]+x "
                         r"[0-9.]+x; median [0-9.]+x$", result.stdout, flags=re.M), result.stdout


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_cpu_vs_torch_peer_has_our_trunk_at_every_width(width):
    # The embedded default's ratio (width 0.25) is only a ratio if the PyTorch peer is the same network at that width.
    torch = pytest.importorskip("torch")
    from hpl_jax import models
    from hpl_jax.benchmarks import cpu_vs_torch
    peer = cpu_vs_torch.torch_embedder(torch, 64, width)
    config = cpu_vs_torch.benchmark_config("auto", 8, 32, width, 64)
    assert sum(p.numel() for p in peer.backbone.parameters()) == cpu_vs_torch.trunk_size(config)
    assert (peer.embedding.in_features, peer.embedding.out_features) == (models.scaled_channels(512, width), 64)


def test_cpu_vs_torch_times_both_sides_at_a_tiny_size():
    command = [sys.executable, "-m", "hpl_jax.benchmarks.cpu_vs_torch", "--conv_impls=auto", "--steps=1",
               "--repeats=1", "--batch=4", "--image_size=16", "--width=0.125", "--embedding_dim=8", "--no_profile"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ResNet-18 x0.125, 8-d, 16 px, batch 4" in result.stdout
    assert re.search(r"^jax conv_impl=auto +[0-9.]+ images/s \(median\)", result.stdout, flags=re.M), result.stdout
    # The PyTorch side answers from its own process, or says in one line why it is skipped.
    if not all(importlib.util.find_spec(name) for name in ("torch", "pytorch_metric_learning")):
        assert "PyTorch peer: skipped (No module named" in result.stdout, result.stdout
    else:
        assert "peer in its own process" in result.stdout
        assert re.search(r"^jax conv_impl=auto .* = [0-9.]+x PyTorch", result.stdout, flags=re.M), result.stdout


def test_cpu_vs_torch_times_a_convolution_in_both_frameworks():
    torch = pytest.importorskip("torch")
    import jax
    from hpl_jax import models
    from hpl_jax.benchmarks import cpu_vs_torch
    module = models.conv(8, 3, 2, 1, jax.numpy.float32, "conv")
    x_shape = jax.ShapeDtypeStruct((2, 9, 9, 4), jax.numpy.float32)
    geometry = cpu_vs_torch.conv_geometry(module, x_shape)
    assert geometry == {"x_shape": [2, 9, 9, 4], "features": 8, "kernel_size": [3, 3], "strides": [2, 2],
                        "padding": [1, 1]}
    for times in (cpu_vs_torch.conv_times(module, x_shape, needs_input_grad=True),
                  cpu_vs_torch.torch_conv_times(torch, geometry, needs_input_grad=True)):
        assert set(times) == {"forward", "input_grad", "kernel_grad"} and min(times.values()) > 0, times
    assert cpu_vs_torch.torch_conv_times(torch, geometry, needs_input_grad=False)["input_grad"] == 0.0


def test_cpu_vs_torch_refuses_a_width_of_zero_in_one_line():
    result = subprocess.run([sys.executable, "-m", "hpl_jax.benchmarks.cpu_vs_torch", "--width=0"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--width must be above 0 and --embedding_dim at least 1 (got 0.0 and 512)")


def test_cpu_convolutions_times_each_implementation_and_says_what_auto_picks():
    command = [sys.executable, "-m", "hpl_jax.benchmarks.cpu_convolutions", "--batch=2", "--repeats=1",
               "--widths=0.25"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("  width 0.25:")]
    # The stem, layer1's 3x3, layer2's stride-2 and stride-1 3x3 and the three 1x1 downsamplings; layer3's and
    # layer4's 3x3 convolutions see maps smaller than their kernel (im2col in 'auto') and are left out.
    assert len(lines) == 7, result.stdout
    assert lines[0].startswith("  width 0.25: 7x7/2   3 ->  16 on 32x32") and lines[0].endswith("auto: oneDNN")
    assert all(re.search(r"xla +[0-9.]+  onednn +[0-9.]+  im2col +[0-9.]+ +oneDNN/XLA [0-9.]+", line)
               for line in lines), lines
    assert all(line.endswith("auto: im2col" if " 1x1/" in line else "auto: XLA") for line in lines[1:]), lines


def test_cpu_vs_torch_profiles_the_jax_step_without_the_peer():
    command = [sys.executable, "-m", "hpl_jax.benchmarks.cpu_vs_torch", "--conv_impls=auto", "--steps=1",
               "--repeats=1", "--batch=4", "--image_size=16", "--width=0.125", "--embedding_dim=8", "--no_torch"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^    conv forward +[0-9.]+ +[0-9.]+%$", result.stdout, flags=re.M), result.stdout
    assert "PyTorch" not in result.stdout.split("profile of the JAX step")[1]
