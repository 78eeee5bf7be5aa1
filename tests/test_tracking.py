"""Tracking against a real MLflow SQLite store in a temporary directory."""
import json

import pytest

from sslpipe import tracking
from sslpipe.config import config_hash, resolve


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve({"name": "unit"})
    h = config_hash(cfg)
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(cfg, h)))
    return cfg, h, tmp_path


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


def test_failed_job_marks_run_failed(store):
    import mlflow

    cfg, h, root = store
    tracking.init_pipeline(cfg, h, {})
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run("prepare") as run:
            1 / 0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(run.run_id).info.status == "FAILED"


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
        assert "tracking failed" in capsys.readouterr().err


def test_disabled_tracking_writes_no_store(store, monkeypatch):
    cfg, h, root = store
    monkeypatch.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(resolve({"tracking": {"enabled": False}}), h)))
    with tracking.stage_run("prepare") as run:
        run.log({"x": 1.0})
    assert run.run_id is None and not (root / "mlflow.db").exists()
