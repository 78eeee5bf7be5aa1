"""Energy-based model trained by (persistent) contrastive divergence, as JEM and IGEBM train one.

E_theta(x) = h(f(x)): a small SiLU MLP h on the encoder's pooled features f(x), which are what
evaluation uses. Training lowers E on data and raises it on negatives drawn from the model
(Hinton 2002, contrastive divergence): `mode: cd` starts each chain at the data point plus a
kick, `mode: pcd` keeps persistent chains in a replay buffer (Tieleman 2008; Du & Mordatch
2019, "Implicit Generation and Modeling with Energy-Based Models" = IGEBM), restarting a
`reinit_fraction` of them each step. The sampler is SGLD as in JEM (Grathwohl et al. 2020,
"Your Classifier is Secretly an Energy Based Model and You Should Treat it Like One"):
x <- x - step_size dE/dx + noise_std eps, 20 steps of step 1 and noise 0.01, a 10k buffer with
5 % restarts, small Gaussian noise on the data; IGEBM's alpha (E+^2 + E-^2) keeps energies finite.
Restarts (`restart`): `data` = a Gaussian with the batch's mean image and full pixel covariance
(JEM++'s informative initialisation, Yang & Ji 2021, which fits one to the data: blurry,
data-coloured images rather than white noise, so short chains start near the data's manifold);
`colour` = per-pixel noise with the mean image and the 3x3 colour covariance; `uniform` = JEM's
U[0, 1] noise. All clamped to [0, 1].

BatchNorm. Evaluation rebuilds the shared backbone (with BatchNorm) from `model` and compares it
with the random-init encoder of the same config, so the method keeps that backbone (models.py is
unchanged) and computes every energy with BatchNorm in eval mode (`bn_eval`), on the running
statistics: E is a per-sample function (train-mode BN would make it depend on the batch and
erase the shift between data and negatives) and SGLD's gradient of the summed energy is each
chain's own. With `objective: energy` no forward is in train mode, so the statistics stay at
their init (mean 0, var 1) and each BN is a learned per-channel affine map, as if removed (JEM
drops BN); the saved encoder is exactly the trained energy network. With `hybrid` only the
views' forward of the pair term is in train mode (as in SimCLR), updating the statistics the
energy and evaluation use. Departures from the papers: the backbone's ReLU and max-pool stay
(SiLU only in the heads); no spectral norm (IGEBM), whose reparametrisation would change the
state dict evaluation loads; the sampler runs under the loop's autocast (x stays fp32); the
positives of the CD term are the first `negatives` images of the batch (as many as chains).

`objective: hybrid` adds the contrastive energy over pairs of views that the literature uses
for representations (Kim & Ye 2022, "Energy-Based Contrastive Learning of Visual
Representations", EBCLR; the energy-based view of SimCLR's NT-Xent): E(v, v') =
-cos(g(f v), g(f v')) / temperature, trained by InfoNCE with the batch's other views as
negatives: loss = cd_loss + nce_weight * pair_nce (EBCLR's generative term is our E(x)). The
shipped configs run `hybrid`: on the CPU budget the pure energy's features stay below the
random-init encoder's (40.3 vs 44.3 % linear top-1 on the CIFAR-10 subset; README). Chains that collapse (negatives' pixel spread across the batch
below `collapse_ratio` x the data's) stop training with an EnergyError.

DDP: gradients are averaged by pretrain.py; each rank keeps its own replay buffer (rank 0's is
checkpointed and every rank resumes from it, so a resumed multi-process run is not bit-identical);
grad_clip clips each rank's gradient before the average. A failed check stops all ranks together.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe.augment import ViewMaker, to_float
from sslpipe.io import make_grid, save_figure, save_png
from sslpipe.methods.shared import view_policy
from sslpipe.models import DivergedError, Encoder, eval_mode

SAMPLER_KEYS = ("mode", "langevin_steps", "step_size", "noise_std", "init_noise", "restart", "data_noise")


class EnergyError(DivergedError):
    """The energies became non-finite or the chains collapsed; the message names the keys to change."""


def cd_loss(e_pos: Tensor, e_neg: Tensor, alpha: float) -> Tensor:
    """mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2) (IGEBM's objective).

    e_pos: N energies of data, e_neg: M energies of negatives (lower = more data-like). The
    difference is the CD gradient estimate; alpha regularises the magnitudes. Its analytic
    optimum, -1 / (2 alpha) at E+ = -1/(2 alpha), E- = +1/(2 alpha), means data and negatives
    are perfectly separated: a loss sitting there says the sampler no longer follows the model.
    """
    return e_pos.mean() - e_neg.mean() + alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())


def pair_nce(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """InfoNCE over the pair energy E(u, v) = -cos(u, v) / temperature (EBCLR; SimCLR's NT-Xent).

    z1, z2: N x D projections of two views. For each of the 2N views v_i with partner v_i+:
    E(v_i, v_i+) + log sum_{k != i} exp(-E(v_i, v_k)), averaged over the 2N views.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)                  # z: 2N x D
    logits = z @ z.T / temperature                                        # -E: 2N x 2N
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # target: 2N
    return F.cross_entropy(logits, target)


def langevin(energy_fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int, step_size: float,
             noise_std: float, bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """SGLD (JEM): K steps of x <- clamp(x - step_size dE/dx + noise_std eps, bounds), eps ~ N(0, I).

    energy_fn maps a batch (N first) to N energies that do not depend on one another. Only x is
    differentiated, so no parameter's .grad is touched. Returns (x_K, drift): x_K detached fp32,
    drift the mean |step_size dE/dx| per pixel over the K steps (0-d); drift / noise_std near 1
    means the chain samples, >> 1 that it descends the energy.
    """
    lo, hi = bounds
    x = x0.detach().float()
    drift = x.new_zeros(())
    with torch.enable_grad():  # the sampler needs dE/dx even when called under no_grad
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy_fn(x).sum(), x)
            move = step_size * grad.float()
            drift = drift + move.abs().mean()
            x = (x.detach() - move + noise_std * torch.randn_like(x)).clamp_(lo, hi)
    return x.detach(), drift / steps


def kick(x: Tensor, std: float) -> Tensor:
    """Where a cd-mode chain starts: the data point plus Gaussian noise of `std`, in [0, 1]."""
    return (x + std * torch.randn_like(x)).clamp_(0, 1)


def colour_noise(ref: Tensor, n: int) -> Tensor:
    """n images of per-pixel Gaussian noise with ref's mean image and 3x3 colour covariance.

    ref: M x 3 x H x W in [0, 1] -> n x 3 x H x W in [0, 1] (clamped), fp32.
    """
    with torch.autocast(ref.device.type, enabled=False):  # fp32: a bf16 covariance is not PSD
        ref = ref.float()
        mu = ref.mean(0, keepdim=True)                                    # mu: 1 x 3 x H x W
        d = (ref - mu).transpose(0, 1).reshape(3, -1)                     # d: 3 x MHW
        lam, vec = torch.linalg.eigh(d @ d.T / d.shape[1])                # cov: 3 x 3 (grey: rank 1)
        root = vec * lam.clamp_min(1e-8).sqrt()                           # root @ root.T = cov
        eps = torch.randn(n, *ref.shape[1:], device=ref.device)
        return (mu + torch.einsum("cd,ndhw->nchw", root, eps)).clamp_(0, 1)


def data_gaussian(ref: Tensor, n: int) -> Tensor:
    """n draws of N(mu, Sigma), mu and Sigma ref's mean image and pixel covariance (rank <= M - 1):
    x = mu + eps D / sqrt(M - 1), D the M centred images, eps ~ N(0, I_M) per draw (no CHW x CHW
    matrix is formed). ref: M x C x H x W in [0, 1] -> n x C x H x W in [0, 1] (clamped), fp32."""
    with torch.autocast(ref.device.type, enabled=False):
        ref = ref.float()
        mu = ref.mean(0, keepdim=True)                                    # mu: 1 x C x H x W
        d = (ref - mu).flatten(1)                                         # D: M x CHW
        eps = torch.randn(n, len(ref), device=ref.device) / max(len(ref) - 1, 1) ** 0.5  # n x M
        return (mu + (eps @ d).view(n, *ref.shape[1:])).clamp_(0, 1)


RESTARTS = {"data": data_gaussian, "colour": colour_noise,
            "uniform": lambda ref, n: torch.rand(n, *ref.shape[1:], device=ref.device)}


def pcd_draw(buffer_size: int, n: int, reinit_fraction: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Replay-buffer slots for n chains (distinct when n <= buffer_size, so the write-back is
    unambiguous) and a mask of those to restart (JEM, IGEBM: ~5 %)."""
    if n <= buffer_size:
        slots = torch.randperm(buffer_size, device=device)[:n]
    else:
        slots = torch.randint(buffer_size, (n,), device=device)
    return slots, torch.rand(n, device=device) < reinit_fraction


def spread(x: Tensor) -> Tensor:
    """Mean over pixels of the std across the batch (0-d): ~0 when every chain is the same image."""
    return x.float().std(0).mean()


class CD(nn.Module):
    name = "cd"
    divergence_hint = "lower cd.step_size or raise cd.alpha"  # appended to the loop's non-finite message

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        return view_policy("cd", cfg["views"], image_size, n_views=2 if cfg["objective"] == "hybrid" else 1,
                           langevin={k: cfg[k] for k in SAMPLER_KEYS})

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        # Negatives need a trained model; the last column shows where a chain starts instead.
        views, s = ViewMaker(policy)(x), policy["langevin"]
        start = kick(views[0], s["init_noise"]) if s["mode"] == "cd" else RESTARTS[s["restart"]](views[0], len(x))
        return [*views, start]

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        d = encoder.feat_dim
        self.encoder, self.cfg = encoder, cfg
        self.head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))  # h: features -> energy
        self.hybrid = cfg["objective"] == "hybrid"
        self.objective = "energy (CD) + nce_weight x pair-energy InfoNCE of two views" if self.hybrid else "energy (CD)"
        if self.hybrid:  # g: features -> the pair energy's embedding
            self.proj = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, cfg["proj_dim"]))
        self.views = ViewMaker(policy)
        self.sampler = dict(policy["langevin"])
        if self.sampler["mode"] == "pcd":
            size = policy["image_size"]
            # Filled with restarts at the first step (data and colour restarts need data). fp16 resolves
            # <= 2^-11, far below the sampler's noise; uint8 would round away the small moves.
            self.register_buffer("buffer", torch.zeros(cfg["buffer_size"], 3, size, size).half())
            self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
            self._filled = False  # host copy of `filled`: no sync per step
        # The loop does not clip: an element-wise value clip on every parameter's gradient, applied
        # as it is made (the sampler's autograd.grad w.r.t. x never fires these hooks).
        c = cfg["grad_clip"]
        for p in self.parameters():
            p.register_hook(lambda g, c=c: g.clamp(-c, c))

    @contextmanager
    def bn_eval(self):
        """BatchNorm in eval mode (running statistics) inside: every energy is a per-sample function."""
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in bns:
            m.eval()
        try:
            yield
        finally:
            for m in bns:
                m.train()

    def energy_of(self, h: Tensor) -> Tensor:  # h: N x D features -> N energies (fp32)
        e = self.head(h).squeeze(1).float()
        b = self.cfg["energy_bound"]  # soft bound: ~identity for |E| << b, gradient never exactly 0
        return b * torch.tanh(e / b)

    def energy(self, x: Tensor) -> Tensor:  # x: N x 3 x H x W in [0, 1] -> N (fp32)
        with self.bn_eval():
            return self.energy_of(self.encoder(x))

    def restart(self, ref: Tensor, n: int) -> Tensor:  # ref: the batch whose statistics restarts share
        return RESTARTS[self.sampler["restart"]](ref, n)

    def sample(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """SGLD negatives and drift from starting points x0 (N x 3 x H x W in [0, 1]), detached."""
        s = self.sampler
        return langevin(self.energy, x0, s["langevin_steps"], s["step_size"], s["noise_std"])

    def starts(self, x_pos: Tensor, m: int, reinit_fraction: float, ref: Tensor) -> tuple[Tensor, Tensor | None]:
        """m chain starts (and their buffer slots in pcd mode, else None); restarts from `ref`'s statistics."""
        if self.sampler["mode"] == "cd":
            return kick(x_pos[:m], self.sampler["init_noise"]), None
        if not self._filled:
            if not bool(self.filled):
                self.buffer.copy_(self.restart(ref, len(self.buffer)).to(self.buffer.dtype))
                self.filled.fill_(True)
            self._filled = True
        slots, reinit = pcd_draw(len(self.buffer), m, reinit_fraction, x_pos.device)
        x0 = self.buffer[slots].float()
        return torch.where(reinit[:, None, None, None], self.restart(ref, m), x0), slots

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        views = self.views(x)
        n = len(views[0])
        m = min(c["negatives"] or n, n)
        x_pos = kick(views[0][:m], self.sampler["data_noise"])           # JEM: noisy data
        x0, slots = self.starts(x_pos, m, c["reinit_fraction"], ref=views[0])
        x_neg, drift = self.sample(x0)
        e = self.energy(torch.cat([x_pos, x_neg.to(x_pos.dtype)]))        # e: 2M
        e_pos, e_neg = e.chunk(2)
        spread_ratio = spread(x_neg) / spread(x_pos).clamp_min(1e-6)
        # One host sync per step (small next to the K sampler passes); under DDP one collective
        # more, so that every rank raises, not one alone.
        non_finite, collapsed = torch.stack([~torch.isfinite(e).all(), spread_ratio < c["collapse_ratio"]]).tolist()
        if ddp.any_rank(non_finite or collapsed, e.device):
            raise EnergyError(
                "cd: the energies became non-finite (NaN). Lower cd.step_size, raise cd.alpha, lower cd.grad_clip "
                "or pretrain.lr, or use precision: fp32." if non_finite else
                f"cd: the Langevin chains collapsed: the negatives' spread across the batch is {spread_ratio.item():.3f} "
                f"of the data's (below cd.collapse_ratio = {c['collapse_ratio']}). Lower cd.step_size or pretrain.lr, "
                "or raise cd.noise_std or cd.alpha." if collapsed else "cd: another process stopped (see its error).")
        if slots is not None:  # only after the check, so a failed step never poisons the buffer
            self.buffer[slots] = x_neg.to(self.buffer.dtype)
        l_cd = cd_loss(e_pos, e_neg, c["alpha"])
        with torch.no_grad():
            e_noise = self.energy(self.restart(views[0], 16)).mean()
        logs = {"e_pos": e_pos.mean(), "e_neg": e_neg.mean(), "e_gap": e_pos.mean() - e_neg.mean(),
                "e_noise": e_noise, "drift_noise": drift / max(self.sampler["noise_std"], 1e-12),
                "neg_spread": spread_ratio, "l_cd": l_cd}
        loss = l_cd
        if self.hybrid:  # the views' forward is the only one with train-mode BatchNorm
            z = self.proj(self.encoder(torch.cat(views)))                 # z: 2N x proj_dim
            l_nce = pair_nce(z[:n], z[n:], c["temperature"])
            loss, logs["l_nce"] = l_cd + c["nce_weight"] * l_nce, l_nce
        return loss, {k: v.detach().float() for k, v in logs.items()}

    @torch.no_grad()
    def diagnostics(self, x: Tensor, out_dir: str | Path) -> dict[str, float]:
        """Energy histograms of data, fresh negatives and restart noise; data above negatives (grid)."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        with eval_mode(self):
            x01 = to_float(x)
            x0, _ = self.starts(x01, len(x01), 0.0, ref=x01)  # pcd: a fresh run from the buffer, not written back
            x_neg, drift = self.sample(x0)
            energies = {name: self.energy(v).cpu().numpy()
                        for name, v in (("data", x01), ("negatives", x_neg), ("noise", self.restart(x01, len(x01))))}

        fig = Figure(figsize=(5.5, 3.5))
        ax = fig.add_subplot()
        bins = np.histogram_bin_edges(np.concatenate(list(energies.values())), bins=40)
        for name, e in energies.items():
            ax.hist(e, bins=bins, alpha=0.5, label=f"{name} (mean {e.mean():.3g})")
        ax.set(xlabel="energy E(x) (lower = more data-like)", ylabel="count", title="CD energies")
        ax.legend()
        out_dir = Path(out_dir)
        save_figure(fig, out_dir / "cd_energy_histogram.png")
        # First row: data; the other seven: negatives. Enlarged (nearest) to >= 512 px tall.
        tiles = torch.cat([x01[:8], x_neg[:56]]).float().cpu()
        save_png(make_grid(tiles, nrow=8), out_dir / "cd_negatives.png", min_height=512)
        out = {f"cd_energy_{name}": float(e.mean()) for name, e in energies.items()}
        out["cd_drift_noise"] = float(drift) / max(self.sampler["noise_std"], 1e-12)
        out["cd_neg_spread"] = float(spread(x_neg) / spread(x01).clamp_min(1e-6))
        return out
