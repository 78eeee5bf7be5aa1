"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020).

Two strongly augmented views of each image go through the encoder f and the projection head
g; the NT-Xent loss pulls each pair together against the other 2N - 2 views in the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.augment import ViewMaker
from sslpipe.methods.shared import cosine_logits, view_policy
from sslpipe.models import Encoder, mlp_head


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Normalized temperature-scaled cross entropy (SimCLR eq. 1), averaged over all 2N anchors.

    z1, z2: N x D projections of the two views (need not be normalised); row i of z1 and row i
    of z2 are a positive pair; every other of the 2N views is a negative.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)                      # z: 2N x D
    logits = cosine_logits(z, z, temperature).float()   # logits: 2N x 2N
    # An anchor is never its own negative: remove the diagonal from the softmax.
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    # The positive of anchor i is i + N (and of i + N, i).
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


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
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():  # how often the positive is the nearest view: a cheap health check
            sim = cosine_logits(z1, z2, 1.0)
            acc = (sim.argmax(1) == torch.arange(len(z1), device=z.device)).float().mean()
        return loss, {"pos_top1": acc}

    def after_step(self) -> None:
        pass
