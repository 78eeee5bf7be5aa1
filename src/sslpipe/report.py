"""Report stage: gather every method's and baseline's outputs into one HTML page, a Markdown
twin and a summary CSV.

Claims follow confidence intervals: "beats" only where the paired 95 % interval of the
difference excludes zero (`sslpipe.metrics`), from the per-test-image hits in each evaluation's
predictions.npz; without them the report shows means and makes no claim.

The report reads exactly the files it is given (`build_report`'s `inputs`: the report rule's
declared inputs, passed as JSON by workflow/rules/report.smk) and names none itself, so
Snakemake re-runs it whenever any of them changes. Optional inputs get a section only when
given and present: validation kNN-monitor curves (`val_knn_top1` column of history.csv),
embedding plots (the first seed's), label-efficient probes (`linear_top1_<p>pct` keys of
metrics.json), method diagnostics (the figures a method's pretraining wrote besides its declared
outputs) and wall time per job (Snakemake benchmark TSVs).

The HTML is self-contained (inline CSS, figures as base64 PNG data URIs; its only links are
its own contents and the MLflow run pages) so it can be mailed or attached to an MLflow run
without its results folder; report.md links the same figures as files in figures/ beside it
(`sslpipe.reportdoc`). Every output goes through `sslpipe.io` atomic writes, so a killed job
never leaves a half-written report behind.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import yaml
from . import figures as fig
from . import metrics as mt
from .io import read_json
from .reportdoc import Doc, Link, num as _num, write_text as _write_text

KNN_COLUMN = "val_knn_top1"  # the pretraining monitor's column in history.csv (validation split)
# PNG names that are never method diagnostics (the report draws its own plots).
STANDARD_PNGS = frozenset({"loss.png", "loss_curve.png", "preview.png"})
# What each column of a method's augmentation preview shows (methods/*.py `preview`), after the original.
PREVIEW_COLUMNS = {"simclr": ["view 1", "view 2"], "moco": ["query view", "key view"],
                   "pirl": ["view of I", "jigsaw tiles in place", "tiles as trained"],
                   "dae": ["clean view", "corrupted input"], "cd": ["view 1", "view 2", "chain start"]}
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
# MLflow 3's UI opens every experiment in its GenAI view unless told (or toggled) otherwise.
TRAINING_VIEW = "workflowType=machine_learning"
COMPARE_FILTER = "tags.`sslpipe.stage` = 'linear_eval'"


# ----------------------------------------------------------------------------- reading inputs
def _require(path: Path) -> Path:
    # Name the exact missing file: "results incomplete" is useless when debugging a DAG.
    if not path.is_file():
        raise FileNotFoundError(f"report input missing: {path}")
    return path


def _load_json(path: Path) -> Any:
    return read_json(_require(path))


def _given(inputs: dict, *keys) -> Any:
    """inputs[k1][k2]...; seeds may be JSON's string keys. Names what the caller did not pass."""
    node = inputs
    for k in keys:
        if not isinstance(node, dict) or (k not in node and str(k) not in node):
            raise ValueError(f"report inputs: nothing given for {'/'.join(map(str, keys))}")
        node = node[k] if k in node else node[str(k)]
    return node


def _optional(inputs: dict, *keys) -> Path | None:
    """A given optional input that exists, else None."""
    try:
        path = Path(_given(inputs, *keys))
    except ValueError:
        return None
    return path if path.is_file() else None


