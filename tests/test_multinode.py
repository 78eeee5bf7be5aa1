"""Pretraining across nodes, on one machine: two torchrun "nodes" on 127.0.0.1 (gloo).

Each "node" is its own `torchrun --nnodes 2 --nproc_per_node 1 --node_rank r --rdzv-backend c10d
--rdzv-endpoint 127.0.0.1:PORT` process, as `srun torchrun ...` starts one per SLURM node (the
rule's command, workflow/rules/common.smk): the two agents meet at the c10d rendezvous and their
workers form one process group of 2 ranks. One step of that group at global batch B computes what
one process computes at batch B (the same loss and gradients, MoCo's queue, PIRL's bank): the
single-process side and the step itself are tests/test_ddp.py's (`one_rank`, `one_step`), only
the launch differs. Run as a script, this file is the workers' program. Then `pretrain.nodes: 2`
through Snakemake: the rule's own `srun torchrun ...` command, with an `srun` that starts its tasks
side by side on this machine, trains one job of 2 ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_ddp, also when run by torchrun
from test_ddp import STEP_METHODS, free_port, one_rank, one_step  # noqa: E402,F401  (one_rank: a fixture)

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
pytestmark = pytest.mark.slow  # two torchrun agents and a rendezvous: ~25 s


def worker(out_dir: str) -> None:
    """One rank under torchrun: join the group as the pretrain stage does, take one step of each
    method, save this rank's loss, gradients and buffers."""
    from sslpipe import distributed as ddp

    torch.set_num_threads(1)
    ddp.init("cpu")
    rank = ddp.rank()
    info = {"world": ddp.world(), "rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
            "group_rank": int(os.environ["GROUP_RANK"])}  # GROUP_RANK: the node's rank
    torch.save({"info": info, **{name: one_step(name) for name in STEP_METHODS}}, Path(out_dir) / f"rank{rank}.pt")
    ddp.teardown()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("multinode")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    nodes = [subprocess.Popen(
        [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sslpipe-test", "--max-restarts", "0",
         __file__, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)]
    logs = []
    for p in nodes:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in nodes), "\n----\n".join(log[-3000:] for log in logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_torchrun_nodes_form_one_group_of_two_ranks(two_nodes):
    infos = [r["info"] for r in two_nodes]
    assert [i["rank"] for i in infos] == [0, 1] and all(i["world"] == 2 for i in infos)
    # One process per "node": each is local rank 0 of its own node, and the nodes are 0 and 1.
    assert all(i["local_rank"] == 0 for i in infos)
    assert sorted(i["group_rank"] for i in infos) == [0, 1]


@pytest.mark.parametrize("name", STEP_METHODS)
def test_one_step_on_two_nodes_equals_one_process_at_the_same_global_batch(two_nodes, one_rank, name):
    single, ranks = one_rank[name], [r[name] for r in two_nodes]
    grads = [k for k in single if k.startswith("grad.")]
    assert grads and all(k in ranks[0] for k in grads)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-5, atol=1e-6, msg=f"{name} loss, rank {r}")
        for k in grads:
            atol = 1e-5 * float(single[k].abs().max())  # float tolerance at the tensor's scale
            torch.testing.assert_close(got[k], single[k], rtol=1e-4, atol=atol, msg=f"{name} {k}, rank {r}")
        for k in (k for k in single if k.startswith("buf.")):  # MoCo's queue, PIRL's memory bank
            torch.testing.assert_close(got[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}, rank {r}")
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in grads)  # one averaged gradient everywhere


# ---- the rule's own command: srun starting one torchrun per "node" ------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# srun for one machine: run the command once per task (--ntasks K), all at once, as SLURM would
# on K nodes; exit with the first failure.
k=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --ntasks) k=$2; shift 2;; --*=*) shift;; *) shift 2;; esac
done
pids=()
for ((i = 0; i < k; i++)); do "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_rule_runs_srun_torchrun_across_two_nodes(tmp_path):
    """pretrain.nodes: 2 through Snakemake: the rule's command (srun, here one that starts its
    tasks side by side on this machine) runs two torchrun agents that meet at the c10d rendezvous
    on $(hostname) and train one job of 2 ranks, which writes its outputs once."""
    import json

    import yaml

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    port = free_port()
    if not 29400 <= port < 30400:  # the rule's port is 29400 + job id mod 1000
        port = next(p for p in range(29400 + os.getpid() % 500, 30400) if _free(p))
    cfg = {"name": "nodes", "seeds": [0], "methods": ["simclr"], "device": "cpu", "precision": "fp32",
           "data": {"source": "digits", "image_size": 16, "max_train": 64, "max_test": 40}, "model": {"width": 8},
           "pretrain": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "nodes": 2}, "tracking": {"enabled": False}}
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": str(port - 29400), "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
                           "results/nodes/pretrain/simclr/seed0/summary.json", "-p", "--cores", "1",
                           "--configfile", str(tmp_path / "nodes.yaml")], capture_output=True, text=True, env=env,
                          timeout=600)
    out = tmp_path / "results" / "nodes" / "pretrain" / "simclr" / "seed0"
    log = (tmp_path / "logs/nodes/pretrain/simclr/seed0.log")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert "srun --nodes 2 --ntasks 2 --ntasks-per-node 1" in proc.stdout + proc.stderr
    assert "torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 64 // 32
    text = log.read_text()
    assert text.count("pretrain simclr seed=0: ") == 2 and log_once(text, ": final loss") and "2 processes (batch 16 each)" in text, text[-2000:]


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


if __name__ == "__main__":
    worker(sys.argv[1])


def log_once(text: str, what: str) -> bool:
    """`what` appears on exactly one line: rank 0 speaks for every process (header, final line)."""
    return sum(what in line for line in text.splitlines()) == 1
