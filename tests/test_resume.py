"""Resuming pretraining after a kill or a preemption signal ends exactly where an uninterrupted
run ends: the same encoder tensors, the same losses, the same evaluation metrics (CPU).

Interruptions are real: signals sent to the training process (SIGUSR1/SIGTERM from inside a
step, SIGKILL to a `python -m sslpipe pretrain` subprocess, SIGTERM to a whole Snakemake
session as SLURM sends it); the only test hook is a method subclass that sends the signal
from a given step or returns a NaN loss.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sslpipe import data
from sslpipe import pretrain as pt
from sslpipe.config import resolve
from sslpipe.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
# Bit-exact comparisons need one thread count throughout; one thread is also the fastest here
# (a tiny model, and OpenMP threads spin-wait on a busy machine).
THREADS = 1
# 192 images / batch 64 = 3 steps per epoch, 36 steps in all: long enough to catch a subprocess
# between its first checkpoint and its end. The CPU, where resuming is bit-exact.
TINY = {
    "name": "resume",
    "seeds": [0],
    "methods": sorted(METHODS),  # every registered method, so a rewritten or new one is covered
    "device": "cpu",
    "data": {"source": "digits", "image_size": 16, "max_train": 192, "max_test": 60},
    "model": {"width": 8},
    "pretrain": {"epochs": 12, "batch_size": 64, "warmup_epochs": 0},
    "moco": {"queue_size": 128},
    "pirl": {"grid": 2, "num_negatives": 64},
    "cd": {"langevin_steps": 3, "buffer_size": 128},
    "evaluate": {"probe_steps": 30, "weight_decays": [0.0, 0.001], "baselines": []},
    "augment": {"benchmark_images": 64},
    "tracking": {"enabled": False},
}
TIMING = ("images_per_s", "wall_s")  # history columns that measure the machine, not the training
NO_TRACKING = json.dumps({"enabled": False})


@pytest.fixture(autouse=True, scope="module")
def fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The resolved config, a prepared digits set and each method's policy, as the stages write them."""
    root = tmp_path_factory.mktemp("resume")
    cfg = resolve(TINY)
    data_dir = root / "data"
    data.prepare(cfg["data"], data_dir)
    policies = {}
    for m in TINY["methods"]:
        policies[m] = root / f"policy_{m}.json"
        policies[m].write_text(json.dumps(METHODS[m].policy(cfg[m], cfg["data"]["image_size"])))
    return {"root": root, "cfg": cfg, "data_dir": data_dir, "policies": policies}


@pytest.fixture(scope="module")
def clean(tiny):
    """method -> the output dir of an uninterrupted run (no checkpoint), computed once."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            out = tiny["root"] / f"clean_{method}"
            pt.run(tiny["cfg"], method, 0, tiny["data_dir"], tiny["policies"][method], out, echo=lambda s: None)
            done[method] = out
        return done[method]

    return get


def history(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def assert_same_training(out_dir: Path, reference: Path) -> None:
    a = torch.load(out_dir / "encoder.pt", weights_only=True)
    b = torch.load(reference / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"encoder tensors differ from the uninterrupted run: {different}"
    assert history(out_dir / "history.csv") == history(reference / "history.csv")


def interrupting(base: type, stops: dict[int, str]) -> type:
    """`base` whose k-th loss call in this process sends itself the signal stops[k] (mid-step)."""
    class Interrupting(base):
        calls = 0

        def loss(self, x, idx):
            type(self).calls += 1
            if type(self).calls in stops:
                os.kill(os.getpid(), getattr(signal, stops[type(self).calls]))
            return super().loss(x, idx)

    return Interrupting


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_after_signals_equals_an_uninterrupted_run(tiny, clean, method, monkeypatch, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "checkpoints" / "checkpoint.pt"
    args = (tiny["cfg"], method, 0, tiny["data_dir"], tiny["policies"][method], out)
    base, before = METHODS[method], signal.getsignal(signal.SIGTERM)
    # 1st process: SIGUSR1 during step 2 (epoch 1); 2nd: SIGTERM during its 5th step, the 7th
    # overall (epoch 3, step 1). Both stop mid-epoch, after the step in progress.
    for stops, where in (({2: "SIGUSR1"}, r"SIGUSR1 at epoch 1 after step 2 \(2/3 steps into it\)"),
                         ({5: "SIGTERM"}, r"SIGTERM at epoch 3 after step 7 \(1/3 steps into it\)")):
        monkeypatch.setitem(METHODS, method, interrupting(base, stops))
        with pytest.raises(pt.Preempted, match=f"preempted by {where}") as err:
            pt.run(*args, echo=lambda s: None, checkpoint=ckpt)
        assert str(ckpt) in str(err.value) and "rerun to resume" in str(err.value)
        assert ckpt.is_file() and not (out / "encoder.pt").exists() and not (out / "history.csv").exists()
        assert signal.getsignal(signal.SIGTERM) is before  # the handler is only there while training
        monkeypatch.undo()
    lines: list[str] = []
    pt.run(*args, echo=lines.append, checkpoint=ckpt)
    assert f"resuming from {ckpt}: epoch 3 after step 7 (1/3 steps into it)" in lines, lines
    assert_same_training(out, clean(method))
    assert not ckpt.exists()  # deleted once the outputs are written


@pytest.mark.slow
def test_supervised_baseline_resumes_after_sigterm_like_pretraining(tiny, monkeypatch, tmp_path, capsys):
    """The supervised baseline trains by the same loop: interrupted twice mid-epoch as above,
    then rerun, its metrics.json (the encoder trained with labels, then evaluated) equals an
    uninterrupted run's; the checkpoint goes once metrics.json is written."""
    from sslpipe import stages, supervised
    from sslpipe.tracking import StageRun

    run, data_dir = StageRun(None, None), tiny["data_dir"]
    clean = tmp_path / "clean" / "metrics.json"
    stages.linear_eval(tiny["cfg"], "supervised", 0, data_dir, None, clean, run)
    out, ckpt = tmp_path / "resumed" / "metrics.json", tmp_path / "checkpoints" / "checkpoint.pt"
    base = supervised.Supervised
    for stops, where in (({2: "SIGUSR1"}, r"SIGUSR1 at epoch 1 after step 2 \(2/3 steps into it\)"),
                         ({5: "SIGTERM"}, r"SIGTERM at epoch 3 after step 7 \(1/3 steps into it\)")):
        monkeypatch.setattr(supervised, "Supervised", interrupting(base, stops))
        with pytest.raises(pt.Preempted, match=f"supervised: preempted by {where}") as err:
            stages.linear_eval(tiny["cfg"], "supervised", 0, data_dir, None, out, run, checkpoint=ckpt)
        assert str(ckpt) in str(err.value) and ckpt.is_file() and not out.exists()
        monkeypatch.undo()
    capsys.readouterr()
    stages.linear_eval(tiny["cfg"], "supervised", 0, data_dir, None, out, run, checkpoint=ckpt)
    assert f"supervised resuming from {ckpt}: epoch 3 after step 7 (1/3 steps into it)" in capsys.readouterr().out
    assert not ckpt.exists()
    resumed = comparable(out)
    assert resumed["supervised_steps"] == 12 * 3 and resumed == comparable(clean)


