"""Tracking against a real MLflow SQLite store in a temporary directory."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sslpipe import compare, tracking
from sslpipe.config import config_hash, resolve


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve({"name": "unit"})
    h = config_hash(cfg)
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(cfg, h)))
    return cfg, h, tmp_path


@pytest.mark.slow
def test_pipeline_parent_and_child_runs(store):
    import mlflow

    cfg, h, root = store
    info = tracking.init_pipeline(cfg, h, {"git_commit": "abc"})
    assert tracking.init_pipeline(cfg, h, {"git_commit": "abc"}) == info  # idempotent: one parent per config
    (root / "note.txt").write_text("hello")
    with tracking.stage_run("pretrain", method="simclr", seed=3, params={"pretrain": {"epochs": 2}},
                            provenance={"git_commit": "abc"}) as run:
        run.log({"loss": 2.0}, 1)
        run.log({"loss": 1.5}, 2)
        run.artifact(root / "note.txt")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    child = client.get_run(run.run_id)
    assert child.info.status == "FINISHED" and child.info.experiment_id == info["experiment_id"]
    assert child.data.tags["mlflow.parentRunId"] == info["parent_run_id"]
    assert child.data.tags["sslpipe.stage"] == "pretrain" and child.data.tags["sslpipe.seed"] == "3"
    assert child.data.tags["sslpipe.config_hash"] == h and child.data.tags["sslpipe.git_commit"] == "abc"
    assert child.data.params["pretrain.epochs"] == "2"
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [2.0, 1.5]
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]
    parent = client.get_run(info["parent_run_id"])
    assert parent.data.params["data.source"] == "digits"


@pytest.mark.slow
def test_failed_job_marks_run_failed(store):
    import mlflow

    cfg, h, root = store
    tracking.init_pipeline(cfg, h, {})
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run("prepare") as run:
            1 / 0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(run.run_id).info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_unreachable_backend(store, monkeypatch, capsys, on_error):
    cfg, h, root = store
    (root / "a-file").write_text("not a directory")  # so the store can never be created below it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/a-file/mlflow.db")
    s = tracking.settings_from_config(resolve({"tracking": {"on_error": on_error}}), h)
    monkeypatch.setenv(tracking.ENV, json.dumps(s))
    if on_error == "fail":
        with pytest.raises(RuntimeError, match="tracking.on_error: continue"):
            with tracking.stage_run("prepare"):
                pass
    else:
        with tracking.stage_run("prepare") as run:
            run.log({"x": 1.0})  # a no-op now, not an error
        assert run.run_id is None
        assert "WARNING: MLflow tracking at" in capsys.readouterr().err


def test_disabled_tracking_writes_no_store(store, monkeypatch):
    cfg, h, root = store
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(resolve({"tracking": {"enabled": False}}), h)))
    with tracking.stage_run("prepare") as run:
        run.log({"x": 1.0})
    assert run.run_id is None and not (root / "mlflow.db").exists()


# ----------------------------------------------------------------------------- concurrent writers
WORKERS, RUNS_EACH, STEPS = 6, 3, 30
CHILD = r"""
import pathlib, sys, time
import mlflow.tracking  # imported before the start signal, so the writers really overlap
from sslpipe import tracking

root, wid = pathlib.Path(sys.argv[1]), int(sys.argv[2])
(root / f"ready{wid}").touch()
deadline = time.monotonic() + 60
while not (root / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal within 60 s")
    time.sleep(0.01)
note = root / f"note{wid}.txt"
note.write_text(str(wid))
for j in range(RUNS_EACH):
    with tracking.stage_run("pretrain", method=f"w{wid}", seed=j, params={"pretrain": {"epochs": STEPS}}) as run:
        for step in range(1, STEPS + 1):
            run.log({"loss": wid + j + step / 100, "step_seen": step}, step)
        run.artifact(note)
""".replace("RUNS_EACH", str(RUNS_EACH)).replace("STEPS", str(STEPS))


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def _start_together(script: str, root, n: int, env: dict, who: str):
    """Run `script` in n processes (argv: root, worker id) that each touch root/ready<id> and then
    wait for root/go, so their work really overlaps; returns (procs, [(stdout, stderr)])."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(w)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(n)]
    try:
        _wait_for(lambda: all((root / f"ready{w}").exists() or procs[w].poll() is not None for w in range(n)),
                  90, f"{who} to start")
        (root / "go").touch()
        return procs, [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


INIT_CHILD = r"""
import json, pathlib, sys, time
import mlflow.tracking  # imported before the start signal, so the store creations really overlap
from sslpipe import config, tracking

root, wid = pathlib.Path(sys.argv[1]), int(sys.argv[2])
cfg = config.resolve({"name": f"pipeline{wid}"})
(root / f"ready{wid}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
print(json.dumps(tracking.init_pipeline(cfg, config.config_hash(cfg), {})))
"""


@pytest.mark.slow
def test_pipelines_started_together_on_a_fresh_store_all_start(tmp_path):
    """Two pipelines (configs) started at once in one directory: each track-init creates the
    SQLite store's schema; without the lock in tracking._client they collide ("duplicate column
    name", "table _alembic_tmp_... already exists") and one or both fail."""
    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.ENV)}
    n = 3
    procs, outs = _start_together(INIT_CHILD, tmp_path, n, env, "the pipelines")
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for w, (out, _) in enumerate(outs):
        info = json.loads(out.strip().splitlines()[-1])
        assert client.get_run(info["parent_run_id"]).data.params["name"] == f"pipeline{w}"


