"""Report stage: build a small but real results tree, render it, and check every output."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reportkit import build_report

DATASET = "digits"
METHODS = ["dae", "simclr"]
BASELINES = ["pixels", "random"]
SEEDS = [0, 1]
# Chosen so the ranking (simclr, pixels, dae, random) differs from input and alphabetical order,
# and only simclr beats both baselines.
TOP1 = {"simclr": [0.91, 0.87], "dae": [0.62, 0.70], "pixels": [0.80, 0.80], "random": [0.30, 0.34]}
TOP5 = {"simclr": [0.99, 0.98], "dae": [0.95, 0.90], "pixels": [None, None], "random": [0.71, 0.62]}
KNN = {"simclr": [0.88, 0.85], "dae": [0.55, 0.61], "pixels": [0.83, 0.81], "random": [0.21, 0.29]}
RANKED = ["simclr", "pixels", "dae", "random"]
N_TEST = 300  # test images behind each synthetic predictions.npz
VOID = {"meta", "img", "br", "hr", "link", "input"}


def _png(path: Path, color: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _hits(path: Path, values: dict[str, float], seed: int) -> None:
    """predictions.npz whose per-image hits average exactly to each metric's value."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, v in values.items():
        h = np.zeros(N_TEST, dtype=np.uint8)
        h[: round(v * N_TEST)] = 1
        arrays[key] = rng.permutation(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))



@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results" / DATASET
    _json(root / "data" / "manifest.json", {"dataset": DATASET, "source": "digits", "classes": list("0123456789"),
                                            "num_classes": 10, "image_size": 8, "counts": {"train": 1437, "test": 360}})
    for i, method in enumerate(METHODS):
        aug = root / "augment" / method
        _json(aug / "policy.json", {"crop_scale": [0.2, 1.0], "jitter": 0.4})
        _png(aug / "preview.png", "red")
        for seed in SEEDS:
            run = root / "pretrain" / method / f"seed{seed}"
            run.mkdir(parents=True)
            # An extra method-specific column the report must tolerate.
            rows = ["epoch,loss,lr,images_per_s,wall_s,extra_metric"]
            rows += [f"{e},{2.0 / (e + i + seed)},{0.1},{1000.0},{e * 1.5},{e}" for e in range(1, 4)]
            (run / "history.csv").write_text("\n".join(rows) + "\n")
            _json(run / "summary.json", {"method": method, "seed": seed, "run_id": f"pre-{method}-{seed}",
                                         "device": "cpu", "precision": "fp32", "wall_time_s": 4.5,
                                         "images_per_s": 1234.5, "final_loss": 0.5, "epochs": 3,
                                         **({"objective": "reconstruction + NT-Xent"} if method == "dae" else {})})
    _json(root / "augment" / "simclr" / "benchmark.json", {"images_per_s": 4321.0})  # optional, simclr only
    _png(root / "pretrain" / "dae" / "seed0" / "reconstructions.png", "blue")  # diagnostic: embedded
    _png(root / "pretrain" / "dae" / "seed1" / "loss.png", "green")  # standard name: not embedded
    for name in METHODS + BASELINES:
        kind = "ssl" if name in METHODS else "baseline"
        for j, seed in enumerate(SEEDS):
            m = {"name": name, "kind": kind, "seed": seed, "linear_top1": TOP1[name][j],
                 "linear_top5": TOP5[name][j], "knn_top1": KNN[name][j], "probe_weight_decay": 1e-4,
                 "feature_dim": 64, "encoder_unchanged": True, "run_id": f"eval-{name}-{seed}"}
            if kind == "ssl":
                m["pretrain_run_id"] = f"pre-{name}-{seed}"
            _json(root / "linear_eval" / name / f"seed{seed}" / "metrics.json", m)
            _hits(root / "linear_eval" / name / f"seed{seed}" / "predictions.npz",
                  {"linear_top1": TOP1[name][j], "knn_top1": KNN[name][j]}, seed)
    return root


PROVENANCE = {"config_hash": "abc123", "git_commit": "deadbeef", "mlflow_tracking_uri": "sqlite:///mlflow.db",
              "experiment_name": "<script>alert(1)</script>", "experiment_id": "7",
              "packages": {"torch": "2.4.0"}, "config": {"methods": METHODS, "pretrain": {"epochs": 3}}}


