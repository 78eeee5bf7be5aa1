"""PIRL: Self-Supervised Learning of Pretext-Invariant Representations (Misra & van der Maaten 2020).

An image I and its jigsaw transform I^t should have similar representations: f(v_I) is a
linear head on the encoder's features of the whole view; g(v_I^t) is a linear head on the
encoder's features of its grid x grid patches, each encoded on its own and concatenated in
the shuffled order. Both are contrasted (the paper's NCE loss) with m_I, a memory-bank running
average of f(v_I), against negatives drawn from the same bank.

Choices where the paper leaves room or we simplify (all cheap to revisit):
- Augmentation: one view v of I (the `views` policy) is used for f and is also what the jigsaw
  cuts; the paper augments I and each patch independently (crop inside its cell, colour jitter).
- Negatives D_N: `num_negatives` distinct bank rows (capped at num_train) drawn uniformly once
  per batch and shared by all its images. Nothing is excluded, so a row may be an image's own
  m_I; with a large bank that happens rarely (|D_N|/num_train per image) and only adds noise.
- Bank update: f(v_I) is L2-normalised before the average (similarity is cosine, so its scale
  should not weight the average), then m_I <- a m_I + (1 - a) f(v_I) is re-normalised, as in
  the released code (VISSL's NCEAverage.update_memory).
- DDP (several processes): the negatives are rank 0's draw (broadcast), the bank updates of
  all ranks (indices and rows) are gathered and written on every rank, so the bank stays the
  same everywhere and one step equals the single-process step on the global batch; paper
  mode's log Z is estimated from the whole first global batch.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe.augment import ViewMaker, jigsaw, unjigsaw
from sslpipe.methods.shared import cosine_logits, view_policy
from sslpipe.models import Encoder


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _fp32(fn):
    """Run a loss in (at least) float32 with autocast off: s / tau with tau = 0.07 magnifies
    bf16's ~1e-2 rounding of cosine similarities to ~0.1 in the logits."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*(_f32(t) if isinstance(t, Tensor) else t for t in args), **kwargs)
    return wrapped


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Rowwise cosine similarity: a, b: N x D -> N (the same normalisation as cosine_logits)."""
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)


def _log_noise(logits_to_negatives: Tensor, mode: str, num_negatives: int, num_data: int | None,
               log_z: float = 0.0) -> Tensor:
    """log of the noise term in h(., b), given s(b, m_I') / tau for every negative I' (... x K -> ...).

    softmax (the notes): log sum_{I' in D_N} exp(s(b, m_I') / tau).
    paper: log(|D_N| / N_data) + log Z, the same for every b. Dividing exp(s/tau) by the
    partition constant Z (estimated once, see PIRL.loss) is the same as multiplying the noise
    term by Z.
    """
    if mode == "softmax":
        return torch.logsumexp(logits_to_negatives, dim=-1)
    if mode == "paper":
        if not num_data:
            raise ValueError("nce mode 'paper' needs num_data (the size of the training set)")
        return torch.full_like(logits_to_negatives[..., 0], math.log(num_negatives / num_data) + log_z)
    raise ValueError(f"unknown nce mode '{mode}': use softmax or paper")


def _log_h_pair(x: Tensor, log_noise: Tensor) -> tuple[Tensor, Tensor]:
    """(log h, log(1 - h)) for h = e^x / (e^x + e^log_noise), both exact in log space.

    1 - h = noise / (e^x + noise), so neither needs a clamp: they stay finite even where h
    rounds to 0 or 1 in float32 (e.g. tau = 0.07 and s near 1).
    """
    z = torch.logaddexp(x, log_noise)
    return x - z, log_noise - z


@_fp32
def h(a: Tensor, b: Tensor, negatives: Tensor, tau: float, mode: str = "softmax",
      num_data: int | None = None, log_z: float = 0.0) -> Tensor:
    """PIRL's h(a, b): the probability that (a, b) is a positive pair, rowwise.

    a, b: N x D; negatives: K x D (the bank entries m_I' of D_N) -> N.
    softmax: h(a, b) = exp(s(a,b)/tau) / (exp(s(a,b)/tau) + sum_{I' in D_N} exp(s(b, m_I')/tau)).
    paper:   h(a, b) = exp(s(a,b)/tau) / (exp(s(a,b)/tau) + |D_N| / N_data).
    s is cosine similarity. The noise term always belongs to the second argument b.
    """
    x = _cos(a, b) / tau                                       # x: N
    to_neg = cosine_logits(b, negatives, tau)                  # to_neg: N x K
    return _log_h_pair(x, _log_noise(to_neg, mode, len(negatives), num_data, log_z))[0].exp()


@_fp32
def l_nce(a: Tensor, b: Tensor, negatives: Tensor, tau: float, mode: str = "softmax",
          num_data: int | None = None, log_z: float = 0.0) -> Tensor:
    """L_NCE(a, b) = -log h(a, b) - sum_{I' in D_N} log(1 - h(b, m_I')), per row (PIRL's L_NCE).

    a, b: N x D; negatives: K x D -> N. h as in `h`, so in h(b, m_I') the noise term is that
    of m_I': in softmax mode sum_{I''} exp(s(m_I', m_I'')/tau) over all of D_N, including
    I'' = I' itself (exp(1/tau)), which bounds h(b, m_I') <= 1/2. In paper mode it is the
    constant |D_N| / N_data.

    Where the paper and the notes differ: the paper's noise term is the constant
    |D_N| / N_data (the NCE prior of Wu et al. 2018 with uniform noise); the notes put the
    negatives' similarities there, which turns -log h(a, b) into the InfoNCE softmax
    cross-entropy. The paper prints exp(s/tau) without a partition function; its released
    code (after Wu et al. 2018) divides exp(s/tau) by a constant Z estimated on the first
    batch. `log_z` is that log Z (0 gives the printed formula, under which, with small tau,
    the positive term saturates at h ~ 1 and the negative terms dominate).
    """
    k = len(negatives)
    x_pos = _cos(a, b) / tau                                 # x_pos: N, s(a, b)/tau
    x_neg = cosine_logits(b, negatives, tau)                   # x_neg: N x K, s(b, m_I')/tau
    log_h_pos, _ = _log_h_pair(x_pos, _log_noise(x_neg, mode, k, num_data, log_z))
    # The noise term of h(b, m_I') depends on m_I' only: one K x K similarity, shared by rows.
    neg_noise = _log_noise(cosine_logits(negatives, negatives, tau), mode, k, num_data, log_z)  # K
    _, log_1m_h_neg = _log_h_pair(x_neg, neg_noise[None, :])  # log_1m_h_neg: N x K
    return -log_h_pos - log_1m_h_neg.sum(dim=1)


def l_pirl(m: Tensor, f: Tensor, g: Tensor, negatives: Tensor, tau: float, lambda_: float,
           mode: str = "softmax", num_data: int | None = None, log_z: float = 0.0) -> Tensor:
    """The PIRL loss, averaged over the batch: lambda L_NCE(m_I, g(v_I^t)) + (1 - lambda) L_NCE(m_I, f(v_I)).

    m: N x D bank entries of the batch (before this step's update); f, g: N x D head outputs;
    negatives: K x D -> scalar.
    """
    jig = l_nce(m, g, negatives, tau, mode, num_data, log_z)   # jig: N
    img = l_nce(m, f, negatives, tau, mode, num_data, log_z)   # img: N
    return (lambda_ * jig + (1 - lambda_) * img).mean()


class PIRL(nn.Module):
    name = "pirl"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        return view_policy("pirl", cfg["views"], image_size, n_views=1, jigsaw={"grid": cfg["grid"]})

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        """[the view, its jigsaw as trained on] (the shuffled patches reassembled in their new order)."""
        (view,) = ViewMaker(policy)(x, 1)
        patches, perm = jigsaw(view, policy["jigsaw"]["grid"])
        identity = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
        shuffled = view.clone()  # a border the grid does not cover (H % grid) is shown as is
        grid_px = unjigsaw(patches, identity)
        shuffled[:, :, : grid_px.shape[2], : grid_px.shape[3]] = grid_px
        return [view, shuffled]

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        self.encoder = encoder
        self.grid = policy["jigsaw"]["grid"]
        d = encoder.feat_dim
        # f and g are linear projections, as in the paper. Its released g projects each patch with
        # shared weights, concatenates and projects again: still a linear map of the concatenation,
        # so this one unconstrained linear layer contains it.
        self.f = nn.Linear(d, cfg["proj_dim"])
        self.g = nn.Linear(self.grid ** 2 * d, cfg["proj_dim"])
        self.temperature = cfg["temperature"]
        self.bank_momentum = cfg["bank_momentum"]
        self.lambda_ = cfg["lambda_"]
        self.nce = cfg["nce"]
        self.num_train = num_train
        self.num_negatives = min(cfg["num_negatives"], num_train)
        self.views = ViewMaker(policy)
        self.register_buffer("bank", F.normalize(torch.randn(num_train, cfg["proj_dim"]), dim=1))
        # paper mode: log Z, set once from the first batch (NaN until then), kept for resuming.
        self.register_buffer("log_z", torch.tensor(float("nan")))

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        (v,) = self.views(x, 1)                                  # v: N x 3 x H x W
        patches, _ = jigsaw(v, self.grid)                        # patches: N x P x 3 x h x w
        n = len(v)
        f = self.f(self.encoder(v))                              # f: N x proj_dim
        # All N*P patches in one encoder call; the features are concatenated in shuffled order.
        patch_feats = self.encoder(patches.flatten(0, 1))        # patch_feats: N*P x D
        g = self.g(patch_feats.reshape(n, -1))                   # g: N x proj_dim
        # Indexing copies, so the update below leaves the entries this loss uses unchanged.
        m = self.bank[idx]                                       # m: N x proj_dim
        neg_idx = ddp.broadcast(torch.randperm(self.num_train, device=self.bank.device)[: self.num_negatives])
        negatives = self.bank[neg_idx]                           # negatives: K x proj_dim
        if self.nce == "paper" and torch.isnan(self.log_z):
            # Z = N_data * mean exp(s(f, m_I')/tau), so that exp(s/tau)/Z averages 1/N_data
            # over the data, as a probability under uniform noise should (Wu et al. 2018).
            with torch.no_grad():
                x = cosine_logits(ddp.gather_nograd(f.detach().float()), negatives.float(), self.temperature)
                self.log_z.fill_((torch.logsumexp(x.flatten(), 0) - math.log(x.numel())).item()
                                 + math.log(self.num_train))
        log_z = self.log_z.item() if self.nce == "paper" else 0.0
        loss = l_pirl(m, f, g, negatives, self.temperature, self.lambda_, self.nce, self.num_train, log_z)
        with torch.no_grad():
            f_unit = F.normalize(f.detach().float(), dim=1)
            bank_sim = (f_unit * m).sum(1).mean()
            new = F.normalize(self.bank_momentum * m + (1 - self.bank_momentum) * f_unit, dim=1)
            # Every rank's rows, on every rank (distinct indices: one permutation's slices).
            self.bank[ddp.gather_nograd(idx)] = ddp.gather_nograd(new.to(self.bank.dtype))
        return loss, {"bank_sim": bank_sim}

    def after_step(self) -> None:
        pass
