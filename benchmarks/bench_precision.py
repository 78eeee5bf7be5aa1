"""Does bf16 autocast cost accuracy? A short SimCLR run in bf16 and in fp32, same seed, then the
linear probe of each.

    python benchmarks/bench_precision.py            # CIFAR-10 subset, small_cnn, 4 epochs (~2 min, idle 2 cores)
    python benchmarks/bench_precision.py --quick    # 1000 training images, 1 epoch (~15 s)

Data: ../shared/data/cifar10_small.npz (5000 train / 1000 test) through `sslpipe.data.prepare`
(npz source). Each run is the pretrain stage (`pretrain.run`: resident data, batched views,
channels_last) with `precision` bf16 or fp32 and everything else equal, then
`evaluate.evaluate_encoder` (linear probe with weight decay chosen on a validation split, and kNN)
at the run's precision; then fp32 with the next seed, to show the seed-to-seed noise the
bf16 - fp32 gap should be read against. Target: linear top-1 within 1 point. If the CPU has no
bf16 support the bf16 run is skipped (sslpipe trains in fp32 there anyway). Prints JSON lines;
appends a row to benchmarks/RESULTS.md (`--no-record` skips; `--quick` runs print only).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import benchlib as bl
from sslpipe import data as data_mod
from sslpipe import evaluate as ev
from sslpipe import models
from sslpipe import pretrain as pt
from sslpipe.config import resolve
from sslpipe.io import write_json
from sslpipe.methods.simclr import SimCLR


def run_one(cfg: dict, precision: str, seed: int, data_dir: Path, work: Path) -> dict:
    cfg = {**cfg, "precision": precision}
    out = work / precision
    out.mkdir(parents=True, exist_ok=True)
    manifest = data_mod.load_manifest(data_dir)
    policy = work / "policy.json"
    write_json(policy, SimCLR.policy(cfg["simclr"], manifest["image_size"]))
    t0 = time.perf_counter()
    summary = pt.run(cfg, "simclr", seed, data_dir, policy, out, echo=lambda s: print(f"  [{precision}] {s}",
                                                                                      file=sys.stderr))
    train_s = time.perf_counter() - t0
    device = pt.pick_device(cfg["device"])
    amp = pt.pick_dtype(precision, device)
    load_encoder = getattr(models, "load_encoder", None) or pt.load_encoder  # moved between modules
    encoder = load_encoder(cfg["model"], manifest, out / "encoder.pt")
    xtr, ytr = data_mod.load_split(data_dir, "train")
    xte, yte = data_mod.load_split(data_dir, "test")
    t1 = time.perf_counter()
    metrics = ev.evaluate_encoder(encoder, xtr, ytr, xte, yte, manifest["num_classes"], cfg["evaluate"], seed,
                                  device, amp)
    return {"precision": precision, "linear_top1": metrics["linear_top1"], "knn_top1": metrics["knn_top1"],
            "final_loss": summary["final_loss"], "train_s": train_s, "eval_s": time.perf_counter() - t1,
            "train_images_per_s": summary["images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 train images, 1 epoch")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(bl.CIFAR_SMALL), help="the npz (x_train, y_train, x_test, y_test)")
    ap.add_argument("--no-seed-run", action="store_true",
                    help="skip the fp32 run with seed + 1 that shows the seed-to-seed noise")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--record", action="store_true", help="append to RESULTS.md even with --quick")
    args = ap.parse_args(argv)
    if args.quick and not args.record:  # smoke runs print only
        args.no_record = True
    epochs = 1 if args.quick else args.epochs
    torch.set_num_threads(args.threads)
    bf16_ok = pt.pick_dtype("auto", torch.device("cpu")) is not None
    m = bl.machine()

    cfg = resolve({"data": {"source": "npz", "path": args.data, "name": "cifar10_small", "image_size": 32,
                            "max_train": 1000 if args.quick else None},
                   "model": {"backbone": "small_cnn", "width": 32},
                   "pretrain": {"epochs": epochs, "batch_size": 128, "warmup_epochs": 1 if epochs > 2 else 0},
                   "device": "cpu",
                   "evaluate": {"probe_steps": 50 if args.quick else 200}})
    bl.emit({"bench": "precision", "machine": m, "epochs": epochs, "seed": args.seed, "bf16_supported": bf16_ok,
             "train_images": cfg["data"]["max_train"] or 5000})
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sslpipe-precision-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_mod.prepare(cfg["data"], data_dir)
        runs = {}
        for precision in (["bf16"] if bf16_ok else []) + ["fp32"]:
            runs[precision] = run_one(cfg, precision, args.seed, data_dir, work)
            bl.emit({"bench": "precision", **runs[precision]})
        if not args.no_seed_run:  # the scale of seed-to-seed noise, to read the bf16 - fp32 gap against
            runs["fp32_seed2"] = run_one(cfg, "fp32", args.seed + 1, data_dir, work / "seed2")
            bl.emit({"bench": "precision", "seed": args.seed + 1, **runs["fp32_seed2"]})
    total = time.perf_counter() - t_all
    rec = {"bench": "precision", "epochs": epochs, "seed": args.seed, "total_s": total, "load": bl.load(),
           "fp32_linear_top1": runs["fp32"]["linear_top1"]}
    if "bf16" in runs:
        rec["bf16_linear_top1"] = runs["bf16"]["linear_top1"]
        rec["difference_points"] = 100 * (runs["bf16"]["linear_top1"] - runs["fp32"]["linear_top1"])
        rec["bf16_train_speedup"] = runs["fp32"]["train_s"] / runs["bf16"]["train_s"]
    if "fp32_seed2" in runs:
        rec["fp32_seed_noise_points"] = 100 * (runs["fp32_seed2"]["linear_top1"] - runs["fp32"]["linear_top1"])
    bl.emit(rec)
    if not args.no_record:
        pct = lambda r, k: f"{100 * r[k]:.1f}%"  # noqa: E731
        b = runs.get("bf16")
        bl.append_row(
            "bench_precision: bf16 vs fp32 accuracy",
            "SimCLR on the CIFAR-10 subset (npz source), small_cnn, batch 128, same seed; linear probe "
            "(and kNN) on the frozen encoder at the run's precision; a second fp32 run with the next seed "
            "shows the seed-to-seed noise. Target: |bf16 - fp32| linear top-1 <= 1 point.",
            ["date", "command", "machine", "load (1/5/15 min)", "epochs", "train images", "bf16 linear / kNN top-1",
             "fp32 linear / kNN top-1", "bf16 - fp32 (points)", "fp32 seed+1 - fp32 (points)",
             "train time bf16 / fp32", "total"],
            [bl.now(), f"`{bl.command_line()}`", bl.machine_cell(m), rec["load"], epochs,
             cfg["data"]["max_train"] or 5000,
             f"{pct(b, 'linear_top1')} / {pct(b, 'knn_top1')}" if b else "n/a (no bf16)",
             f"{pct(runs['fp32'], 'linear_top1')} / {pct(runs['fp32'], 'knn_top1')}",
             f"**{rec['difference_points']:+.1f}**" if b else "-",
             f"{rec['fp32_seed_noise_points']:+.1f}" if "fp32_seed_noise_points" in rec else "-",
             (f"{b['train_s']:.0f} s / " if b else "") + f"{runs['fp32']['train_s']:.0f} s", f"{total:.0f} s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
