"""A dead tracking server loses nothing: a job under `on_error: continue` keeps what it logged in
mlflow-offline/, and `sslpipe track-replay` puts it into a live store as the run it would have
been. Also: a job that starts again marks its earlier RUNNING (killed) runs KILLED."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from sslpipe import offline, tracking
from sslpipe.config import config_hash, resolve


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _settings(monkeypatch, on_error="continue"):
    cfg = resolve({"name": "off", "tracking": {"on_error": on_error}})
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(cfg, config_hash(cfg))))
    return cfg


@pytest.mark.slow
def test_offline_record_and_replay(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = _settings(monkeypatch)
    dead = _dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    assert tracking.init_pipeline(cfg, config_hash(cfg), {"git_commit": "c0ffee"}) == {}  # track-init, offline
    (tmp_path / "history.csv").write_text("epoch,loss\n1,2.0\n")
    with tracking.stage_run("pretrain", method="simclr", seed=3, params={"pretrain": {"lr": 0.1}}) as run:
        for epoch, loss in ((1, 2.0), (2, 1.5)):
            run.log({"loss": loss}, epoch)
        run.artifact(tmp_path / "history.csv")
        run.tag("sslpipe.note", "kept")
        run.dataset({"dataset": "digits", "sha256": {"train": "ab"}, "counts": {"train": 1}}, "train")
    err = capsys.readouterr().err.strip().splitlines()
    # One short line each (the hook's, the job's), naming the URI and the OS error, not MLflow's whole message.
    assert run.run_id is None and len(err) == 2 and all(len(line) < 250 for line in err), err
    assert all(f"MLflow tracking at {dead} failed" in line and "Connection refused" in line for line in err), err
    assert "kept in mlflow-offline/" in err[1]
    [pipeline_record] = list((tmp_path / tracking.OFFLINE_DIR).glob("pipeline-*.json"))
    [record] = [p for p in (tmp_path / tracking.OFFLINE_DIR).glob("*.json") if p != pipeline_record]

    live = f"sqlite:///{tmp_path / 'live.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    proc = subprocess.run([sys.executable, "-m", "sslpipe", "track-replay", "--tracking-uri", live],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "replayed 1 run(s)" in proc.stdout, proc.stderr
    assert not record.exists() and (tmp_path / tracking.OFFLINE_DIR / "replayed" / record.name).exists()
    client = mlflow.tracking.MlflowClient(live)
    exp = client.get_experiment_by_name("off")
    [r] = client.search_runs([exp.experiment_id], "tags.`sslpipe.stage` = 'pretrain'")
    assert r.info.run_name == "pretrain/simclr/seed3" and r.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    assert r.data.params["pretrain.lr"] == "0.1" and r.data.tags["sslpipe.note"] == "kept"
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["history.csv"]
    assert r.inputs.dataset_inputs[0].dataset.name == "digits"
    parent = client.get_run(r.data.tags["mlflow.parentRunId"])  # the pipeline run, created by the replay
    assert parent.data.tags["sslpipe.pipeline"] == "true" and parent.info.status == "FINISHED"
    # ... as track-init would have made it: the resolved config as params and files, the provenance.
    assert parent.data.params["name"] == "off" and parent.data.params["tracking.on_error"] == "continue"
    assert parent.data.tags["sslpipe.git_commit"] == "c0ffee"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"config.resolved.json", "provenance.json"}
    assert not pipeline_record.exists()
    assert offline.replay(tmp_path / tracking.OFFLINE_DIR, live) == []  # nothing twice


@pytest.mark.slow
def test_a_rerun_marks_the_killed_run_killed(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _settings(monkeypatch, "fail")
    cm = tracking.stage_run("pretrain", method="moco", seed=0)
    first = cm.__enter__()  # a job SIGKILLed here never reaches __exit__: its run stays RUNNING
    with tracking.stage_run("pretrain", method="moco", seed=1):
        pass  # another job: left alone
    with tracking.stage_run("pretrain", method="moco", seed=0) as again:
        pass
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert client.get_run(again.run_id).info.status == "FINISHED"
    assert not (tmp_path / tracking.OFFLINE_DIR).exists()  # the backend was never lost: no record
