"""MLflow tracking: the only module that imports mlflow.

Layout in MLflow: one experiment per config `name`; one parent run per pipeline (per resolved
config, found again by its config hash); one child run per Snakemake job (stage x method x
seed), tagged `sslpipe.stage`, `sslpipe.method`, `sslpipe.dataset`, `sslpipe.seed`,
`sslpipe.config_hash`, `sslpipe.git_commit`.

The pipeline's tracking settings reach jobs through the environment variable
`SSLPIPE_TRACKING` (JSON, set by the Snakefile), not through rule params, so that pointing
tracking elsewhere never re-runs the pipeline. Without it (a stage run by hand), tracking uses
the defaults: experiment "default", SQLite store `mlflow.db` in the working directory.

SQLite pitfalls: processes creating or migrating a fresh store at once corrupt it (two pipelines
started together), so clients are made under a lock file beside the database (`_client`), and the
pipeline calls `init_pipeline` once before any job (Snakefile `onstart`); runs are always created
with an explicit experiment id. MLflow sets `PRAGMA busy_timeout = 20000` on every SQLite session
(a `?timeout=` in the URI would be overridden by it), so a writer waits up to 20 s for a lock (6
writers at once lose nothing and see no lock error: tests/test_tracking.py). A lock that SQLite
refuses at once (a read transaction upgrading to a write while another process writes) can still
surface as "database is locked"; every call retries that with jittered back-off (`_retry`).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from sslpipe.data import dataset_name
from sslpipe.io import file_lock

ENV = "SSLPIPE_TRACKING"
DEFAULTS = {"enabled": True, "uri": None, "on_error": "fail", "experiment": "default", "config_hash": None, "dataset": None}

# Marks the experiment as model training: MLflow 3's UI then opens its runs view, not the GenAI one.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"

OFFLINE_DIR = "mlflow-offline"  # in the working directory, beside the default mlflow.db

# For http(s) URIs unless the user set them: MLflow's own (7 retries with back-off, 120 s timeout)
# make a dead server cost minutes per call; these fail within seconds, still riding out a blip.
# The timeout is per socket operation (connect, or a pause in a transfer), so large uploads fit.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def settings() -> dict:
    """Tracking settings for this process: the pipeline's (from the environment) or defaults."""
    return {**DEFAULTS, **json.loads(os.environ.get(ENV, "{}"))}


def settings_from_config(cfg: dict, config_hash: str) -> dict:
    return {**{k: cfg["tracking"][k] for k in ("enabled", "uri", "on_error")}, "experiment": cfg["name"],
            "config_hash": config_hash, "dataset": dataset_name(cfg["data"])}


def tracking_uri(s: dict) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or s["uri"] or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:  # sqlite:///FILE?query -> FILE; None for other stores
    return Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None


def _retry(fn: Callable[[], Any], attempts: int = 8) -> Any:
    """Call fn, retrying with jittered exponential back-off when SQLite reports a lock."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # mlflow wraps sqlalchemy's OperationalError in its own types
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.05 * 2 ** i * (1 + random.random()))


def _client(s: dict, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri(s)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():  # MLflow reads these at each request
            os.environ.setdefault(key, value)
    db = _sqlite_path(uri)  # a SQLite client creates or migrates the schema as it is made
    with file_lock(f"{db}.lock") if db else contextlib.nullcontext():
        return MlflowClient(tracking_uri=uri)


def _experiment_id(client, s: dict, create: bool) -> str:
    exp = _retry(lambda: client.get_experiment_by_name(s["experiment"]))
    if exp is not None:
        if create and exp.tags.get(KIND_TAG) != KIND:
            _retry(lambda: client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND))
        return exp.experiment_id
    if not create:
        raise RuntimeError(f"MLflow experiment '{s['experiment']}' does not exist at {tracking_uri(s)}")
    db = _sqlite_path(tracking_uri(s))  # with SQLite, artifacts go beside the file, not into the job's cwd
    location = (db.parent / "mlartifacts").resolve().as_uri() if db else None
    return _retry(lambda: client.create_experiment(s["experiment"], artifact_location=location,
                                                   tags={KIND_TAG: KIND}))


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)
    return out


def _find_parent(client, exp_id: str, config_hash: str | None) -> str | None:
    if not config_hash:
        return None
    runs = _retry(lambda: client.search_runs(
        [exp_id], filter_string=f"tags.`sslpipe.pipeline` = 'true' and tags.`sslpipe.config_hash` = '{config_hash}'",
        max_results=1, order_by=["attributes.start_time DESC"]))
    return runs[0].info.run_id if runs else None


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k[:250], v[:6000]) for k, v in _flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        _retry(lambda chunk=items[i:i + 100]: client.log_batch(run_id, params=chunk))


def _reason(exc: Exception) -> str:
    """An OS error ("[Errno 111] Connection refused") from MLflow's long message, else its first line."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", line)
    return errno.group(0).strip() if errno else line[:300]


