"""Tests for PIRL (sslpipe.methods.pirl): h and L_NCE against explicit loops, the jigsaw and its
per-tile augmentation, PIRL.loss against the loss computed by hand, the negatives (never the
image's own entry), the memory bank update, gradients, a learning test and a one-epoch pretrain run."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from sslpipe import data, pretrain
from sslpipe.augment import color_jitter, crop_flip, grayscale, jigsaw, jigsaw_view, to_float, unjigsaw
from sslpipe.config import resolve
from sslpipe.evaluate import knn_predict
from sslpipe.io import write_json
from sslpipe.methods import METHODS
from sslpipe.methods.pirl import PIRL, h, l_nce, l_pirl, negative_mask
from sslpipe.models import build_encoder

MANIFEST = {"mean": [0.5] * 3, "std": [0.25] * 3}


# ----------------------------------------------------------------------------- naive reference
def ref_cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return (u @ v / (u.norm() * v.norm())).item()


def ref_h(a, b, negs, tau, mode, num_data) -> float:
    num = math.exp(ref_cos(a, b) / tau)
    if mode == "softmax":
        noise = 0.0
        for m in negs:
            noise += math.exp(ref_cos(b, m) / tau)
    else:
        noise = len(negs) / num_data
    return num / (num + noise)


def ref_l_nce(a, b, negs, tau, mode, num_data) -> float:
    loss = -math.log(ref_h(a, b, negs, tau, mode, num_data))
    for m in negs:
        loss -= math.log(1 - ref_h(b, m, negs, tau, mode, num_data))
    return loss


def rand_inputs(n=5, k=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    negs = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return a, b, c, negs


MODES = [("softmax", 0.07), ("softmax", 0.5), ("paper", 0.07), ("paper", 0.5)]


@pytest.mark.parametrize("mode,tau", MODES)
def test_h_matches_naive_loops(mode, tau):
    a, b, _, negs = rand_inputs()
    got = h(a, b, negs, tau, mode, num_data=100)
    want = torch.tensor([ref_h(a[i], b[i], negs, tau, mode, 100) for i in range(len(a))], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode,tau", MODES)
def test_l_nce_matches_naive_loops(mode, tau):
    a, b, _, negs = rand_inputs(seed=1)
    got = l_nce(a, b, negs, tau, mode, num_data=100)
    want = torch.tensor([ref_l_nce(a[i], b[i], negs, tau, mode, 100) for i in range(len(a))], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["softmax", "paper"])
def test_l_pirl_is_the_lambda_weighted_batch_mean(mode):
    m, f, g, negs = rand_inputs(seed=2)
    tau, lam = 0.2, 0.3
    want = sum(lam * ref_l_nce(m[i], g[i], negs, tau, mode, 50) + (1 - lam) * ref_l_nce(m[i], f[i], negs, tau, mode, 50)
               for i in range(len(m))) / len(m)
    got = l_pirl(m, f, g, negs, tau, lam, mode, num_data=50)
    assert got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_negative_pairs_have_h_at_most_half_in_softmax_mode():
    # The documented choice: h(b, m_I') takes m_I''s own noise term, which contains
    # exp(s(m_I', m_I')/tau) = exp(1/tau) >= the numerator.
    _, b, _, negs = rand_inputs(k=6)
    for i in range(len(b)):
        probs = h(b[i].expand(len(negs), -1), negs, negs, 0.1, "softmax")
        assert (probs <= 0.5 + 1e-12).all()
        assert probs.max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("mode", ["softmax", "paper"])
def test_l_nce_stays_exact_where_the_naive_form_overflows(mode):
    # tau = 0.01 and identical vectors: exp(100) overflows float32, and in paper mode
    # 1 - h ~ 1e-45 rounds to 0, so a clamped log would be far off.
    v = F.normalize(torch.ones(4, 8), dim=1).requires_grad_()
    negs = F.normalize(torch.ones(3, 8), dim=1)
    loss = l_nce(v, v, negs, 0.01, mode, num_data=1000)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(v.grad).all()
    x = 1 / 0.01
    if mode == "paper":  # -log h ~ 0; each -log(1 - h) = log(e^x + K/N) - log(K/N) ~ x - log(K/N)
        want = 3 * (x - math.log(3 / 1000))
    else:  # all similarities 1: -log h = log(4), each negative term = log(1 + 1/3)
        want = math.log(4) + 3 * math.log(4 / 3)
    torch.testing.assert_close(loss, torch.full((4,), want), rtol=1e-5, atol=1e-5)


def test_losses_run_in_float32_under_autocast():
    a, b, c, negs = (t.float() for t in rand_inputs(seed=3))
    plain = l_nce(a, b, negs, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = l_nce(a, b, negs, 0.07)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain)


def test_unknown_mode_and_missing_num_data_fail():
    a, b, _, negs = rand_inputs()
    with pytest.raises(ValueError, match="num_data"):
        l_nce(a, b, negs, 0.1, "paper")
    with pytest.raises(ValueError, match="unknown nce mode"):
        h(a, b, negs, 0.1, "nope")


@pytest.mark.parametrize("mode,tau", MODES)
def test_masked_negatives_are_each_rows_own_d_n(mode, tau):
    # keep: row n's D_N among the K candidates; the reference loops over that row's list only.
    a, b, _, negs = rand_inputs(n=5, k=7, seed=4)
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.7
    keep[:, 0] = True
    got_h = h(a, b, negs, tau, mode, num_data=100, keep=keep)
    got = l_nce(a, b, negs, tau, mode, num_data=100, keep=keep)
    for i in range(5):
        row = negs[keep[i]]
        assert got_h[i].item() == pytest.approx(ref_h(a[i], b[i], row, tau, mode, 100), rel=1e-9)
        assert got[i].item() == pytest.approx(ref_l_nce(a[i], b[i], row, tau, mode, 100), rel=1e-8)


def test_negative_mask_never_keeps_the_images_own_entry_and_keeps_k():
    torch.manual_seed(0)
    num_train, k = 20, 6
    hits = 0
    for _ in range(200):
        cand = torch.randperm(num_train)[: k + 1]
        idx = torch.randperm(num_train)[:8]
        keep = negative_mask(cand, idx)
        assert keep.shape == (8, k + 1) and (keep.sum(1) == k).all()
        for i in range(8):
            kept = cand[keep[i]].tolist()
            assert idx[i].item() not in kept and len(set(kept)) == k
            hits += idx[i].item() in cand.tolist()
            if idx[i].item() not in cand.tolist():
                assert kept == cand[:k].tolist()  # the first K: uniform over K-subsets without I
    assert hits > 100  # the own entry was a candidate often, so the exclusion was exercised


# ----------------------------------------------------------------------------- jigsaw and its tiles
def test_jigsaw_permutes_patches_and_is_invertible():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 10, 10)  # 10 is not divisible by 3: the jigsaw uses the top-left 9 x 9
    patches, perm = jigsaw(x, 3)
    assert patches.shape == (6, 9, 3, 3, 3)
    assert (perm.sort(dim=1).values == torch.arange(9)).all()
    assert (perm != torch.arange(9)).any()
    for n in range(6):
        for j in range(9):
            r, c = divmod(perm[n, j].item(), 3)
            assert torch.equal(patches[n, j], x[n, :, 3 * r:3 * r + 3, 3 * c:3 * c + 3])
    assert torch.equal(unjigsaw(patches, perm), x[:, :, :9, :9])


VIEWS = {"crop_scale": [0.2, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_p": 0.5, "jitter_p": 1.0, "jitter_strength": 0.5,
         "grayscale_p": 0.5, "blur_p": 0.0, "solarize_p": 0.0}


def test_tiles_get_independent_augmentation_parameters():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 20, 20)
    grid, size, crop = 2, 20, 0.75
    tiled, p = jigsaw_view(x, grid, size, VIEWS, (0.6, 1.0), crop)
    assert tiled.shape == (5, 3, 20, 20)
    x0, y0, w, h = (t.repeat_interleave(4) for t in p["box"].unbind(1))
    col, row = torch.arange(4).repeat(5) % grid, torch.arange(4).repeat(5) // grid
    tb = p["tile_box"]
    # Within one image, tiles differ in their place inside their cells and in their colour jitter.
    in_cell = torch.stack([tb[:, 0] - (x0 + w * col / grid), tb[:, 1] - (y0 + h * row / grid)], 1).reshape(5, 4, 2)
    per_image = {k: p[k].reshape(5, 4) for k in ("brightness", "hue")}
    for n in range(5):
        gaps = (in_cell[n][:, None] - in_cell[n][None]).abs().amax(-1) + torch.eye(4)
        assert gaps.min() > 1e-3, gaps
        assert len(set(per_image["brightness"][n].tolist())) == len(set(per_image["hue"][n].tolist())) == 4
    assert 0 < p["flip"].float().mean() < 1 and p["gray"].any() and not p["gray"].all()
    # Each tile is a tile_crop box inside its cell of the image's crop ...
    torch.testing.assert_close(tb[:, 2], w * crop / grid)
    torch.testing.assert_close(tb[:, 3], h * crop / grid)
    assert (tb[:, 0] >= x0 + w * col / grid - 1e-4).all() and (tb[:, 0] + tb[:, 2] <= x0 + w * (col + 1) / grid + 1e-4).all()
    assert (tb[:, 1] >= y0 + h * row / grid - 1e-4).all() and (tb[:, 1] + tb[:, 3] <= y0 + h * (row + 1) / grid + 1e-4).all()
    # ... and is exactly that tile augmented alone with its own parameters, in place in its cell.
    for t in range(20):
        n, j = divmod(t, 4)
        one = crop_flip(x[n:n + 1], tb[t:t + 1], p["flip"][t:t + 1], 10)
        one = color_jitter(one, *(p[k][t:t + 1] for k in ("brightness", "contrast", "saturation", "hue", "order")))
        one = grayscale(one, p["gray"][t:t + 1])
        r, c = divmod(j, grid)
        torch.testing.assert_close(tiled[n:n + 1, :, 10 * r:10 * r + 10, 10 * c:10 * c + 10], one)


def test_preview_shows_the_view_the_tiles_and_their_shuffle():
    cfg = resolve({})["pirl"]
    policy = PIRL.policy(cfg, 10)
    assert policy["jigsaw"] == {"grid": 3, "scale": [0.6, 1.0], "tile_crop": 0.75} and policy["method"] == "pirl"
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    view, tiled, shuffled = PIRL.preview(policy, x)
    assert view.shape == tiled.shape == shuffled.shape == x.shape
    assert 0 <= shuffled.min() and shuffled.max() <= 1
    # The same nine tiles, moved: every shuffled cell is one of the in-place cells.
    ident = torch.arange(9).expand(4, 9)
    orig, _ = jigsaw(tiled, 3, ident)
    moved, _ = jigsaw(shuffled, 3, ident)
    for n in range(4):
        used = set()
        for j in range(9):
            match = [i for i in range(9) if torch.equal(moved[n, j], orig[n, i]) and i not in used]
            assert match, (n, j)
            used.add(match[0])
    assert not torch.equal(shuffled, tiled)


# ----------------------------------------------------------------------------- the module
def make_pirl(num_train=40, size=24, width=8, views=None, **overrides) -> PIRL:
    cfg = {**resolve({"pirl": {"views": views or {}}})["pirl"], **overrides}
    encoder = build_encoder({"backbone": "small_cnn", "width": width}, MANIFEST)
    return PIRL(encoder, cfg, PIRL.policy(cfg, size), num_train)


@pytest.mark.parametrize("mode", ["softmax", "paper"])
def test_loss_equals_the_paper_loss_by_hand_and_the_bank_update(mode):
    """One step of PIRL.loss = the loss written out by hand from the same f, g, bank and draw of
    negatives: each image's D_N is the K+1 candidates without its own entry (or the first K)."""
    torch.manual_seed(0)
    num_train, k = 12, 8
    method = make_pirl(num_train=num_train, bank_momentum=0.3, num_negatives=k, temperature=0.2, lambda_=0.4, nce=mode)
    out = {}
    method.f.register_forward_hook(lambda mod, i, o: out.__setitem__("f", o.detach().double()))
    method.g.register_forward_hook(lambda mod, i, o: out.__setitem__("g", o.detach().double()))
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    idx = torch.tensor([3, 0, 11, 7, 8, 5])
    old = method.bank.clone().double()
    loss, logs = method.loss(x, idx)
    cand = method.last_candidates.tolist()
    assert len(set(cand)) == k + 1 and any(i in cand for i in idx.tolist())
    f, g = out["f"], out["g"]
    tau, lam, want = 0.2, 0.4, 0.0
    log_z = method.log_z.item() if mode == "paper" else 0.0
    for i, own in enumerate(idx.tolist()):
        negs = [old[c] for c in cand if c != own][:k]
        assert len(negs) == k
        terms = []
        for b in (g[i], f[i]):
            if mode == "softmax":
                terms.append(ref_l_nce(old[own], b, negs, tau, mode, num_train))
            else:  # exp(s/tau) / Z against the constant K / N_data, by hand
                def hp(u, v):
                    e = math.exp(ref_cos(u, v) / tau - log_z)
                    return e / (e + k / num_train)
                terms.append(-math.log(hp(old[own], b)) - sum(math.log(1 - hp(b, m)) for m in negs))
        want += (lam * terms[0] + (1 - lam) * terms[1]) / len(idx)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # The bank: the configured average of the old entry and the normalised f(v_I), nothing else.
    want_rows = F.normalize(0.3 * old[idx] + 0.7 * F.normalize(f, dim=1), dim=1)
    torch.testing.assert_close(method.bank[idx].double(), want_rows, rtol=1e-5, atol=1e-6)
    rest = torch.ones(num_train, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(method.bank[rest].double(), old[rest])
    assert logs["bank_sim"].item() == pytest.approx((F.normalize(f, dim=1) * old[idx]).sum(1).mean().item(), rel=1e-5)


def test_with_a_small_bank_every_negative_set_is_the_whole_bank_but_the_image():
    torch.manual_seed(0)
    method = make_pirl(num_train=10, num_negatives=10_000)
    assert method.num_negatives == 9
    method.loss(torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8), torch.arange(4))
    assert sorted(method.last_candidates.tolist()) == list(range(10))


