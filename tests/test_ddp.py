"""Multi-process (DDP) pretraining on the CPU: 2 processes, gloo, 127.0.0.1.

One step of the 2-process run at global batch B computes what one process computes at batch B:
the same loss and the same parameter gradients (SimCLR's negatives span both ranks, MoCo's
shuffling BN and queue span both ranks, PIRL's negatives and memory bank are shared, the
supervised baseline's cross-entropy reads each rank's rows' labels, BatchNorm normalises over the
global batch). Then the real CLI under torchrun writes its outputs once.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sslpipe import data
from sslpipe import distributed as ddp
from sslpipe import pretrain as pt
from sslpipe.augment import jigsaw, to_float
from sslpipe.checkpoint import Checkpoint, Progress
from sslpipe.config import ConfigError, resolve
from sslpipe.methods import METHODS
from sslpipe.models import build_encoder, load_encoder
from sslpipe.supervised import Supervised, mild_policy

REPO = Path(__file__).resolve().parents[1]
B, N, SIZE = 16, 32, 16  # global batch, training set, image side
STEP_CFG = {
    "device": "cpu", "precision": "fp32",
    "data": {"image_size": SIZE},
    "model": {"width": 8},
    "pretrain": {"batch_size": B, "warmup_epochs": 0, "epochs": 1},
    "moco": {"queue_size": 64, "bn_groups": 2},        # 2 BN groups = 1 per rank with 2 processes
    "pirl": {"grid": 2, "num_negatives": 16},
}
MANIFEST = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
STEP_METHODS = ("simclr", "moco", "pirl", "supervised")  # supervised: the baseline, trained by the same loop


def fixed_views(x: torch.Tensor, n_views: int | None = None) -> list[torch.Tensor]:
    """Views that are a fixed function of the image: the image and its mirror image.

    The random views cannot be compared: each rank draws its own augmentation stream (so the
    ranks' views are independent), a different one from the single process's. What is compared
    is everything after the views: the split of the batch, the gathers, BatchNorm, the
    gradient average.
    """
    x01 = to_float(x)
    return [x01, x01.flip(3)][: n_views or 2]


def fixed_jigsaw(x: torch.Tensor, grid: int, perm: torch.Tensor | None = None):
    """PIRL's jigsaw with one fixed permutation (patches in reverse order), for the same reason."""
    reverse = torch.arange(grid * grid - 1, -1, -1).expand(len(x), -1)
    return jigsaw(x, grid, reverse)


def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)


