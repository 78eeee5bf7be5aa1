"""`python -m sslpipe compare` against a real MLflow SQLite store written by the tracking module."""
from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys

import pytest

from sslpipe import cli, compare, tracking
from sslpipe.config import config_hash, resolve

# Two methods x three seeds over two experiments (configs): seeds 0, 1 in "exp-a", seed 2 in "exp-b".
TOP1 = {"simclr": [0.81, 0.85, 0.90], "moco": [0.70, 0.66, 0.75]}
KNN = {"simclr": [0.78, 0.80, 0.83], "moco": [0.60, 0.64, 0.61]}
PCT1 = [0.40, 0.45, 0.52]  # simclr only: the 1% / 10% label probes
PCT10 = [0.60, 0.66, 0.71]
STALE = 0.11  # an earlier evaluation of (exp-a, simclr, seed 1), superseded by a rerun


def _pipeline(mp: pytest.MonkeyPatch, cfg: dict) -> str:
    cfg = resolve(cfg)
    h = config_hash(cfg)
    mp.setenv(tracking.ENV, json.dumps(tracking.settings_from_config(cfg, h)))
    tracking.init_pipeline(cfg, h, {"git_commit": "abc"})
    return h


def _eval(method: str, seed: int, metrics: dict) -> None:
    with tracking.stage_run("linear_eval", method=method, seed=seed, provenance={"git_commit": "abc"}) as run:
        run.log(metrics)


def _metrics(method: str, seed: int) -> dict:
    m = {"linear_top1": TOP1[method][seed], "linear_top5": 0.99, "knn_top1": KNN[method][seed], "eval_s": 1.0}
    if method == "simclr":
        m.update(linear_top1_10pct=PCT10[seed], linear_top1_1pct=PCT1[seed])
    return m


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        hashes = {"exp-a": _pipeline(mp, {"name": "exp-a", "seeds": [0, 1]})}
        _eval("simclr", 1, {**_metrics("simclr", 1), "linear_top1": STALE})
        for method in TOP1:
            for seed in (0, 1):
                _eval(method, seed, _metrics(method, seed))  # (simclr, 1) a second time: the rerun
        with pytest.raises(RuntimeError):  # a FAILED evaluation must not count
            with tracking.stage_run("linear_eval", method="moco", seed=0) as run:
                run.log({"linear_top1": 0.0})
                raise RuntimeError("job died")
        hashes["exp-b"] = _pipeline(mp, {"name": "exp-b", "seeds": [2]})
        for method in TOP1:
            _eval(method, 2, _metrics(method, 2))
        with tracking.stage_run("pretrain", method="simclr", seed=2) as run:  # not an evaluation
            run.log({"linear_top1": 0.0})
        # Another dataset, in exp-b too: only the dataset filter separates it.
        hashes["other"] = _pipeline(mp, {"name": "exp-b", "data": {"name": "digits-small"}})
        _eval("simclr", 0, {"linear_top1": 0.5, "linear_top5": 0.9, "knn_top1": 0.4})
    return f"sqlite:///{root / 'mlflow.db'}", hashes


def _rows(text: str) -> dict[tuple[str, str], dict]:
    return {(r["dataset"], r["method"]): r for r in csv.DictReader(io.StringIO(text))}


@pytest.mark.slow
def test_numbers_are_mean_and_std_of_the_logged_runs(store):
    uri, _ = store
    rows = _rows(compare.compare(uri, fmt="csv"))
    assert set(rows) == {("digits", "simclr"), ("digits", "moco"), ("digits-small", "simclr")}
    for method in TOP1:
        row = rows[("digits", method)]
        assert row["runs"] == "3" and row["configs"] == "2" and row["experiments"] == "exp-a;exp-b"
        for name, values in (("linear_top1", TOP1[method]), ("knn_top1", KNN[method])):
            assert float(row[f"{name}_mean"]) == statistics.mean(values)  # exact: the stale rerun is gone
            assert float(row[f"{name}_std"]) == statistics.stdev(values)
            assert row[f"{name}_n"] == "3"
    simclr, moco = rows[("digits", "simclr")], rows[("digits", "moco")]
    assert float(simclr["linear_top1_1pct_mean"]) == statistics.mean(PCT1)
    assert float(simclr["linear_top1_10pct_std"]) == statistics.stdev(PCT10)
    assert moco["linear_top1_1pct_mean"] == "" and moco["linear_top1_1pct_n"] == "0"
    header = next(csv.reader(io.StringIO(compare.compare(uri, fmt="csv"))))
    # Label-efficient columns ordered by label fraction, not as text ("10" < "1" would be wrong).
    assert header.index("linear_top1_1pct_mean") < header.index("linear_top1_10pct_mean")
    assert "eval_s_mean" not in header


@pytest.mark.slow
def test_markdown_table(store):
    uri, _ = store
    md = compare.compare(uri, dataset="digits")
    assert ("| dataset | method | runs | linear_top1 | linear_top5 | knn_top1 | linear_top1_1pct | "
            "linear_top1_10pct | experiments | configs |") in md
    m = TOP1["moco"]
    top1 = f"{100 * statistics.mean(m):.1f} ± {100 * statistics.stdev(m):.1f}"
    assert f"| digits | moco | 3 | {top1} | 99.0 ± 0.0 |" in md
    assert "| — | — | exp-a, exp-b | 2 |" in md  # moco has no label-efficient probes
    lines = [line for line in md.splitlines() if line.startswith("| digits |")]
    assert [line.split(" | ")[1] for line in lines] == ["simclr", "moco"]  # best linear top-1 first