@pytest.mark.parametrize("mode", ["softmax", "paper"])
def test_gradients_reach_f_g_and_the_encoder(mode):
    torch.manual_seed(0)
    method = make_pirl(num_train=64, num_negatives=32, nce=mode)
    loss, _ = method.loss(torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8), torch.arange(8))
    assert torch.isfinite(loss)
    loss.backward()
    first_conv = method.encoder.backbone[0].weight
    for p in (method.f.weight, method.g.weight, first_conv):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert not method.bank.requires_grad


def test_bank_is_a_normalised_buffer_in_the_state_dict():
    method = make_pirl(num_train=16, proj_dim=12)
    state = method.state_dict()
    assert state["bank"].shape == (16, 12)
    torch.testing.assert_close(state["bank"].norm(dim=1), torch.ones(16))
    assert method.num_negatives == 15


def tinted_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Real images with a nuisance: scikit-learn's digits at 16 px, each tinted by a random RGB
    colour (uint8 N x 3 x 16 x 16). A random encoder's features follow the tint."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.from_numpy(d.images).float()[:, None] / 16.0, size=16, mode="bilinear", align_corners=False)
    x = (x * (0.2 + 0.8 * torch.rand(len(x), 3, 1, 1, generator=g)) * 255).round().clamp(0, 255).to(torch.uint8)
    return x, torch.from_numpy(d.target).long()


