"""Tracking records kept while MLflow is unreachable, and their replay into MLflow.

With `tracking.on_error: continue`, a job whose backend fails goes on without MLflow, and
`tracking.stage_run` writes everything the job logged (tags, params, metrics with their steps,
artifacts, dataset, final status) as one JSON file in OFFLINE_DIR of the working directory.
`sslpipe track-replay` (`replay`) later puts each record into MLflow as the run it would have
been, so a dead server loses nothing. Talks to MLflow only through `sslpipe.tracking`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from sslpipe import tracking as tr
from sslpipe.io import read_json, write_json
from sslpipe.tracking import OFFLINE_DIR


def write(record: dict) -> None:
    """Keep one job's record (tracking.StageRun.record) in OFFLINE_DIR, or the pipeline's
    (`pipeline`: true; the config and provenance track-init would have logged on the parent run)."""
    name = "pipeline" if record.get("pipeline") else record["name"].replace("/", "-")
    h = record["settings"]["config_hash"] or "nohash"
    write_json(Path(OFFLINE_DIR) / f"{name}-{h}-{time.time_ns()}.json", record)


def replay(directory: str | os.PathLike = OFFLINE_DIR, uri: str | None = None) -> list[str]:
    """Put every record a job kept while MLflow was unreachable into MLflow (at `uri`, else the
    record's own tracking URI), as the run it would have been: same tags, params, metrics (with
    their steps), artifacts and dataset, under the pipeline's parent run (created if missing,
    then closed: FINISHED, or FAILED when a replayed job failed), which also gets what a job
    logged on it (the report's summary metrics and files).
    Replayed records move to `directory`/replayed/. Returns the new run ids."""
    done, out, created = Path(directory) / "replayed", [], {}
    # Pipeline records first: their parent run gets the config params and provenance, as from track-init.
    for path in sorted(Path(directory).glob("*.json"), key=lambda p: (not p.name.startswith("pipeline-"), p.name)):
        rec = read_json(path)
        s = {**rec["settings"], "uri": uri or rec["settings"].get("uri")}
        client = tr._client(s, uri)
        exp_id = tr._experiment_id(client, s, create=True)
        if rec.get("pipeline"):
            h = s["config_hash"]
            if tr._find_parent(client, exp_id, h) is None:
                created[tr._init_pipeline(s, rec["cfg"], h, rec["provenance"])["parent_run_id"]] = (client, "FINISHED")
            done.mkdir(parents=True, exist_ok=True)
            path.rename(done / path.name)
            continue
        h = rec["tags"].get("sslpipe.config_hash")
        parent = tr._find_parent(client, exp_id, h)
        if parent is None and h:  # as track-init would have made it; closed below, as track-finish would
            parent = tr._retry(lambda: client.create_run(exp_id, run_name=f"pipeline-{h}", tags={
                "sslpipe.pipeline": "true", "sslpipe.config_hash": h, "sslpipe.dataset": rec["tags"]["sslpipe.dataset"],
                "sslpipe.git_commit": rec["tags"].get("sslpipe.git_commit", "unknown")})).info.run_id
            created[parent] = (client, "FINISHED")
        tags = {**rec["tags"], "sslpipe.replayed": "true", **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = tr._retry(lambda: client.create_run(exp_id, tags=tags, run_name=rec["name"])).info.run_id
        tr._log_params(client, run_id, rec["params"])
        _apply(tr.StageRun(client, run_id), rec["ops"])
        if parent and rec.get("parent"):  # the report's summary and files, logged on the pipeline run
            _apply(tr.StageRun(client, parent), rec["parent"]["ops"])
        tr._retry(lambda: client.set_terminated(run_id, rec.get("status", "FINISHED")))
        if parent in created and rec.get("status", "FINISHED") != "FINISHED":
            created[parent] = (client, "FAILED")
        done.mkdir(parents=True, exist_ok=True)
        path.rename(done / path.name)
        out.append(run_id)
    for parent, (client, status) in created.items():
        tr._retry(lambda: client.set_terminated(parent, status))
    return out


def _apply(run: "tr.StageRun", ops: list) -> None:
    for kind, *args in ops:
        if kind == "tag" and args[2] is not None:  # a link to a run that never reached MLflow
            continue
        tr._retry(lambda kind=kind, args=args: getattr(run, f"_{kind}")(*args))