def test_checkpoint_loads_with_weights_only_and_holds_the_whole_state(tiny, monkeypatch, tmp_path):
    """No pickled objects (torch.load(weights_only=True) reads it); no temporary file left."""
    ckpt = tmp_path / "ck" / "checkpoint.pt"
    monkeypatch.setitem(METHODS, "moco", interrupting(METHODS["moco"], {4: "SIGUSR1"}))
    with pytest.raises(pt.Preempted):
        pt.run(tiny["cfg"], "moco", 0, tiny["data_dir"], tiny["policies"]["moco"], tmp_path / "out",
               echo=lambda s: None, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    p = state["progress"]
    assert (p["epoch"], p["step_in_epoch"], p["step"]) == (2, 1, 4)
    assert sorted(p["order"].tolist()) == list(range(192))  # the epoch's permutation, to go on with it
    assert len(p["history"]) == 1 and set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    keys = set(state["method"])
    assert {"queue", "queue_ptr"} <= keys and any(k.startswith("key_encoder.") for k in keys)  # MoCo's state
    assert state["optimizer"]["state"]  # AdamW moments
    assert [f.name for f in ckpt.parent.iterdir()] == ["checkpoint.pt"]


@pytest.mark.slow  # a real training run, to its NaN in epoch 2
def test_non_finite_loss_keeps_the_last_good_checkpoint(tiny, monkeypatch, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ck" / "checkpoint.pt"
    base = METHODS["simclr"]

    class Diverging(base):  # NaN from the first step of epoch 2 on
        calls = 0

        def loss(self, x, idx):
            type(self).calls += 1
            loss, logs = super().loss(x, idx)
            return (loss * float("nan") if type(self).calls >= 4 else loss), logs

    monkeypatch.setitem(METHODS, "simclr", Diverging)
    with pytest.raises(pt.TrainingError, match="non-finite at epoch 2") as err:
        pt.run(tiny["cfg"], "simclr", 0, tiny["data_dir"], tiny["policies"]["simclr"], out,
               echo=lambda s: None, checkpoint=ckpt)
    assert f"last good checkpoint, at epoch 2 after step 3 (its start), is kept at {ckpt}" in str(err.value)
    state = torch.load(ckpt, weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["progress"]["step_in_epoch"] == 0  # after epoch 1
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    assert not (out / "encoder.pt").exists()
    monkeypatch.undo()

    # The advice is to lower the lr: that rerun must not resume from a checkpoint made with the old one.
    lower_lr = copy.deepcopy(tiny["cfg"])
    lower_lr["pretrain"]["lr"] /= 2
    lines: list[str] = []
    pt.run(lower_lr, "simclr", 0, tiny["data_dir"], tiny["policies"]["simclr"], out, echo=lines.append,
           checkpoint=ckpt)
    assert any(line.startswith(f"ignoring checkpoint {ckpt}: it was written for a different config") for line in lines)
    assert not any(line.startswith("resuming") for line in lines)
    assert len(history(out / "history.csv")) == TINY["pretrain"]["epochs"] and not ckpt.exists()


def pretrain_command(tiny, method: str, out: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "sslpipe", "pretrain", "--config", json.dumps(tiny["cfg"]),
            "--threads", str(THREADS), "--method", method, "--seed", "0", "--data-dir", str(tiny["data_dir"]),
            "--policy", str(tiny["policies"][method]), "--out-dir", str(out), "--checkpoint", str(ckpt)]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_from_the_periodic_checkpoint(tiny, clean, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ck" / "checkpoint.pt"
    env = {**os.environ, "SSLPIPE_TRACKING": NO_TRACKING}
    cmd = pretrain_command(tiny, "moco", out, ckpt)
    with open(tmp_path / "killed.txt", "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        wait_for(ckpt, proc)  # the end of epoch 1: training still has 33 steps to go
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed while training, not finished
    assert not out.exists() or not {"encoder.pt", "history.csv"} & {p.name for p in out.iterdir()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(f"resuming from {re.escape(str(ckpt))}: epoch [0-9]+ after step [0-9]+ \\(its start\\)",
                     done.stdout), done.stdout
    assert_same_training(out, clean("moco"))
    assert not ckpt.exists()


# ---- the real workflow -----------------------------------------------------------------------

def snakemake_cmd(work: Path, target: str, *args: str) -> tuple[list[str], dict]:
    """The jobs form one chain, so one core costs no parallelism and gives the pretrain job THREADS."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), target,
           "--cores", str(THREADS), *args, "--configfile", str(work / "tiny.yaml")]  # --configfile takes 1+ values
    return cmd, env


def snakemake(work: Path, target: str, *args: str) -> subprocess.CompletedProcess:
    cmd, env = snakemake_cmd(work, target, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def group_running(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group is left, from /proc (Linux, as SLURM)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def wait_until_gone(pgid: int, timeout: float = 60) -> None:
    """Until no process of the group is left (a job's python may outlive its shell briefly)."""
    deadline = time.monotonic() + timeout
    while group_running(pgid):
        assert time.monotonic() < deadline, f"processes of group {pgid} still run {timeout} s after the signal"
        time.sleep(0.05)


def comparable(metrics_path: Path) -> dict:
    """metrics.json without what differs between any two runs: timings and MLflow run ids."""
    metrics = json.loads(metrics_path.read_text())
    return {k: v for k, v in metrics.items() if not k.endswith("_s") and not k.endswith("run_id")}


@pytest.mark.slow
def test_snakemake_sigterm_then_rerun_equals_a_clean_run(tmp_path):
    """SLURM's preemption: SIGTERM to every process of the job, Snakemake included. The rerun
    resumes the pretrain job from its checkpoint; its metrics equal those of a clean run."""
    work = tmp_path
    (work / "tiny.yaml").write_text(yaml.safe_dump(dict(TINY, methods=["moco"])))
    pre = work / "results/resume/pretrain/moco/seed0"
    metrics = work / "results/resume/linear_eval/moco/seed0/metrics.json"
    ckpt = work / "checkpoints/resume/moco/seed0/checkpoint.pt"
    log = work / "logs/resume/pretrain/moco/seed0.log"
    target = str(metrics.relative_to(work))

    cmd, env = snakemake_cmd(work, target)
    with open(work / "preempted.txt", "w") as fh:  # a file, not a pipe nobody reads while we wait
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(ckpt, proc, timeout=300)  # pretraining is past epoch 1
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    wait_until_gone(proc.pid)
    assert proc.returncode != 0, (work / "preempted.txt").read_text()[-3000:]
    assert "preempted by SIGTERM at epoch" in log.read_text(), log.read_text()
    assert ckpt.is_file()
    # Nothing Snakemake could take as finished: no declared output of the job, no temporaries.
    assert not pre.exists() or not list(pre.iterdir())

    snakemake(work, target, "--rerun-incomplete")
    assert "resuming from checkpoints/resume/moco/seed0/checkpoint.pt" in log.read_text()
    assert not ckpt.exists()
    resumed = comparable(metrics)
    resumed_encoder = torch.load(pre / "encoder.pt", weights_only=True)

    # The clean run: the same job again from scratch, uninterrupted (and evaluated again).
    snakemake(work, target, "--forcerun", "pretrain")
    assert "resuming" not in log.read_text()
    clean_encoder = torch.load(pre / "encoder.pt", weights_only=True)
    assert all(torch.equal(resumed_encoder[k], clean_encoder[k]) for k in clean_encoder)
    assert comparable(metrics) == resumed