class _Collector(HTMLParser):
    """Checks nesting and gathers text, image sources and table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.imgs: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _fmt(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.mean(vals):.1f} ± {100 * std:.1f} (n={len(vals)})"


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def test_html_report(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = build_report(results, DATASET, METHODS, SEEDS, BASELINES, out, PROVENANCE)
    page = _parse(out / "report.html")
    text = " ".join(page.text)
    for name in METHODS + BASELINES:
        assert name in text
    assert DATASET in text

    summary = next(t for t in page.tables if t[0][:3] == ["rank", "name", "kind"])
    assert summary[0][3:] == ["Linear top-1", "Linear top-5", "kNN top-1", "pretrain (s)", "images/s"]
    assert [r[1] for r in summary[1:]] == RANKED
    for row in summary[1:]:
        name = row[1]
        assert row[2] == ("ssl" if name in METHODS else "baseline")
        assert row[3:6] == [_fmt(TOP1[name]), _fmt(TOP5[name]), _fmt(KNN[name])]
        # Cost: the method's pretraining (mean over seeds); baselines that do not train have none.
        assert row[6:] == (["4.5", "1234"] if name in METHODS else ["—", "—"])
    assert "Beat every baseline (pixels, random) on linear top-1: simclr." in text
    assert text.count("Objective: ") == 1 and "Objective: reconstruction + NT-Xent" in text  # dae's, from its summary
    assert res["beat_all_baselines"] == ["simclr"]
    # The wording follows the paired intervals: dae is clearly below pixels, clearly above random.
    verdicts = {(c["method"], c["baseline"], c["metric"]): c["verdict"] for c in res["comparisons"]}
    assert verdicts[("dae", "pixels", "linear_top1")] == "worse"
    assert verdicts[("dae", "random", "linear_top1")] == "beats"
    assert verdicts[("simclr", "pixels", "knn_top1")] == "beats"
    assert "dae is worse than pixels on linear top-1 (-14.0 points, 95 % CI" in text
    assert [r["name"] for r in res["rows"]] == RANKED

    # dot chart + forest chart + loss curves + 2 previews + dae's reconstructions (loss.png is a standard name)
    assert len(page.imgs) == 6
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "reconstructions (seed 0)" in text and "loss (seed 1)" not in text
    page_src = (out / "report.html").read_text(encoding="utf-8")
    # Self-contained: pictures inline; links only to its own sections and MLflow pages (training view).
    assert not re.search(r'src="(?!data:)', page_src)
    assert not re.search(r'href="(?!#|http://127\.0\.0\.1:5000/#/(runs|experiments)/)', page_src)
    assert ('<a href="http://127.0.0.1:5000/#/experiments/7/runs/eval-simclr-1?workflowType=machine_learning">'
            'eval-simclr-1</a>') in page_src
    assert '<a href="http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning">' in page_src
    assert ("/#/experiments/7/runs?workflowType=machine_learning&amp;compareRunsMode=CHART&amp;searchFilter="
            "tags.%60sslpipe.stage%60%20%3D%20%27linear_eval%27") in page_src

    runs = next(t for t in page.tables if "eval run id" in t[0])
    assert ["simclr", "1", "ssl", "64", "0.0001", "pre-simclr-1", "eval-simclr-1"] in runs
    assert ["pixels", "0", "baseline", "64", "0.0001", "—", "eval-pixels-0"] in runs
    assert "4321.0 images/s" in text  # optional augment benchmark shown when present
    # Provenance: escaped scalars, config as a collapsible YAML block.
    assert "<script>" not in page_src and "&lt;script&gt;alert(1)&lt;/script&gt;" in page_src
    assert re.search(r"<details><summary>config</summary><pre>[^<]*epochs: 3", page_src)
    assert "Warning" not in text
    # Optional sections stay out when their inputs do not exist.
    for absent in ("kNN monitor", "Embeddings", "Wall time per stage", "% labels)", "Reference:"):
        assert absent not in text


# ----------------------------------------------------------------------------- optional inputs
PCT1 = {"simclr": [0.50, 0.56], "dae": [0.31, 0.35], "pixels": [0.44, 0.40], "random": [0.12, 0.10],
        "supervised": [0.90, 0.92]}
PCT10 = {"simclr": [0.80, 0.78], "dae": [0.55, 0.61], "pixels": [0.70, 0.72], "random": [0.25, 0.21],
         "supervised": [0.97, 0.96]}
SUPERVISED = [0.97, 0.95]  # above simclr: a reference, yet simclr must still count as beating the baselines
BENCH = {"prepare.tsv": 2.0, "augment/simclr.tsv": 1.5, "augment/dae.tsv": 0.5, "pretrain/simclr/seed0.tsv": 30.0,
         "pretrain/simclr/seed1.tsv": 34.0, "pretrain/dae/seed0.tsv": 20.0, "pretrain/dae/seed1.tsv": 22.0,
         "linear_eval/pixels/seed0.tsv": 3.0, "linear_eval/supervised/seed1.tsv": 4.0,
         # not this config's jobs, so never given: a method and a seed it does not have, a layout of
         # earlier versions and the report's own previous run
         "pretrain/byol/seed0.tsv": 99.0, "pretrain/simclr/seed7.tsv": 99.0, "supervised/seed0.tsv": 99.0,
         "report.tsv": 99.0}
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


@pytest.fixture
def optional(results: Path) -> Path:
    """Add every optional input: kNN monitor, embeddings, label-efficient probes, a supervised
    baseline, readable diagnostics names and Snakemake benchmarks."""
    for seed in SEEDS:  # simclr monitors kNN on epochs 2 and 3 only; dae has the column but no values
        for method, knn in (("simclr", ["", "0.5", "0.6"]), ("dae", ["", "", ""])):
            path = results / "pretrain" / method / f"seed{seed}" / "history.csv"
            lines = path.read_text().splitlines()
            path.write_text("\n".join([lines[0] + ",val_knn_top1"] + [f"{ln},{k}" for ln, k in zip(lines[1:], knn)]) + "\n")
    (results / "pretrain/dae/seed0/reconstructions.png").rename(results / "pretrain/dae/seed0/dae_energy_vs_corruption.png")
    for name, color in (("simclr", "yellow"), ("pixels", "purple")):
        _png(results / "linear_eval" / name / "seed0" / "embedding.png", color)
        _png(results / "linear_eval" / name / "seed1" / "embedding.png", "black")  # only the first seed is shown
    for name in METHODS + BASELINES + ["supervised"]:
        for j, seed in enumerate(SEEDS):
            path = results / "linear_eval" / name / f"seed{seed}" / "metrics.json"
            m = json.loads(path.read_text()) if path.exists() else {
                "name": name, "kind": "baseline", "seed": seed, "linear_top1": SUPERVISED[j], "linear_top5": 1.0,
                "knn_top1": SUPERVISED[j], "feature_dim": 64, "encoder_unchanged": True, "run_id": f"eval-sup-{seed}"}
            _json(path, {**m, "linear_top1_10pct": PCT10[name][j], "linear_top1_1pct": PCT1[name][j]})
            top1 = SUPERVISED[j] if name == "supervised" else TOP1[name][j]
            _hits(path.with_name("predictions.npz"), {"linear_top1": top1, "linear_top1_1pct": PCT1[name][j]}, seed)
    bench = results.parents[1] / "benchmarks" / DATASET
    for rel, sec in BENCH.items():
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_text(BENCH_HEADER + f"{sec}\t0:00:{sec:02.0f}\t100\t200\t90\t95\t0.1\t0.2\t50.0\t{sec}\n")
    return results


def test_optional_sections(optional: Path, tmp_path: Path) -> None:
    out = tmp_path / "opt"
    res = build_report(optional, DATASET, METHODS, SEEDS, BASELINES + ["supervised"], out, PROVENANCE)
    html = (out / "report.html").read_text(encoding="utf-8")
    page = _parse(out / "report.html")
    text = " ".join(page.text)

    summary = next(t for t in page.tables if t[0][:3] == ["rank", "name", "kind"])
    assert summary[0][3:] == ["Linear top-1", "Linear top-5", "kNN top-1", "Linear top-1 (1% labels)",
                              "Linear top-1 (10% labels)", "pretrain (s)", "images/s"]  # by label fraction, not as text
    assert [r[1] for r in summary[1:]] == ["supervised"] + RANKED
    for row in summary[1:]:
        assert row[6:8] == [_fmt(PCT1[row[1]]), _fmt(PCT10[row[1]])]
    assert "n = number of seeds" in text
    assert res["beat_all_baselines"] == ["simclr"]  # the supervised reference is not a bar to clear
    assert "Beat every baseline (pixels, random) on linear top-1: simclr." in text
    # supervised is compared too (shown), but never a bar a method must clear
    assert any(c["baseline"] == "supervised" and c["verdict"] == "worse" for c in res["comparisons"])
    assert "Reference: supervised (trained with labels" in text and _fmt(SUPERVISED) in text

    # Figures: bar, loss, kNN monitor, 2 embeddings (first seed), 2 previews, the dae diagnostic.
    caps = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert caps == ["Linear top-1 by method", "Each method minus each baseline, linear top-1, with 95 % paired intervals",
                    "Pretraining loss curves", "kNN monitor curves",
                    "simclr embedding of test features (seed 0)", "pixels embedding of test features (seed 0)",
                    "dae augmentation preview (rows: training images; columns: original, clean view, corrupted input)",
                    "dae energy vs corruption (seed 0)",
                    "simclr augmentation preview (rows: training images; columns: original, view 1, view 2)"]
    embedded = dict(zip(caps, page.imgs))
    assert base64.b64decode(embedded["pixels embedding of test features (seed 0)"].split(",", 1)[1]) == (
        optional / "linear_eval/pixels/seed0/embedding.png").read_bytes()

    stages = next(t for t in page.tables if t[0] == ["stage", "jobs", "total (s)", "slowest job (s)"])
    assert stages[1:] == [["augment", "2", "2.0", "1.5"], ["linear_eval", "2", "7.0", "4.0"],
                          ["prepare", "1", "2.0", "2.0"], ["pretrain", "4", "106.0", "34.0"]]
    jobs = next(t for t in page.tables if t[0] == ["stage", "name", "seed", "wall time (s)"])
    assert ["pretrain", "simclr", "1", "34.0"] in jobs and ["linear_eval", "supervised", "1", "4.0"] in jobs
    assert len(jobs) == 1 + 9 and "9 jobs, 117.0 s in all" in text  # files not given are not read

    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| pretrain | 4 | 106.0 | 34.0 |" in md and "Linear top-1 (10% labels) |" in md
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    for name, row in rows.items():
        assert float(row["linear_top1_1pct_mean"]) == statistics.mean(PCT1[name])
        assert float(row["linear_top1_10pct_std"]) == statistics.stdev(PCT10[name])
    assert rows["supervised"]["kind"] == "baseline" and rows["supervised"]["n_seeds"] == "2"


def test_no_knn_values_no_knn_figure(optional: Path, tmp_path: Path) -> None:
    build_report(optional, DATASET, ["dae"], SEEDS, BASELINES, tmp_path / "k")  # dae's column is all empty
    assert "kNN monitor" not in (tmp_path / "k" / "report.html").read_text(encoding="utf-8")


def test_bad_benchmark_file_is_named(optional: Path, tmp_path: Path) -> None:
    bad = optional.parents[1] / "benchmarks" / DATASET / "prepare.tsv"
    bad.write_text("not a benchmark\n")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        build_report(optional, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "b")
    build_report(optional, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "b", benchmarks=False)
    assert "Wall time" not in (tmp_path / "b" / "report.html").read_text(encoding="utf-8")


def test_summary_csv(results: Path, tmp_path: Path) -> None:
    build_report(results, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "out")
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["name", "kind", "n_seeds", "linear_top1_mean", "linear_top1_std",
                                 "linear_top5_mean", "linear_top5_std", "knn_top1_mean", "knn_top1_std"]
    assert [r["name"] for r in rows] == RANKED
    for row in rows:
        name = row["name"]
        assert row["kind"] == ("ssl" if name in METHODS else "baseline") and row["n_seeds"] == "2"
        for col, values in (("linear_top1", TOP1), ("linear_top5", TOP5), ("knn_top1", KNN)):
            if values[name][0] is None:
                assert row[f"{col}_mean"] == row[f"{col}_std"] == ""
                continue
            assert float(row[f"{col}_mean"]) == statistics.mean(values[name])
            assert float(row[f"{col}_std"]) == statistics.stdev(values[name])


def test_single_seed_std_is_zero(results: Path, tmp_path: Path) -> None:
    res = build_report(results, DATASET, METHODS, [1], BASELINES, tmp_path / "one")
    text = " ".join(_parse(tmp_path / "one" / "report.html").text)
    assert "70.0 ± 0.0 (n=1)" in text  # dae seed 1
    assert all(r["linear_top1_std"] == 0.0 and r["n_seeds"] == 1 for r in res["rows"])
    assert [r["name"] for r in res["rows"]] == ["simclr", "pixels", "dae", "random"]


def test_markdown_has_tables(results: Path, tmp_path: Path) -> None:
    build_report(results, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "md", PROVENANCE)
    md = (tmp_path / "md" / "report.md").read_text(encoding="utf-8")
    assert "| rank | name | kind | Linear top-1 | Linear top-5 | kNN top-1 |" in md
    for i, name in enumerate(RANKED, 1):
        kind = "ssl" if name in METHODS else "baseline"
        assert f"| {i} | {name} | {kind} | {_fmt(TOP1[name])} | {_fmt(TOP5[name])} | {_fmt(KNN[name])} |" in md
    run = "http://127.0.0.1:5000/#/experiments/7/runs/{}?workflowType=machine_learning"
    assert (f"| simclr | 0 | ssl | 64 | 0.0001 | [pre-simclr-0]({run.format('pre-simclr-0')}) | "
            f"[eval-simclr-0]({run.format('eval-simclr-0')}) |") in md
    assert "data:image" not in md and "<script>" in md  # Markdown is plain text, not HTML-escaped
    assert "```yaml" in md


def test_encoder_change_is_flagged(results: Path, tmp_path: Path) -> None:
    path = results / "linear_eval" / "dae" / "seed1" / "metrics.json"
    _json(path, {**json.loads(path.read_text()), "encoder_unchanged": False})
    build_report(results, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "w")
    assert "encoder changed during linear evaluation in: dae/seed1" in (tmp_path / "w" / "report.html").read_text(
        encoding="utf-8")


@pytest.mark.parametrize("rel", ["data/manifest.json", "linear_eval/random/seed1/metrics.json"] + [pytest.param(
    rel, marks=pytest.mark.slow) for rel in ("augment/dae/preview.png", "augment/simclr/policy.json",
                                             "pretrain/simclr/seed1/history.csv", "pretrain/dae/seed0/summary.json")])
def test_missing_required_file(results: Path, tmp_path: Path, rel: str) -> None:
    (results / rel).unlink()
    out = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(str(results / rel))):
        build_report(results, DATASET, METHODS, SEEDS, BASELINES, out)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_no_claim_inside_the_noise(results: Path, tmp_path: Path) -> None:
    """Means that differ by less than the interval's width give "no clear difference", never "beats"."""
    for j, seed in enumerate(SEEDS):  # dae 1.3 points above pixels on 300 images: inside the noise
        for name, v in (("dae", 0.813), ("pixels", 0.80)):
            _hits(results / "linear_eval" / name / f"seed{seed}" / "predictions.npz",
                  {"linear_top1": v, "knn_top1": KNN[name][j]}, seed + 10 * len(name))
    res = build_report(results, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "out")
    c = next(c for c in res["comparisons"] if (c["method"], c["baseline"], c["metric"]) == ("dae", "pixels", "linear_top1"))
    assert c["diff"] > 0 and c["lo"] < 0 < c["hi"] and c["verdict"] == "no clear difference"
    text = " ".join(_parse(tmp_path / "out" / "report.html").text)
    assert "dae vs pixels on linear top-1: no clear difference" in text


