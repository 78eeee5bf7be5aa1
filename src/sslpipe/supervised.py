"""The supervised baseline: the encoder's architecture trained *with* labels, as an upper reference.

What self-supervised pretraining is compared against from above (SimCLR, Chen et al. 2020,
table 8, reports the supervised ResNet beside every linear-evaluation number): the same
backbone (`models.build_encoder`) with a linear head on its features, trained by cross-entropy
for the same epochs, batch size, optimiser and learning-rate schedule as pretraining
(`cfg["pretrain"]`), on the same device-resident uint8 data under the same autocast. Its head is
then thrown away and its features are evaluated exactly as a pretrained encoder's are (frozen,
linear probe + kNN), so the gap to it is the price of not using labels.

Augmentation is deliberately light: a random resized crop of 80-100% of the area and a
horizontal flip (the flip is kept even for digits because every SSL method here trains with
it too, so the reference sees no invariance the methods are denied), no colour jitter.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.augment import ViewMaker
from sslpipe.models import Encoder, TrainingError, build_encoder
from sslpipe.progress import clock, say

MILD_VIEWS = {"crop_scale": [0.8, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_p": 0.5, "jitter_p": 0.0,
              "jitter_strength": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}


def mild_policy(image_size: int) -> dict:
    """The view policy the supervised baseline trains on (one view per image)."""
    return {"method": "supervised", "image_size": image_size, "n_views": 1, "views": dict(MILD_VIEWS)}


def train(cfg: dict, manifest: dict, data_dir: str | Path, ytr: np.ndarray, seed: int, device: torch.device,
          amp_dtype: torch.dtype | None, log: Callable[[dict, int | None], None] = lambda m, s=None: None
          ) -> tuple[Encoder, dict]:
    """Train encoder + linear head with labels `ytr` (the training split's, in file order).

    `cfg` needs the keys `model`, `pretrain` and `channels_last`. Returns the encoder (eval
    mode, on `device`) and a summary whose keys are prefixed `supervised_`.
    """
    from sslpipe.pretrain import load_train_tensor, lr_at, make_optimizer  # the training loop's own helpers

    tcfg = cfg["pretrain"]
    torch.manual_seed(seed)
    x = load_train_tensor(Path(data_dir), device, cfg["channels_last"])
    y = torch.from_numpy(np.asarray(ytr)).long().to(device)
    n, b = len(x), tcfg["batch_size"]
    if b > n:
        raise TrainingError(f"config key 'pretrain.batch_size' = {b} is larger than the training set "
                            f"({n} images in {data_dir}): lower pretrain.batch_size.")
    encoder = build_encoder(cfg["model"], manifest)
    model = nn.Sequential(encoder, nn.Linear(encoder.feat_dim, manifest["num_classes"])).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if tcfg["compile"]:
        encoder.backbone.compile()  # in place: state_dict keys stay those of the plain module
    opt = make_optimizer(model.parameters(), tcfg, device)
    views = ViewMaker(mild_policy(manifest["image_size"]))

    steps_per_epoch = n // b  # as pretraining: the last partial batch is dropped
    total, warmup = steps_per_epoch * tcfg["epochs"], tcfg["warmup_epochs"] * steps_per_epoch
    step, t_start, row = 0, time.perf_counter(), {}
    for epoch in range(1, tcfg["epochs"] + 1):
        model.train()
        order = torch.randperm(n, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            lr = lr_at(step, total, warmup, tcfg["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * b:(i + 1) * b]
            (xb,) = views(x[idx], 1)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y[idx]).sum()
            step += 1
        mean_loss = (loss_sum / steps_per_epoch).item()  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise TrainingError(f"supervised baseline: the loss became non-finite at epoch {epoch} (step {step}). "
                                "Lower pretrain.lr, or use precision: fp32.")
        row = {"supervised_loss": mean_loss, "supervised_train_top1": (correct / (steps_per_epoch * b)).item(),
               "supervised_lr": lr}
        log(row, epoch)
        elapsed = time.perf_counter() - t_start
        say(f"supervised epoch {epoch}/{tcfg['epochs']} loss {mean_loss:.4f} train top-1 "
            f"{100 * row['supervised_train_top1']:.1f}% lr {lr:.2e} {epoch * steps_per_epoch * b / elapsed:.0f} img/s "
            f"elapsed {clock(elapsed)} eta {clock(elapsed / epoch * (tcfg['epochs'] - epoch))}")
    wall = time.perf_counter() - t_start
    encoder.eval()
    return encoder, {"supervised_epochs": tcfg["epochs"], "supervised_steps": step,
                     "supervised_final_loss": row["supervised_loss"],
                     "supervised_train_top1": row["supervised_train_top1"], "supervised_train_s": wall,
                     "supervised_images_per_s": step * b / wall}
