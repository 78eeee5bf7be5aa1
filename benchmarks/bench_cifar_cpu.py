"""The CPU reproduction on real photos: config/cifar10-cpu.yaml end to end, every method against
the random-init encoder and raw pixels with paired 95 % intervals.

    python benchmarks/bench_cifar_cpu.py              # the shipped config (target: <= 25 min on 2 cores)
    python benchmarks/bench_cifar_cpu.py --seeds 0 1  # more seeds: the intervals resample them too

Runs `snakemake --cores all --configfile <tmp>/cifar10-cpu.yaml` in a fresh temporary directory,
with data.path pointed at the CIFAR-10 subset in ../shared/data (5,000 train / 1,000 test images),
then reads every evaluation's metrics.json and predictions.npz and prints, per method: linear
top-1, kNN top-1, the label-efficient probes, pretraining wall time, and the paired difference to
random init and to raw pixels with its interval and verdict (sslpipe.metrics, the report's own
statistics). Prints JSON lines and a table; appends one row per method to benchmarks/RESULTS.md
(`--no-record` skips). `--keep` leaves the directory (with its report) for inspection.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import benchlib as bl
from sslpipe import metrics as mt

SECTION = "CPU reproduction on the CIFAR-10 subset (config/cifar10-cpu.yaml)"
INTRO = ("`python benchmarks/bench_cifar_cpu.py`: the whole pipeline (5 methods, 3 baselines) on the 5,000/1,000-image "
         "CIFAR-10 subset, small CNN width 32. Accuracies in %; Δ = paired difference to the baseline in points with its "
         "95 % bootstrap interval over seeds and test images (sslpipe.metrics). Pipeline wall time is the whole run.")
HEADER = ["date", "machine", "seeds", "pipeline (min)", "method", "linear top-1", "kNN top-1", "1 % labels",
          "10 % labels", "pretrain (s)", "Δ vs random [95 % CI]", "Δ vs pixels [95 % CI]"]


def run_pipeline(work: Path, cfg: dict, log: Path) -> tuple[int, float]:
    configfile = work / "cifar10-cpu.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(bl.REPO / "Snakefile"), "-d", str(work),
           "--cores", "all", "--configfile", str(configfile)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def collect(work: Path) -> tuple[dict, dict, dict]:
    """metrics[name][seed], hits[name][seed], pretrain wall seconds[name][seed] from the results tree."""
    metrics, hits, wall = {}, {}, {}
    for path in sorted(work.glob("results/**/linear_eval/*/seed*/metrics.json")):
        name, seed = path.parent.parent.name, int(path.parent.name[4:])
        metrics.setdefault(name, {})[seed] = json.loads(path.read_text())
        hits.setdefault(name, {})[seed] = mt.load_hits(path.with_name("predictions.npz"))
    for path in work.glob("results/**/pretrain/*/seed*/summary.json"):
        wall.setdefault(path.parent.parent.name, {})[int(path.parent.name[4:])] = json.loads(path.read_text())["wall_time_s"]
    return metrics, hits, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not bl.CIFAR_SMALL.is_file():
        print(f"the CIFAR-10 subset {bl.CIFAR_SMALL} is absent: nothing to measure", file=sys.stderr)
        return 2
    cfg = yaml.safe_load((bl.REPO / "config" / "cifar10-cpu.yaml").read_text())
    cfg["data"]["path"] = str(bl.CIFAR_SMALL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    work = Path(tempfile.mkdtemp(prefix="sslpipe-cifar-cpu-"))
    m = bl.machine()
    rc, secs = run_pipeline(work, cfg, work / "snakemake.log")
    bl.emit({"bench": "cifar_cpu", "rc": rc, "pipeline_s": secs, "workdir": str(work), **m})
    if rc:
        print((work / "snakemake.log").read_text()[-4000:], file=sys.stderr)
        return rc
    metrics, hits, wall = collect(work)
    keys = mt.metric_keys(x for per in metrics.values() for x in per.values())
    comps = mt.comparisons(hits, cfg["methods"], ["random", "pixels"], keys)
    ci = {(c["method"], c["baseline"], c["metric"]): c for c in comps}
    pct = lambda name, k: 100 * np.mean([x[k] for x in metrics[name].values()]) if k in next(iter(metrics[name].values())) else float("nan")  # noqa: E731
    print(f"\n{len(cfg['seeds'])} seed(s), pipeline {secs / 60:.1f} min; report: {next(work.glob('results/**/report.html'), '-')}")
    print(f"{'name':<14}{'linear':>8}{'kNN':>8}{'1%':>7}{'10%':>7}{'pre (s)':>9}  {'Δ vs random [95% CI]':<34}{'Δ vs pixels [95% CI]'}")
    for name in cfg["methods"] + [b for b in cfg["evaluate"]["baselines"] if b in metrics]:
        pre = np.mean(list(wall.get(name, {}).values())) if name in wall else float("nan")
        vs = {b: ci.get((name, b, "linear_top1")) for b in ("random", "pixels")}
        cells = {b: f"{mt.fmt_ci(c)} {c['verdict']}" if c else "-" for b, c in vs.items()}
        row = [pct(name, "linear_top1"), pct(name, "knn_top1"), pct(name, "linear_top1_1pct"), pct(name, "linear_top1_10pct")]
        obj = (cfg.get(name) or {}).get("objective")  # cd / dae: which loss ran, as in the report
        label = f"{name} ({obj})" if obj else name
        print(f"{label:<14}" + "".join(f"{v:>8.1f}" for v in row[:2]) + "".join(f"{v:>7.1f}" for v in row[2:])
              + f"{pre:>9.0f}  {cells['random']:<34}{cells['pixels']}")
        bl.emit({"bench": "cifar_cpu", "name": name, "linear_top1": row[0], "knn_top1": row[1], "pct1": row[2],
                 "pct10": row[3], "pretrain_s": pre, "vs": {b: c for b, c in vs.items()}})
        if not args.no_record:
            bl.append_row(SECTION, INTRO, HEADER, [bl.now(), bl.machine_cell(m), len(cfg["seeds"]), f"{secs / 60:.1f}",
                                                  label, *(f"{v:.1f}" for v in row), f"{pre:.0f}",
                                                  cells["random"], cells["pixels"]])
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