def knn_top1(encoder, xtr, ytr, xte, yte) -> float:
    encoder.eval()
    with torch.no_grad():
        ftr, fte = encoder(to_float(xtr)), encoder(to_float(xte))
    encoder.train()
    return (knn_predict(ftr, ytr, fte, 10, 20, 0.07) == yte).float().mean().item()


@pytest.mark.slow
def test_pirl_learns_on_tinted_digits():
    """The learning test: a few seconds of PIRL on one thread lift kNN top-1 clearly above the
    same encoder at its random init; a loss trained backwards, or without its positives, does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y = tinted_digits()
        test = torch.arange(len(x)) % 5 == 0
        xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
        views = {"crop_scale": [0.5, 1.0], "flip_p": 0.0}
        m = make_pirl(num_train=len(xtr), size=16, grid=2, views=views, num_negatives=256, temperature=0.2)
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
    assert trained > random_init + 0.15, (random_init, trained)


# ----------------------------------------------------------------------------- end to end
def test_pretrain_one_epoch(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "pirl", PIRL)
    cfg = resolve({"methods": ["pirl"], "model": {"width": 8}, "pretrain": {"epochs": 1, "batch_size": 32},
                   "data": {"image_size": 24}, "device": "cpu"})
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    data.prepare({**cfg["data"], "source": "digits", "max_train": 128, "max_test": 64}, data_dir)
    policy_path = tmp_path / "policy.json"
    write_json(policy_path, PIRL.policy(cfg["pirl"], 24))
    summary = pretrain.run(cfg, "pirl", 0, data_dir, policy_path, out_dir, echo=lambda s: None)
    state = torch.load(out_dir / "encoder.pt", weights_only=True)
    assert any(k.startswith("backbone.") for k in state)
    with open(out_dir / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"])) and "bank_sim" in rows[0]
    assert math.isfinite(summary["final_loss"])


def test_paper_mode_partition_constant_matches_reference_and_is_set_once():
    a, b, negs = rand_inputs()[:3]
    tau, num_data, log_z = 0.2, 50, 3.0
    # exp(s/tau)/Z against the constant noise K/N_data, written out by hand.
    num = math.exp(ref_cos(a[0], b[0]) / tau) / math.exp(log_z)
    want = num / (num + len(negs) / num_data)
    got = h(a, b, negs, tau, "paper", num_data, log_z)[0].item()
    assert got == pytest.approx(want, rel=1e-5)

    torch.manual_seed(0)
    model = make_pirl(num_train=40, nce="paper", num_negatives=16)
    x = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    assert torch.isnan(model.log_z)
    loss, _ = model.loss(x, torch.arange(8))
    first = model.log_z.item()
    assert math.isfinite(first) and math.isfinite(loss.item())
    model.loss(x, torch.arange(8, 16))
    assert model.log_z.item() == first  # estimated on the first batch only
    # With Z the positive term no longer saturates: the loss is of the order of K log 2, not thousands.
    assert loss.item() < 16 * math.log(2) * 4
