"""The pretrain stage: one method, one seed, data resident on the device.

The whole training set lives on the device as one uint8 tensor (N x 3 x H x W); each step
indexes a batch there and the method augments it on the device. The loss is accumulated on
the device and read back only every `log_every` steps, so the host never waits on every step.
"""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sslpipe import data as data_mod
from sslpipe.io import atomic_path, read_json, write_json, write_text
from sslpipe.methods import METHODS
from sslpipe.models import TrainingError, build_encoder, pick_device, pick_dtype

LogFn = Callable[[dict, int | None], None]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to zero (SimCLR's schedule, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels on CUDA; foreach (one kernel per op over all tensors) elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], **fast)
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], **fast)


def load_train_tensor(data_dir: Path, device: torch.device, channels_last: bool) -> torch.Tensor:
    x, _ = data_mod.load_split(data_dir, "train")  # labels are never read by pretraining
    t = torch.from_numpy(x).permute(0, 3, 1, 2)     # N x H x W x 3 -> N x 3 x H x W (uint8)
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()
    return t.to(device)


def run(cfg: dict, method_name: str, seed: int, data_dir: str | Path, policy_path: str | Path,
        out_dir: str | Path, log: LogFn = lambda m, s=None: None, echo: Callable[[str], None] = print) -> dict:
    """Pretrain `method_name` and write encoder.pt, history.csv and summary.json to out_dir."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tcfg = cfg["pretrain"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = pick_device(cfg["device"])
    amp_dtype = pick_dtype(cfg["precision"], device)
    manifest = data_mod.load_manifest(data_dir)
    policy = read_json(policy_path)
    x = load_train_tensor(data_dir, device, cfg["channels_last"])
    n, b = len(x), tcfg["batch_size"]
    if b > n:
        raise TrainingError(f"config key 'pretrain.batch_size' = {b} is larger than the training set "
                            f"({n} images in {data_dir}): lower pretrain.batch_size.")

    encoder = build_encoder(cfg["model"], manifest)
    method = METHODS[method_name](encoder, cfg[method_name], policy, n).to(device)
    if cfg["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    if tcfg["compile"]:
        encoder.backbone.compile()  # in place: state_dict keys stay those of the plain module
    opt = make_optimizer([p for p in method.parameters() if p.requires_grad], tcfg, device)

    steps_per_epoch = n // b  # drop the last partial batch: contrastive losses want full batches
    total = steps_per_epoch * tcfg["epochs"]
    warmup = tcfg["warmup_epochs"] * steps_per_epoch
    history: list[dict] = []
    step, t_start = 0, time.perf_counter()
    echo(f"pretrain {method_name} seed={seed}: {n} images, batch {b}, {tcfg['epochs']} epochs, device {device}, "
         f"precision {amp_dtype or 'fp32'}, backbone {cfg['model']['backbone']}")
    for epoch in range(1, tcfg["epochs"] + 1):
        method.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, device=device)
        loss_sum = torch.zeros((), device=device)
        extra_sum: dict[str, torch.Tensor] = {}
        for i in range(steps_per_epoch):
            lr = lr_at(step, total, warmup, tcfg["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * b:(i + 1) * b]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, logs = method.loss(x[idx], idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step()
            loss_sum += loss.detach().float()
            for k, v in logs.items():
                extra_sum[k] = extra_sum.get(k, 0) + v.detach().float()
            step += 1
            if step % tcfg["log_every"] == 0 and not torch.isfinite(loss_sum):
                raise TrainingError(non_finite_message(method_name, epoch, step))
        mean_loss = (loss_sum / steps_per_epoch).item()  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise TrainingError(non_finite_message(method_name, epoch, step))
        dt = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": mean_loss, "lr": lr, "images_per_s": steps_per_epoch * b / dt,
               "wall_s": time.perf_counter() - t_start}
        row.update({k: (v / steps_per_epoch).item() for k, v in extra_sum.items()})
        history.append(row)
        log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        echo(f"epoch {epoch}/{tcfg['epochs']} loss {mean_loss:.4f} lr {lr:.2e} {row['images_per_s']:.0f} img/s")

    method.eval()
    diagnostics = {}
    if hasattr(method, "diagnostics"):
        torch.manual_seed(seed)  # diagnostics draw noise too: make them repeatable on their own
        diagnostics = method.diagnostics(x[: min(n, 256)], out_dir) or {}
        if diagnostics:
            log(diagnostics, tcfg["epochs"])
    save_encoder(encoder, out_dir / "encoder.pt")
    write_text(out_dir / "history.csv", history_csv(history))
    wall = time.perf_counter() - t_start
    summary = {"method": method_name, "seed": seed, "device": str(device), "precision": str(amp_dtype or "fp32"),
               "epochs": tcfg["epochs"], "steps": step, "wall_time_s": wall,
               "images_per_s": step * b / wall, "final_loss": history[-1]["loss"], "diagnostics": diagnostics}
    return summary


def non_finite_message(method: str, epoch: int, step: int) -> str:
    return (f"{method}: the loss became non-finite at epoch {epoch} (step {step}). Lower pretrain.lr, "
            "or use precision: fp32; for cd, lower cd.step_size or raise cd.alpha.")


def save_encoder(encoder: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def history_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_summary(out_dir: Path, summary: dict) -> None:
    write_json(out_dir / "summary.json", summary)