def one_step(name: str) -> dict[str, torch.Tensor]:
    """One optimisation step of the real training loop; in a process group, this rank's part."""
    import sslpipe.methods.pirl as pirl_mod

    pirl_mod.jigsaw = fixed_jigsaw  # the caller restores it (the worker processes just exit)
    cfg, cpu = resolve(STEP_CFG), torch.device("cpu")
    torch.manual_seed(0)
    if name == "supervised":  # labels: 10 classes in turn; the loss reads those of the batch's rows
        encoder = build_encoder(cfg["model"], MANIFEST)
        method = pt.place(cfg, Supervised(encoder, torch.arange(N) % 10, 10, mild_policy(SIZE)), encoder, cpu)
    else:
        _, method = pt.build_method(cfg, name, METHODS[name].policy(cfg[name], SIZE), MANIFEST, N, cpu)
    method.views = fixed_views
    opt = pt.make_optimizer([p for p in method.parameters() if p.requires_grad], cfg["pretrain"], cpu)
    loop = pt.Loop(method, opt, images(), cfg["pretrain"], cpu, None, name, Checkpoint(None, "", 1, cpu),
                   log=lambda m, s=None: None, echo=lambda s: None)
    st = Progress(order=torch.randperm(N, generator=torch.Generator().manual_seed(1)), loss_sum=torch.zeros(()))
    # The step's own draws (MoCo's key shuffle, PIRL's negatives) are rank 0's, broadcast; rank 0
    # draws them from the same state as the single process.
    torch.manual_seed(1)
    loop.step(st)
    out = {"loss": ddp.mean(st.loss_sum)}  # each rank's loss is over its rows: the mean is the batch's
    out.update({f"grad.{k}": p.grad.clone() for k, p in method.named_parameters() if p.grad is not None})
    out.update({f"buf.{k}": getattr(method, k).clone() for k in ("queue", "queue_ptr", "bank") if hasattr(method, k)})
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ddp.init("cpu")
    assert ddp.world() == 2 and ddp.rank() == rank
    torch.save({name: one_step(name) for name in STEP_METHODS}, Path(out_dir) / f"rank{rank}.pt")
    ddp.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank() -> dict:
    import sslpipe.methods.pirl as pirl_mod

    threads, original = torch.get_num_threads(), pirl_mod.jigsaw
    torch.set_num_threads(1)
    try:
        return {name: one_step(name) for name in STEP_METHODS}
    finally:
        pirl_mod.jigsaw = original
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_METHODS)
def test_one_step_on_two_processes_equals_one_process(two_ranks, one_rank, name):
    single, ranks = one_rank[name], [r[name] for r in two_ranks]
    grads = [k for k in single if k.startswith("grad.")]
    assert grads and all(k in ranks[0] for k in grads)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-5, atol=1e-6, msg=f"{name} loss, rank {r}")
        for k in grads:
            # Float tolerance at the tensor's scale: the two runs sum in different orders.
            atol = 1e-5 * float(single[k].abs().max())
            torch.testing.assert_close(got[k], single[k], rtol=1e-4, atol=atol, msg=f"{name} {k}, rank {r}")
    # Both ranks hold the very same averaged gradient, so their parameters stay identical.
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in grads)


@pytest.mark.slow
def test_moco_queue_holds_every_ranks_keys_on_every_rank(two_ranks, one_rank):
    q0, q1, single = two_ranks[0]["moco"], two_ranks[1]["moco"], one_rank["moco"]
    assert torch.equal(q0["buf.queue"], q1["buf.queue"]) and int(q0["buf.queue_ptr"]) == int(q1["buf.queue_ptr"]) == B
    # All 2 x B/2 keys, in global batch order, where the single process put its B keys.
    torch.testing.assert_close(q0["buf.queue"][:B], single["buf.queue"][:B], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q0["buf.queue"][B:], single["buf.queue"][B:], rtol=0, atol=0)  # untouched


@pytest.mark.slow
def test_pirl_memory_bank_gets_every_ranks_updates(two_ranks, one_rank):
    b0, b1, single = two_ranks[0]["pirl"]["buf.bank"], two_ranks[1]["pirl"]["buf.bank"], one_rank["pirl"]["buf.bank"]
    assert torch.equal(b0, b1)
    torch.testing.assert_close(b0, single, rtol=1e-4, atol=1e-5)


def test_batch_size_must_divide_among_processes():
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size.*pretrain\.processes = 3"):
        resolve({"pretrain": {"batch_size": 64, "processes": 3}})
    assert resolve({"pretrain": {"batch_size": 64, "processes": 4}})["pretrain"]["processes"] == 4


# ---- the real loop: its permutation, per-rank augmentation streams, resume -----------------------

LOOP = {
    "seeds": [0], "methods": ["simclr"], "device": "cpu", "precision": "fp32",
    "data": {"source": "digits", "image_size": 16, "max_train": 96, "max_test": 30},
    "model": {"width": 8},
    "pretrain": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0, "log_every": 1},  # 3 steps an epoch
    "tracking": {"enabled": False},
}


def train_recorded(root: Path, out: Path, stops: tuple[int, ...] = (), checkpoint: Path | None = None) -> list:
    """pt.run on the real loop; returns, per loss call of this process, the batch's row indices
    and the torch RNG state before the views are drawn. SIGUSR1 is sent at the calls in `stops`."""
    base, seen = METHODS["simclr"], []

    class Recording(base):
        calls = 0

        def loss(self, x, idx):
            type(self).calls += 1
            seen.append((idx.tolist(), torch.get_rng_state()))
            if type(self).calls in stops:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().loss(x, idx)

    METHODS["simclr"] = Recording
    try:
        pt.run(resolve(LOOP), "simclr", 0, root / "data", root / "policy.json", out, echo=lambda s: None,
               checkpoint=checkpoint)
    finally:
        METHODS["simclr"] = base
    return seen


