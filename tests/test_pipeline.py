"""End to end: the real Snakemake workflow on a tiny config, in a temporary directory.

One pipeline run (module-scoped) serves several tests: the outputs, the MLflow store, the
report, re-run behaviour. It takes about a minute on 2 cores.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the real workflow end to end: minutes (pytest -m "not slow" skips it)
METHODS = ["simclr", "moco", "pirl", "dae", "cd"]
BASELINES = ["pixels", "random", "supervised"]
TINY = {
    "name": "tiny",
    "seeds": [0],
    "methods": METHODS,
    "data": {"source": "digits", "image_size": 16, "max_train": 320, "max_test": 120},
    "model": {"width": 8},
    "pretrain": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
    "pirl": {"grid": 2, "num_negatives": 128},
    "moco": {"queue_size": 256},
    "cd": {"langevin_steps": 5, "buffer_size": 512},
    "evaluate": {"probe_steps": 30, "weight_decays": [0.0, 0.001], "knn_monitor_every": 1,
                 "baselines": BASELINES},
    "augment": {"benchmark_images": 64},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    cfg = write_config(work / "tiny.yaml", TINY)
    proc = snakemake(work, "--configfile", str(cfg))
    return work, cfg, proc


def results(work: Path, name: str = "tiny") -> Path:
    return work / "results" / name  # results/{config name}/


def test_every_stage_writes_its_outputs(pipeline):
    work, _, _ = pipeline
    r = results(work)
    manifest = json.loads((r / "data/manifest.json").read_text())
    assert manifest["counts"] == {"train": 320, "test": 120} and manifest["num_classes"] == 10
    for m in METHODS:
        assert json.loads((r / f"augment/{m}/policy.json").read_text())["method"] == m
        assert (r / f"augment/{m}/preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        history = (r / f"pretrain/{m}/seed0/history.csv").read_text().splitlines()
        assert history[0].startswith("epoch,loss,lr,images_per_s") and len(history) == 3
        assert "val_knn_top1" in history[0].split(",")  # the (validation) kNN monitor ran every epoch
        metrics = json.loads((r / f"linear_eval/{m}/seed0/metrics.json").read_text())
        # Well above chance (0.1): a collapsed or non-finite encoder scores about 0.1. (Beating the
        # random-init encoder is each method's learning test; 2 epochs here do not show it reliably.)
        assert metrics["encoder_unchanged"] is True and 0.25 < metrics["linear_top1"] <= 1.0, (m, metrics)
    for b in BASELINES:
        metrics = json.loads((r / f"linear_eval/{b}/seed0/metrics.json").read_text())
        assert metrics["kind"] == "baseline"
    for name in METHODS + BASELINES:  # the PCA picture of the test features, beside metrics.json
        assert (r / f"linear_eval/{name}/seed0/embedding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Pixels on digits are an easy baseline: a broken probe would not reach this.
    assert json.loads((r / "linear_eval/pixels/seed0/metrics.json").read_text())["linear_top1"] > 0.8
    # No temporary files left behind by the atomic writers.
    assert not [p for p in r.rglob("*") if ".tmp" in p.name]



def test_every_job_log_says_what_it_did(pipeline):
    """Each job's log (stdout + stderr, redirected by its rule) holds at least its summary line:
    `tail -f logs/...` shows what a job is doing and what it wrote."""
    work, _, _ = pipeline
    logs = work / "logs/tiny"
    files = sorted(logs.rglob("*.log"))
    assert len(files) == 1 + 5 + 5 + 8 + 1  # prepare, augment x5, pretrain x5, evaluations x8, report
    assert [str(p.relative_to(logs)) for p in files if not p.read_text().strip()] == []
    text = {str(p.relative_to(logs)): p.read_text() for p in files}
    assert re.search(r"prepare digits: 320 train / 120 test images, 10 classes", text["prepare.log"])
    assert "wrote" in text["augment/simclr.log"] and "images/s" in text["augment/simclr.log"]
    assert re.search(r"epoch 2/2 loss \S+ .* eta 0:00 val kNN", text["pretrain/moco/seed0.log"])
    for name in METHODS + BASELINES:
        assert re.search(rf"linear_eval {name} seed=0: linear top-1 \d+\.\d%", text[f"linear_eval/{name}/seed0.log"])
    assert "supervised epoch 2/2" in text["linear_eval/supervised/seed0.log"]
    assert "MLflow run " in text["linear_eval/simclr/seed0.log"]
    assert all(name in text["report.log"] for name in METHODS + BASELINES) and "report.html" in text["report.log"]

def test_mlflow_has_a_run_for_every_job(pipeline):
    import mlflow

    work, _, _ = pipeline
    client = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("sslpipe.stage", "pipeline"), []).append(run)
    counts = {stage: len(rs) for stage, rs in by_stage.items()}
    assert counts == {"pipeline": 1, "prepare": 1, "augment": 5, "pretrain": 5, "linear_eval": 8, "report": 1}
    parent = by_stage["pipeline"][0]
    assert parent.info.status == "FINISHED"
    for run in runs:
        if run is not parent:
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", run.data.tags["sslpipe.git_commit"])  # not "unknown"
    # The UI's model-training view; runs named stage/method/seed; encoders and datasets logged;
    # evaluations and pretraining runs linked both ways; the comparison on the parent run.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert {r.info.run_name for r in by_stage["pretrain"]} == {f"pretrain/{m}/seed0" for m in METHODS}
    pre_by_id = {r.info.run_id: r for r in by_stage["pretrain"]}
    for run in by_stage["pretrain"]:
        assert [a.path for a in client.list_artifacts(run.info.run_id, "encoder")] == ["encoder/encoder.pt"]
        assert run.inputs.dataset_inputs[0].dataset.name == "digits"
    for run in by_stage["linear_eval"]:
        if run.data.tags["sslpipe.method"] in METHODS:
            pre = pre_by_id[run.data.tags["sslpipe.pretrain_run_id"]]
            assert pre.data.tags["sslpipe.eval_run_id"] == run.info.run_id
            # Clickable both ways on the runs' MLflow pages (their Markdown descriptions).
            assert f"(#/runs/{pre.info.run_id})" in run.data.tags["mlflow.note.content"]
            assert f"(#/runs/{run.info.run_id})" in pre.data.tags["mlflow.note.content"]
    assert "simclr.linear_top1_vs_random_lo" in parent.data.metrics
    assert "report/report.html" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    for run in by_stage["pretrain"]:
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2]
    # Metrics in MLflow are the ones in metrics.json.
    for run in by_stage["linear_eval"]:
        name = run.data.tags["sslpipe.method"]
        metrics = json.loads((results(work) / f"linear_eval/{name}/seed0/metrics.json").read_text())
        assert run.data.metrics["linear_top1"] == pytest.approx(metrics["linear_top1"])
        assert metrics["run_id"] == run.info.run_id


def test_report_names_every_method_and_baseline(pipeline):
    work, _, _ = pipeline
    html = (results(work) / "report/report.html").read_text()
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", html)  # "cd" occurs inside the pictures' bytes
    with open(results(work) / "report/summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = [r["name"] for r in rows]  # one row per method and baseline
    assert sorted(names) == sorted(METHODS + BASELINES)
    for name in names:
        assert re.search(rf"\b{name}\b", text), name
    assert "Objective: reconstruction" in text and "Objective: energy (CD)" in text  # the schema's defaults ran


def test_the_report_reads_only_its_declared_inputs(pipeline, tmp_path, monkeypatch):
    """The report rule declares every file the report reads: its --inputs are exactly its declared
    inputs (benchmarks and the CD and DAE figures included), and the report, given them, opens
    no other file of the run (tests/reportkit.py)."""
    from reportkit import only_given, opened_files, sslpipe_build_report

    work, cfg, _ = pipeline
    proc = snakemake(work, "--configfile", str(cfg), "-n", "-p", "--forcerun", "report", "results/tiny/report/report.html")
    job = proc.stdout[proc.stdout.index("rule report:"):]
    declared = re.search(r"^\s*input: (.+)$", job, re.M).group(1).split(", ")
    command = next(line for line in job.splitlines() if "-m sslpipe report" in line)
    words = shlex.split(command.split("sslpipe report", 1)[1].split(" > ")[0])
    inputs = json.loads(words[words.index("--inputs") + 1])
    monkeypatch.chdir(work)  # the paths are relative to the working directory, as in the job
    _, given = only_given([], inputs, work, tmp_path)
    assert given == {Path(p).resolve() for p in declared} and all(p.is_file() for p in given)
    figures = {Path(p).name for m in ("cd", "dae") for p in inputs["pretrain"][m]["0"]["diagnostics"]}
    assert figures == {"cd_energy_histogram.png", "cd_negatives.png", "dae_energy_vs_corruption.png",
                       "dae_reconstructions.png"}
    assert len(inputs["benchmarks"]) == 1 + 5 + 5 + 8  # prepare, augment x5, pretrain x5, evaluations x8
    out = tmp_path / "report"
    with opened_files() as opened:
        sslpipe_build_report(inputs, "digits", METHODS, [0], BASELINES, out)
    read, _ = only_given(opened, inputs, work, out)
    assert read and read <= given, sorted(map(str, read - given))


def test_rerun_with_nothing_changed_does_nothing(pipeline):
    work, cfg, _ = pipeline
    proc = snakemake(work, "--configfile", str(cfg), "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_a_missing_encoder_is_redone_although_the_report_exists(pipeline):
    """After a failed `--forcerun pretrain` the encoder is gone but the report is not: the next
    run must redo that pretraining job (and what depends on it), not say "Nothing to be done"."""
    work, cfg, _ = pipeline
    enc = results(work) / "pretrain/dae/seed0/encoder.pt"
    aside = enc.with_name("encoder.pt.aside")
    enc.rename(aside)  # a rename keeps the file's mtime: putting it back restores the state
    try:
        proc = snakemake(work, "--configfile", str(cfg), "--dry-run", "--quiet", "rules")
    finally:
        aside.rename(enc)
    table = {p[0]: int(p[1]) for line in proc.stdout.splitlines() if len(p := line.split()) == 2 and p[1].isdigit()}
    assert table.get("pretrain") == 1, proc.stdout


def cores_in_use(log: str) -> int:
    """The most threads held at once by running jobs, from Snakemake's job blocks ('rule X:' ...
    'jobid: N' ... 'threads: T', T = 1 when absent) and its 'Finished jobid: N' lines."""
    threads, running, most, job = {}, set(), 0, None
    for line in log.splitlines():
        line = line.strip()
        if m := re.match(r"^jobid: (\d+)$", line):
            job = m.group(1)
            threads[job] = 1
            running.add(job)
        elif (m := re.match(r"^threads: (\d+)$", line)) and job is not None:
            threads[job] = int(m.group(1))
        elif m := re.search(r"Finished jobid: (\d+)", line):
            most = max(most, sum(threads[j] for j in running))  # peak just before a job ends
            running.discard(m.group(1))
            job = None
    return most


def test_cores_are_honoured(pipeline):
    """--cores 2 (the helper above): never more than 2 threads' worth of jobs at once (issue 14:
    Snakemake 9.10+ was seen running three one-thread jobs on --cores 2)."""
    _, _, proc = pipeline
    used = cores_in_use(proc.stderr + proc.stdout)
    assert 1 <= used <= 2, used


def test_snakemake_report_holds_the_marked_outputs(pipeline, tmp_path):
    """`snakemake --report`: the outputs marked with report() (HTML report, summary, previews)
    and their captions from workflow/report/ end up in one self-contained file."""
    work, cfg, _ = pipeline
    out = tmp_path / "snakemake-report.html"
    snakemake(work, "--configfile", str(cfg), "--report", str(out))
    text = out.read_text()
    for name in ["report.html", "summary.csv"] + [f"{m}/preview.png" for m in METHODS]:
        assert name in text, name
    assert "ranked by linear top-1" in text, "the summary's caption (workflow/report/summary.rst) is missing"


def rerun_table(work: Path, cfg: dict, tmp_path: Path) -> dict:
    path = write_config(tmp_path / "changed.yaml", cfg)
    proc = snakemake(work, "--configfile", str(path), "--dry-run", "--quiet", "rules")
    return {parts[0]: int(parts[1]) for line in proc.stdout.splitlines()
            if len(parts := line.split()) == 2 and parts[1].isdigit()}


def changed(section: str, **keys) -> dict:
    return dict(TINY, **{section: {**TINY.get(section, {}), **keys}})


@pytest.mark.parametrize("cfg, expected", [
    # A training setting of one method: its pretraining, evaluation and the report; not its
    # augment job (the view policy does not hold the temperature).
    (changed("moco", temperature=0.3), {"pretrain": 1, "linear_eval": 1, "report": 1}),
    # Its view policy: its augment job too.
    (changed("simclr", views={"flip_p": 0.0}), {"augment": 1, "pretrain": 1, "linear_eval": 1, "report": 1}),
    # Which baselines exist is no setting of any evaluation job: only the report re-runs.
    (changed("evaluate", baselines=["pixels", "random"]), {"report": 1}),
    # The kNN monitor writes history.csv: every encoder re-trains (and is re-evaluated).
    (changed("evaluate", knn_monitor_every=2), {"pretrain": 5, "linear_eval": 5, "report": 1}),
    # A probe setting: every evaluation, no training.
    (changed("evaluate", probe_steps=31), {"linear_eval": 5, "baseline": 3, "report": 1}),
    # The shared training section: every pretraining job and the supervised baseline.
    (changed("pretrain", lr=0.003), {"pretrain": 5, "linear_eval": 5, "baseline": 1, "report": 1}),
    # A method's own training override: that method only.
    (changed("dae", pretrain={"lr": 0.003}), {"pretrain": 1, "linear_eval": 1, "report": 1}),
])
def test_a_change_reruns_exactly_the_jobs_that_depend_on_it(pipeline, tmp_path, cfg, expected):
    work, _, _ = pipeline
    table = rerun_table(work, cfg, tmp_path)
    assert table == {**expected, "all": 1, "total": sum(expected.values()) + 1}


def test_a_second_config_runs_beside_the_first(pipeline, tmp_path):
    """Another config on the same dataset writes results/{its name}/: the first one's report
    and encoders stay as they were (and its dry run still has nothing to do)."""
    work, cfg, _ = pipeline
    r = results(work)
    before = {p: p.read_bytes() for p in [r / "report/report.html", r / "pretrain/dae/seed0/encoder.pt"]}
    other = dict(TINY, name="tiny-other", methods=["dae"], pretrain={**TINY["pretrain"], "epochs": 1},
                 evaluate={**TINY["evaluate"], "baselines": ["pixels"], "knn_monitor_every": 0})
    snakemake(work, "--configfile", str(write_config(tmp_path / "other.yaml", other)))
    assert (results(work, "tiny-other") / "report/report.html").is_file()
    assert (work / "logs/tiny-other/report.log").is_file() and (work / "benchmarks/tiny-other/report.tsv").is_file()
    assert all(p.read_bytes() == b for p, b in before.items())
    proc = snakemake(work, "--configfile", str(cfg), "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_bad_config_fails_before_any_job(tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", dict(TINY, pretrain={"epochs": 0}))
    proc = snakemake(tmp_path, "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "config key 'pretrain.epochs' = 0 (from " in proc.stderr
    assert not (tmp_path / "results").exists()


def test_compare_matches_metrics_json(pipeline):
    """`python -m sslpipe compare` (read back from MLflow) gives the numbers of the metrics.json files."""
    import csv

    work, _, _ = pipeline
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the workdir's mlflow.db
    proc = subprocess.run([sys.executable, "-m", "sslpipe", "compare", "--format", "csv", "--experiment", "tiny"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in csv.DictReader(proc.stdout.splitlines())}
    assert set(rows) == set(METHODS + BASELINES)
    for name, row in rows.items():
        metrics = json.loads((results(work) / f"linear_eval/{name}/seed0/metrics.json").read_text())
        assert (row["dataset"], row["runs"], row["experiments"]) == ("digits", "1", "tiny")
        assert float(row["linear_top1_mean"]) == metrics["linear_top1"]  # one seed: the mean is the value
