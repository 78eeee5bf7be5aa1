import math

import torch

from sslpipe.methods.simclr import nt_xent


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
