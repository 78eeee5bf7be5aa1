"""Small pieces the methods share: free functions, not a base class."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cosine_logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Cosine similarity of every row of a with every row of b, over the temperature.

    a: N x D, b: M x D (any scale) -> logits: N x M.
    """
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_source (MoCo's key encoder update).

    Buffers (e.g. BatchNorm running statistics) are copied, as they are not learned.
    """
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(m).add_(s.detach(), alpha=1 - m)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


def view_policy(method: str, views: dict, image_size: int, n_views: int, **extra) -> dict:
    """The JSON-able view policy every method writes through the augment stage."""
    return {"method": method, "image_size": image_size, "n_views": n_views, "views": dict(views), **extra}
