"""Denoising autoencoder (sslpipe.methods.dae) and the shared `augment.corrupt` it trains on."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sslpipe import augment
from sslpipe.augment import corrupt, patch_mask
from sslpipe.config import resolve
from sslpipe.data import load_split, prepare
from sslpipe.methods import METHODS
from sslpipe.evaluate import knn_predict
from sslpipe.methods.dae import DAE, ENERGY_SIGMAS, Decoder, patch_normalised, reconstruction_error
from sslpipe.models import build_encoder, spatial_features
from test_simclr import nt_xent_reference

STEPS, MARGIN = 300, 0.02  # learning test: measured kNN 0.850 -> 0.905 (seed 0)
MANIFEST = {"mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads cost more than they save (10x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dae(image_size: int = 16, width: int = 8, **overrides) -> DAE:
    cfg = {**resolve({})["dae"], **overrides}
    enc = build_encoder({"backbone": "small_cnn", "width": width}, MANIFEST)
    return DAE(enc, cfg, DAE.policy(cfg, image_size), num_train=100)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A prepared 16 px digits set: (data_dir, train images as a uint8 N x 3 x H x W tensor)."""
    out = tmp_path_factory.mktemp("digits")
    prepare({**resolve({})["data"], "source": "digits", "image_size": 16, "max_train": 256, "max_test": 64}, out)
    x, _ = load_split(out, "train")
    return out, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- corrupt
def interior(n: int = 64, size: int = 16) -> torch.Tensor:
    """Float images strictly inside (0, 1), so every 0 or 1 pixel was put there by corrupt."""
    torch.manual_seed(1)
    return 0.1 + 0.8 * torch.rand(n, 3, size, size)


@pytest.mark.parametrize("size", [16, 18])  # 18: the last row/column of patches is cut to 2 px
def test_mask_zeroes_whole_patches_at_mask_ratio(size):
    x, p = interior(256, size), 4
    torch.manual_seed(0)
    xt = corrupt(x, "mask", mask_ratio=0.3, mask_patch=p)
    zero = xt == 0
    assert torch.equal(xt[~zero], x[~zero])                       # kept pixels untouched
    assert (zero == zero[:, :1]).all()                            # same mask on every channel
    g = math.ceil(size / p)
    for i in range(g):                                            # each patch all-zero or all-kept
        for j in range(g):
            patch = zero[:, 0, i * p:(i + 1) * p, j * p:(j + 1) * p].flatten(1)
            assert (patch.all(1) | ~patch.any(1)).all(), (i, j)
    patch_zero = zero[:, 0, ::p, ::p].float()                     # one pixel per patch
    assert patch_zero.shape[1:] == (g, g)
    assert abs(patch_zero.mean().item() - 0.3) < 0.03             # 256 * g^2 >= 4096 patches


def test_salt_pepper_sets_fraction_to_0_or_1():
    x = interior(256)
    torch.manual_seed(0)
    xt = corrupt(x, "salt_pepper", salt_pepper=0.2)
    hit = (xt != x).any(1)                                        # N x H x W pixel positions
    assert abs(hit.float().mean().item() - 0.2) < 0.01
    v = xt.permute(0, 2, 3, 1)[hit]                               # hit pixels: K x 3
    assert ((v == 0) | (v == 1)).all() and (v == v[:, :1]).all()  # black or white, all channels
    assert abs((v[:, 0] == 1).float().mean().item() - 0.5) < 0.05  # salt and pepper equally often
    assert torch.equal(xt.permute(0, 2, 3, 1)[~hit], x.permute(0, 2, 3, 1)[~hit])


def test_gaussian_changes_pixels_and_stays_in_unit_range():
    x = torch.full((64, 3, 16, 16), 0.5)
    torch.manual_seed(0)
    xt = corrupt(x, "gaussian", noise_std=0.1)
    assert (xt != x).float().mean() > 0.99
    d = xt - x
    assert abs(d.std().item() - 0.1) < 0.005 and abs(d.mean().item()) < 0.005
    wide = corrupt(x, "gaussian", noise_std=2.0)                  # heavy noise: clipped, not wrapped
    assert wide.min() == 0 and wide.max() == 1
    assert torch.equal(corrupt(x, "gaussian", noise_std=0.0), x)


def test_unknown_corruption_is_rejected():
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        corrupt(interior(2), "blur")


