"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020).

Two strongly augmented views of each image go through the encoder f and the projection head
g (Linear-BN-ReLU-Linear, appendix B.9); the NT-Xent loss pulls each pair together against the
other 2N - 2 views in the batch. `SimCLR.loss` calls `nt_xent`, the function tested against the
paper's equation.

Departures from the paper: the optimiser is the pipeline's (AdamW or SGD with momentum; the paper
uses LARS), and the small CPU configs train for far fewer steps (config/cifar10-cpu.yaml: 60 epochs
with T 0.2, which does better than the paper's CIFAR T 0.5 at that budget).

Under DDP (several processes) the negatives span the global batch, as with the paper's
global BN and large batches on TPUs: every rank gathers all ranks' projections (with autograd)
and scores its own anchors against all 2B views; the ranks' mean loss is the single-process
loss at batch B, and so, after gradient averaging, is the gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe.augment import ViewMaker
from sslpipe.methods.shared import cosine_logits, view_policy
from sslpipe.models import Encoder, mlp_head


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, z1_all: Tensor | None = None,
            z2_all: Tensor | None = None, offset: int = 0) -> Tensor:
    """Normalized temperature-scaled cross entropy (SimCLR eq. 1), averaged over the 2N anchors.

    z1, z2: N x D projections of the two views (need not be normalised); row i of z1 and row i
    of z2 are a positive pair; every other of the 2N views is a negative.
    Under DDP, z1_all, z2_all: M x D the views of the whole global batch, whose rows
    offset..offset+N are z1, z2 (this rank's); the anchors stay z1, z2 and every other of the
    2M views is a negative. Default: z1, z2 themselves (M = N, offset 0).
    """
    anchors = torch.cat([z1, z2], dim=0)                              # anchors: 2N x D
    views = anchors if z1_all is None else torch.cat([z1_all, z2_all], dim=0)  # views: 2M x D
    n, m = z1.shape[0], views.shape[0] // 2
    logits = cosine_logits(anchors, views, temperature).float()       # logits: 2N x 2M
    rows = torch.arange(offset, offset + n, device=z1.device)         # this rank's rows in the global batch
    own = torch.cat([rows, rows + m])                                 # anchor a's own column
    # An anchor is never its own negative: remove its own column from the softmax.
    logits = logits.masked_fill(F.one_hot(own, 2 * m).bool(), float("-inf"))
    # The positive of anchor i is i + M (and of i + M, i), in global columns.
    targets = torch.cat([rows + m, rows])
    return F.cross_entropy(logits, targets)


def global_views(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, int]:
    """The views `nt_xent` scores against: under DDP all ranks' projections, rows in global batch
    order (z1_all: B x D), gathered with autograd so that the negatives' gradients reach the ranks
    that computed them, and this rank's first row; in one process z1, z2 themselves and 0."""
    z1_all, z2_all = ddp.gather(z1), ddp.gather(z2)
    return z1_all, z2_all, ddp.my_rows(len(z1_all)).start


class SimCLR(nn.Module):
    name = "simclr"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        return view_policy("simclr", cfg["views"], image_size, n_views=2)

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        return ViewMaker(policy)(x)

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        self.encoder = encoder
        self.head = mlp_head(encoder.feat_dim, cfg["proj_hidden"], cfg["proj_dim"])
        self.temperature = cfg["temperature"]
        self.views = ViewMaker(policy)

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        v1, v2 = self.views(x, 2)
        # One forward over both views: BatchNorm sees the 2N batch, as in the paper.
        z = self.head(self.encoder(torch.cat([v1, v2])))  # z: 2N x proj_dim
        z1, z2 = z.chunk(2)
        z1_all, z2_all, offset = global_views(z1, z2)  # z1_all: B x proj_dim (B = N in one process)
        loss = nt_xent(z1, z2, self.temperature, z1_all, z2_all, offset)
        with torch.no_grad():  # how often the positive is the nearest view: a cheap health check
            sim = cosine_logits(z1, z2_all, 1.0)
            acc = (sim.argmax(1) == torch.arange(offset, offset + len(z1), device=z.device)).float().mean()
        return loss, {"pos_top1": acc}
