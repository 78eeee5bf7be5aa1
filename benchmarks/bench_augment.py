"""Augmentation throughput: sslpipe's batched views vs torchvision v2 per image in a DataLoader.

    python benchmarks/bench_augment.py            # full run (~2-3 min on 2 CPU cores)
    python benchmarks/bench_augment.py --quick    # smoke run (~20 s)

Policy: SimCLR's CIFAR views (crop scale (0.2, 1), flip 0.5, colour jitter p 0.8 strength 0.5,
grayscale 0.2), then the same with Gaussian blur p 0.5. Two views per image, uint8 in, float out.

* sslpipe: `ViewMaker` on batches of 256 indexed from the resident uint8 (channels_last) tensor,
  torch threads = 2 (the training loop's path);
* torchvision: `transforms.v2` applied per image in a `DataLoader` (2 workers, batch 256, persistent
  workers, timed after a warm-up epoch), the usual PyTorch data pipeline;
* kornia: the previous implementation (`kornia_view_pipeline` below), batched like sslpipe
  (`pip install -e '.[bench]'`: kornia is no runtime dependency).

Also times each op alone, kornia vs sslpipe's hand-written op (`--no-ops` skips this). Prints
JSON lines; appends rows to benchmarks/RESULTS.md (`--no-record` skips; `--quick` runs print only).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import benchlib as bl
from sslpipe import augment as aug
from sslpipe.config import resolve
from sslpipe.methods.shared import view_policy

BATCH = 256


def kornia_view_pipeline(views: dict, image_size: int) -> "torch.nn.Module":
    """The same policy from kornia's generic ops: the reference `bench_augment.py` compares with."""
    import kornia.augmentation as K

    s = views["jitter_strength"]
    kernel = aug.blur_kernel_size(image_size)
    ops: list = [
        K.RandomResizedCrop((image_size, image_size), scale=tuple(views["crop_scale"]),
                            ratio=tuple(views["crop_ratio"]), p=1.0),
        K.RandomHorizontalFlip(p=views["flip_p"]),
    ]
    if views["jitter_p"] > 0 and s > 0:
        ops.append(K.ColorJitter(aug.JITTER_BCS * s, aug.JITTER_BCS * s, aug.JITTER_BCS * s, aug.JITTER_HUE * s, p=views["jitter_p"]))
    if views["grayscale_p"] > 0:
        ops.append(K.RandomGrayscale(p=views["grayscale_p"]))
    if views["blur_p"] > 0:
        ops.append(K.RandomGaussianBlur((kernel, kernel), aug.BLUR_SIGMA, p=views["blur_p"]))
    if views["solarize_p"] > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=views["solarize_p"]))
    return K.AugmentationSequential(*ops, data_keys=["input"])

def simclr_views(blur: bool) -> dict:
    return resolve({"simclr": {"views": {"blur_p": 0.5 if blur else 0.0}}})["simclr"]["views"]


def torchvision_transform(views: dict, size: int) -> v2.Compose:
    """The same policy as torchvision v2 ops on one uint8 image (the reference pipeline)."""
    s = views["jitter_strength"]
    k = aug.blur_kernel_size(size)
    ops = [v2.RandomResizedCrop(size, scale=tuple(views["crop_scale"]), ratio=tuple(views["crop_ratio"]),
                                antialias=True),
           v2.RandomHorizontalFlip(views["flip_p"]),
           v2.RandomApply([v2.ColorJitter(aug.JITTER_BCS * s, aug.JITTER_BCS * s, aug.JITTER_BCS * s,
                                          aug.JITTER_HUE * s)], p=views["jitter_p"]),
           v2.RandomGrayscale(views["grayscale_p"])]
    if views["blur_p"] > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=aug.BLUR_SIGMA)], p=views["blur_p"]))
    if views["solarize_p"] > 0:
        ops.append(v2.RandomSolarize(128, p=views["solarize_p"]))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


class TwoViews(Dataset):
    def __init__(self, x: torch.Tensor, transform):
        self.x, self.transform = x, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = self.x[i]
        return self.transform(img), self.transform(img)


def torchvision_epoch(x: torch.Tensor, views: dict, workers: int):
    """One pass through a DataLoader (persistent workers: started once, by the warm-up pass)."""
    loader = DataLoader(TwoViews(x, torchvision_transform(views, x.shape[-1])), batch_size=BATCH, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0, drop_last=False)

    def epoch():
        for v1, v2_ in loader:
            assert v1.dtype == torch.float32 and v2_.shape == v1.shape

    return epoch


