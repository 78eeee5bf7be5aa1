"""`python -m sslpipe compare`: one table of methods x metrics over everything in the MLflow store.

The report compares the methods of one pipeline run; `compare` reads the `linear_eval` runs
back from MLflow, so it spans configs, pipeline invocations and experiments. Rows are grouped
by (dataset, method name); each cell is the mean ± sample std over the runs in the group (one
per seed and config), with the number of runs behind it.

Reruns: a job evaluated several times (same config hash, method and seed: `--forceall`, a
pipeline run again after deleting outputs) counts once, with its latest run, so a repeated
job cannot weigh twice in a mean. Runs with no config hash (a stage run by hand) are never
merged. Only FINISHED runs are read (see `tracking.search_eval_runs`).
"""
from __future__ import annotations

import csv
import io
import re
import statistics
from typing import Any

from sslpipe import tracking

BASE_METRICS = ("linear_top1", "linear_top5", "knn_top1")
PCT = re.compile(r"^linear_top1_(\d+(?:\.\d+)?)pct$")  # label-efficient probes, e.g. linear_top1_10pct


def latest_per_job(runs: list[dict]) -> list[dict]:
    """Keep the latest run for each (config hash, method, seed); see the module docstring."""
    latest: dict[Any, dict] = {}
    for run in runs:
        t = run["tags"]
        h = t.get("sslpipe.config_hash")
        key = (h, t.get("sslpipe.method"), t.get("sslpipe.seed")) if h else run["run_id"]
        if key not in latest or (run["start_time"], run["run_id"]) > (latest[key]["start_time"], latest[key]["run_id"]):
            latest[key] = run
    return list(latest.values())


def metric_names(runs: list[dict]) -> list[str]:
    """The standard metrics, then every label-efficient one present, by label fraction."""
    pct = {m for r in runs for m in r["metrics"] if PCT.match(m)}
    return list(BASE_METRICS) + sorted(pct, key=lambda m: float(PCT.match(m).group(1)))


def summarise(runs: list[dict], metrics: list[str]) -> list[dict]:
    """One row per (dataset, method): runs, experiments, configs, and mean/std/n per metric."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        key = (run["tags"].get("sslpipe.dataset") or "?", run["tags"].get("sslpipe.method") or "?")
        groups.setdefault(key, []).append(run)
    rows = []
    for (dataset, method), rs in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "method": method, "runs": len(rs),
                               "experiments": ";".join(sorted({r["experiment"] for r in rs})),
                               "configs": len({r["tags"].get("sslpipe.config_hash") or r["run_id"] for r in rs})}
        for m in metrics:
            vals = [r["metrics"][m] for r in rs if m in r["metrics"]]
            row[f"{m}_n"] = len(vals)
            row[f"{m}_mean"] = statistics.mean(vals) if vals else None
            # Sample std, 0.0 for one run: the same convention as the report.
            row[f"{m}_std"] = (statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        rows.append(row)
    top = metrics[0]
    rows.sort(key=lambda r: (r["dataset"], r[f"{top}_mean"] is None, -(r[f"{top}_mean"] or 0.0), r["method"]))
    return rows


def csv_columns(metrics: list[str]) -> list[str]:
    return (["dataset", "method", "runs"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
            + ["experiments", "configs"])


def to_csv(rows: list[dict], metrics: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns(metrics), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    # Fractions at full precision (repr), an absent metric as an empty cell.
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def _cell(row: dict, m: str) -> str:
    mean, std, n = row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"]
    if mean is None:
        return "—"
    # The run count is its own column; say n only where this metric is missing from some runs.
    return f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if n == row["runs"] else f" (n={n})")


def to_markdown(rows: list[dict], metrics: list[str]) -> str:
    header = ["dataset", "method", "runs"] + metrics + ["experiments", "configs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["dataset"], r["method"], r["runs"]] + [_cell(r, m) for m in metrics]
        cells += [r["experiments"].replace(";", ", "), r["configs"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    note = ("Accuracies in %, mean ± sample std over runs (one run per seed and config; the latest "
            "when a job was evaluated more than once).")
    return note + "\n\n" + "\n".join(lines) + "\n"


def parse_tags(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag expects key=value, got {item!r}")
        out[key] = value
    return out


def compare(uri: str | None = None, experiments: list[str] | None = None, dataset: str | None = None,
            methods: list[str] | None = None, tags: dict[str, str] | None = None, fmt: str = "markdown") -> str:
    """The comparison table as Markdown or CSV text."""
    filters = dict(tags or {})
    if dataset:
        filters["sslpipe.dataset"] = dataset
    where = uri or tracking.tracking_uri(tracking.DEFAULTS)
    try:
        runs = tracking.search_eval_runs(experiments, filters, uri=uri)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # MlflowException, connection errors: one line, not a traceback
        raise RuntimeError(f"reading MLflow runs from {where} failed: {exc}") from exc
    if methods:
        runs = [r for r in runs if r["tags"].get("sslpipe.method") in methods]
    if not runs:
        raise RuntimeError(f"no finished linear_eval runs match (experiments={experiments or 'all'}, "
                           f"filters={filters or 'none'}, methods={methods or 'all'}) at {where}")
    runs = latest_per_job(runs)
    metrics = metric_names(runs)
    rows = summarise(runs, metrics)
    return to_csv(rows, metrics) if fmt == "csv" else to_markdown(rows, metrics)
