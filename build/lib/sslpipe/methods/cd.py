"""Energy-based model trained by (persistent) contrastive divergence.

Contrastive divergence (Hinton 2002) lowers the energy E_theta(x) on data and raises it on
negatives drawn from the model by a short MCMC run started at the data; persistent CD
(Tieleman 2008) keeps the chains alive across updates instead. Following Du & Mordatch (2019,
"Implicit Generation and Modeling with Energy-Based Models") the sampler is Langevin dynamics
in pixel space, the persistent chains live in a replay buffer with a few restarted from
uniform noise each batch, and a small penalty on E^2 keeps the energies from drifting. The
energy is a linear head on the encoder's features, which are what evaluation uses (the
energy-based view of SSL in the NYU Deep Learning course notes).

DDP (several processes): gradients are averaged and BatchNorm spans the global batch
(pretrain.py), but each rank keeps its own replay buffer (its chains, its restarts): the
buffers start equal and then drift apart, which only diversifies the negatives. Rank 0's
buffer goes into the checkpoint and every rank resumes from it, so a resumed multi-process
run is not bit-identical to an uninterrupted one. The grad_clip hooks clip each rank's
gradient before the average, not the average. A non-finite energy stops all ranks together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe.augment import ViewMaker, to_float
from sslpipe.io import atomic_path, make_grid, save_png
from sslpipe.methods.shared import view_policy
from sslpipe.models import Encoder


class EnergyError(RuntimeError):
    """The energies became non-finite; the message names the config keys to change."""


def cd_loss(e_pos: Tensor, e_neg: Tensor, alpha: float) -> Tensor:
    """mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2) (Du & Mordatch 2019).

    e_pos: N energies of data, e_neg: M energies of negatives (lower = more data-like).
    The first two terms are the contrastive divergence gradient estimate (Hinton 2002); the
    alpha term regularises the energy magnitudes, since the difference alone is shift-invariant.
    """
    return e_pos.mean() - e_neg.mean() + alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())


def langevin(energy_fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int, step_size: float,
             noise_std: float, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """K steps of x <- clamp(x - step_size/2 * dE/dx + noise_std * eps, bounds), eps ~ N(0, I).

    energy_fn maps a batch (any shape, N first) to N energies. The gradient of the summed
    energy is each sample's own gradient only if samples do not interact (true for eval-mode
    BatchNorm, not train-mode). Only x is differentiated (torch.autograd.grad), so no
    parameter's .grad is touched; x0 is detached and so is the result. Returns fp32.
    """
    lo, hi = bounds
    x = x0.detach().float()
    with torch.enable_grad():  # the sampler needs dE/dx even when called under no_grad
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy_fn(x).sum(), x)
            x = (x.detach() - 0.5 * step_size * grad + noise_std * torch.randn_like(x)).clamp_(lo, hi)
    return x.detach()


def kick(x: Tensor, std: float) -> Tensor:
    """Where a cd-mode chain starts: the data point plus Gaussian noise of `std`, in [0, 1]."""
    return (x + std * torch.randn_like(x)).clamp_(0, 1)


def pcd_draw(buffer_size: int, n: int, reinit_fraction: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Replay-buffer slots for n chains (distinct when n <= buffer_size, so the write-back is
    unambiguous) and a mask of those restarted from uniform noise (Du & Mordatch: ~5%)."""
    if n <= buffer_size:
        slots = torch.randperm(buffer_size, device=device)[:n]
    else:
        slots = torch.randint(buffer_size, (n,), device=device)
    return slots, torch.rand(n, device=device) < reinit_fraction


