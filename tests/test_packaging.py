"""The package outside the checkout: build a wheel, install it into a fresh venv (its
dependencies come from this venv's site-packages, no internet), and run `sslpipe` from a
directory that holds no checkout: check-config reads the schema shipped in the wheel, and a
one-epoch stage chain trains."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(args, cwd, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_runs_outside_the_checkout(tmp_path):
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        REPO], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("sslpipe-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = Path(sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    # The dependencies: this venv's site-packages as a plain path (its .pth files, such as the
    # editable install's, are not processed, so `sslpipe` can only come from the wheel).
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    sh([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel], cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSLPIPE_TRACKING", "MLFLOW_TRACKING_URI")}
    cli = env_dir / "bin" / "sslpipe"
    where = sh([py, "-c", "import sslpipe, sslpipe.config as c; print(sslpipe.__file__); print(c.SCHEMA_PATH)"], work, env)
    assert all(str(env_dir) in line for line in where.stdout.split()), where.stdout

    assert sh([cli, "--version"], work, env).stdout.strip() == "sslpipe 0.1.0"
    cfg = {"name": "wheel", "methods": ["simclr"], "data": {"image_size": 16, "max_train": 200, "max_test": 50},
           "model": {"width": 8}, "pretrain": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0},
           "tracking": {"enabled": False}}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    printed = json.loads(sh([cli, "check-config", "c.yaml", "--config", "seeds=[3]"], work, env).stdout)
    assert printed["seeds"] == [3] and printed["simclr"]["temperature"] > 0  # defaults from the shipped schema
    common = ["--config", "c.yaml", "--threads", "1"]
    sh([cli, "prepare", *common, "--out-dir", "d"], work, env)
    sh([cli, "augment", *common, "--method", "simclr", "--seed", "0", "--data-dir", "d", "--out-dir", "a"], work, env)
    sh([cli, "pretrain", *common, "--method", "simclr", "--seed", "0", "--data-dir", "d",
        "--policy", "a/policy.json", "--out-dir", "p"], work, env)
    assert (work / "p/encoder.pt").is_file() and len((work / "p/history.csv").read_text().splitlines()) == 2
    assert not (work / "mlflow.db").exists()  # the file's tracking: enabled: false was honoured
