"""Wall time of the default pipeline from scratch, and of a rerun with nothing changed.

    python benchmarks/bench_pipeline.py            # config/config.yaml (~2-3 min on 2 cores)
    python benchmarks/bench_pipeline.py --quick    # the same with 1 epoch and short probes

Runs `snakemake -s <repo>/Snakefile -d <tmp> --cores all --configfile <tmp>/config/config.yaml`
in a fresh temporary directory (a copy of config/), with the repo's venv bin first on PATH and
MLflow tracking into that directory, then the same command again (it must find nothing to do).
Also prints each stage's summed job wall time and the slowest jobs (from the rules' benchmark
files). Targets: from scratch <= 3 min, rerun <= 10 s. Prints JSON lines; appends a row to
benchmarks/RESULTS.md (`--no-record` skips, `--quick` prints only; a failed run is printed with
its log's tail and not recorded). `--keep` leaves the directory for inspection.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import benchlib as bl


def snakemake(workdir: Path, configfile: Path, cores: str, log: Path) -> tuple[int, float]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)  # tracking goes to the work directory's default
    cmd = [str(Path(bin_dir) / "snakemake"), "-s", str(bl.REPO / "Snakefile"), "-d", str(workdir),
           "--cores", cores, "--configfile", str(configfile)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def job_times(workdir: Path) -> list[dict]:
    """Wall and CPU seconds of each job, from the rules' `benchmark:` files (benchmarks/<config name>/...)."""
    jobs = []
    for tsv in sorted((workdir / "benchmarks").rglob("*.tsv")):
        lines = tsv.read_text().splitlines()
        if len(lines) < 2:
            continue
        row = dict(zip(lines[0].split("\t"), lines[-1].split("\t")))
        name = str(tsv.relative_to(workdir / "benchmarks").with_suffix(""))
        try:
            jobs.append({"job": name, "wall_s": float(row["s"]), "cpu_s": float(row.get("cpu_time", "nan"))})
        except ValueError:
            continue
    return sorted(jobs, key=lambda j: -j["wall_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pretrain 1 epoch, probe_steps 30")
    ap.add_argument("--config", default=str(bl.REPO / "config" / "config.yaml"))
    ap.add_argument("--cores", default="all")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--record", action="store_true", help="append to RESULTS.md even with --quick")
    args = ap.parse_args(argv)
    if args.quick and not args.record:  # smoke runs print only
        args.no_record = True
    m = bl.machine()
    work = Path(tempfile.mkdtemp(prefix="sslpipe-pipeline-"))
    try:
        shutil.copytree(bl.REPO / "config", work / "config")
        configfile = work / "config" / Path(args.config).name
        shutil.copy(args.config, configfile)
        if args.quick:
            cfg = yaml.safe_load(configfile.read_text())
            cfg.setdefault("pretrain", {})["epochs"] = 1
            cfg["pretrain"]["warmup_epochs"] = 0
            cfg.setdefault("evaluate", {})["probe_steps"] = 30
            configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
        bl.emit({"bench": "pipeline", "machine": m, "workdir": str(work), "config": args.config, "quick": args.quick})
        results = {}
        for name in ("scratch", "rerun"):
            log = work / f"snakemake-{name}.log"
            load_before = bl.load()
            rc, wall = snakemake(work, configfile, args.cores, log)
            results[name] = {"rc": rc, "wall_s": wall, "load_before": load_before}
            bl.emit({"bench": "pipeline", "run": name, "rc": rc, "wall_s": wall, "load_before": load_before})
            if rc != 0:
                tail = "\n".join(log.read_text().splitlines()[-40:])
                print(f"snakemake ({name}) failed with exit status {rc}; last lines of {log}:\n{tail}", file=sys.stderr)
                return rc
        jobs = job_times(work)
        by_stage: dict[str, float] = {}
        for j in jobs:  # name/stage/... -> stage
            stage = j["job"].split("/")[1] if "/" in j["job"] else j["job"]
            by_stage[stage] = by_stage.get(stage, 0.0) + j["wall_s"]
        bl.emit({"bench": "pipeline", "jobs": len(jobs), "job_wall_s_by_stage": by_stage,
                 "slowest_jobs": jobs[:5]})
        rerun_log = (work / "snakemake-rerun.log").read_text()
        nothing = "Nothing to be done" in rerun_log
        rec = {"bench": "pipeline", "scratch_s": results["scratch"]["wall_s"], "rerun_s": results["rerun"]["wall_s"],
               "rerun_nothing_to_do": nothing, "load": bl.load()}
        bl.emit(rec)
        if not args.no_record:
            bl.append_row(
                "bench_pipeline: default pipeline wall time",
                "`snakemake --cores all` with config/config.yaml (digits, small_cnn, five methods, the seeds and epochs it sets) in a "
                "fresh directory, then again with nothing changed. Targets: scratch <= 180 s, rerun <= 10 s.",
                ["date", "command", "machine", "load before (1/5/15 min)", "config", "from scratch", "rerun",
                 "rerun did nothing", "slowest jobs (wall s)"],
                [bl.now(), f"`{bl.command_line()}`", bl.machine_cell(m), results["scratch"]["load_before"],
                 Path(args.config).name + (" (quick: 1 epoch)" if args.quick else ""),
                 f"**{rec['scratch_s']:.0f} s**", f"**{rec['rerun_s']:.1f} s**", "yes" if nothing else "no",
                 ", ".join(f"{j['job'].split('/', 1)[-1]} {j['wall_s']:.0f}" for j in jobs[:3])])
        return 0
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