# ----------------------------------------------------------------------------- policy, decoder
def test_policy_carries_corruption_and_preview():
    cfg = {**resolve({})["dae"], "corruption": "salt_pepper", "salt_pepper": 0.3}
    policy = DAE.policy(cfg, 16)
    assert json.loads(json.dumps(policy)) == policy
    assert policy["n_views"] == 1 and policy["corruption"]["kind"] == "salt_pepper"
    assert policy["corruption"]["salt_pepper"] == 0.3
    x = interior(8)
    clean, noisy = DAE.preview(policy, x)
    assert clean.shape == noisy.shape == x.shape
    assert 0 <= noisy.min() and noisy.max() <= 1
    assert ((noisy == 0) | (noisy == 1)).float().mean() > 0.2     # corrupted view is corrupted
    assert ((clean == 0) | (clean == 1)).float().mean() < 0.05


def test_colour_corruption_greys_the_input_and_keeps_the_target():
    """colour_corruption acts on the encoder's input only: with grayscale_p 1 and nothing masked
    the input is the grey view (same geometry), while the loss's target keeps the colours."""
    model = make_dae(mask_ratio=0.0, norm_target=False, colour_corruption={"grayscale_p": 1.0, "jitter_p": 0.0,
                                                                           "jitter_strength": 0.5})
    torch.manual_seed(0)
    v = torch.rand(4, 3, 16, 16)
    v_tilde, weight = model.corrupt(v)
    assert torch.allclose(v_tilde, augment.luma(v).expand_as(v), atol=1e-5)   # grey input, no crop/flip
    assert not torch.allclose(model.target(v), v_tilde)                      # coloured target
    assert make_dae().colour is None                                         # off by default
    _, preview = DAE.preview(DAE.policy({**resolve({})["dae"], "mask_ratio": 0.0,
                                         "colour_corruption": {"grayscale_p": 1.0}}, 16), interior(4))
    assert (preview - preview.mean(1, keepdim=True)).abs().max() < 1e-5      # the preview shows it


def test_mask_fill_and_patch_mask():
    x = interior(64)
    torch.manual_seed(3)
    masked = patch_mask(64, 16, 16, 0.4, 4)
    torch.manual_seed(3)
    fill = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1)
    xt = corrupt(x, "mask", mask_ratio=0.4, mask_patch=4, fill=fill)
    assert masked.shape == (64, 1, 16, 16) and masked.dtype == torch.bool
    assert torch.equal(xt, torch.where(masked, fill, x))          # corrupt's mask is patch_mask's
    assert not torch.equal(masked[0], masked[1])                  # per-sample masks


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_spatial_features_pool_to_the_encoder_output(backbone):
    enc = build_encoder({"backbone": backbone, "width": 8}, MANIFEST).eval()
    x = torch.rand(2, 3, 16, 16)
    s = spatial_features(enc, x)
    assert s.shape == (2, enc.feat_dim, 2, 2)                     # stride 8
    assert torch.allclose(s.mean((2, 3)), enc(x), atol=1e-5)


@pytest.mark.parametrize("size", [8, 10, 16, 24, 32, 96])
@pytest.mark.parametrize("decoder", ["spatial", "pooled"])
def test_decoder_output_matches_input_size(size, decoder):
    model = make_dae(size, decoder=decoder, norm_target=False)  # sigmoid output in [0, 1]
    x = torch.rand(4, 3, size, size)
    z = model.reconstruct(x)
    assert z.shape == x.shape and 0 <= z.min() and z.max() <= 1
    y = model.encoder(x) if decoder == "pooled" else spatial_features(model.encoder, x)
    assert torch.equal(model.decoder(y), z)                       # reads what `decoder` names


# ----------------------------------------------------------------------------- loss
def test_reconstruction_error_matches_naive_reference():
    torch.manual_seed(0)
    z, x = torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    w = (torch.rand(2, 1, 5, 5) < 0.5).float() + 0.25 * (torch.rand(2, 1, 5, 5) < 0.5).float()
    num = den = plain = 0.0
    for n in range(2):
        for c in range(3):
            for i in range(5):
                for j in range(5):
                    e = (z[n, c, i, j].item() - x[n, c, i, j].item()) ** 2
                    num, den, plain = num + w[n, 0, i, j].item() * e, den + w[n, 0, i, j].item(), plain + e
    assert reconstruction_error(z, x, w).item() == pytest.approx(num / den, rel=1e-5)
    assert reconstruction_error(z, x).item() == pytest.approx(plain / 150, rel=1e-5)


def test_patch_normalised_matches_naive_reference():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6)                                    # 4 px cells: the last cut to 2 px
    t = patch_normalised(x, 4)
    for n in range(2):
        for i0 in (0, 4):
            for j0 in (0, 4):
                cell = x[n, :, i0:i0 + 4, j0:j0 + 4]
                vals = cell.flatten().tolist()
                m = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals) + 1e-6)
                assert torch.allclose(t[n, :, i0:i0 + 4, j0:j0 + 4], (cell - m) / sd, atol=1e-4)