def _backend_failed(s: dict, exc: Exception, what: str, job: bool = False) -> None:
    """`on_error: continue`: warn in one line and go on; `fail`: one readable error, no traceback."""
    msg = f"MLflow tracking at {tracking_uri(s)} failed ({what}: {_reason(exc)})"
    if s["on_error"] == "continue":
        kept = f" for this job (kept in {OFFLINE_DIR}/ for `sslpipe track-replay`)" if job else ""
        print(f"sslpipe: WARNING: {msg}; continuing without MLflow{kept}", file=sys.stderr)
        return
    raise RuntimeError(f"{msg}. Fix tracking.uri or MLFLOW_TRACKING_URI, or set tracking.on_error: "
                       "continue (or tracking.enabled: false)") from exc


def init_pipeline(cfg: dict, config_hash: str, provenance: dict) -> dict:
    """Create the store, the experiment and the pipeline's parent run (idempotent).

    Returns {"tracking_uri", "experiment_id", "parent_run_id"} ({} when tracking is off, or
    when the backend fails under `tracking.on_error: continue`).
    """
    s = settings_from_config(cfg, config_hash)
    if not s["enabled"]:
        return {}
    try:
        return _init_pipeline(s, cfg, config_hash, provenance)
    except Exception as exc:
        _backend_failed(s, exc, "creating the pipeline run")
        from sslpipe import offline  # what track-init would have logged, for track-replay
        offline.write({"pipeline": True, "settings": s, "cfg": cfg, "provenance": provenance})
        return {}


def _init_pipeline(s: dict, cfg: dict, config_hash: str, provenance: dict) -> dict:
    client = _client(s)
    exp_id = _experiment_id(client, s, create=True)
    parent = _find_parent(client, exp_id, config_hash)
    if parent is None:
        tags = {"sslpipe.pipeline": "true", "sslpipe.config_hash": config_hash, "sslpipe.dataset": s["dataset"],
                "sslpipe.git_commit": provenance.get("git_commit", "unknown")}
        parent = _retry(lambda: client.create_run(exp_id, tags=tags, run_name=f"pipeline-{config_hash}")).info.run_id
        _log_params(client, parent, cfg)
        _retry(lambda: client.log_dict(parent, cfg, "config.resolved.json"))
        _retry(lambda: client.log_dict(parent, provenance, "provenance.json"))
    return {"tracking_uri": tracking_uri(s), "experiment_id": exp_id, "parent_run_id": parent}


