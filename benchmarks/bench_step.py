"""SimCLR pretraining step throughput: sslpipe's step vs a plain PyTorch loop vs the model alone.

    python benchmarks/bench_step.py                 # ResNet-18 (CIFAR stem), batch 128 (~4 min on 2 cores)
    python benchmarks/bench_step.py --quick         # small_cnn smoke run (~30 s)
    python benchmarks/bench_step.py --backbone small_cnn --batch 256 --steps 10

(a) sslpipe: the pretrain stage's step -- the CIFAR subset resident as one uint8 channels_last
    tensor, a batch indexed there, two batched views (`ViewMaker`), bf16 autocast when
    `pretrain.pick_dtype("auto")` says the CPU supports it, channels_last model, AdamW foreach.
(b) reference: a plain loop -- torchvision v2 per image in a DataLoader (2 workers, batch
    --batch, two views per image), fp32, contiguous layout, default AdamW.
(c) model only: (a) with views already made (random tensors of the views' shape), same precision
    and layout -- the bound any data pipeline can reach. (a) and (c) run their steps in turn.

Images/s count images (each makes two views), from the median step time of --steps timed
steps after --warmup untimed ones. The data pipeline's share of an sslpipe step is estimated as
1 - t(c) / t(a), and also timed directly inside (a)'s steps. Prints JSON lines; appends a row
to benchmarks/RESULTS.md (`--no-record` skips; `--quick` runs print only).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import benchlib as bl
from bench_augment import TwoViews, torchvision_transform
from sslpipe import pretrain as pt
from sslpipe.config import resolve
from sslpipe.methods.simclr import SimCLR, nt_xent
from sslpipe.models import build_encoder, mlp_head


def setup(args):
    x = np.load(bl.CIFAR_SMALL)["x_train"]
    xf = x.reshape(-1, 3).astype(np.float64) / 255
    manifest = {"mean": xf.mean(0).tolist(), "std": xf.std(0).tolist()}
    cfg = resolve({"model": {"backbone": args.backbone}, "pretrain": {"batch_size": args.batch}})
    return x, manifest, cfg


def timed_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def sslpipe_method(cfg, manifest, n, device, channels_last=True):
    policy = SimCLR.policy(cfg["simclr"], 32)
    method = SimCLR(build_encoder(cfg["model"], manifest), cfg["simclr"], policy, n).to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    opt = pt.make_optimizer([p for p in method.parameters() if p.requires_grad], cfg["pretrain"], device)
    return method, opt


def sslpipe_step(method, opt, amp):
    def step(x, idx):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = method.loss(x, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def make_sslpipe_step(x_np, manifest, cfg, amp):
    """(a): the pretrain loop's step, data resident as uint8 channels_last."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    method, opt = sslpipe_method(cfg, manifest, len(x), device)
    b = cfg["pretrain"]["batch_size"]
    order = torch.randperm(len(x))
    step = sslpipe_step(method, opt, amp)
    state = {"i": 0}
    method.train()
    # Time the data ops inside the step directly too (synchronous on the CPU): the batch index
    # into the resident tensor and the views.
    data_s: list[float] = []
    views = method.views

    def timed_views(xb, n):
        t0 = time.perf_counter()
        out = views(xb, n)
        data_s[-1] += time.perf_counter() - t0
        return out

    method.views = timed_views

    def one():
        i = state["i"] % (len(x) // b)
        state["i"] += 1
        t0 = time.perf_counter()
        idx = order[i * b:(i + 1) * b]
        xb = x[idx]
        data_s.append(time.perf_counter() - t0)
        step(xb, None)

    one.data_s = data_s
    return one


def make_model_only_step(manifest, cfg, amp):
    """(c): as (a), but the views are ready-made tensors: only the model, loss and optimizer run."""
    torch.manual_seed(0)
    b = cfg["pretrain"]["batch_size"]
    method, opt = sslpipe_method(cfg, manifest, 5000, torch.device("cpu"))
    ready = [torch.rand(b, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    method.views = lambda x, n: ready  # the step is otherwise SimCLR.loss unchanged
    step = sslpipe_step(method, opt, amp)
    method.train()
    return lambda: step(None, None)


def interleaved(steps_fn: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each variant's timed steps, run in turn (a, c, a, c, ...) after the warm-up, so
    a change in machine load hits both alike."""
    for fn in steps_fn.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in steps_fn}
    for _ in range(steps):
        for k, fn in steps_fn.items():
            out[k] += timed_steps(fn, 0, 1)
    return out


def run_reference(x_np, manifest, cfg, warmup, steps, workers):
    """(b): torchvision per image in a DataLoader, fp32, contiguous, default AdamW."""
    torch.manual_seed(0)
    b = cfg["pretrain"]["batch_size"]
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    views = cfg["simclr"]["views"]
    loader = DataLoader(TwoViews(x, torchvision_transform(views, 32)), batch_size=b, shuffle=True,
                        num_workers=workers, drop_last=True)
    encoder = build_encoder(cfg["model"], manifest)
    scfg = cfg["simclr"]
    head = mlp_head(encoder.feat_dim, scfg["proj_hidden"], scfg["proj_dim"])
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["pretrain"]["lr"], weight_decay=cfg["pretrain"]["weight_decay"])
    encoder.train(), head.train()
    times = []
    total = warmup + steps
    t_prev = time.perf_counter()
    while len(times) < total:
        for v1, v2 in loader:  # the step's time includes waiting for its batch
            z = head(encoder(torch.cat([v1, v2])))
            z1, z2 = z.chunk(2)
            loss = nt_xent(z1, z2, scfg["temperature"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            t = time.perf_counter()
            times.append(t - t_prev)
            t_prev = t
            if len(times) == total:
                break
    return times[warmup:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small_cnn, 2 warm-up + 5 timed steps")
    ap.add_argument("--backbone", choices=["resnet18", "small_cnn"], default=None, help="default resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="sslpipe's precision (a, c); auto = pick_dtype('auto')")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--record", action="store_true", help="append to RESULTS.md even with --quick")
    args = ap.parse_args(argv)
    if args.quick and not args.record:  # smoke runs print only
        args.no_record = True
    if args.backbone is None:
        args.backbone = "small_cnn" if args.quick else "resnet18"
    if args.quick:
        args.warmup = min(args.warmup, 2)

    torch.set_num_threads(args.threads)
    x, manifest, cfg = setup(args)
    amp = pt.pick_dtype(args.precision, torch.device("cpu"))
    m = bl.machine()
    b = args.batch
    bl.emit({"bench": "step", "machine": m, "backbone": args.backbone, "batch": b, "steps": args.steps,
             "warmup": args.warmup, "sslpipe_precision": str(amp or "fp32")})

    t = {}
    a_step = make_sslpipe_step(x, manifest, cfg, amp)
    t.update(interleaved({"sslpipe": a_step, "model_only": make_model_only_step(manifest, cfg, amp)},
                         args.warmup, args.steps))
    data_s = a_step.data_s[-args.steps:]
    direct = bl.median([d / s for d, s in zip(data_s, t["sslpipe"])])
    bl.emit({"variant": "sslpipe", "step_s": t["sslpipe"], "data_s": data_s})
    bl.emit({"variant": "model_only", "step_s": t["model_only"]})
    t["reference"] = run_reference(x, manifest, cfg, args.warmup, args.steps, args.workers)
    bl.emit({"variant": "reference", "step_s": t["reference"]})

    med = {k: bl.median(v) for k, v in t.items()}
    rate = {k: b / v for k, v in med.items()}
    outside = 1 - med["model_only"] / med["sslpipe"]
    rec = {"bench": "step", "backbone": args.backbone, "batch": b, "sslpipe_precision": str(amp or "fp32"),
           "sslpipe_images_per_s": rate["sslpipe"], "reference_fp32_images_per_s": rate["reference"],
           "model_only_images_per_s": rate["model_only"],
           "ratio_sslpipe_over_reference": rate["sslpipe"] / rate["reference"],
           "data_pipeline_fraction_of_step": outside, "data_fraction_timed_directly": direct,
           "median_step_s": med, "load": bl.load()}
    bl.emit(rec)
    if not args.no_record:
        bl.append_row(
            "bench_step: SimCLR step throughput",
            "Images/s (two views each) from the median step time. (a) sslpipe: resident uint8 data, batched "
            "views, autocast per `pick_dtype('auto')`, channels_last, AdamW foreach. (b) reference: torchvision "
            "v2 per image in a DataLoader (2 workers), fp32, contiguous. (c) model only: (a) with ready-made "
            "views. Data share = 1 - t(c)/t(a) (medians); 'timed' = median over (a)'s steps of the time spent "
            "indexing the batch and making the views, over the step time. Targets: (a)/(b) >= 2.5x, data share "
            "<= 10%.",
            ["date", "command", "machine", "load (1/5/15 min)", "backbone", "batch", "steps (warm-up + timed)",
             "(a) sslpipe img/s", "(b) reference fp32 img/s", "(c) model only img/s", "(a)/(b)",
             "data share of (a): 1 - t(c)/t(a) / timed"],
            [bl.now(), f"`{bl.command_line()}`", bl.machine_cell(m), rec["load"], args.backbone, b,
             f"{args.warmup} + {args.steps}", f"{bl.fmt(rate['sslpipe'], 1)} ({amp or 'fp32'})".replace("torch.", ""),
             bl.fmt(rate["reference"], 1), bl.fmt(rate["model_only"], 1),
             f"**{rec['ratio_sslpipe_over_reference']:.2f}x**", f"**{100 * outside:.1f}%** / {100 * direct:.1f}%"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
