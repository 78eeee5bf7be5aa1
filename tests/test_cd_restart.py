"""Where CD's persistent chains restart (sslpipe.methods.cd.RESTARTS): the `data` Gaussian has the
batch's mean image and pixel covariance, so restarts look like blurred data, not white noise."""
from __future__ import annotations

import torch

from sslpipe.methods.cd import RESTARTS, data_gaussian


def test_data_gaussian_has_the_batch_mean_and_covariance():
    torch.manual_seed(0)
    # 40 images of 2 x 4 x 4 = 32 pixels in [0.3, 0.7], so the clamp to [0, 1] never acts.
    ref = 0.3 + 0.4 * torch.rand(40, 2, 4, 4)
    x = data_gaussian(ref, 200_000)
    assert x.shape == (200_000, 2, 4, 4) and x.dtype == torch.float32
    d = ref.flatten(1) - ref.flatten(1).mean(0)
    cov_ref = d.T @ d / (len(ref) - 1)                                     # 32 x 32
    y = x.flatten(1) - x.flatten(1).mean(0)
    cov = y.T @ y / (len(y) - 1)
    assert (x.mean(0) - ref.mean(0)).abs().max() < 2e-3                   # the mean image
    assert (cov - cov_ref).abs().max() < 2e-3                             # the full covariance,
    assert cov_ref.abs().max() > 5 * 2e-3                                 # (a covariance worth testing)


def test_data_gaussian_lies_in_the_span_of_the_batch():
    """Draws are combinations of the batch's centred images: no pixel varies that the data keeps
    fixed (a grey batch gives grey restarts; a border the data never uses stays at its value)."""
    torch.manual_seed(0)
    ref = torch.full((16, 3, 8, 8), 0.5)
    ref[:, :, 2:6, 2:6] = torch.rand(16, 1, 4, 4).expand(16, 3, 4, 4)    # grey centre, flat border
    x = data_gaussian(ref, 500)
    assert 0 <= x.min() <= x.max() <= 1
    assert (x - x.mean(1, keepdim=True)).abs().max() < 1e-6                # grey in, grey out
    border = torch.ones(8, 8, dtype=torch.bool)
    border[2:6, 2:6] = False
    assert (x[:, :, border] - 0.5).abs().max() < 1e-6                      # fixed pixels stay fixed
    assert x[:, :, 2:6, 2:6].std() > 0.1                                   # the varying ones vary


def test_data_gaussian_under_autocast_is_fp32():
    ref = torch.rand(8, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert data_gaussian(ref, 4).dtype == torch.float32


def test_every_restart_kind_gives_images_in_range():
    ref = torch.rand(8, 3, 4, 4)
    for kind, fn in RESTARTS.items():
        x = fn(ref, 5)
        assert x.shape == (5, 3, 4, 4) and 0 <= x.min() <= x.max() <= 1, kind
