"""Issue 14's first promise, end to end: with the tracking server down from the start,
`tracking.on_error: continue` finishes a real (small) Snakemake pipeline with exit 0 and every
output written, each job keeps what it would have logged in mlflow-offline/, and
`sslpipe track-replay` later puts every run into a live `mlflow server` (on 127.0.0.1) with the
metrics on disk, FINISHED, nested under one pipeline run. About 4 min on a half-busy 2-core box."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SMALL = {
    "name": "offline",
    "seeds": [0],
    "methods": ["dae"],
    "data": {"source": "digits", "image_size": 16, "max_train": 200, "max_test": 100},
    "model": {"width": 8},
    "pretrain": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0},
    "dae": {"mask_patch": 4},
    "evaluate": {"probe_steps": 20, "weight_decays": [0.0], "label_fractions": [], "baselines": ["pixels"]},
    "augment": {"benchmark_images": 32},
}
JOBS = {"prepare", "augment/dae/seed0", "pretrain/dae/seed0", "linear_eval/dae/seed0", "linear_eval/pixels/seed0", "report"}


def _dead_uri() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # tracking.uri alone says where MLflow is
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=2400)  # ~1.5 min alone; 15 min beside a benchmark at nice 10


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "WARNING" in line and "sslpipe" in line]


def test_dead_server_then_replay(tmp_path, start_mlflow_server):
    work = tmp_path / "work"
    work.mkdir()
    dead = _dead_uri()
    (work / "small.yaml").write_text(yaml.safe_dump({**SMALL, "tracking": {"uri": dead, "on_error": "continue"}}))

    # 1. The pipeline, with MLflow unreachable from the start.
    proc = _run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2",
                 "--configfile", str(work / "small.yaml")], work)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r = work / "results/offline"
    for out in ("data/manifest.json", "data/train.npz", "augment/dae/policy.json", "pretrain/dae/seed0/encoder.pt",
                "pretrain/dae/seed0/history.csv", "pretrain/dae/seed0/summary.json",
                "linear_eval/dae/seed0/metrics.json", "linear_eval/pixels/seed0/metrics.json",
                "report/report.html", "report/summary.csv"):
        assert (r / out).is_file() and (r / out).stat().st_size > 0, out
    # The hooks warned once each (track-init, track-finish), naming the URI; no traceback anywhere.
    hook_warnings = _warnings(proc.stderr)
    assert len(hook_warnings) == 2 and all(dead in w and "continuing without MLflow" in w for w in hook_warnings), \
        proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    logs = {str(p.relative_to(work / "logs/offline"))[:-4]: p.read_text() for p in (work / "logs/offline").rglob("*.log")}
    assert set(logs) == {"prepare", "augment/dae", "pretrain/dae/seed0", "linear_eval/dae/seed0",
                         "linear_eval/pixels/seed0", "report"}
    for job, text in logs.items():  # each job: one warning line saying where its record went, no traceback
        [warning] = _warnings(text)
        assert "continuing without MLflow" in warning and "mlflow-offline/" in warning, (job, text[-2000:])
        assert "Connection refused" in warning and len(warning) < 250, warning  # the cause, not MLflow's whole message
        assert "Traceback" not in text, (job, text[-3000:])
    # The records: one per job, beside the default mlflow.db (the working directory).
    offline_dir = work / "mlflow-offline"
    records = {json.loads(p.read_text())["name"]: p for p in offline_dir.glob("*.json") if not p.name.startswith("pipeline-")}
    assert set(records) == JOBS and len(list(offline_dir.glob("pipeline-*.json"))) == 1  # + track-init's
    assert all(json.loads(p.read_text())["status"] == "FINISHED" for p in records.values())

    check_replay(work, *start_mlflow_server())


def check_replay(work: Path, url: str, _art: Path) -> None:
    """2. A live server, started after the pipeline: nothing of it there until the replay."""
    from mlflow.tracking import MlflowClient

    r, offline_dir = work / "results/offline", work / "mlflow-offline"
    records = {json.loads(p.read_text())["name"]: p for p in offline_dir.glob("*.json") if not p.name.startswith("pipeline-")}
    [pipeline_record] = offline_dir.glob("pipeline-*.json")
    client = MlflowClient(url)
    assert client.get_experiment_by_name("offline") is None
    replay = _run([sys.executable, "-m", "sslpipe", "track-replay", "--tracking-uri", url], work)
    assert replay.returncode == 0 and f"replayed {len(JOBS)} run(s)" in replay.stdout, replay.stdout + replay.stderr
    assert "Traceback" not in replay.stderr and not list(offline_dir.glob("*.json"))
    assert {p.name for p in (offline_dir / "replayed").glob("*.json")} == {p.name for p in records.values()} | {
        pipeline_record.name}

    exp = client.get_experiment_by_name("offline")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    [parent] = [x for x in runs if x.data.tags.get("sslpipe.pipeline") == "true"]
    stage_runs = {x.info.run_name: x for x in runs if x is not parent}
    # The pipeline run as track-init would have made it: the resolved config as params and a file.
    assert parent.data.params["name"] == "offline" and parent.data.params["tracking.on_error"] == "continue"
    assert {"config.resolved.json", "provenance.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert set(stage_runs) == JOBS  # each job once
    for name, run in stage_runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, name
        assert run.data.tags["sslpipe.replayed"] == "true"
        assert run.data.tags["sslpipe.config_hash"] == parent.data.tags["sslpipe.config_hash"]

    # The metrics are the ones on disk: every number in each evaluation's metrics.json ...
    for method in ("dae", "pixels"):
        on_disk = json.loads((r / f"linear_eval/{method}/seed0/metrics.json").read_text())
        logged = stage_runs[f"linear_eval/{method}/seed0"].data.metrics
        numbers = {k: float(v) for k, v in on_disk.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"}
        assert "linear_top1" in numbers and logged == numbers, method
    # ... pretraining's loss curve (history.csv) and final loss (summary.json), the data counts ...
    pre = stage_runs["pretrain/dae/seed0"]
    summary = json.loads((r / "pretrain/dae/seed0/summary.json").read_text())
    with open(r / "pretrain/dae/seed0/history.csv") as fh:
        history = list(csv.DictReader(fh))
    curve = client.get_metric_history(pre.info.run_id, "loss")
    assert [(m.step, m.value) for m in curve] == [(int(h["epoch"]), float(h["loss"])) for h in history]
    assert pre.data.metrics["loss"] == summary["final_loss"]
    assert [a.path for a in client.list_artifacts(pre.info.run_id, "encoder")] == ["encoder/encoder.pt"]
    manifest = json.loads((r / "data/manifest.json").read_text())
    prep = stage_runs["prepare"].data.metrics
    assert (prep["n_train"], prep["n_test"]) == (manifest["counts"]["train"], manifest["counts"]["test"])
    # ... and the report's summary on the pipeline run, where a live run puts it (summary.csv).
    with open(r / "report/summary.csv") as fh:
        rows = {row["name"]: row for row in csv.DictReader(fh)}
    for name in ("dae", "pixels"):
        assert parent.data.metrics[f"{name}.linear_top1_mean"] == pytest.approx(float(rows[name]["linear_top1_mean"]))
    assert "report/report.html" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert parent.info.status == "FINISHED"  # closed by the replay, as track-finish would have

    # Replaying again adds nothing.
    again = _run([sys.executable, "-m", "sslpipe", "track-replay", "--tracking-uri", url], work)
    assert again.returncode == 0 and "replayed 0 run(s)" in again.stdout
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == len(JOBS) + 1
