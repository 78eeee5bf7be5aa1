"""The pipeline as SLURM batch jobs: the shipped SLURM profile, on a real single-node cluster.

`scripts/slurm-local.sh start` brings the cluster up (`.ci/run` does, before the tests); without
a node that accepts jobs the test is skipped, or fails when SSLPIPE_REQUIRE_SLURM=1 (CI), so a
cluster that did not start cannot pass as a skip. The same tiny config runs once locally and
once through sbatch: the numbers must match, since a job's place of execution must not change
its result. About 2.5 minutes on 2 cores: 4 jobs one after the other, each seen to end by the
plugin's squeue polls (1, 12, 33, 64 s after a submission).

Like with like: both runs give the pretrain job the same thread count (2), so the comparison
holds on every CPU. With bf16 autocast (CPUs with AVX512-BF16 or AMX) a 1-thread and a
2-thread run differ (linear top-1 0.842 vs 0.867 on the tiny config), because the bf16 kernels
split their reductions by thread. The jobs' final states and GPUs are read from the records
`scripts/slurm-local.sh` keeps (job completion log, prolog log), not from squeue, which forgets
finished jobs after MinJobAge.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from test_pipeline import REPO, TINY, snakemake, write_config
pytestmark = pytest.mark.slow  # the real workflow end to end: minutes (pytest -m "not slow" skips it)

PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
# One method, no baselines, up to its metrics: each stage is one more wave of jobs and one more
# status poll (about 30 s), and the report adds nothing SLURM-specific.
CONFIG = dict(TINY, name="tiny-slurm", methods=["simclr"], evaluate={**TINY["evaluate"], "baselines": []})
TARGET = "results/tiny-slurm/linear_eval/simclr/seed0/metrics.json"  # results/{name}/
# The plugin's line per sbatch; its log path names the rule.
# The pretrain job's threads in both runs (the rule's default is pretrain.processes = 1; the
# profile gives SLURM jobs more): equal, so that bf16 kernels split their work the same way.
PRETRAIN_THREADS = 2
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: .*?/rule_([a-z_]+)/")


def slurm_node_up() -> str | None:
    """None when a SLURM node accepts jobs, else why not."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (sinfo/sbatch not on PATH)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    states = out.stdout.split()
    if out.returncode != 0 or not {"idle", "mix", "alloc", "comp"} & set(states):
        return f"no SLURM node is up (sinfo: {(out.stdout + out.stderr).strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_node_up()
    if reason:
        if os.environ.get("SSLPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(f"SSLPIPE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(f"{reason}; start one with `sudo scripts/slurm-local.sh start`")


def slurm_profile(tmp_path: Path) -> Path:
    """The shipped profile, fitted to a 2-CPU test node without slurmdbd.

    What stays from it: the executor, the per-rule requests (the rule's GPU for pretrain, scheduled on
    the node's fake GPU), requeue, rerun-incomplete. What changes: sizes, accounting and the
    status polling (first poll after 40 s by default, longer than any job here).
    """
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm" and "gpu" not in profile["set-resources"]["pretrain"]  # the rule's
    profile.update({
        "slurm-status-command": "squeue",   # no slurmdbd: sacct knows no jobs
        "slurm-no-account": True,
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-logdir": str(tmp_path / "slurm-logs"),
        "slurm-keep-successful-logs": True,
        "latency-wait": 5,
        "retries": 0,                       # a failure shows at once, not after resubmissions
        "default-resources": {"mem_mb": 1000, "runtime": 10},
        # The same threads as the local run (PRETRAIN_THREADS), so CPU results are bitwise comparable.
        "set-threads": {"pretrain": PRETRAIN_THREADS},
    })
    for res in profile["set-resources"].values():
        res.update(mem_mb=2000, runtime=10)
    profile["set-resources"]["pretrain"]["cpus_per_task"] = PRETRAIN_THREADS
    out = tmp_path / "profile"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(profile))
    return out


def _records(path: Path) -> dict[str, dict[str, str]]:
    """`Key=value ...` lines by JobId (the last line of a job wins)."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" in fields:
            out[fields["JobId"]] = fields
    return out


def finished_jobs(ids: list[str]) -> dict[str, dict]:
    """Final state and allocated GPUs of each job, from the cluster's job completion log and the
    prolog's log (scripts/slurm-local.sh), which keep every job however long ago it ended."""
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True,
                          timeout=30).stdout
    comp = Path(re.search(r"^JobCompLoc\s*=\s*(\S+)", conf, re.M).group(1))
    done, prolog = _records(comp), _records(comp.with_name("prolog.log"))
    return {i: {"state": done.get(i, {}).get("JobState"), "gpus": prolog.get(i, {}).get("JobGpus")} for i in ids}


def test_pipeline_on_slurm_matches_the_local_run(cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), remote.mkdir()
    # The local run overlaps the SLURM run, which mostly waits between status polls.
    with ThreadPoolExecutor(1) as pool:
        # Targets first: --configfile takes every word after it.
        here_run = pool.submit(snakemake, local, TARGET, "--set-threads", f"pretrain={PRETRAIN_THREADS}",
                               "--configfile", str(write_config(local / "tiny.yaml", CONFIG)))
        proc = snakemake(remote, TARGET, "--profile", str(slurm_profile(tmp_path)),
                         "--configfile", str(write_config(remote / "tiny.yaml", CONFIG)))
        here_run.result()

    log = proc.stdout + proc.stderr
    rule_of = {job_id: rule for job_id, rule in SUBMITTED.findall(log)}
    assert sorted(rule_of.values()) == ["augment", "linear_eval", "prepare", "pretrain"], log[-4000:]
    jobs = finished_jobs(list(rule_of))
    assert {j["state"] for j in jobs.values()} == {"COMPLETED"} and len(jobs) == 4, jobs
    # The profile's GPU request reached SLURM, for pretrain only: SLURM gave it the node's GPU.
    assert {rule_of[i] for i, j in jobs.items() if j["gpus"]} == {"pretrain"}, jobs

    here, there = json.loads((local / TARGET).read_text()), json.loads((remote / TARGET).read_text())
    for key in ["linear_top1", "knn_top1"]:
        assert there[key] == pytest.approx(here[key], abs=1e-6), key
    assert there["encoder_unchanged"] is True
    assert there["run_id"] and there["run_id"] != here["run_id"]  # tracked, in the SLURM run's own store
    assert (remote / "mlflow.db").exists()