def _load_benchmark(path: Path) -> float:
    """Seconds a job took: column `s` of a Snakemake benchmark TSV (mean over repeats)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    try:
        return statistics.mean(float(r["s"]) for r in rows)
    except (KeyError, ValueError, TypeError, statistics.StatisticsError):
        raise ValueError(f"{path} is not a Snakemake benchmark file (a tab-separated table with an 's' "
                         "column); delete it and re-run that job to measure it again") from None


def _benchmarks(rows: list) -> list[tuple]:
    """(stage, name or None, seed or None, seconds) per job, from the given [stage, name, seed,
    benchmark TSV] rows (the rule declares one per job of this config; never the report's own,
    which is written after it finishes), ordered by stage, name and seed."""
    rows = sorted(rows, key=lambda r: (r[0], r[1] or "", -1 if r[2] is None else int(r[2])))
    return [(stage, name, None if seed is None else int(seed), _load_benchmark(Path(path)))
            for stage, name, seed, path in rows]


def _load_history(path: Path) -> pd.DataFrame:
    df = pd.read_csv(_require(path))
    missing = {"epoch", "loss"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}")
    return df




# ----------------------------------------------------------------------------- statistics
def _summarise(name: str, kind: str, metrics: list[dict], keys: list[str]) -> dict:
    if any(r.get("linear_top1") is None for r in metrics):  # the ranking key; top-5 alone may be null
        raise ValueError(f"linear_top1 missing for {name}")
    return mt.summarise(name, kind, metrics, keys)


def _winners(comps: list[dict], methods: list[str], bars: list[str]) -> list[str]:
    """Methods whose linear top-1 beats every non-reference baseline by a paired interval that
    excludes zero."""
    won = {(c["method"], c["baseline"]) for c in comps if c["metric"] == "linear_top1" and c["verdict"] == "beats"}
    return [m for m in methods if bars and all((m, b) in won for b in bars)]


def _knn_histories(histories: dict[str, list[pd.DataFrame]]) -> dict[str, list[pd.DataFrame]]:
    """Per method, the seeds whose history has kNN-monitor values (methods with none left out)."""
    col = KNN_COLUMN
    out = {m: [df for df in dfs if col in df and df[col].notna().any()] for m, dfs in histories.items()}
    return {m: dfs for m, dfs in out.items() if dfs}


# ----------------------------------------------------------------------------- report sections
def _mlflow(provenance: dict | None):
    """run id -> Link to its MLflow run page: the tracking server itself for an http(s) URI, else
    `mlflow ui` on its default address (`mlflow ui --backend-store-uri <the store>`)."""
    uri = str((provenance or {}).get("tracking_uri") or (provenance or {}).get("mlflow_tracking_uri") or "")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
    on = bool(uri) and uri != "off"
    eid = (provenance or {}).get("experiment_id")
    page = (lambda rid: f"{base}/#/experiments/{eid}/runs/{rid}?{TRAINING_VIEW}") if eid else (
        lambda rid: f"{base}/#/runs/{rid}")

    def link(rid: str | None, text: str | None = None) -> Link:
        return Link(text or rid, page(rid) if on and rid else None)
    return link, base, on


def _cost(name: str, kind: str, summaries: dict, seeds: list[int], metrics: dict) -> list[str]:
    """Pretraining wall time (s) and images/s, mean over seeds: the method's own training, or the
    supervised baseline's; nothing for baselines that do not train."""
    if kind == "ssl":
        ss = [summaries[(name, s)] for s in seeds]
        wall, ips = [x.get("wall_time_s") for x in ss], [x.get("images_per_s") for x in ss]
    else:
        wall = [metrics[(name, s)].get("supervised_train_s") for s in seeds]
        ips = [metrics[(name, s)].get("supervised_images_per_s") for s in seeds]
    mean = lambda v: None if None in v else statistics.mean(v)  # noqa: E731
    return [_num(mean(wall), ".1f"), _num(mean(ips), ".0f")]


def _claims_section(doc: Doc, comps: list[dict], methods: list[str], bars: list[str], winners: list[str],
                    baselines: list[str]) -> None:
    """What the numbers support, in words that follow the paired intervals (sslpipe.metrics)."""
    doc.heading("Does pretraining beat the baselines?", 3)
    if not bars:
        doc.para("No baselines were evaluated." if not baselines else "Only reference baselines were evaluated.")
        return
    if not comps:
        doc.para("No per-image predictions (predictions.npz) were found, so no difference can be tested: "
                 "the table above shows means only, and no method is said to beat a baseline.")
        return
    first = comps[0]
    doc.para(f"A method is said to beat a baseline only when the 95 % interval of the paired difference excludes "
             f"zero: a paired bootstrap ({mt.N_BOOT} resamples) over {first['resampled']}, "
             f"{first['n_seeds']} seed(s) x {first['n_images']} test images, seed s of a method against seed s "
             f"of the baseline on the same images. One test image is {100 / first['n_images']:.2f} points.")
    doc.para(f"Beat every baseline ({', '.join(bars)}) on linear top-1: {', '.join(winners) or 'none'}.")
    doc.bullets([mt.sentence(c) + "." for c in comps if c["metric"] == "linear_top1" and c["baseline"] in bars])
    metrics = list(dict.fromkeys(c["metric"] for c in comps))
    body = [[m, b] + [next((f"{mt.fmt_ci(c)} {c['verdict']}" for c in comps
                            if c["method"] == m and c["baseline"] == b and c["metric"] == k), "—") for k in metrics]
            for m in methods for b in baselines]
    doc.table(["method", "against"] + [f"{mt.label(k)}: Δ points [95 % CI]" for k in metrics], body)


