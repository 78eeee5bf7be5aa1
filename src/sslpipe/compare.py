"""`python -m sslpipe compare`: one table of methods x metrics over everything in the MLflow store.

The report compares the methods of one pipeline run; `compare` reads the `linear_eval` runs
back from MLflow, so it spans configs, pipeline invocations and experiments. Rows are grouped
by (dataset, method name); each cell is the mean ± sample std over the runs in the group (one
per seed and config), with the number of runs behind it.

Reruns: a job evaluated several times (same config hash, method and seed: `--forceall`, a
pipeline run again after deleting outputs) counts once, with its latest run, so a repeated
job cannot weigh twice in a mean. Runs with no config hash (a stage run by hand) are never
merged. Only FINISHED runs are read (see `tracking.search_eval_runs`).

Intervals (`--against NAME`, default the random-init baseline): for each method, the paired
difference to that baseline with its 95 % bootstrap interval, exactly as the report computes it
(`sslpipe.metrics`): the method's run and the baseline's run of the same config hash and seed form
a pair, their predictions.npz artifacts give per-test-image hits, and pairs are resampled as the
report resamples seeds. The verdict ("beats", "worse", "no clear difference") follows the interval.
"""
from __future__ import annotations

import csv
import io
from typing import Any

import tempfile
from pathlib import Path

import numpy as np

from sslpipe import metrics as mt
from sslpipe import tracking

INTERVAL_METRICS = ("linear_top1", "knn_top1")
CI_FIELDS = ("diff", "lo", "hi", "verdict", "pairs")  # the CSV columns of each interval


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
    return mt.metric_keys(r["metrics"] for r in runs)


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
        for m in metrics:  # sample std, 0.0 for one run: the report's convention (metrics.mean_std)
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = mt.mean_std(r["metrics"].get(m) for r in rs)
        rows.append(row)
    top = metrics[0]
    rows.sort(key=lambda r: (r["dataset"], r[f"{top}_mean"] is None, -(r[f"{top}_mean"] or 0.0), r["method"]))
    return rows


def _hits(run: dict, tmp: Path, uri: str | None) -> dict[str, np.ndarray] | None:
    path = tracking.download_artifact(run["run_id"], "predictions.npz", tmp / run["run_id"], uri)
    return None if path is None else mt.load_hits(path)


def add_intervals(rows: list[dict], runs: list[dict], against: list[str], uri: str | None) -> None:
    """Per row, the paired interval against each baseline in `against` (see the module docstring):
    `{metric}_vs_{baseline}` = {diff, lo, hi, verdict, pairs}, or None without pairs."""
    def job(r):  # (dataset, config hash, seed): what pairs a method's run with a baseline's
        t = r["tags"]
        return t.get("sslpipe.dataset"), t.get("sslpipe.config_hash"), t.get("sslpipe.seed")
    by_method: dict[tuple, dict] = {}
    for r in runs:
        if r["tags"].get("sslpipe.config_hash"):
            by_method.setdefault((r["tags"].get("sslpipe.dataset"), r["tags"].get("sslpipe.method")), {})[job(r)] = r
    with tempfile.TemporaryDirectory() as tmp:
        cache: dict[str, dict | None] = {}

        def hits(r: dict) -> dict | None:  # each run's artifact downloaded once
            if r["run_id"] not in cache:
                cache[r["run_id"]] = _hits(r, Path(tmp), uri)
            return cache[r["run_id"]]
        for row in rows:
            mine = by_method.get((row["dataset"], row["method"]), {})
            for base in against:
                theirs = by_method.get((row["dataset"], base), {})
                pairs = [(mine[j], theirs[j]) for j in sorted(set(mine) & set(theirs), key=str)]
                for m in INTERVAL_METRICS:
                    key = f"{m}_vs_{base}"
                    row[key] = None
                    if row["method"] == base:
                        continue
                    ok = [(hits(a), hits(b)) for a, b in pairs]
                    ok = [(a[m], b[m]) for a, b in ok if a and b and m in a and m in b and a[m].shape == b[m].shape]
                    if ok and len({a.shape for a, _ in ok}) == 1:  # one test set for all pairs
                        ci = mt.paired_bootstrap(np.stack([a for a, _ in ok]), np.stack([b for _, b in ok]))
                        row[key] = {**ci, "verdict": mt.verdict(ci), "pairs": len(ok)}


def csv_columns(metrics: list[str], against: list[str] = ()) -> list[str]:
    vs = [f"{m}_vs_{b}_{s}" for b in against for m in INTERVAL_METRICS for s in CI_FIELDS]
    return (["dataset", "method", "runs"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
            + vs + ["experiments", "configs"])


def _flat(row: dict, against: list[str]) -> dict:
    out = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for b in against:
        for m in INTERVAL_METRICS:
            ci = row.get(f"{m}_vs_{b}") or {}
            out.update({f"{m}_vs_{b}_{s}": ci.get(s) for s in CI_FIELDS})
    return out


def to_csv(rows: list[dict], metrics: list[str], against: list[str] = ()) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns(metrics, against), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    # Fractions at full precision (repr), an absent metric as an empty cell.
    writer.writerows({k: "" if v is None else v for k, v in _flat(r, against).items()} for r in rows)
    return buf.getvalue()


def _cell(row: dict, m: str) -> str:
    mean, std, n = row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"]
    if mean is None:
        return "—"
    # The run count is its own column; say n only where this metric is missing from some runs.
    return f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if n == row["runs"] else f" (n={n})")


def _vs_cell(ci: dict | None) -> str:
    return "—" if not ci else f"{mt.fmt_ci(ci)} {ci['verdict']} (pairs={ci['pairs']})"


def to_markdown(rows: list[dict], metrics: list[str], against: list[str] = ()) -> str:
    vs = [f"linear_top1 vs {b}: Δ [95 % CI]" for b in against]
    header = ["dataset", "method", "runs"] + metrics + vs + ["experiments", "configs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["dataset"], r["method"], r["runs"]] + [_cell(r, m) for m in metrics]
        cells += [_vs_cell(r.get(f"linear_top1_vs_{b}")) for b in against]
        cells += [r["experiments"].replace(";", ", "), r["configs"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    note = ("Accuracies in %, mean ± sample std over runs (one run per seed and config; the latest "
            "when a job was evaluated more than once).")
    if against:
        note += (" Δ: paired difference in points against the baseline's run of the same config and seed, "
                 f"95 % bootstrap interval over pairs and test images ({mt.N_BOOT} resamples); 'beats' only "
                 "when it excludes zero.")
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
            methods: list[str] | None = None, tags: dict[str, str] | None = None, fmt: str = "markdown",
            against: list[str] | None = None) -> str:
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
    against = ["random"] if against is None else against
    everything = latest_per_job(runs)  # the baselines' runs too, for the intervals
    if methods:
        runs = [r for r in runs if r["tags"].get("sslpipe.method") in methods]
    if not runs:
        raise RuntimeError(f"no finished linear_eval runs match (experiments={experiments or 'all'}, "
                           f"filters={filters or 'none'}, methods={methods or 'all'}) at {where}")
    runs = latest_per_job(runs)
    metrics = metric_names(runs)
    rows = summarise(runs, metrics)
    against = [b for b in against if any(r["tags"].get("sslpipe.method") == b for r in everything)]
    add_intervals(rows, everything, against, uri)
    return to_csv(rows, metrics, against) if fmt == "csv" else to_markdown(rows, metrics, against)
