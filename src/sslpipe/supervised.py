"""The supervised baseline: the encoder's architecture trained *with* labels, as an upper reference.

What self-supervised pretraining is compared against from above (SimCLR, Chen et al. 2020,
table 8, reports the supervised ResNet beside every linear-evaluation number): the same
backbone (`models.build_encoder`) with a linear head on its features, trained by cross-entropy
for the same epochs, batch size, optimiser and learning-rate schedule as pretraining
(`cfg["pretrain"]`), on the same device-resident uint8 data under the same autocast. Its head is
then thrown away and its features are evaluated exactly as a pretrained encoder's are (frozen,
linear probe + kNN), so the gap to it is the price of not using labels.

It is a method-shaped module (`methods.base.Method`: policy, preview, loss) trained by
pretraining's own loop (`pretrain.fit`), so it resumes from a checkpoint after SIGTERM/SIGUSR1,
runs under DDP and stops on a non-finite loss exactly as pretraining does. It is no SSL method:
it is not in `METHODS` (the pipeline never pretrains it), and it trains inside its evaluation job.

Augmentation is deliberately light: a random resized crop of 80-100% of the area and a
horizontal flip (the flip is kept even for digits because every SSL method here trains with
it too, so the reference sees no invariance the methods are denied), no colour jitter.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe import pretrain as pt
from sslpipe.augment import ViewMaker
from sslpipe.checkpoint import Checkpoint, fingerprint
from sslpipe.models import Encoder, build_encoder
from sslpipe.progress import say

MILD_VIEWS = {"crop_scale": [0.8, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_p": 0.5, "jitter_p": 0.0,
              "jitter_strength": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
# History columns logged to the tracking run each epoch, as supervised_<column>.
LOGGED = ("loss", "train_top1", "lr")


def mild_policy(image_size: int) -> dict:
    """The view policy the supervised baseline trains on (one view per image)."""
    return {"method": "supervised", "image_size": image_size, "n_views": 1, "views": dict(MILD_VIEWS)}


class Supervised(nn.Module):
    """Encoder + linear head, cross-entropy on the labels of the batch's images.

    `labels`: N (long), the training split's labels in file order; a non-persistent buffer, so
    it follows the module to the device but stays out of the state_dict (and the checkpoint).
    """
    name = "supervised"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        return mild_policy(image_size)

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        return ViewMaker(policy)(x)

    def __init__(self, encoder: Encoder, labels: Tensor, num_classes: int, policy: dict):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feat_dim, num_classes)
        self.register_buffer("labels", labels, persistent=False)
        self.views = ViewMaker(policy)

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        (v,) = self.views(x, 1)
        logits = self.head(self.encoder(v))                 # logits: N x classes, under the loop's autocast
        y = self.labels[idx]                                # y: N, the labels of these images
        with torch.autocast(x.device.type, enabled=False):  # the loss in fp32, on fp32 logits
            loss = F.cross_entropy(logits.float(), y)
        # The epoch's mean of per-batch accuracies: the fraction of its images classified right.
        return loss, {"train_top1": (logits.detach().argmax(1) == y).float().mean()}


def train(cfg: dict, manifest: dict, data_dir: str | Path, ytr: np.ndarray, seed: int, device: torch.device,
          amp_dtype: torch.dtype | None, log: Callable[[dict, int | None], None] = lambda m, s=None: None,
          checkpoint: str | Path | None = None, echo: Callable[[str], None] = lambda line: say(f"supervised {line}")
          ) -> tuple[Encoder, dict]:
    """Train encoder + linear head with labels `ytr` (the training split's, in file order).

    `cfg` needs the keys `model`, `pretrain` and `channels_last`. With `checkpoint`, training
    resumes from it as pretraining does (written every pretrain.checkpoint_every epochs, after
    the last one and on SIGTERM/SIGUSR1, then `Preempted`); the caller deletes it once its
    outputs are written. Returns the encoder (eval mode, on `device`) and a summary whose keys
    are prefixed `supervised_`.
    """
    data_dir, tcfg = Path(data_dir), cfg["pretrain"]
    pt.seed_everything(seed)
    if not ddp.is_main():  # rank 0 speaks for all
        log, echo = (lambda m, s=None: None), (lambda line: None)
    x = pt.load_train_tensor(data_dir, device, cfg["channels_last"])
    b = tcfg["batch_size"]
    pt.check_batch_size(b, len(x), data_dir)
    policy = mild_policy(manifest["image_size"])
    encoder = build_encoder(cfg["model"], manifest)
    labels = torch.from_numpy(np.asarray(ytr)).long()
    method = pt.place(cfg, Supervised(encoder, labels, manifest["num_classes"], policy), encoder, device)
    ckpt = Checkpoint(Path(checkpoint) if checkpoint else None,
                      fingerprint(cfg, Supervised.name, seed, manifest, policy, device, amp_dtype, ddp.world(),
                                  method_cfg={}),
                      tcfg["checkpoint_every"], device)
    logged = lambda m, s=None: log({f"supervised_{k}": m[k] for k in LOGGED if k in m}, s)  # noqa: E731
    st, t_start, _ = pt.fit(cfg, tcfg, method, Supervised.name, x, seed, device, amp_dtype, ckpt, logged, echo,
                            "train")
    wall = time.perf_counter() - t_start
    last = st.history[-1]
    return encoder, {"supervised_epochs": tcfg["epochs"], "supervised_steps": st.step,
                     "supervised_final_loss": last["loss"], "supervised_train_top1": last["train_top1"],
                     "supervised_train_s": wall, "supervised_images_per_s": st.step * b / wall}