def test_without_predictions_no_claim(results: Path, tmp_path: Path) -> None:
    for path in results.glob("linear_eval/*/seed*/predictions.npz"):
        path.unlink()
    res = build_report(results, DATASET, METHODS, SEEDS, BASELINES, tmp_path / "out")
    assert res["comparisons"] == [] and res["beat_all_baselines"] == []
    assert "no method is said to beat a baseline" in (tmp_path / "out" / "report.md").read_text()



@pytest.mark.parametrize("n_views,columns", [(2, "original, view 1, view 2, chain start"),
                                             (1, "original, view 1, chain start")])
def test_cd_preview_columns_follow_its_views(results: Path, tmp_path: Path, n_views: int, columns: str) -> None:
    """CD's preview has one view with `objective: energy` and two with hybrid, then the chain start."""
    import shutil

    for stage in ("augment", "pretrain", "linear_eval"):  # cd: a copy of dae's files
        shutil.copytree(results / stage / "dae", results / stage / "cd")
    _json(results / "augment" / "cd" / "policy.json", {"method": "cd", "n_views": n_views})
    build_report(results, DATASET, METHODS + ["cd"], SEEDS, BASELINES, tmp_path / "r")
    text = " ".join(_parse(tmp_path / "r" / "report.html").text)
    assert f"cd augmentation preview (rows: training images; columns: {columns})" in text
