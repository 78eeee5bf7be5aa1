"""PIRL: Self-Supervised Learning of Pretext-Invariant Representations (Misra & van der Maaten 2020).

An image I and its jigsaw transform I^t should have similar representations: f(v_I) is a
linear head on the encoder's features of a view of I; g(v_I^t) is a linear head on the
concatenated features of I^t's grid x grid tiles, each augmented and encoded on its own and
concatenated in shuffled order. Both are contrasted (L_NCE) with m_I, a memory-bank running
average of f(v_I), against negatives D_N drawn from the same bank.

- Views: v_I is one view of the `views` policy. I^t is cut from its own random resized crop of I
  (area ~ U(jigsaw_scale)); each tile is a box of `tile_crop` of its cell's side at a random
  place in the cell, with its own flip and colour jitter / greyscale (`augment.jigsaw_view`),
  as the paper (crop inside the cell, jitter each patch independently).
- Negatives: one draw of K + 1 distinct bank rows per batch (shared by its rows, and by all
  ranks under DDP: rank 0's draw, broadcast). Row n's D_N is those candidates without its own
  entry m_I, or, where m_I is not among them, the first K: exactly K distinct rows, uniform
  over the K-subsets of the bank without I (the first K of a uniform permutation with I taken
  out). Implemented as a per-row mask over the K + 1 candidates (`negative_mask`).
- `nce: softmax` (the course notes): h(a, b) = e^{s(a,b)/tau} / (e^{s(a,b)/tau} +
  sum_{I' in D_N} e^{s(b, m_I')/tau}), so -log h(m_I, .) is InfoNCE's softmax cross-entropy
  over D_N. `nce: paper`: the paper's h with the constant noise term |D_N| / N_data (NCE under
  uniform noise, Wu et al. 2018) and exp(s/tau) divided by a partition constant Z estimated
  on the first batch, as the released code does (the printed formula has no Z). Both then
  add the paper's sum over D_N of -log(1 - h(g or f, m_I')).
- Bank update: f(v_I) is L2-normalised before the average (similarity is cosine, so its scale
  should not weight the average), then m_I <- a m_I + (1 - a) f(v_I) is re-normalised, as in
  the released code (VISSL's NCEAverage.update_memory).
- DDP (several processes): the bank updates of all ranks (indices and rows) are gathered and
  written on every rank, so the bank stays the same everywhere and one step equals the
  single-process step on the global batch; paper mode's log Z uses the whole first global batch.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe.augment import ViewMaker, jigsaw, jigsaw_view, to_float, unjigsaw
from sslpipe.methods.shared import cosine_logits, view_policy
from sslpipe.models import Encoder


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t


def _fp32(fn):
    """Run a loss in (at least) float32 with autocast off: s / tau with tau = 0.07 magnifies
    bf16's ~1e-2 rounding of cosine similarities to ~0.1 in the logits."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*(_f32(t) if isinstance(t, Tensor) else t for t in args),
                      **{k: _f32(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()})
    return wrapped


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Rowwise cosine similarity: a, b: N x D -> N (the same normalisation as cosine_logits)."""
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)


def negative_mask(candidates: Tensor, idx: Tensor) -> Tensor:
    """keep: N x (K+1), row n's D_N among K + 1 distinct candidate bank rows: all but idx[n]
    where it is a candidate, else all but the last. Every row keeps exactly K, never its own."""
    own = candidates[None, :] == idx[:, None]                      # own: N x (K+1), <= 1 per row
    last = torch.zeros_like(own)
    last[:, -1] = True
    return ~torch.where(own.any(1, keepdim=True), own, last)


def _log_noise(to_neg: Tensor, mode: str, num_data: int | None, log_z: float, keep: Tensor | None) -> Tensor:
    """log of the noise term of h(., b), from s(b, m_I')/tau for every candidate I' (N x K -> N).

    Row n's D_N is the candidates where keep[n] (all of them without keep).
    softmax: log sum_{I' in D_N} exp(s(b, m_I')/tau). paper: log(|D_N| / N_data) + log Z, the
    same for every b (dividing exp(s/tau) by Z is multiplying the noise term by Z).
    """
    if mode == "softmax":
        return torch.logsumexp(to_neg if keep is None else to_neg.masked_fill(~keep, -math.inf), dim=-1)
    if mode == "paper":
        if not num_data:
            raise ValueError("nce mode 'paper' needs num_data (the size of the training set)")
        count = to_neg.new_full(to_neg.shape[:-1], to_neg.shape[-1]) if keep is None else keep.sum(-1).to(to_neg)
        return (count / num_data).log() + log_z
    raise ValueError(f"unknown nce mode '{mode}': use softmax or paper")


def _log_noise_of_negatives(negatives: Tensor, to_neg: Tensor, tau: float, mode: str, num_data: int | None,
                            log_z: float, keep: Tensor | None) -> Tensor:
    """The noise term of h(b, m_I') for every row n and candidate I' (N x K, or 1 x K).

    softmax: log sum_{I'' in D_N(n)} exp(s(m_I', m_I'')/tau), I'' = I' included: one K x K
    similarity shared by the rows; with a mask, row n's sums are one matmul with keep[n] after a
    per-candidate max shift (the diagonal, so a kept candidate's sum is >= 1 and its log finite).
    """
    if mode != "softmax":
        return _log_noise(to_neg, mode, num_data, log_z, keep)[:, None]
    sim = cosine_logits(negatives, negatives, tau)                 # sim: K x K
    if keep is None:
        return torch.logsumexp(sim, dim=1)[None, :]
    top = sim.max(dim=1).values                                    # top: K
    sums = keep.to(sim.dtype) @ (sim - top[:, None]).exp().T       # sums: N x K
    return torch.where(keep, sums, torch.ones_like(sums)).log() + top[None, :]


def _log_h_pair(x: Tensor, log_noise: Tensor) -> tuple[Tensor, Tensor]:
    """(log h, log(1 - h)) for h = e^x / (e^x + e^log_noise), both exact in log space, so they
    stay finite where h rounds to 0 or 1 in float32 (e.g. tau = 0.07 and s near 1)."""
    z = torch.logaddexp(x, log_noise)
    return x - z, log_noise - z


@_fp32
def h(a: Tensor, b: Tensor, negatives: Tensor, tau: float, mode: str = "softmax",
      num_data: int | None = None, log_z: float = 0.0, keep: Tensor | None = None) -> Tensor:
    """PIRL's h(a, b): the probability that (a, b) is a positive pair, rowwise.

    a, b: N x D; negatives: K x D (the bank entries m_I'); keep: N x K (row n's D_N) -> N.
    softmax: h(a, b) = exp(s(a,b)/tau) / (exp(s(a,b)/tau) + sum_{I' in D_N} exp(s(b, m_I')/tau)).
    paper:   h(a, b) = (exp(s(a,b)/tau)/Z) / (exp(s(a,b)/tau)/Z + |D_N| / N_data).
    s is cosine similarity. The noise term always belongs to the second argument b.
    """
    x = _cos(a, b) / tau                                           # x: N
    to_neg = cosine_logits(b, negatives, tau)                      # to_neg: N x K
    return _log_h_pair(x, _log_noise(to_neg, mode, num_data, log_z, keep))[0].exp()


@_fp32
def l_nce(a: Tensor, b: Tensor, negatives: Tensor, tau: float, mode: str = "softmax",
          num_data: int | None = None, log_z: float = 0.0, keep: Tensor | None = None) -> Tensor:
    """L_NCE(a, b) = -log h(a, b) - sum_{I' in D_N} log(1 - h(b, m_I')), per row (PIRL's L_NCE).

    a, b: N x D; negatives: K x D; keep: N x K bool, row n's D_N (None: all K) -> N. h as in
    `h`, so in h(b, m_I') the noise term is that of m_I': in softmax mode the sum over D_N,
    I' itself included (exp(1/tau)), which bounds h(b, m_I') <= 1/2; in paper mode the
    constant |D_N| / N_data. `log_z` = log Z (0 gives the printed formula, under which, with
    small tau, the positive term saturates at h ~ 1 and the negative terms dominate).
    """
    x_pos = _cos(a, b) / tau                                       # x_pos: N, s(a, b)/tau
    x_neg = cosine_logits(b, negatives, tau)                       # x_neg: N x K, s(b, m_I')/tau
    log_h_pos, _ = _log_h_pair(x_pos, _log_noise(x_neg, mode, num_data, log_z, keep))
    neg_noise = _log_noise_of_negatives(negatives, x_neg, tau, mode, num_data, log_z, keep)  # N x K or 1 x K
    _, log_1m_h_neg = _log_h_pair(x_neg, neg_noise)                # log_1m_h_neg: N x K
    if keep is not None:
        log_1m_h_neg = torch.where(keep, log_1m_h_neg, torch.zeros_like(log_1m_h_neg))
    return -log_h_pos - log_1m_h_neg.sum(dim=1)


def l_pirl(m: Tensor, f: Tensor, g: Tensor, negatives: Tensor, tau: float, lambda_: float,
           mode: str = "softmax", num_data: int | None = None, log_z: float = 0.0,
           keep: Tensor | None = None) -> Tensor:
    """The PIRL loss, averaged over the batch: lambda L_NCE(m_I, g(v_I^t)) + (1 - lambda) L_NCE(m_I, f(v_I)).

    m: N x D bank entries of the batch (before this step's update); f, g: N x D head outputs;
    negatives: K x D; keep: N x K (row n's D_N) -> scalar.
    """
    jig = l_nce(m, g, negatives, tau, mode, num_data, log_z, keep=keep)   # jig: N
    img = l_nce(m, f, negatives, tau, mode, num_data, log_z, keep=keep)   # img: N
    return (lambda_ * jig + (1 - lambda_) * img).mean()


class PIRLViews:
    """views(x, 2) -> [v_I (the `views` policy), the jigsaw image of I: tiles augmented in place]."""

    def __init__(self, policy: dict):
        self.image, self.jig = ViewMaker(policy), policy["jigsaw"]
        self.size, self.views = policy["image_size"], policy["views"]
        self.last_params: dict[str, Tensor] = {}

    def __call__(self, x: Tensor, n_views: int = 2) -> list[Tensor]:
        (v,) = self.image(x, 1)
        x01 = to_float(x) if x.dtype == torch.uint8 else x
        tiled, self.last_params = jigsaw_view(x01, self.jig["grid"], self.size, self.views,
                                              self.jig["scale"], self.jig["tile_crop"])
        return [v, tiled][:n_views]


class PIRL(nn.Module):
    name = "pirl"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        jig = {"grid": cfg["grid"], "scale": list(cfg["jigsaw_scale"]), "tile_crop": cfg["tile_crop"]}
        return view_policy("pirl", cfg["views"], image_size, n_views=2, jigsaw=jig)

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        """[v_I, the jigsaw's augmented tiles in place, the same tiles as trained on (shuffled)]."""
        view, tiled = PIRLViews(policy)(x)
        patches, _ = jigsaw(tiled, policy["jigsaw"]["grid"])
        canvas = torch.zeros_like(view)  # a border the grid does not cover (size % grid) stays black
        shuffled = canvas.clone()
        canvas[:, :, : tiled.shape[2], : tiled.shape[3]] = tiled
        identity = torch.arange(patches.shape[1]).expand(len(x), -1)
        shuffled[:, :, : tiled.shape[2], : tiled.shape[3]] = unjigsaw(patches, identity)
        return [view, canvas, shuffled]

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
        if num_train < 2:
            raise ValueError("PIRL needs at least 2 training images (each image's negatives exclude itself)")
        self.num_negatives = min(cfg["num_negatives"], num_train - 1)
        self.views = PIRLViews(policy)
        self.last_candidates: Tensor | None = None  # the last draw of K + 1 bank rows (for tests)
        self.register_buffer("bank", F.normalize(torch.randn(num_train, cfg["proj_dim"]), dim=1))
        # paper mode: log Z, set once from the first batch (NaN until then), kept for resuming.
        self.register_buffer("log_z", torch.tensor(float("nan")))

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        v, tiled = self.views(x, 2)                              # v, tiled: N x 3 x H x W
        patches, _ = jigsaw(tiled, self.grid)                    # patches: N x P x 3 x h x w, shuffled
        n = len(v)
        f = self.f(self.encoder(v))                              # f: N x proj_dim
        # All N*P patches in one encoder call; the features are concatenated in shuffled order.
        patch_feats = self.encoder(patches.flatten(0, 1))        # patch_feats: N*P x D
        g = self.g(patch_feats.reshape(n, -1))                   # g: N x proj_dim
        # Indexing copies, so the update below leaves the entries this loss uses unchanged.
        m = self.bank[idx]                                       # m: N x proj_dim
        perm = torch.randperm(self.num_train, device=self.bank.device)[: self.num_negatives + 1]
        cand = self.last_candidates = ddp.broadcast(perm)        # cand: K+1
        negatives = self.bank[cand]                              # negatives: K+1 x proj_dim
        keep = negative_mask(cand, idx)                          # keep: N x K+1, K per row
        if self.nce == "paper" and torch.isnan(self.log_z):
            # Z = N_data * mean exp(s(f, m_I')/tau), so that exp(s/tau)/Z averages 1/N_data
            # over the data, as a probability under uniform noise should (Wu et al. 2018).
            with torch.no_grad():
                x = cosine_logits(ddp.gather_nograd(f.detach().float()), negatives.float(), self.temperature)
                self.log_z.fill_((torch.logsumexp(x.flatten(), 0) - math.log(x.numel())).item()
                                 + math.log(self.num_train))
        log_z = self.log_z.item() if self.nce == "paper" else 0.0
        loss = l_pirl(m, f, g, negatives, self.temperature, self.lambda_, self.nce, self.num_train, log_z, keep)
        with torch.no_grad():
            f_unit = F.normalize(f.detach().float(), dim=1)
            bank_sim = (f_unit * m).sum(1).mean()
            new = F.normalize(self.bank_momentum * m + (1 - self.bank_momentum) * f_unit, dim=1)
            # Every rank's rows, on every rank (distinct indices: one permutation's slices).
            self.bank[ddp.gather_nograd(idx)] = ddp.gather_nograd(new.to(self.bank.dtype))
        return loss, {"bank_sim": bank_sim}