@pytest.mark.slow
def test_filters(store):
    uri, hashes = store
    only_a = _rows(compare.compare(uri, experiments=["exp-a"], fmt="csv"))
    assert set(only_a) == {("digits", "simclr"), ("digits", "moco")}
    assert float(only_a[("digits", "simclr")]["linear_top1_mean"]) == statistics.mean(TOP1["simclr"][:2])
    assert set(_rows(compare.compare(uri, methods=["moco"], fmt="csv"))) == {("digits", "moco")}
    assert set(_rows(compare.compare(uri, dataset="digits-small", fmt="csv"))) == {("digits-small", "simclr")}
    by_tag = _rows(compare.compare(uri, tags={"sslpipe.config_hash": hashes["exp-b"]}, fmt="csv"))
    assert {k: r["runs"] for k, r in by_tag.items()} == {("digits", "simclr"): "1", ("digits", "moco"): "1"}
    assert float(by_tag[("digits", "moco")]["linear_top1_mean"]) == TOP1["moco"][2]
    both = _rows(compare.compare(uri, experiments=["exp-a", "exp-b"], tags={"sslpipe.git_commit": "abc"},
                                 methods=["simclr", "moco"], fmt="csv"))
    assert both[("digits", "simclr")]["runs"] == "3"
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'"):
        compare.compare(uri, experiments=["nope"])
    with pytest.raises(RuntimeError, match="no finished linear_eval runs match"):
        compare.compare(uri, tags={"sslpipe.git_commit": "it's other"})  # a quote in the value is fine


def test_latest_run_per_job_wins():
    def run(rid, t, h="h1", seed="0"):
        return {"run_id": rid, "start_time": t, "tags": {"sslpipe.config_hash": h, "sslpipe.method": "m",
                                                         "sslpipe.seed": seed}}
    kept = compare.latest_per_job([run("a", 5), run("b", 9), run("c", 7), run("d", 1, seed="1"),
                                   run("e", 1, h=""), run("f", 2, h="")])
    assert sorted(r["run_id"] for r in kept) == ["b", "d", "e", "f"]  # no hash: never merged


@pytest.mark.slow
def test_cli_csv_and_errors(store, tmp_path, capsys):
    uri, _ = store
    proc = subprocess.run([sys.executable, "-m", "sslpipe", "compare", "--tracking-uri", uri, "--format", "csv",
                           "--method", "simclr", "--tag", "sslpipe.git_commit=abc"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert set(rows) == {("digits", "simclr"), ("digits-small", "simclr")}
    assert float(rows[("digits", "simclr")]["linear_top1_mean"]) == statistics.mean(TOP1["simclr"])

    missing = tmp_path / "nowhere.db"
    assert cli.main(["compare", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err and not missing.exists()
    assert cli.main(["compare", "--tracking-uri", uri, "--tag", "novalue"]) == 2
    assert "--tag expects key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_intervals_against_a_baseline_match_the_reports(tmp_path, monkeypatch):
    """`compare` pairs each method's run with the random baseline's run of the same config and seed,
    through their predictions.npz artifacts, and gives the interval metrics.paired_bootstrap gives."""
    import numpy as np

    from sslpipe import metrics as mt
    from sslpipe.io import write_npz

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = np.random.default_rng(0)
    p = {"simclr": 0.8, "moco": 0.52, "random": 0.5}
    hits = {(m, s): (rng.random(400) < p[m]).astype(np.uint8) for m in p for s in (0, 1)}
    _pipeline(monkeypatch, {"name": "ci", "seeds": [0, 1]})
    for (m, s), h in hits.items():
        with tracking.stage_run("linear_eval", method=m, seed=s) as run:
            run.log({"linear_top1": float(h.mean()), "knn_top1": float(h.mean())})
            write_npz(tmp_path / f"{m}{s}" / "predictions.npz", {"linear_top1": h, "knn_top1": h})
            run.artifact(tmp_path / f"{m}{s}" / "predictions.npz")
    rows = _rows(compare.compare(f"sqlite:///{tmp_path / 'mlflow.db'}", fmt="csv"))
    for m in ("simclr", "moco"):
        want = mt.paired_bootstrap(np.stack([hits[(m, s)] for s in (0, 1)]),
                                   np.stack([hits[("random", s)] for s in (0, 1)]))
        row = rows[("digits", m)]
        assert float(row["linear_top1_vs_random_lo"]) == pytest.approx(want["lo"])
        assert float(row["linear_top1_vs_random_hi"]) == pytest.approx(want["hi"])
        assert row["linear_top1_vs_random_pairs"] == "2"
    assert rows[("digits", "simclr")]["linear_top1_vs_random_verdict"] == "beats"
    assert rows[("digits", "moco")]["linear_top1_vs_random_verdict"] == "no clear difference"
    text = compare.compare(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "linear_top1 vs random: Δ [95 % CI]" in text and "beats (pairs=2)" in text