def naive_masked_error(z, v, masked, visible_weight: float) -> float:
    """sum_p w_p ||z_p - v_p||^2 / (C sum_p w_p), w_p = 1 on masked pixels, visible_weight elsewhere."""
    num = den = 0.0
    for n in range(len(z)):
        for i in range(z.shape[2]):
            for j in range(z.shape[3]):
                w = 1.0 if masked[n, 0, i, j] else visible_weight
                for c in range(3):
                    num += w * (z[n, c, i, j].item() - v[n, c, i, j].item()) ** 2
                    den += w
    return num / den


@pytest.mark.parametrize("visible_weight,norm_target", [(0.0, True), (0.0, False), (0.3, False)])
def test_mask_loss_is_on_masked_pixels_of_the_clean_view(visible_weight, norm_target):
    model = make_dae(corruption="mask", mask_ratio=0.5, mask_patch=4, norm_target=norm_target,
                     visible_weight=visible_weight)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(5)
    loss, logs = model.loss(x, torch.arange(3))
    # Replay: the same view, then the same mask; the masked patches hold the data mean.
    torch.manual_seed(5)
    v = model.views(x, 1)[0]
    masked = patch_mask(3, 16, 16, 0.5, 4)
    v_tilde = torch.where(masked, torch.full((1, 3, 1, 1), 0.5), v)
    z = model.decoder(spatial_features(model.encoder, v_tilde))  # decoder on the spatial map
    if norm_target:  # the clean view's pixels, normalised per 4 x 4 patch
        v = patch_normalised(v, 4)
    assert masked.any() and (~masked).any()
    assert loss.item() == pytest.approx(naive_masked_error(z, v, masked, visible_weight), rel=1e-4)
    assert logs["mse_identity"].item() > 0                        # masked pixels really changed
    loss.backward()
    assert model.encoder.backbone[0].weight.grad.abs().sum() > 0  # gradient reaches the encoder


def test_hybrid_loss_is_reconstruction_plus_nt_xent_of_the_two_corrupted_views():
    """objective hybrid (contrastive MAE): two views, one mask draw over both, one forward; the loss
    is both views' masked reconstruction error plus nce_weight x NT-Xent (test_simclr's naive
    reference) of the head's outputs for the pooled features, view 1's rows against view 2's."""
    model = make_dae(objective="hybrid", nce_weight=0.7, temperature=0.3, mask_ratio=0.5, mask_patch=4,
                     norm_target=False)
    assert model.views.policy["n_views"] == 2
    heads = []
    model.head.register_forward_hook(lambda m, i, o: heads.append((i[0].detach(), o.detach())))
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(5)
    loss, logs = model.loss(x, torch.arange(6))
    torch.manual_seed(5)  # replay: the two views, then the mask of all 12 rows
    v = torch.cat(model.views(x, 2))
    masked = patch_mask(12, 16, 16, 0.5, 4)
    h = spatial_features(model.encoder, torch.where(masked, torch.full((1, 3, 1, 1), 0.5), v))
    [(pooled, z)] = heads
    assert torch.allclose(pooled, h.mean((2, 3)), atol=1e-5)  # g reads the corrupted views' pooled features
    rec = naive_masked_error(model.decoder(h), v, masked, 0.0)
    nce = nt_xent_reference(z[:6], z[6:], 0.3)
    assert logs["l_rec"].item() == pytest.approx(rec, rel=1e-4)
    assert logs["l_nce"].item() == pytest.approx(nce, rel=1e-4)
    assert loss.item() == pytest.approx(rec + 0.7 * nce, rel=1e-4)
    assert "l_nce" not in make_dae().loss(x, torch.arange(6))[1]  # reconstruction alone by default


@pytest.mark.parametrize("kind", ["gaussian", "salt_pepper"])
def test_loss_matches_naive_reference(kind):
    model = make_dae(corruption=kind, norm_target=False)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(5)
    loss, logs = model.loss(x, torch.arange(3))
    # Same seed -> the same view and corruption; the loss must compare z with the clean view.
    torch.manual_seed(5)
    v = model.views(x, 1)[0]
    v_tilde = corrupt(v, **model.corruption)
    z = model.reconstruct(v_tilde)
    total, count, total_noisy = 0.0, 0, 0.0
    for n in range(len(x)):
        for a, b, c in zip(z[n].flatten().tolist(), v[n].flatten().tolist(), v_tilde[n].flatten().tolist()):
            total += (a - b) ** 2
            total_noisy += (c - b) ** 2
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert logs["mse_identity"].item() == pytest.approx(total_noisy / count, rel=1e-5)
    assert total_noisy > 0                                        # the input really was corrupted