def _loop_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ddp.init("cpu")
    root_p, ckpt = Path(root), Path(root) / "ck" / "checkpoint.pt"
    seen = train_recorded(root_p, root_p / "clean")
    # Rank 0 alone gets the signal during its 2nd step (epoch 1); both ranks stop after that step.
    try:
        train_recorded(root_p, root_p / "resumed", stops=(2,) if rank == 0 else (), checkpoint=ckpt)
        stopped = False
    except pt.Preempted:
        stopped = ckpt.is_file()
    rest = train_recorded(root_p, root_p / "resumed", checkpoint=ckpt)
    torch.save({"idx": [i for i, _ in seen], "rng": seen[0][1], "stopped": stopped, "rest": len(rest)},
               root_p / f"loop_rank{rank}.pt")
    ddp.teardown()


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp_loop")
    cfg = resolve(LOOP)
    data.prepare(cfg["data"], root / "data")
    (root / "policy.json").write_text(json.dumps(METHODS["simclr"].policy(cfg["simclr"], 16)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_recorded(root, root / "single")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_loop_worker, args=(free_port(), str(root)), nprocs=2, join=True)
    ranks = [torch.load(root / f"loop_rank{r}.pt", weights_only=True) for r in range(2)]
    return {"root": root, "single": single, "ranks": ranks}


@pytest.mark.slow
def test_ranks_train_on_disjoint_halves_of_the_single_process_batch(loop_runs):
    """Through pt.run: every rank uses the same epoch permutation (rank 0's, broadcast; in
    epoch 1 the single process's), and rank r takes its half of each global batch."""
    single = [idx for idx, _ in loop_runs["single"]]
    r0, r1 = (r["idx"] for r in loop_runs["ranks"])
    assert len(single) == len(r0) == len(r1) == 2 * 3
    for step, (a, b) in enumerate(zip(r0, r1)):
        assert len(a) == len(b) == 16 and not set(a) & set(b), step
    # Epoch 1: together, in rank order, the single process's batches. (Later permutations come
    # after each process's own augmentation draws, which differ from the single process's.)
    assert [a + b for a, b in zip(r0[:3], r1[:3])] == single[:3]
    for epoch in range(2):  # an epoch's 3 batches are 96 distinct rows: a permutation
        rows = [i for step in range(3 * epoch, 3 * epoch + 3) for i in r0[step] + r1[step]]
        assert sorted(rows) == list(range(96))


@pytest.mark.slow
def test_ranks_draw_independent_augmentation_streams(loop_runs):
    """Rank 0 keeps the single process's augmentation stream; rank 1 draws its own."""
    rng0, rng1 = (r["rng"] for r in loop_runs["ranks"])
    assert torch.equal(rng0, loop_runs["single"][0][1])
    assert not torch.equal(rng0, rng1)


@pytest.mark.slow
def test_ddp_resume_after_a_signal_on_one_rank_equals_an_uninterrupted_run(loop_runs):
    root, ranks = loop_runs["root"], loop_runs["ranks"]
    assert all(r["stopped"] for r in ranks)      # both ranks stopped (one had the signal) and a checkpoint exists
    assert all(r["rest"] == 6 - 2 for r in ranks)  # the rerun trained only the steps left
    a = torch.load(root / "resumed" / "encoder.pt", weights_only=True)
    b = torch.load(root / "clean" / "encoder.pt", weights_only=True)
    assert [k for k in b if not torch.equal(a[k], b[k])] == []
    assert not (root / "ck" / "checkpoint.pt").exists()
    resumed, clean = ddp_history(root / "resumed"), ddp_history(root / "clean")
    assert len(resumed) == len(clean) == 2 and resumed[1] == clean[1]


def ddp_history(p: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "wall_s")}
            for row in csv.DictReader(open(p / "history.csv"))]


