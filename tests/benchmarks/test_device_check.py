"""The device check's dry run: every stage of launch/device_check.sh at tiny shapes on the CPU, so it cannot rot
before the next GPU lease (hpl_jax/benchmarks/device_check.py)."""
import json
import os
import subprocess
import sys

import pytest

from hpl_jax.benchmarks import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.long
def test_dry_run_runs_every_stage_and_writes_both_files(tmp_path):
    out = tmp_path / "out"
    # The launch script, as a GPU machine runs it: it must parse its flags and write into OUT.
    finished = subprocess.run(["bash", os.path.join(ROOT, "launch", "device_check.sh"), str(out), "--dry_run",
                               "--budget_s=100000"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")})
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((out / "device_check.json").read_text())
    names = [name for name, _ in device_check.stages(device_check.DRY, dry_run=True)]
    assert list(results["stages"]) == names
    assert results["total_stages"] == len(names)
    for name, stage in results["stages"].items():
        assert "error" not in stage, (name, stage)
        if name.endswith("_torch") and not _torch_importable():
            assert "No module named 'torch'" in stage["skipped"], stage
        else:
            assert "skipped" not in stage, (name, stage)
    for pair in ("train_cub", "train_sop", "train_sop_b360"):
        ours = results["stages"][f"{pair}_jax"]
        assert ours["images_per_s"] > 0 and ours["loss_finite"], ours
        assert ours["batch"] == (device_check.DRY.big_batch if pair.endswith("b360") else device_check.DRY.batch)
    assert results["stages"]["train_sop_jax"]["proxies"] == (
        f"{device_check.DRY.sop_classes} + {device_check.DRY.sop_coarse}")
    assert results["stages"]["loss_sop"]["hpl"] > 0
    assert_retrieval_stage(results["stages"]["retrieval_sop"])
    assert results["stages"]["kmeans_sop"]["refresh_shape"] == (
        f"{device_check.DRY.sop_classes} into {device_check.DRY.sop_coarse}")
    table = results["stages"]["default_end_to_end"]["final_table"]
    assert table[0].split()[0] == "metric" and any(line.startswith("recall@1") for line in table)
    page = (out / "device_check.md").read_text()
    assert "| train_cub (batch 8, proxies 10 + 2) |" in page and "## default_end_to_end" in page


def assert_retrieval_stage(retrieval):
    """Every path of the retrieval stage ran twice; all find the same nearest neighbours' classes."""
    for name in ("host_preparation", "device", "host_path", "device_super", "device_super_approx", "jax_knn"):
        assert len(retrieval[f"{name}_s"]) == 2, name
    recall = retrieval["device_recall@1"]
    assert 0 < recall == retrieval["host_path_recall@1"] == retrieval["device_super_recall@1"]
    assert recall == pytest.approx(retrieval["jax_knn_recall@1"], abs=1e-4)
    assert retrieval["device_vs_host_path_largest_difference"] < 1e-6
    # On a CPU XLA's approx_max_k is the exact top-k: recall 1, the same metrics.
    assert retrieval["device_super_approx_equals_exact"] and retrieval["approx_max_k_recall"] == 1.0
    if _torch_importable():
        assert recall == pytest.approx(retrieval["torch_knn_recall@1"], abs=1e-4)
        assert retrieval["ratio_device_over_torch_knn"] > 0
    else:
        assert "No module named 'torch'" in retrieval["torch_knn"]


def test_retrieval_stage_dry_run_times_every_path():
    assert_retrieval_stage(device_check.retrieval(device_check.DRY))


def test_markdown_reports_a_failed_stage_and_a_missing_peer():
    results = {"dry_run": True, "finished_stages": 1, "total_stages": 3, "elapsed_s": 1.0, "stages": {
        "train_cub_jax": {"images_per_s": 10.0, "ms_per_step": 800.0, "compile_s": 1.0, "peak_device_gib": None,
                          "batch": 8, "proxies": "10 + 2"},
        "train_cub_torch": {"skipped": "ModuleNotFoundError: No module named 'torch'"},
        "train_sop_jax": {"error": "RuntimeError: out of memory"}}}
    page = device_check.markdown(results)
    assert "| train_cub (batch 8, proxies 10 + 2) | 10.0 | 800.0 | 1.0 | None | ModuleNotFoundError" in page
    assert "| train_sop | RuntimeError: out of memory |" in page