class CD(nn.Module):
    name = "cd"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        sampler = {"mode": cfg["mode"], "steps": cfg["langevin_steps"], "step_size": cfg["step_size"],
                   "noise_std": cfg["noise_std"], "init_noise": cfg["init_noise"]}
        return view_policy("cd", cfg["views"], image_size, n_views=1, langevin=sampler)

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        # A negative needs a trained model, which the augment stage does not have; the second
        # column shows where a cd-mode chain starts instead: the view plus the init kick.
        (v,) = ViewMaker(policy)(x, 1)
        return [v, kick(v, policy["langevin"]["init_noise"])]

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feat_dim, 1)
        self.views = ViewMaker(policy)
        self.sampler = dict(policy["langevin"])
        self.alpha, self.bound, self.reinit_fraction = cfg["alpha"], cfg["energy_bound"], cfg["reinit_fraction"]
        if self.sampler["mode"] == "pcd":
            size = policy["image_size"]
            # Particles in [0, 1], initialised uniform. fp16 halves fp32's memory and still
            # resolves <= 2^-11, far below the sampler's noise (0.005); uint8 (1/255) would round
            # away the small per-step moves of persistent chains.
            self.register_buffer("buffer", torch.rand(cfg["buffer_size"], 3, size, size).half())
        # The training loop does not clip and opt.step() follows backward() directly, so clip
        # where the gradient is made: an element-wise value clip (to +-grad_clip) on every
        # parameter, applied before it is accumulated into .grad. Langevin's autograd.grad
        # w.r.t. x never computes parameter gradients, so these hooks do not fire there.
        c = cfg["grad_clip"]
        for p in self.parameters():
            p.register_hook(lambda g, c=c: g.clamp(-c, c))

    def energy(self, x: Tensor) -> Tensor:  # x: N x 3 x H x W in [0, 1] -> N (fp32)
        e = self.head(self.encoder(x)).squeeze(1).float()
        # Soft bound: ~identity for |E| << energy_bound, never beyond it, gradient never exactly 0
        # (a hard clamp would stop learning on every clipped sample).
        return self.bound * torch.tanh(e / self.bound)

    def sample(self, x0: Tensor) -> Tensor:
        """Langevin negatives from starting points x0 (N x 3 x H x W in [0, 1]), fp32, detached."""
        was_training = self.training
        # Eval mode: the K sampler forwards must not pull BatchNorm's running statistics towards
        # negatives, and each sample's energy must not depend on the rest of the batch (see
        # `langevin`). fp32 even under bf16 autocast: a bf16 dE/dx (8-bit mantissa) is too coarse
        # for the small pixel moves that the K steps add up.
        self.eval()
        try:
            with torch.autocast(x0.device.type, enabled=False):
                s = self.sampler
                return langevin(self.energy, x0, s["steps"], s["step_size"], s["noise_std"])
        finally:
            self.train(was_training)

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        (x_pos,) = self.views(x, 1)
        slots = None
        if self.sampler["mode"] == "pcd":
            slots, reinit = pcd_draw(len(self.buffer), len(x_pos), self.reinit_fraction, x_pos.device)
            x0 = self.buffer[slots].float()
            x0 = torch.where(reinit[:, None, None, None], torch.rand_like(x0), x0)
        else:
            x0 = kick(x_pos, self.sampler["init_noise"])
        x_neg = self.sample(x0)
        # One forward over data and negatives: train-mode BatchNorm normalising each batch on its
        # own would erase the shift between them, the very thing the energy has to tell apart.
        e = self.energy(torch.cat([x_pos, x_neg.to(x_pos.dtype)]))  # e: 2N
        e_pos, e_neg = e.chunk(2)
        # One host sync per step: small next to the K forward/backward passes of the sampler.
        # Under DDP one collective more, so that every rank raises, not one alone.
        if ddp.any_rank(not torch.isfinite(e).all(), e.device):
            raise EnergyError("cd: the energies became non-finite (NaN). Lower cd.step_size, raise cd.alpha, "
                              "lower cd.grad_clip or pretrain.lr, or use precision: fp32.")
        if slots is not None:  # only after the check, so a failed step never poisons the buffer
            self.buffer[slots] = x_neg.to(self.buffer.dtype)
        return cd_loss(e_pos, e_neg, self.alpha), {"e_pos": e_pos.detach().mean(), "e_neg": e_neg.detach().mean()}

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def diagnostics(self, x: Tensor, out_dir: str | Path) -> dict[str, float]:
        """Energy histograms of data, fresh negatives and uniform noise; a grid of negatives."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        was_training = self.training
        self.eval()
        x01 = to_float(x)
        if self.sampler["mode"] == "pcd":  # a fresh run from the buffer, not written back
            x0 = self.buffer[pcd_draw(len(self.buffer), len(x01), 0.0, x01.device)[0]].float()
        else:
            x0 = kick(x01, self.sampler["init_noise"])
        x_neg = self.sample(x0)
        energies = {name: self.energy(v).cpu().numpy()
                    for name, v in (("data", x01), ("negatives", x_neg), ("noise", torch.rand_like(x01)))}
        self.train(was_training)

        fig = Figure(figsize=(5.5, 3.5))
        ax = fig.add_subplot()
        bins = np.histogram_bin_edges(np.concatenate(list(energies.values())), bins=40)
        for name, e in energies.items():
            ax.hist(e, bins=bins, alpha=0.5, label=f"{name} (mean {e.mean():.3g})")
        ax.set(xlabel="energy E(x) (lower = more data-like)", ylabel="count", title="CD energies")
        ax.legend()
        out_dir = Path(out_dir)
        with atomic_path(out_dir / "cd_energy_histogram.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        save_png(make_grid(x_neg[:64].float().cpu(), nrow=8), out_dir / "cd_negatives.png")
        return {f"cd_energy_{name}": float(e.mean()) for name, e in energies.items()}
