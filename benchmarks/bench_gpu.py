"""The GPU path in one command: step throughput, memory, a short real run and the pipeline.

    python benchmarks/bench_gpu.py                        # on the GPU if there is one (~6 min on an H100)
    python benchmarks/bench_gpu.py --device cpu --quick   # the same code paths on the CPU, tiny (CI)
    python benchmarks/bench_gpu.py --sync-debug           # also count host syncs in sslpipe's step

1. Steps (ResNet-18, CIFAR stem, batch 512; --quick: small_cnn, batch 32), images/s: SimCLR's step
   as the pretrain stage takes it (`pretrain.Loop.step`: resident uint8 data, batched views on the
   device, bf16 autocast where `pick_dtype('auto')` finds it, channels_last), the model alone
   (ready-made views), a plain loop (torchvision per image in a DataLoader, pinned memory and
   non-blocking copies on CUDA, fp32), and `pretrain.compile: true` (skipped with --quick on the
   CPU: compiling takes minutes there); MoCo's and PIRL's step. Each with its peak GPU memory
   (`torch.cuda.max_memory_allocated`; "n/a" on the CPU); --sync-debug counts host syncs per
   step under `torch.cuda.set_sync_debug_mode("warn")`.
2. A real run through the pipeline: SimCLR, ResNet-18, the CIFAR-10 subset (../shared/data/
   cifar10_small.npz; skipped with a line if absent), --epochs 200 (~3 min at ~6,000 images/s, an
   estimate for an H100-class GPU); linear probe and kNN top-1, the random-init encoder beside it.
3. The pipeline on a tiny config with `device: cuda` (--quick: cpu), MLflow on, `--resources
   gpu=1`: every rule runs, the two pretraining jobs take turns, MLflow holds every job's run.

JSON lines and a summary table; appends to benchmarks/RESULTS.md with the device's name (not with
--quick or --no-record). tests/test_bench_gpu.py checks that --quick prints every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

import benchlib as bl
from bench_augment import TwoViews, torchvision_transform
from bench_step import interleaved
from sslpipe import pretrain as pt
from sslpipe.checkpoint import Checkpoint, Progress
from sslpipe.config import resolve
from sslpipe.methods import METHODS
from sslpipe.methods.simclr import nt_xent
from sslpipe.models import build_encoder, mlp_head, pick_device

SECTION = "bench_gpu: the GPU path (steps, memory, a real run, the pipeline)"


def images(quick: bool) -> tuple[np.ndarray, str]:
    if bl.CIFAR_SMALL.exists():
        return np.load(bl.CIFAR_SMALL)["x_train"], "cifar10_small"
    g = np.random.default_rng(0)  # the step's cost does not depend on the pixels
    return g.integers(0, 256, (1024 if quick else 5120, 32, 32, 3), dtype=np.uint8), "random uint8 (no CIFAR subset)"


def sync(device: torch.device) -> None:
    torch.cuda.synchronize() if device.type == "cuda" else None


def peak_mib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "n/a"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def step_cfg(args, method: str, compile_: bool = False) -> dict:
    cfg = {"device": args.device, "precision": "auto", "model": {"backbone": args.backbone, "width": 32},
           "pretrain": {"batch_size": args.batch, "warmup_epochs": 1, "log_every": 10, "compile": compile_}}
    if method == "moco":
        cfg["moco"] = {"queue_size": 4 * args.batch}
    if method == "pirl":
        cfg["pirl"] = {"num_negatives": min(1024, 4 * args.batch)}
    return resolve(cfg)


def sslpipe_step(x_dev, manifest, cfg, method_name, device, model_only=False):
    """One step of the real training loop (pretrain.Loop.step), epoch after epoch."""
    torch.manual_seed(0)
    policy = METHODS[method_name].policy(cfg[method_name], x_dev.shape[-1])
    _, method = pt.build_method(cfg, method_name, policy, manifest, len(x_dev), device)
    if model_only:  # bench_step's bound: the views are ready-made, the rest of SimCLR.loss unchanged
        b = cfg["pretrain"]["batch_size"]
        ready = [torch.rand(b, 3, *x_dev.shape[-2:], device=device).contiguous(memory_format=torch.channels_last)
                 for _ in range(2)]
        method.views = lambda x, n: ready
    opt = pt.make_optimizer([p for p in method.parameters() if p.requires_grad], cfg["pretrain"], device)
    loop = pt.Loop(method, opt, x_dev, cfg["pretrain"], device, pt.pick_dtype(cfg["precision"], device), method_name,
                   Checkpoint(None, "", 1, device), log=lambda m, s=None: None, echo=lambda s: None)
    st = Progress(order=torch.randperm(len(x_dev), device=device), loss_sum=torch.zeros((), device=device))
    method.train()

    def one():
        if st.step_in_epoch == loop.steps_per_epoch:
            st.step_in_epoch = 0
        loop.step(st)
        sync(device)
    return one


def reference_step(x_np, manifest, cfg, device, workers):
    """bench_step's plain loop, on `device`: torchvision v2 per image in a DataLoader (pinned
    memory and non-blocking copies on CUDA), fp32, contiguous, default AdamW."""
    torch.manual_seed(0)
    b, scfg = cfg["pretrain"]["batch_size"], cfg["simclr"]
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    loader = DataLoader(TwoViews(x, torchvision_transform(scfg["views"], x.shape[-1])), batch_size=b, shuffle=True,
                        num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    encoder = build_encoder(cfg["model"], manifest).to(device)
    head = mlp_head(encoder.feat_dim, scfg["proj_hidden"], scfg["proj_dim"]).to(device)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=cfg["pretrain"]["lr"],
                            weight_decay=cfg["pretrain"]["weight_decay"])
    encoder.train(), head.train()
    batches = iter(())

    def one():  # the step's time includes waiting for its batch
        nonlocal batches
        try:
            v1, v2 = next(batches)
        except StopIteration:
            batches = iter(loader)
            v1, v2 = next(batches)
        v = torch.cat([v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)])  # from pinned memory
        z1, z2 = head(encoder(v)).chunk(2)
        loss = nt_xent(z1, z2, scfg["temperature"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
    return one


def host_syncs(step, device: torch.device, steps: int = 3):
    """Host syncs per step under torch.cuda.set_sync_debug_mode('warn'); 'n/a' on the CPU."""
    if device.type != "cuda":
        return "n/a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"per_step": len(found) / steps, "first": found[:3]}


def bench_steps(args, device, x_np, manifest) -> list[dict]:
    x_dev = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    x_dev = x_dev.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x_dev
    b, out = args.batch, []

    def record(method, variant, times, step, t_first=None, **extra):
        rec = {"bench": "gpu_step", "method": method, "variant": variant, "backbone": args.backbone, "batch": b,
               "images_per_s": b / bl.median(times), "median_step_s": bl.median(times), "peak_mem_mib": peak_mib(device),
               "precision": extra.pop("precision", str(pt.pick_dtype("auto", device) or "fp32")),
               **({} if t_first is None else {"first_step_s": t_first})}
        if args.sync_debug:
            rec["host_syncs"] = host_syncs(step, device)
        rec.update(extra)
        bl.emit(rec)
        out.append(rec)

    cfg = step_cfg(args, "simclr")
    reset_peak(device)  # (a) and (c) run in turn: their peaks are measured together
    a = sslpipe_step(x_dev, manifest, cfg, "simclr", device)
    c = sslpipe_step(x_dev, manifest, cfg, "simclr", device, model_only=True)
    t = interleaved({"sslpipe": a, "model_only": c}, args.warmup, args.steps)
    record("simclr", "sslpipe", t["sslpipe"], a)
    record("simclr", "model_only", t["model_only"], c)
    del a, c
    reset_peak(device)
    ref = reference_step(x_np, manifest, cfg, device, args.workers)
    t = interleaved({"ref": ref}, args.warmup, args.steps)["ref"]
    record("simclr", "reference", t, ref, precision="fp32", workers=args.workers)
    del ref
    if args.quick and device.type == "cpu":
        out.append({"bench": "gpu_step", "method": "simclr", "variant": "compile",
                    "skipped": "pretrain.compile on the CPU with --quick: compiling takes minutes there"})
        bl.emit(out[-1])
    else:
        reset_peak(device)
        step = sslpipe_step(x_dev, manifest, step_cfg(args, "simclr", compile_=True), "simclr", device)
        t0 = time.perf_counter()
        step()  # the first step compiles
        t_first = time.perf_counter() - t0
        record("simclr", "compile", interleaved({"s": step}, args.warmup, args.steps)["s"], step, t_first)
        del step
    for name in ("moco", "pirl"):
        reset_peak(device)
        step = sslpipe_step(x_dev, manifest, step_cfg(args, name), name, device)
        record(name, "sslpipe", interleaved({"s": step}, args.warmup, args.steps)["s"], step)
        del step
    return out


# ---- 2. and 3. the pipeline ------------------------------------------------------------------

def snakemake(work: Path, cfg: dict, *extra: str) -> tuple[int, float, str]:
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(bl.REPO / "Snakefile"), "-d", str(work),
           "--configfile", str(configfile), *extra]
    t0 = time.perf_counter()  # one stream: job starts and ends in the order Snakemake printed them
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode, time.perf_counter() - t0, proc.stdout


def real_cfg(args, device) -> dict:
    """SimCLR with the backbone on the CIFAR-10 subset (--quick: 512 / 200 images, 1 epoch)."""
    quick, b = args.quick, 64 if args.quick else 512
    return {"name": "bench-gpu-real", "seeds": [0], "methods": ["simclr"], "device": device.type,
            "data": {"source": "npz", "name": "cifar10_small", "path": str(bl.CIFAR_SMALL), "image_size": 32,
                     **({"max_train": 512, "max_test": 200} if quick else {})},
            "model": {"backbone": args.backbone, "width": 8 if quick else 32},
            "pretrain": {"epochs": args.epochs, "batch_size": b, "optimizer": "sgd", "lr": 0.3 * b / 256,
                         "weight_decay": 0.0005, "momentum": 0.9, "warmup_epochs": 0 if quick else 10, "log_every": 50},
            "simclr": {"temperature": 0.5, "proj_hidden": 2048, "proj_dim": 128,
                       "views": {"crop_scale": [0.2, 1.0], "jitter_p": 0.8, "jitter_strength": 0.5, "grayscale_p": 0.2}},
            "evaluate": {"baselines": ["random"], **({"probe_steps": 30, "weight_decays": [0.0]} if quick else {})},
            "augment": {"benchmark_images": 64}, "tracking": {"enabled": False}}


def tiny_cfg(device, work: Path) -> dict:
    """Two pretraining jobs (so that --resources gpu=1 has something to order), MLflow on."""
    return {"name": "bench-gpu-tiny", "seeds": [0], "methods": ["simclr", "moco"], "device": device.type,
            "data": {"source": "digits", "image_size": 16, "max_train": 320, "max_test": 120},
            "model": {"width": 8}, "pretrain": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
            "moco": {"queue_size": 256},
            "evaluate": {"probe_steps": 30, "weight_decays": [0.0, 0.001], "baselines": ["random"]},
            "augment": {"benchmark_images": 64}, "tracking": {"enabled": True, "uri": f"sqlite:///{work / 'mlflow.db'}"}}


def real_record(args, work: Path, wall: float) -> dict:
    summary = json.loads(next(work.glob("results/*/pretrain/simclr/seed0/summary.json")).read_text())
    m, r = metrics(work, "simclr"), metrics(work, "random")
    return {"bench": "gpu_real_run", "backbone": args.backbone, "epochs": summary["epochs"],
            "device": summary["device"], "precision": summary["precision"],
            "pretrain_wall_s": summary["wall_time_s"], "pretrain_images_per_s": summary["images_per_s"],
            "pipeline_wall_s": wall, "linear_top1": m["linear_top1"], "knn_top1": m["knn_top1"],
            "random_linear_top1": r["linear_top1"], "random_knn_top1": r["knn_top1"]}


def metrics(work: Path, name: str) -> dict:
    return json.loads(next(work.glob(f"results/*/linear_eval/{name}/seed0/metrics.json")).read_text())


def pipeline_record(work: Path, device, rc: int, wall: float, log: str) -> dict:
    rec = {"bench": "gpu_pipeline", "device": device.type, "returncode": rc, "wall_s": wall}
    if rc:
        return {**rec, "log_tail": log[-3000:]}
    summaries = [json.loads(p.read_text()) for p in work.glob("results/*/pretrain/*/seed0/summary.json")]
    db = sqlite3.connect(work / "mlflow.db")  # the store itself (only tracking.py imports mlflow)
    stages = db.execute("SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                        "WHERE t.key = 'sslpipe.stage'").fetchall()
    losses = db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'loss'").fetchone()[0]
    db.close()
    return {**rec, "pretrain_jobs": len(summaries), "pretrain_devices": sorted({s["device"] for s in summaries}),
            "report": any(work.glob("results/*/report/report.html")),
            "max_concurrent_pretrain": max_concurrent(log, "pretrain"),
            "mlflow_finished_runs": {s: sum(1 for v, st in stages if v == s and st == "FINISHED")
                                     for s in sorted({v for v, _ in stages})},
            "mlflow_loss_points": losses}


def max_concurrent(log: str, rule: str) -> int:
    """The most jobs of `rule` running at once, from Snakemake's 'rule X: ... jobid: N' and
    'Finished jobid: N' lines."""
    running, most, current_rule = set(), 0, None
    for line in log.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line.strip()):
            current_rule = m.group(1)
        elif (m := re.match(r"^jobid: (\d+)", line.strip())) and current_rule == rule:
            running.add(m.group(1))
            most = max(most, len(running))
            current_rule = None
        elif m := re.search(r"Finished jobid: (\d+)", line):
            running.discard(m.group(1))
    return most


def pipelines(args, device) -> tuple[dict, dict]:
    """(real run, tiny pipeline). With --quick the two are one pipeline run (the tiny config on
    the CIFAR subset, when present): a Snakemake start and an MLflow store cost more than the run."""
    have_cifar = bl.CIFAR_SMALL.exists()
    skipped = {"bench": "gpu_real_run", "skipped": f"no CIFAR-10 subset at {bl.CIFAR_SMALL}"}
    resources = ("--cores", str(max(2, args.cores)), "--resources", "gpu=1")
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        if args.quick:
            cfg = tiny_cfg(device, work / "pipe")
            if have_cifar:
                cfg.update({k: real_cfg(args, device)[k] for k in ("data", "model", "evaluate")})
            cfg["pretrain"]["epochs"] = args.epochs
            (work / "pipe").mkdir()
            rc, wall, log = snakemake(work / "pipe", cfg, *resources)
            pipe = pipeline_record(work / "pipe", device, rc, wall, log)
            real = real_record(args, work / "pipe", wall) if have_cifar and rc == 0 else skipped
        else:
            real = skipped
            if have_cifar:
                (work / "real").mkdir()
                rc, wall, log = snakemake(work / "real", real_cfg(args, device), "--cores", str(args.cores))
                real = real_record(args, work / "real", wall) if rc == 0 else {
                    "bench": "gpu_real_run", "error": f"snakemake exited {rc}", "log_tail": log[-3000:]}
            (work / "pipe").mkdir()
            rc, wall, log = snakemake(work / "pipe", tiny_cfg(device, work / "pipe"), *resources)
            pipe = pipeline_record(work / "pipe", device, rc, wall, log)
    bl.emit(real), bl.emit(pipe)
    return real, pipe


# ---- summary ---------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return bl.machine_cell(bl.machine())


def summary_rows(steps: list[dict], real: dict, pipe: dict) -> list[list[str]]:
    mem = lambda m: f"{m:,.0f} MiB" if isinstance(m, float) else str(m)  # noqa: E731
    rows = [[f"{s['method']} {s['variant']}", s.get("skipped") or f"{s['images_per_s']:,.0f} img/s",
             mem(s.get("peak_mem_mib", "n/a")), s.get("precision", "")] for s in steps]
    if "linear_top1" in real:
        rows.append([f"real run {real['epochs']} ep", f"linear {100 * real['linear_top1']:.1f}% / kNN "
                     f"{100 * real['knn_top1']:.1f}% (random {100 * real['random_linear_top1']:.1f}% / "
                     f"{100 * real['random_knn_top1']:.1f}%)", f"{real['pretrain_wall_s']:.0f} s pretrain",
                     real["precision"]])
    else:
        rows.append(["real run", real.get("skipped") or real.get("error", "?"), "", ""])
    ok = pipe["returncode"] == 0
    rows.append(["pipeline (gpu=1)", f"{'ok' if ok else 'FAILED'} in {pipe['wall_s']:.0f} s" +
                 (f", pretrain jobs at once: {pipe['max_concurrent_pretrain']}, MLflow runs {pipe['mlflow_finished_runs']}"
                  if ok else ""), "", ", ".join(pipe.get("pretrain_devices", []))])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="small_cnn, batch 32, 2 + 3 steps, 1-epoch real run")
    ap.add_argument("--sync-debug", action="store_true", help="count host syncs per step (CUDA)")
    ap.add_argument("--epochs", type=int, default=None, help="real run's epochs (default 200; --quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all; --quick 1)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    args.device = device.type
    args.backbone, args.batch = ("small_cnn", 32) if args.quick else ("resnet18", 512)
    args.steps, args.warmup = (3, 2) if args.quick else (20, 5)
    args.epochs = args.epochs or (1 if args.quick else 200)
    args.threads = args.threads or (1 if args.quick else os.cpu_count())
    args.cores = 1 if args.quick else min(4, os.cpu_count())
    args.workers = 1 if args.quick else max(1, min(8, os.cpu_count() - 2))
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pretrain stage does
    t0 = time.perf_counter()
    x, source = images(args.quick)
    xf = x.reshape(-1, 3).astype(np.float64) / 255
    manifest = {"mean": xf.mean(0).tolist(), "std": xf.std(0).tolist()}
    bl.emit({"bench": "gpu", "device": device_name(device), "quick": args.quick, "step_images": source,
             "steps": args.steps, "warmup": args.warmup, "machine": bl.machine()})
    steps = bench_steps(args, device, x, manifest)
    real, pipe = pipelines(args, device)
    total = time.perf_counter() - t0
    bl.emit({"bench": "gpu_total", "wall_s": total})
    rows = summary_rows(steps, real, pipe)
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\n{device_name(device)}; total {total:.0f} s")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    if not (args.quick or args.no_record):
        intro = ("`python benchmarks/bench_gpu.py` on a GPU: steps at batch 512 (ResNet-18, CIFAR stem; peak memory "
                 "= torch.cuda.max_memory_allocated), the real run on the CIFAR-10 subset (linear / kNN top-1 vs the "
                 "random-init encoder), the tiny pipeline under --resources gpu=1.")
        for r in rows:
            bl.append_row(SECTION, intro, ["date", "device", "what", "figure", "memory / time", "precision"],
                          [bl.now(), device_name(device), *r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