@pytest.mark.slow
def test_ddp_resume_logs_the_interrupted_epochs_loss_of_an_uninterrupted_run(loop_runs):
    """The checkpoint holds the mean over ranks of the interrupted epoch's partial sums, so the
    resumed epoch logs the clean run's loss up to fp32 rounding (the sums are added in another
    order). Before, every rank loaded rank 0's own sums: rank 0's first steps counted twice."""
    root = loop_runs["root"]
    resumed, clean = ddp_history(root / "resumed"), ddp_history(root / "clean")
    assert [r.keys() for r in resumed] == [r.keys() for r in clean]
    for a, b in zip(resumed, clean):
        assert {k: float(v) for k, v in a.items()} == pytest.approx({k: float(v) for k, v in b.items()}, rel=1e-6)


# ---- the real CLI under torchrun -------------------------------------------------------------

TINY = {
    "name": "ddp", "seeds": [0], "methods": ["moco"], "device": "cpu",
    "data": {"source": "digits", "image_size": 16, "max_train": 128, "max_test": 40},
    "model": {"width": 8},
    "pretrain": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0, "processes": 2},
    "moco": {"queue_size": 64, "bn_groups": 2},
}


@pytest.mark.slow
def test_torchrun_cli_writes_outputs_once_and_they_load(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = resolve(TINY)
    data.prepare(cfg["data"], tmp_path / "data")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(METHODS["moco"].policy(cfg["moco"], 16)))
    out, ckpt, uri = tmp_path / "out", tmp_path / "ck" / "checkpoint.pt", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "SSLPIPE_TRACKING": json.dumps({"enabled": True, "uri": uri, "experiment": "ddp"})}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "sslpipe", "pretrain", "--config", json.dumps(cfg), "--threads", "1", "--method", "moco",
           "--seed", "0", "--data-dir", str(tmp_path / "data"), "--policy", str(policy), "--out-dir", str(out),
           "--checkpoint", str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # Rank 0 alone speaks: one start line, one line per epoch.
    assert log.count("pretrain moco seed=0: ") == 2 and log_once(log, ": final loss") and "2 processes (batch 16 each)" in log, log[-3000:]
    assert log.count("epoch 1/2 loss") == 1 and log.count("epoch 2/2 loss") == 1, log[-3000:]
    load_encoder(cfg["model"], data.load_manifest(tmp_path / "data"), out / "encoder.pt")
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 * (128 // 32)
    assert summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]))
    assert not ckpt.exists()  # written collectively each epoch, deleted by rank 0 at the end
    # One MLflow run (rank 0's), with the per-epoch loss.
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")] == pytest.approx(
        [float(r["loss"]) for r in rows])


@pytest.mark.slow
def test_rule_launches_torchrun_and_asks_for_one_gpu_per_process(tmp_path):
    """Dry run: 2 processes ask for 2 GPUs and 2 threads, and run under torchrun."""
    (tmp_path / "tiny.yaml").write_text(json.dumps(dict(TINY, tracking={"enabled": False})))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
           "results/ddp/pretrain/moco/seed0/encoder.pt", "-n", "-p", "--cores", "4",
           "--configfile", str(tmp_path / "tiny.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = proc.stdout[proc.stdout.index("checkpoint pretrain:"):]  # a checkpoint (workflow/rules/pretrain.smk)
    assert "gpu=2" in job
    assert "torchrun --standalone --nproc_per_node 2 -m sslpipe pretrain --config " in job
    assert "--threads $(( 2 > 2 ? 2 / 2 : 1 ))" in job  # the rule's 2 threads, shared: 1 per process


def log_once(text: str, what: str) -> bool:
    """`what` appears on exactly one line: rank 0 speaks for every process (header, final line)."""
    return sum(what in line for line in text.splitlines()) == 1