def batched_epoch(x: torch.Tensor, make_views):
    """One pass over x in batches of BATCH indexed from the resident tensor (as the training loop)."""
    n = len(x)

    def epoch():
        order = torch.randperm(n)
        for i in range(0, n, BATCH):
            v1, v2_ = make_views(x[order[i:i + BATCH]])
            assert v1.dtype == torch.float32

    return epoch


def interleaved_rates(n: int, epochs: dict, repeats: dict) -> dict[str, list[float]]:
    """Images/s of each pipeline's timed passes, run in turn (a, b, c, a, b, c, ...) after one
    warm-up pass each, so a change in machine load hits all of them alike."""
    for fn in epochs.values():
        fn()
    rates = {k: [] for k in epochs}
    for r in range(max(repeats.values())):
        for k, fn in epochs.items():
            if r < repeats[k]:
                rates[k].append(n / bl.median(bl.timeit(fn, 1, warmup=0)))
    return rates


def kornia_maker(views: dict, size: int):
    pipe = kornia_view_pipeline(views, size)

    def make(xb):
        x01 = aug.to_float(xb)
        return pipe(x01), pipe(x01)

    return make


def per_op(x: torch.Tensor, repeat: int) -> list[dict]:
    """Views/s of each op alone on one batch of 2 x BATCH views (float, 32 px): kornia vs sslpipe."""
    import kornia.augmentation as K

    views = simclr_views(blur=True)
    s, size = views["jitter_strength"], x.shape[-1]
    xb = aug.to_float(x[:BATCH].repeat(2, 1, 1, 1).contiguous())
    n = len(xb)
    pipe = aug.view_pipeline(views, size)
    p = pipe.sample(n, size, size, "cpu")
    on = torch.ones(n, dtype=torch.bool)
    bcs, hue = aug.JITTER_BCS * s, aug.JITTER_HUE * s
    u = lambda lo, hi: torch.empty(n).uniform_(lo, hi)  # noqa: E731
    jit = (u(1 - bcs, 1 + bcs), u(1 - bcs, 1 + bcs), u(1 - bcs, 1 + bcs), u(-hue, hue), torch.rand(n, 4).argsort(1))
    sigma = u(*aug.BLUR_SIGMA)
    k = aug.blur_kernel_size(size)
    rrc = K.RandomResizedCrop((size, size), scale=tuple(views["crop_scale"]), ratio=tuple(views["crop_ratio"]), p=1.0)
    flip = K.RandomHorizontalFlip(p=0.5)
    cj = K.ColorJitter(bcs, bcs, bcs, hue, p=1.0)
    gray = K.RandomGrayscale(p=1.0)
    blur = K.RandomGaussianBlur((k, k), aug.BLUR_SIGMA, p=1.0)
    full_k = kornia_view_pipeline(views, size)
    xu = (xb * 255).round().byte()
    cases = {
        "uint8->float": (None, lambda: aug.to_float(xu)),
        "sample params": (None, lambda: pipe.sample(n, size, size, "cpu")),
        "crop+flip": (lambda: flip(rrc(xb)), lambda: aug.crop_flip(xb, p["box"], p["flip"], size)),
        "colour jitter (all applied)": (lambda: cj(xb), lambda: aug.color_jitter(xb, *jit)),
        "grayscale (all applied)": (lambda: gray(xb), lambda: aug.grayscale(xb, on)),
        "gaussian blur (all applied)": (lambda: blur(xb), lambda: aug.gaussian_blur(xb, sigma, k)),
        "whole policy (blur p 0.5)": (lambda: full_k(xb), lambda: pipe(xb)),
    }
    rows = []
    for name, (kfn, sfn) in cases.items():
        s_rate = n / bl.median(bl.timeit(sfn, repeat))
        k_rate = n / bl.median(bl.timeit(kfn, repeat)) if kfn else None
        rows.append({"op": name, "views": n, "kornia_views_per_s": k_rate, "sslpipe_views_per_s": s_rate,
                     "speedup": s_rate / k_rate if k_rate else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 images, 2 timed epochs, no per-op table")
    ap.add_argument("--epochs", type=int, default=5, help="timed passes over the data per pipeline (median)")
    ap.add_argument("--images", type=int, default=None, help="images of the CIFAR subset (default all 5000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for sslpipe and kornia")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for torchvision")
    ap.add_argument("--no-kornia", action="store_true")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--record", action="store_true", help="append to RESULTS.md even with --quick")
    args = ap.parse_args(argv)
    if args.quick and not args.record:  # smoke runs print only
        args.no_record = True
    epochs = 2 if args.quick else args.epochs
    n_img = args.images or (1024 if args.quick else None)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = np.load(bl.CIFAR_SMALL)["x_train"][:n_img]
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    resident = xt.contiguous(memory_format=torch.channels_last)  # as pretrain.load_train_tensor
    per_image = xt.contiguous()
    m = bl.machine()
    bl.emit({"bench": "augment", "machine": m, "images": len(x), "epochs": epochs})

    results = {}
    for blur in (False, True):
        views = simclr_views(blur)
        maker = aug.ViewMaker(view_policy("simclr", views, x.shape[1], n_views=2))
        epochs_fn = {"sslpipe": batched_epoch(resident, lambda xb: maker(xb, 2)),
                     "torchvision": torchvision_epoch(per_image, views, args.workers)}
        repeats = {"sslpipe": epochs, "torchvision": epochs}
        if not args.no_kornia:  # slow: fewer passes
            epochs_fn["kornia"] = batched_epoch(resident, kornia_maker(views, x.shape[1]))
            repeats["kornia"] = 1 if args.quick else max(1, epochs // 2)
        rates = interleaved_rates(len(x), epochs_fn, repeats)
        med = {k: bl.median(v) for k, v in rates.items()}
        rec = {"bench": "augment", "policy": "simclr" + (" + blur 0.5" if blur else ""), "images": len(x),
               "views_per_image": 2, **{f"{k}_images_per_s": v for k, v in med.items()},
               "ratio_sslpipe_over_torchvision": med["sslpipe"] / med["torchvision"],
               "runs": {k: [round(r) for r in v] for k, v in rates.items()}, "load": bl.load()}
        if "kornia" in med:
            rec["ratio_sslpipe_over_kornia"] = med["sslpipe"] / med["kornia"]
        bl.emit(rec)
        results[blur] = rec

    if not args.no_record:
        for blur, rec in results.items():
            bl.append_row(
                "bench_augment: augmentation throughput",
                "Images/s (two views each, uint8 in, float out), median of timed passes over the CIFAR-10 "
                "subset. sslpipe: batched `ViewMaker`, 2 torch threads. torchvision: `transforms.v2` per "
                "image in a DataLoader, 2 workers, batch 256. kornia: the previous batched implementation. "
                "Target: sslpipe >= 5x torchvision.",
                ["date", "command", "machine", "load (1/5/15 min)", "policy", "sslpipe img/s", "torchvision img/s",
                 "kornia img/s", "sslpipe / torchvision"],
                [bl.now(), f"`{bl.command_line()}`", bl.machine_cell(m), rec["load"], rec["policy"],
                 bl.fmt(rec["sslpipe_images_per_s"]), bl.fmt(rec["torchvision_images_per_s"]),
                 bl.fmt(rec["kornia_images_per_s"]) if "kornia_images_per_s" in rec else "-",
                 f"**{rec['ratio_sslpipe_over_torchvision']:.1f}x**"])

    if not (args.quick or args.no_ops):
        rows = per_op(resident, repeat=args.epochs)
        load = bl.load()
        for r in rows:
            bl.emit({"bench": "augment_op", **r, "load": load})
            if not args.no_record:
                bl.append_row(
                    "bench_augment: kornia vs hand-written ops",
                    "Views/s of each op alone on one batch of 512 float views (256 images x 2), 32 px, "
                    "2 torch threads, median of repeats ('all applied': p = 1, so both do the work on "
                    "every view).",
                    ["date", "machine", "load (1/5/15 min)", "op", "kornia views/s", "sslpipe views/s", "speedup"],
                    [bl.now(), bl.machine_cell(m), load, r["op"],
                     bl.fmt(r["kornia_views_per_s"]) if r["kornia_views_per_s"] else "-",
                     bl.fmt(r["sslpipe_views_per_s"]), f"{r['speedup']:.1f}x" if r["speedup"] else "-"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