class StageRun:
    """A child run for one job. `log` is the callable training code receives.

    With `on_error: continue`, a tracking failure (at the start or in the middle of a job) is
    reported once on stderr and tracking stops for the job; the job itself goes on and writes its
    outputs. Everything the job logs is also kept in `record`, which `stage_run` writes to
    OFFLINE_DIR when the backend was lost, for `replay` to put into MLflow later.
    """

    def __init__(self, client, run_id: str | None, s: dict | None = None, record: dict | None = None):
        self.client, self.run_id, self.s, self.record = client, run_id, s or DEFAULTS, record
        self.lost = False

    def _call(self, fn: Callable[[], Any]) -> None:
        if self.run_id is None:
            return
        try:
            _retry(fn)
        except Exception as exc:
            _backend_failed(self.s, exc, "logging", job=True)
            self.run_id, self.lost = None, True

    def _op(self, kind: str, *args) -> None:
        if self.record is not None:
            self.record["ops"].append([kind, *args])
        self._call(lambda: getattr(self, f"_{kind}")(*args))

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._op("log", {k: float(v) for k, v in metrics.items()}, step)

    def artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        self._op("artifact", str(Path(path).resolve()), folder)

    def tag(self, key: str, value: str, run_id: str | None = None) -> None:
        """Tag this run (or `run_id`: e.g. link a pretraining run back to its evaluation)."""
        self._op("tag", key, value, run_id)

    def dataset(self, manifest: dict, context: str) -> None:
        """Log the prepared dataset as the run's input, with the manifest's digest (MLflow datasets)."""
        self._op("dataset", {k: manifest.get(k) for k in ("dataset", "source", "image_size", "num_classes",
                                                           "counts", "sha256")}, context)

    def _log(self, metrics: dict, step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in metrics.items()])

    def _artifact(self, path: str, folder: str | None) -> None:
        self.client.log_artifact(self.run_id, path, folder)

    def _tag(self, key: str, value: str, run_id: str | None) -> None:
        self.client.set_tag(run_id or self.run_id, key, value)

    def _dataset(self, manifest: dict, context: str) -> None:
        import hashlib

        from mlflow.entities import Dataset, DatasetInput, InputTag

        # One digest for both splits, from the manifest's per-split sha256 of the arrays.
        digest = hashlib.sha256(json.dumps(manifest.get("sha256") or {}, sort_keys=True).encode()).hexdigest()[:16]
        ds = Dataset(name=manifest.get("dataset") or "?", digest=digest, source_type="sslpipe",
                     source=json.dumps({"source": manifest.get("source")}),
                     schema=json.dumps({"image_size": manifest.get("image_size"), "classes": manifest.get("num_classes")}),
                     profile=json.dumps(manifest.get("counts") or {}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    def parent(self) -> "StageRun":
        """The pipeline's parent run, to log the report's summary where the UI shows it first."""
        if self.run_id is None:  # offline (or off): what the parent would get goes into this job's record
            return StageRun(None, None, record=self.record and self.record.setdefault("parent", {"ops": []}))
        pid = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        return StageRun(self.client if pid else None, pid, self.s)


def _kill_stale(client, exp_id: str, tags: dict) -> None:
    """Earlier RUNNING runs of this job (same config, stage, method, seed) were killed (SIGKILL,
    node failure) before they could close: mark them KILLED now that the job runs again."""
    if not tags.get("sslpipe.config_hash"):
        return
    where = " and ".join(f"tags.`sslpipe.{k}` = {_quote(tags['sslpipe.' + k])}" for k in ("config_hash", "stage", "method", "seed"))
    for r in _retry(lambda: client.search_runs([exp_id], f"{where} and attributes.status = 'RUNNING'")):
        _retry(lambda r=r: client.set_terminated(r.info.run_id, "KILLED"))


@contextlib.contextmanager
def stage_run(stage: str, *, method: str | None = None, seed: int | None = None,
              params: dict | None = None, provenance: dict | None = None) -> Iterator[StageRun]:
    """Open a child run for a job; mark it FINISHED or FAILED when the block ends.

    With `tracking.enabled: false` yields a run that logs nothing. When the backend fails and
    `tracking.on_error` is `continue`, says so on stderr, goes on without tracking and keeps
    what the job logged in OFFLINE_DIR (see `replay`).
    """
    from sslpipe import offline

    s = settings()
    run = StageRun(None, None)
    if s["enabled"]:
        tags = {"sslpipe.stage": stage, "sslpipe.method": method or "", "sslpipe.seed": "" if seed is None else str(seed),
                "sslpipe.dataset": s["dataset"] or "", "sslpipe.config_hash": s["config_hash"] or "",
                **{f"sslpipe.{k}": str(v) for k, v in (provenance or {}).items()}}
        name = "/".join(str(p) for p in (stage, method, None if seed is None else f"seed{seed}") if p)
        record = {"name": name, "tags": tags, "params": params or {}, "settings": s, "ops": []}
        try:
            client = _client(s)
            exp_id = _experiment_id(client, s, create=True)
            _kill_stale(client, exp_id, tags)
            parent = _find_parent(client, exp_id, s["config_hash"])
            info = _retry(lambda: client.create_run(
                exp_id, tags={**tags, **({"mlflow.parentRunId": parent} if parent else {})}, run_name=name)).info
            run = StageRun(client, info.run_id, s, record)
            if params:
                _log_params(client, run.run_id, params)
        except Exception as exc:
            _backend_failed(s, exc, "opening the job's run", job=True)
            run = StageRun(None, None, s, record)
            run.lost = True
    status = "FINISHED"
    try:
        yield run
    except BaseException:
        status = "FAILED"
        raise
    finally:
        run._call(lambda: run.client.set_terminated(run.run_id, status))
        if run.lost and run.record is not None:
            offline.write({**run.record, "status": status})


def finish_pipeline(cfg: dict, config_hash: str, status: str) -> None:
    """Mark the pipeline's parent run FINISHED or FAILED (Snakefile onsuccess / onerror)."""
    s = settings_from_config(cfg, config_hash)
    if not s["enabled"]:
        return
    try:
        client = _client(s)
        parent = _find_parent(client, _experiment_id(client, s, create=False), config_hash)
        if parent:
            _retry(lambda: client.set_terminated(parent, status))
    except Exception as exc:
        _backend_failed(s, exc, f"marking the pipeline run {status}")


# ----------------------------------------------------------------------------- reading runs back
def _quote(value: str) -> str:
    """A string literal for an MLflow filter (no escape syntax exists: pick the other quote)."""
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    raise ValueError(f"cannot filter on a value containing both quote characters: {value!r}")


def _experiments(client, names: list[str] | None, uri: str) -> dict[str, str]:
    """{experiment id: name} for the named experiments, or for every active one."""
    if names:
        found = {n: _retry(lambda n=n: client.get_experiment_by_name(n)) for n in names}
        missing = [n for n, e in found.items() if e is None]
        if missing:
            raise ValueError(f"no MLflow experiment named {', '.join(map(repr, missing))} at {uri}; "
                             "leave out --experiment to search all of them")
        return {e.experiment_id: e.name for e in found.values()}
    out, token = {}, None
    while True:
        page = _retry(lambda: client.search_experiments(max_results=1000, page_token=token))
        out.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return out


def download_artifact(run_id: str, name: str, dest: str | os.PathLike, uri: str | None = None) -> Path | None:
    """Download run `run_id`'s artifact `name` into `dest`; None when the run has no such artifact."""
    import mlflow

    try:
        return Path(_retry(lambda: mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=name, dst_path=str(dest), tracking_uri=uri or tracking_uri(DEFAULTS))))
    except Exception as exc:  # MlflowException / OSError for a run logged before predictions existed
        if "not" in str(exc).lower() or isinstance(exc, OSError):
            return None
        raise


def search_eval_runs(experiments: list[str] | None = None, filters: dict[str, str] | None = None,
                     uri: str | None = None, stage: str = "linear_eval") -> list[dict]:
    """Every FINISHED run of `stage` in the given experiments (default: all) whose tags equal
    `filters` ({tag: value}), oldest first, as plain dicts: run_id, experiment, experiment_id,
    start_time (ms), tags, metrics (each metric's last value).

    `uri` defaults like the jobs' own: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd.
    Failed or still running jobs are left out: their metrics are partial or absent.
    """
    uri = uri or tracking_uri(DEFAULTS)
    db = _sqlite_path(uri)
    if db and not db.is_file():  # MLflow would silently create an empty store instead
        raise FileNotFoundError(f"no MLflow store at {db}: run the pipeline there first, or pass "
                                "--tracking-uri (or set MLFLOW_TRACKING_URI)")
    client = _client(DEFAULTS, uri)
    names = _experiments(client, experiments, uri)
    clauses = [f"tags.`sslpipe.stage` = {_quote(stage)}", "attributes.status = 'FINISHED'"]
    for key, value in (filters or {}).items():
        if "`" in key:
            raise ValueError(f"tag names cannot contain backticks: {key!r}")
        clauses.append(f"tags.`{key}` = {_quote(str(value))}")
    runs, token = [], None
    while names:
        page = _retry(lambda: client.search_runs(list(names), " and ".join(clauses), max_results=1000,
                                                 order_by=["attributes.start_time ASC"], page_token=token))
        runs += [{"run_id": r.info.run_id, "experiment": names[r.info.experiment_id],
                  "experiment_id": r.info.experiment_id, "start_time": r.info.start_time,
                  "tags": dict(r.data.tags), "metrics": dict(r.data.metrics)} for r in page]
        token = page.token
        if not token:
            break
    return runs
