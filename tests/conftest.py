"""Shared fixtures. Tests use real data: scikit-learn's digits, and the CIFAR-10 subset in
../shared when present. With SSLPIPE_REQUIRE_SHARED=1 (set by .ci/run) its absence fails the
tests that need it instead of skipping them. `mlflow_server` is a real MLflow tracking server on
127.0.0.1 (tests/test_tracking.py, tests/test_tracking_offline_pipeline.py)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10_small.npz"


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """One intra-op thread for every test: the tensors are tiny, and on a busy 2-core machine two
    spinning threads cost more than they save (test_moco's one-epoch run took 11 s of CPU instead
    of 0.5). A test that wants more threads sets them itself and restores them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cifar_small() -> Path:
    if not SHARED_CIFAR.exists():
        why = f"the CIFAR-10 subset {SHARED_CIFAR} is absent (it ships only beside the developers' checkout)"
        if os.environ.get("SSLPIPE_REQUIRE_SHARED") == "1":
            pytest.fail(f"{why}, and SSLPIPE_REQUIRE_SHARED=1 says these tests may not skip here")
        pytest.skip(why)
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A prepared digits dataset at 16 px (real images), shared by tests that only read it."""
    from sslpipe import data
    from sslpipe.config import resolve

    out = tmp_path_factory.mktemp("digits")
    data.prepare(resolve({})["data"] | {"image_size": 16}, out)
    return out


# ----------------------------------------------------------------------------- MLflow tracking server
def free_port() -> int:
    """A loopback port nobody listens on (as a dead tracking server's URI, or for a new server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_env():
    """Restore MLflow's HTTP settings afterwards: tracking sets defaults for them in os.environ."""
    from sslpipe import tracking

    saved = {k: os.environ.pop(k, None) for k in tracking.HTTP_DEFAULTS}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.fixture
def start_mlflow_server(tmp_path, http_env):
    """start_mlflow_server() starts a real `mlflow server` on loopback (SQLite store and proxied
    artifacts in tmp_path) and returns (its URL, its artifact directory); every server started is
    stopped afterwards. A fresh store's migrations take half a minute on a busy 2-core machine."""
    procs = []

    def start() -> tuple[str, Path]:
        port, log = free_port(), tmp_path / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}", "--artifacts-destination", str(tmp_path / "art")]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(log, "w") as fh:  # own session, so the server and any workers it forks stop together
            procs.append(proc := subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return url, tmp_path / "art"
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready within 180 s"
                pytest.skip(f"mlflow server could not start ({why}): {log.read_text()[-1500:]}")
            time.sleep(0.5)

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def mlflow_server(start_mlflow_server):
    """A real `mlflow server` on loopback, with proxied artifacts: (its URL, its artifact directory)."""
    return start_mlflow_server()