def _method_section(doc: Doc, inputs: dict, method: str, seeds: list[int], metrics: dict, summaries: dict,
                    tile: int, link) -> None:
    doc.heading(f"Method: {method}")
    preview = _require(Path(_given(inputs, "augment", method, "preview"))).read_bytes()
    policy = _load_json(Path(_given(inputs, "augment", method, "policy")))
    labels = ["original"] + PREVIEW_COLUMNS.get(method, [])
    if method == "cd" and policy.get("n_views") == 1:  # objective energy: one view, then the chain start
        labels.remove("view 2")
    doc.figure(f"preview_{method}", fig.preview_with_headers(preview, tile, labels),
               f"{method} augmentation preview (rows: training images; columns: {', '.join(labels)})")
    doc.code("Augmentation policy", json.dumps(policy, indent=2, sort_keys=True), "json")
    if objective := summaries[(method, seeds[0])].get("objective"):  # methods with a choice of loss (cd, dae)
        doc.para(f"Objective: {objective}")
    if bench := _optional(inputs, "augment", method, "benchmark"):  # only when the augment benchmark ran
        ips = read_json(bench).get("images_per_s")
        doc.para(f"Augmentation throughput: {_num(ips, '.1f')} images/s")
    body, extras = [], []
    for seed in seeds:
        s, m = summaries[(method, seed)], metrics[(method, seed)]
        body.append([seed, s.get("device"), str(s.get("precision")).replace("torch.", ""), s.get("epochs"),
                     _num(s.get("final_loss"), ".4f"), _num(s.get("wall_time_s"), ".1f"),
                     _num(s.get("images_per_s"), ".1f"), _num(100 * m["linear_top1"], ".1f"),
                     link(s.get("run_id"), "pretrain run") if s.get("run_id") else "—"])
        # Method-specific diagnostics (reconstructions, energy histograms...): embed every one given.
        extras += [(Path(p), seed) for p in _given(inputs, "pretrain", method, seed).get("diagnostics", [])
                   if Path(p).name not in STANDARD_PNGS]
    doc.table(["seed", "device", "precision", "epochs", "final loss", "wall time (s)", "images/s",
               "linear top-1 (%)", "MLflow"], body)
    doc.begin_grid()
    for path, seed in extras:  # "dae_energy_vs_corruption" -> "dae energy vs corruption (seed 0)"
        doc.figure(f"{'' if path.stem.startswith(method) else method + '_'}{path.stem}_seed{seed}", fig.enlarge(_require(path).read_bytes()),
                   f"{path.stem.replace('_', ' ')} (seed {seed})")
    doc.end_grid()


def _pictures_section(doc: Doc, inputs: dict, names: list[str], seed: int, metrics: dict, classes) -> None:
    """Embeddings (PCA of the test features, one seed) in a grid, then the probes' confusion matrices."""
    found = [(n, p) for n in names if (p := _optional(inputs, "evaluations", n, seed, "embedding"))]
    if found:
        doc.heading("Embeddings")
        doc.begin_grid()
        for name, path in found:
            doc.figure(f"embedding_{name}", path.read_bytes(), f"{name} embedding of test features (seed {seed})")
        doc.end_grid()
    conf = {n: np.sum([metrics[k]["linear_confusion"] for k in metrics if k[0] == n], axis=0) for n in names
            if all("linear_confusion" in metrics[k] for k in metrics if k[0] == n)}
    if conf:
        doc.heading("Confusion matrices")
        doc.para("The linear probe's mistakes on the test set, summed over seeds: cell (true class, predicted "
                 "class) is the fraction of that class predicted as the other; the diagonal (accuracy) is left blank.")
        doc.figure("confusion", fig.confusion_grid(conf, classes), "Confusion matrices of the linear probe")


def _wall_time_section(doc: Doc, jobs: list[tuple]) -> None:
    stages: dict[str, list[float]] = {}
    for stage, _, _, sec in jobs:
        stages.setdefault(stage, []).append(sec)
    doc.heading("Wall time per stage", 3)
    doc.para(f"From Snakemake benchmarks: {len(jobs)} jobs, {sum(sec for *_, sec in jobs):.1f} s in all "
             "(jobs may have run in parallel).")
    doc.table(["stage", "jobs", "total (s)", "slowest job (s)"],
              [[st, len(v), _num(sum(v), ".1f"), _num(max(v), ".1f")] for st, v in stages.items()])
    doc.table(["stage", "name", "seed", "wall time (s)"], [[st, n, sd, _num(sec, ".1f")] for st, n, sd, sec in jobs])


