"""Tests for SimCLR (sslpipe.methods.simclr): NT-Xent against a loop reference, SimCLR.loss against
the loss computed by hand from its encoder outputs, and a learning test on real images."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslpipe.config import resolve
from sslpipe.evaluate import knn_predict
from sslpipe.methods.simclr import SimCLR, nt_xent
from sslpipe.models import build_encoder


def nt_xent_reference(z1, z2, t):
    """NT-Xent written as in the paper, one anchor at a time (Chen et al. 2020, eq. 1)."""
    z = torch.cat([z1, z2])
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = [float(torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm())) / t for k in range(n2)]
        denom = sum(math.exp(sims[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n2


def test_nt_xent_matches_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5) * 3, torch.randn(6, 5)
    for t in (0.1, 0.5, 1.0):
        assert math.isclose(nt_xent(z1, z2, t).item(), nt_xent_reference(z1, z2, t), rel_tol=1e-5)


def test_nt_xent_is_low_for_aligned_pairs_and_scale_invariant():
    torch.manual_seed(1)
    z = torch.randn(8, 16)
    aligned = nt_xent(z, z + 0.01 * torch.randn_like(z), 0.1)
    random = nt_xent(z, torch.randn(8, 16), 0.1)
    assert aligned < random
    # Cosine similarity: rescaling a projection changes nothing.
    assert torch.isclose(nt_xent(z, 5 * z, 0.5), nt_xent(z, z, 0.5), atol=1e-6)


# ----------------------------------------------------------------------------- the training path
def tinted_digits(n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images with a nuisance: scikit-learn's digits at 16 px, each tinted by a random RGB
    colour (uint8 N x 3 x 16 x 16, labels N). A random encoder's features follow the tint; an
    encoder trained to match colour-jittered views of one image learns to ignore it."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.from_numpy(d.images).float()[:, None] / 16.0, size=16, mode="bilinear",
                      align_corners=False)                                    # N x 1 x 16 x 16 in [0, 1]
    tint = 0.2 + 0.8 * torch.rand(len(x), 3, 1, 1, generator=g)
    x = (x * tint * 255).round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    return (x, y) if n is None else (x[:n], y[:n])


def make_simclr(width: int = 8, **overrides) -> SimCLR:
    over = {"views": {"crop_scale": [0.5, 1.0], "flip_p": 0.0}}
    cfg = {**resolve({"simclr": over})["simclr"], "proj_hidden": 64, "proj_dim": 32, **overrides}
    x, _ = tinted_digits()
    xf = x.float() / 255
    manifest = {"mean": xf.mean((0, 2, 3)).tolist(), "std": xf.std((0, 2, 3)).tolist()}
    encoder = build_encoder({"backbone": "small_cnn", "width": width}, manifest)
    return SimCLR(encoder, cfg, SimCLR.policy(cfg, 16), num_train=len(x))


def test_loss_is_nt_xent_of_both_views_encoder_outputs():
    """One step of SimCLR.loss = the paper's loss computed by hand from the same encoder outputs:
    the same views (same seed), encoded in one 2N batch (BatchNorm over both views), projected by g."""
    torch.manual_seed(0)
    m = make_simclr(temperature=0.3).train()
    x, _ = tinted_digits(12)
    torch.manual_seed(7)
    loss, logs = m.loss(x, torch.arange(12))
    torch.manual_seed(7)
    v1, v2 = m.views(x, 2)
    assert not torch.equal(v1, v2)
    with torch.no_grad():
        z = m.head(m.encoder(torch.cat([v1, v2])))
    z1, z2 = z[:12].double(), z[12:].double()
    assert math.isclose(loss.item(), nt_xent_reference(z1, z2, 0.3), rel_tol=1e-5)
    assert loss.requires_grad and 0 <= logs["pos_top1"].item() <= 1


def knn_top1(encoder, xtr, ytr, xte, yte) -> float:
    encoder.eval()
    with torch.no_grad():
        ftr, fte = encoder(xtr.float() / 255), encoder(xte.float() / 255)
    encoder.train()
    return (knn_predict(ftr, ytr, fte, 10, 20, 0.07) == yte).float().mean().item()


@pytest.mark.slow
def test_simclr_learns_to_ignore_colour_on_tinted_digits():
    """The learning test: 100 steps (about 3 s on one thread) lift kNN top-1 well above the same
    encoder at its random init; a loss without its second view, or trained backwards, does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = make_simclr()
        x, y = tinted_digits()
        test = torch.arange(len(x)) % 5 == 0
        xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
        random_init = knn_top1(m.encoder, xtr, ytr, xte, yte)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(100):
            idx = torch.randint(0, len(xtr), (128,))
            loss, _ = m.loss(xtr[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained = knn_top1(m.encoder, xtr, ytr, xte, yte)
    finally:
        torch.set_num_threads(threads)
    assert trained > random_init + 0.15, (random_init, trained)  # measured: 0.64 -> 0.94
