"""The pipeline-level hooks (track-init before any job, track-finish after the last) keep the
`tracking.on_error` promise: `continue` warns in one line and carries on, `fail` stops with one
readable line naming the URI and the ways out (no traceback, no config dump)."""
from __future__ import annotations

import socket
import subprocess
import sys

import json
import pytest

from sslpipe import tracking
from sslpipe.config import config_hash, resolve


def _dead_uri() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_hooks_with_a_dead_server(tmp_path, monkeypatch, on_error):
    cfg = resolve({"tracking": {"on_error": on_error}})
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": _dead_uri(), "HOME": str(tmp_path)}
    for hook in (["track-init"], ["track-finish", "--status", "FINISHED"]):
        proc = subprocess.run([sys.executable, "-m", "sslpipe", *hook, "--config", json.dumps(cfg)],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        err = proc.stderr.strip().splitlines()
        if on_error == "continue":
            assert proc.returncode == 0 and "WARNING: MLflow tracking at http://127.0.0.1" in proc.stderr, proc.stderr
        else:
            assert proc.returncode == 2, proc.stderr
            assert len(err) == 1 and "tracking.on_error: continue" in err[0] and "http://127.0.0.1" in err[0], err
            assert "Traceback" not in proc.stderr and '"seeds"' not in proc.stderr


@pytest.mark.slow
def test_init_pipeline_returns_nothing_when_continuing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    cfg = resolve({"tracking": {"on_error": "continue"}})
    assert tracking.init_pipeline(cfg, config_hash(cfg), {}) == {}
    assert capsys.readouterr().err.count("WARNING") == 1