def _runs_section(doc: Doc, summaries: dict, metrics: dict, kinds: dict, provenance: dict | None) -> None:
    link, base, on = _mlflow(provenance)
    doc.heading("MLflow runs")
    eid = (provenance or {}).get("experiment_id")
    if on:
        doc.para(f"Links open the runs in the MLflow UI at {base}"
                 + ("" if base != MLFLOW_UI else f" (start it with: mlflow ui --backend-store-uri "
                                                 f"{provenance.get('tracking_uri') or provenance.get('mlflow_tracking_uri')})")
                 + ".", link=Link("Open the experiment", f"{base}/#/experiments/{eid}/runs?{TRAINING_VIEW}") if eid else None)
        if eid:  # the evaluation runs side by side as charts, one bar per run (and metric)
            doc.para("Compare the methods' evaluations there in one click:",
                     link=Link("linear_eval runs, chart view", f"{base}/#/experiments/{eid}/runs?{TRAINING_VIEW}"
                               f"&compareRunsMode=CHART&searchFilter={quote(COMPARE_FILTER)}"))
    run_rows = []
    for (name, seed), m in metrics.items():
        pre = m.get("pretrain_run_id")
        if kinds[name] == "ssl":
            pre_summary = summaries[(name, seed)].get("run_id")
            if pre and pre_summary and pre != pre_summary:  # eval of a stale pretrain run
                pre = f"{pre} (≠ pretrain summary {pre_summary})"
            pre = pre or pre_summary
        run_rows.append([name, seed, kinds[name], m.get("feature_dim"), m.get("probe_weight_decay"),
                         link(pre) if pre and "≠" not in pre else pre, link(m.get("run_id")) if m.get("run_id") else None])
    doc.table(["name", "seed", "kind", "feature dim", "probe weight decay", "pretrain run id", "eval run id"], run_rows)


def _provenance_section(doc: Doc, provenance: dict | None, jobs: list[tuple]) -> None:
    doc.heading("Provenance")
    if jobs:
        _wall_time_section(doc, jobs)
    if not provenance:
        doc.para("No provenance recorded.")
        return
    scalars = {k: v for k, v in provenance.items() if not isinstance(v, dict)}
    doc.table(["key", "value"], [[k, json.dumps(v) if isinstance(v, list) else v] for k, v in scalars.items()])
    # Nested dicts (the resolved config, package versions) are long: collapsed YAML blocks.
    for key, value in provenance.items():
        if isinstance(value, dict):
            doc.code(key, yaml.safe_dump(value, sort_keys=False, default_flow_style=False), "yaml")


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    # repr keeps full float precision; an absent metric (e.g. no top-5) is an empty cell.
    writer.writerows({k: ("" if r[k] is None else r[k]) for k in columns} for r in rows)
    _write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- entry point