@pytest.mark.slow
def test_concurrent_jobs_lose_nothing(store):
    """Several jobs writing to the default SQLite store at once (what `snakemake --cores N` does)."""
    import mlflow

    cfg, h, root = store
    info = tracking.init_pipeline(cfg, h, {})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs, outs = _start_together(CHILD, root, WORKERS, env, "the writers")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "WARNING: MLflow tracking" not in err
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([info["experiment_id"]], "tags.`sslpipe.stage` = 'pretrain'", max_results=1000)
    assert sorted((r.data.tags["sslpipe.method"], r.data.tags["sslpipe.seed"]) for r in runs) == sorted(
        (f"w{w}", str(j)) for w in range(WORKERS) for j in range(RUNS_EACH))
    for r in runs:
        wid, j = int(r.data.tags["sslpipe.method"][1:]), int(r.data.tags["sslpipe.seed"])
        assert r.info.status == "FINISHED" and r.data.params["pretrain.epochs"] == str(STEPS)
        assert r.data.tags["mlflow.parentRunId"] == info["parent_run_id"]
        loss = client.get_metric_history(r.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(s, wid + j + s / 100) for s in range(1, STEPS + 1)]
        assert len(client.get_metric_history(r.info.run_id, "step_seen")) == STEPS
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == [f"note{wid}.txt"]


# ----------------------------------------------------------------------------- HTTP tracking server
# http_env and mlflow_server (a real `mlflow server` on 127.0.0.1): tests/conftest.py
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tracking_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    url, art = mlflow_server
    job = tmp_path / "job"
    job.mkdir()
    monkeypatch.chdir(job)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = resolve({"name": "served"})
    h = config_hash(cfg)
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(cfg, h)))
    info = tracking.init_pipeline(cfg, h, {"git_commit": "abc"})
    assert info["tracking_uri"] == url
    (job / "note.txt").write_text("over http")
    with tracking.stage_run("pretrain", method="simclr", seed=0) as run:
        run.log({"loss": 1.25}, 1)
        run.artifact(job / "note.txt")
    client = mlflow.tracking.MlflowClient(url)
    child = client.get_run(run.run_id)
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == info["parent_run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 1.25)]
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]
    # Proxied: the file went through the server into its artifact store, nothing local to the job.
    assert [p.read_text() for p in art.rglob("note.txt")] == ["over http"]
    assert sorted(p.name for p in job.iterdir()) == ["note.txt"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    # `compare` reads the server the same way it reads a SQLite file.
    with tracking.stage_run("linear_eval", method="simclr", seed=0) as run:
        run.log({"linear_top1": 0.625})
    table = compare.compare(url, fmt="csv").splitlines()
    assert len(table) == 2 and table[1].startswith("digits,simclr,1,0.625,0.0,1,")


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_unreachable_server_fails_fast(store, monkeypatch, capsys, http_env, on_error):
    cfg, h, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(
        resolve({"tracking": {"on_error": on_error}}), h)))
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "7"  # a user's own setting is kept
    t0 = time.monotonic()
    if on_error == "fail":
        with pytest.raises(RuntimeError, match="tracking.on_error: continue"):
            with tracking.stage_run("prepare"):
                pass
    else:
        with tracking.stage_run("prepare") as run:
            run.log({"x": 1.0})
        assert run.run_id is None and "WARNING: MLflow tracking at" in capsys.readouterr().err
    # MLflow's own defaults (7 retries, exponential back-off) take minutes here.
    assert time.monotonic() - t0 < 20
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


# ----------------------------------------------------------------------------- the lock retry
def test_a_write_that_meets_a_held_sqlite_lock_is_retried_until_it_is_released(tmp_path):
    """A real SQLite lock, held by another connection for 0.3 s: a write that does not wait
    (timeout 0, as a lock that MLflow's busy timeout cannot wait out surfaces) fails at once
    with "database is locked"; through `_retry` (its default attempts) it succeeds once the
    lock is gone. Errors other than a lock are raised at once, without retrying."""
    import sqlite3
    import threading

    db = tmp_path / "store.db"
    with sqlite3.connect(db) as c:
        c.execute("create table t (x integer)")
    holder = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
    holder.execute("begin exclusive")
    release = threading.Timer(0.3, lambda: holder.execute("commit"))
    calls = []

    def write():
        calls.append(time.monotonic())
        with sqlite3.connect(db, timeout=0) as c:
            c.execute("insert into t values (1)")

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        write()  # no retry: the lock is reported
    release.start()
    try:
        tracking._retry(write)
    finally:
        release.join()
        holder.close()
    assert len(calls) > 2 and calls[-1] - calls[0] >= 0.3  # it kept trying until the lock went
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from t").fetchone() == (1,)

    other = []
    with pytest.raises(ValueError):
        tracking._retry(lambda: other.append(1) or (_ for _ in ()).throw(ValueError("no such table")))
    assert other == [1]