def test_loss_falls_on_fixed_batch(digits):
    _, x = digits
    torch.manual_seed(0)
    model = make_dae()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(123)                                    # fixed views and corruption
        loss, _ = model.loss(x[:32], torch.arange(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- diagnostics
@pytest.mark.slow
def test_diagnostics_energy_curve_and_pngs(digits, tmp_path):
    _, x = digits
    torch.manual_seed(0)
    model = make_dae()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        idx = torch.randint(0, len(x), (64,))
        loss, _ = model.loss(x[idx], idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train()
    torch.manual_seed(9)
    metrics = model.diagnostics(x, tmp_path)
    assert model.training                                         # mode restored
    energies = [metrics[f"dae_energy_sigma_{s:g}"] for s in ENERGY_SIGMAS]
    assert all(np.isfinite(energies)) and np.isfinite(metrics["dae_denoise_mse"])
    assert energies[-1] > 2 * energies[0], energies               # off the data, the energy is high
    # Replay the same noise: F(y) = mean ||y - g(f(y))||^2 against the *noisy* y, in eval mode.
    model.eval()
    torch.manual_seed(9)
    with torch.no_grad():
        x01 = augment.to_float(x)
        for s, e in zip(ENERGY_SIGMAS, energies):
            y = corrupt(x01, "gaussian", noise_std=s)
            assert e == pytest.approx((model.to_pixels(model.reconstruct(y), y) - y).pow(2).mean().item(), rel=1e-4), s
    with Image.open(tmp_path / "dae_energy_vs_corruption.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    with Image.open(tmp_path / "dae_reconstructions.png") as im:
        # 3 rows (corrupted, reconstructed, clean) x 8 columns of 64 px tiles, 2 px padding.
        assert im.format == "PNG" and im.size == (8 * 66 + 2, 3 * 66 + 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


# ----------------------------------------------------------------------------- end to end
def test_pretrain_one_epoch_smoke(digits, tmp_path, monkeypatch):
    from sslpipe import pretrain

    monkeypatch.setitem(METHODS, "dae", DAE)
    data_dir, _ = digits
    cfg = resolve({"methods": ["dae"], "model": {"width": 8}, "pretrain": {"epochs": 1, "batch_size": 32},
                   "data": {"image_size": 16}})
    policy_path = tmp_path / "policy.json"
    policy_path.write_text(json.dumps(DAE.policy(cfg["dae"], 16)))
    out = tmp_path / "out"
    summary = pretrain.run(cfg, "dae", 0, data_dir, policy_path, out, echo=lambda s: None)
    state = torch.load(out / "encoder.pt", weights_only=True)
    assert any(k.startswith("backbone.") for k in state) and not any("decoder" in k for k in state)
    assert np.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].split(",")[:2] == ["epoch", "loss"] and "mse_identity" in history[0]
    assert np.isfinite(float(history[1].split(",")[1]))
    assert (out / "dae_energy_vs_corruption.png").is_file() and (out / "dae_reconstructions.png").is_file()
    assert "dae_energy_sigma_0.8" in summary["diagnostics"]


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_trained_encoder_beats_random_init_on_knn(tmp_path):
    """A small fixed problem (digits at 16 px, width 8, a few hundred steps on one thread): the
    masked autoencoder's encoder must beat its own random initialisation on a kNN probe, so a
    DAE that reconstructs the corrupted input or trains on the wrong pixels fails."""
    prepare({**resolve({})["data"], "source": "digits", "image_size": 16, "max_train": 1000, "max_test": 400},
            tmp_path)
    (xtr, ytr), (xte, yte) = [load_split(tmp_path, s) for s in ("train", "test")]
    xtr, xte = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in (xtr, xte)]
    ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()

    def knn(model: DAE) -> float:
        model.eval()
        with torch.no_grad():
            ftr, fte = model.encoder(augment.to_float(xtr)), model.encoder(augment.to_float(xte))
        model.train()
        return (knn_predict(ftr, ytr, fte, 10, 20, 0.07) == yte).float().mean().item()

    torch.manual_seed(0)
    model = make_dae(mask_patch=4)
    before = knn(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        idx = torch.randint(0, len(xtr), (64,))
        loss, _ = model.loss(xtr[idx], idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = knn(model)
    assert after > before + MARGIN, (before, after)