def build_report(inputs: dict, dataset: str, methods: list[str], seeds: list[int], baselines: list[str],
                 out_dir: str | Path, provenance: dict | None = None) -> dict:
    """Write report.html, report.md (+ its figures/) and summary.csv into out_dir; return the ranked rows.

    inputs: every file to read (the report rule's `report_files`, workflow/rules/common.smk):
    {"manifest": path, "augment": {method: {"policy", "preview", "benchmark"*}},
     "pretrain": {method: {seed: {"summary", "history", "diagnostics"*: [png, ...]}}},
     "evaluations": {name: {seed: {"metrics", "predictions"*, "embedding"*}}},
     "benchmarks"*: [[stage, name or None, seed or None, tsv], ...]}   (* optional)
    """
    out = Path(out_dir)
    manifest = _load_json(Path(_given(inputs, "manifest")))
    kinds = {**{m: "ssl" for m in methods}, **{b: "baseline" for b in baselines}}
    # Every input is read before the first write, so a missing file leaves no partial outputs.
    metrics = {(n, s): _load_json(Path(_given(inputs, "evaluations", n, s, "metrics"))) for n in kinds for s in seeds}
    histories = {m: [_load_history(Path(_given(inputs, "pretrain", m, s, "history"))) for s in seeds]
                 for m in methods}
    summaries = {(m, s): _load_json(Path(_given(inputs, "pretrain", m, s, "summary"))) for m in methods for s in seeds}
    hits = {n: {s: h for s in seeds if (p := _optional(inputs, "evaluations", n, s, "predictions"))
                and (h := mt.load_hits(p)) is not None} for n in kinds}
    jobs = _benchmarks(inputs.get("benchmarks") or [])
    keys = mt.metric_keys(metrics.values())
    rows = [_summarise(n, k, [metrics[(n, s)] for s in seeds], keys) for n, k in kinds.items()]
    rows.sort(key=lambda r: (-r["linear_top1_mean"], r["name"]))  # name breaks ties deterministically
    comps = mt.comparisons(hits, methods, list(baselines), keys)
    bars = [b for b in baselines if b not in mt.REFERENCES]
    winners = _winners(comps, methods, bars)

    doc = Doc(out)
    doc.heading(f"sslpipe report: {dataset}", 1)
    doc.table(["dataset", "source", "classes", "image size", "train", "test"],
              [[manifest.get("dataset", dataset), manifest.get("source"), manifest.get("num_classes"),
                manifest.get("image_size"), (manifest.get("counts") or {}).get("train"),
                (manifest.get("counts") or {}).get("test")]])

    doc.heading("Summary")
    doc.para(f"Accuracies in %, mean ± sample std over seeds (n = number of seeds behind each number; "
             f"this config has {len(seeds)}), ranked by linear top-1. Cost: pretraining wall time and images/s "
             "(mean over seeds; for the supervised baseline its own training).")
    shown = [m for m in keys if any(r[f"{m}_mean"] is not None for r in rows)]  # drop all-null top-5
    doc.table(["rank", "name", "kind"] + [mt.label(m) for m in shown] + ["pretrain (s)", "images/s"],
              [[i + 1, r["name"], r["kind"]] + [mt.fmt_mean_std(r, m) for m in shown]
               + _cost(r["name"], r["kind"], summaries, seeds, metrics) for i, r in enumerate(rows)],
              [r["kind"] for r in rows])
    doc.figure("accuracy", fig.dot_chart(rows), "Linear top-1 by method")
    if any(c["metric"] == "linear_top1" for c in comps):
        doc.figure("differences", fig.forest_chart(comps, "linear_top1"),
                   "Each method minus each baseline, linear top-1, with 95 % paired intervals")
    _claims_section(doc, comps, methods, bars, winners, baselines)
    for r in (r for r in rows if r["kind"] == "baseline" and r["name"] in mt.REFERENCES):
        doc.para(f"Reference: {r['name']} (trained with labels, an upper bound rather than a bar to "
                 f"clear) reaches {mt.fmt_mean_std(r, 'linear_top1')} linear top-1.")
    changed = [f"{n}/seed{s}" for (n, s), m in metrics.items() if m.get("encoder_unchanged") is False]
    if changed:  # a linear probe must not move the encoder; flag it loudly rather than hide it
        doc.para(f"Warning: encoder changed during linear evaluation in: {', '.join(changed)}", "warn")

    if histories:
        doc.heading("Training curves")
        doc.figure("loss", fig.small_multiples(histories, "loss", "pretraining loss",
                                               "Pretraining loss per method (own y axis each: the objectives "
                                               "differ; mean ± std over seeds)"), "Pretraining loss curves")
    knn = _knn_histories(histories)
    if knn:
        doc.figure("knn_monitor", fig.curve_chart(knn, KNN_COLUMN, "validation kNN top-1 (%)",
                                                  "kNN monitor during pretraining: held-out training images "
                                                  "(mean over seeds)", 100.0), "kNN monitor curves")
    _pictures_section(doc, inputs, [r["name"] for r in rows], seeds[0], metrics, manifest.get("classes"))
    for method in methods:
        _method_section(doc, inputs, method, seeds, metrics, summaries, int(manifest.get("image_size") or 0),
                        _mlflow(provenance)[0])
    _runs_section(doc, summaries, metrics, kinds, provenance)
    _provenance_section(doc, provenance, jobs)

    doc.write(f"sslpipe report: {dataset}")
    columns = mt.csv_columns(keys)
    _write_csv(out / "summary.csv", rows, columns)
    return {"dataset": dataset, "rows": [{k: r[k] for k in columns} for r in rows], "comparisons": comps,
            "beat_all_baselines": winners, "outputs": {k: str(out / k) for k in ("report.html", "report.md", "summary.csv")}}
