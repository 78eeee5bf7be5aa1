"""The supervised baseline: trains with labels, is evaluated like any encoder, is wired into the rules."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sslpipe import data, stages, supervised
from sslpipe.config import resolve
from sslpipe.models import TrainingError, state_fingerprint
from sslpipe.tracking import StageRun

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": {"width": 8}, "pretrain": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
        "evaluate": {"probe_steps": 30, "weight_decays": [0.0, 0.001]}}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems: one thread, as the pipeline's jobs run
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_supervised_baseline_beats_the_random_encoder(digits_dir, tmp_path):
    cfg = resolve(TINY)
    run = StageRun(None, None)  # tracking off: a run that logs nothing
    sup = stages.linear_eval(cfg, "supervised", 0, digits_dir, None, tmp_path / "supervised/metrics.json", run)
    rnd = stages.linear_eval(cfg, "random", 0, digits_dir, None, tmp_path / "random/metrics.json", run)
    assert sup["kind"] == "baseline" and sup["encoder_unchanged"] and sup["supervised_epochs"] == 2
    n_train = len(data.load_split(digits_dir, "train")[1])
    assert sup["supervised_steps"] == 2 * (n_train // 64)  # pretraining's epochs and batch size
    assert sup["linear_top1"] > 0.5                       # chance is 0.1
    assert sup["knn_top1"] > rnd["knn_top1"]              # labels taught it something
    assert json.loads((tmp_path / "supervised/metrics.json").read_text())["linear_top1"] == sup["linear_top1"]
    for name in ("supervised", "random"):
        assert (tmp_path / name / "embedding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_supervised_training_is_seeded_and_checks_the_batch_size(digits_dir):
    cfg = resolve({**TINY, "pretrain": {**TINY["pretrain"], "epochs": 1}})
    manifest = data.load_manifest(digits_dir)
    _, ytr = data.load_split(digits_dir, "train")
    cpu = torch.device("cpu")
    prints = [state_fingerprint(supervised.train(cfg, manifest, digits_dir, ytr, s, cpu, None)[0]) for s in (0, 0, 1)]
    assert prints[0] == prints[1] != prints[2]
    big = resolve({**TINY, "pretrain": {"batch_size": 5000}})
    with pytest.raises(TrainingError, match="pretrain.batch_size"):
        supervised.train(big, manifest, digits_dir, ytr, 0, cpu, None)


@pytest.mark.slow
def test_rules_give_the_supervised_baseline_the_pretrain_settings(tmp_path):
    """A real Snakemake dry run: the supervised job's config slice carries pretrain and
    channels_last, the pixels job's does not, and neither carries knn_monitor_every (a
    pretraining setting, which must not re-run evaluation)."""
    cfg = {"name": "tiny", "methods": ["simclr"], "data": {"image_size": 16},
           "pretrain": {"epochs": 3}, "evaluate": {"baselines": ["pixels", "supervised"], "knn_monitor_every": 2},
           "tracking": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "1", "--dry-run", "--printshellcmds", "--configfile", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    slices = {}
    for line in proc.stdout.splitlines():
        if "sslpipe linear-eval" in line:
            args = shlex.split(line.strip())
            slices[args[args.index("--method") + 1]] = json.loads(args[args.index("--config") + 1])
    assert set(slices) == {"simclr", "pixels", "supervised"}
    assert slices["supervised"]["pretrain"]["epochs"] == 3 and "channels_last" in slices["supervised"]
    assert "pretrain" not in slices["pixels"] and "pretrain" not in slices["simclr"]
    assert all("knn_monitor_every" not in s["evaluate"] for s in slices.values())
    assert all(s["evaluate"]["label_fractions"] == [0.01, 0.1] for s in slices.values())
