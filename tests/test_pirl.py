"""Tests for PIRL (sslpipe.methods.pirl): h and L_NCE against explicit loops, the jigsaw, the
memory bank update, gradients, and a one-epoch pretrain run."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from sslpipe import data, pretrain
from sslpipe.augment import jigsaw, to_float, unjigsaw
from sslpipe.config import resolve
from sslpipe.io import write_json
from sslpipe.methods import METHODS
from sslpipe.methods import pirl as pirl_mod
from sslpipe.methods.pirl import PIRL, h, l_nce, l_pirl
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


# ----------------------------------------------------------------------------- jigsaw and preview
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


def test_preview_shows_the_view_and_its_shuffled_patches():
    cfg = resolve({})["pirl"]
    policy = PIRL.policy(cfg, 10)
    assert policy["jigsaw"] == {"grid": 3} and policy["n_views"] == 1 and policy["method"] == "pirl"
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    view, shuffled = PIRL.preview(policy, x)
    assert view.shape == shuffled.shape == x.shape
    assert 0 <= shuffled.min() and shuffled.max() <= 1
    # The uncovered border is the view's; the 3 x 3 grid holds the view's patches, reordered.
    assert torch.equal(shuffled[:, :, 9:], view[:, :, 9:]) and torch.equal(shuffled[:, :, :, 9:], view[:, :, :, 9:])
    ident = torch.arange(9).expand(4, 9)
    orig, _ = jigsaw(view, 3, ident)
    moved, _ = jigsaw(shuffled, 3, ident)
    for n in range(4):
        used = set()
        for j in range(9):
            match = [i for i in range(9) if torch.equal(moved[n, j], orig[n, i]) and i not in used]
            assert match, (n, j)
            used.add(match[0])
    assert not torch.equal(shuffled, view)


# ----------------------------------------------------------------------------- the module
def make_pirl(num_train=40, **overrides) -> PIRL:
    cfg = {**resolve({})["pirl"], **overrides}
    encoder = build_encoder({"backbone": "small_cnn", "width": 8}, MANIFEST)
    return PIRL(encoder, cfg, PIRL.policy(cfg, 24), num_train)


def test_bank_update_is_the_configured_average_and_loss_uses_old_entries(monkeypatch):
    torch.manual_seed(0)
    method = make_pirl(num_train=40, bank_momentum=0.3, num_negatives=10_000, temperature=0.2, lambda_=0.4)
    assert method.num_negatives == 40  # capped: the negatives are the whole bank, in random order
    method.views = lambda x, n=None: [to_float(x)]  # deterministic view, so f(v_I) can be recomputed
    seen = {}

    def recording_jigsaw(v, grid, perm=None):
        seen["patches"], p = jigsaw(v, grid, perm)
        return seen["patches"], p

    monkeypatch.setattr(pirl_mod, "jigsaw", recording_jigsaw)
    x = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    idx = torch.tensor([3, 0, 17, 39, 8, 22, 5, 30])
    old = method.bank.clone()
    loss, logs = method.loss(x, idx)

    with torch.no_grad():  # train mode, same batches: BatchNorm gives the same outputs
        f = method.f(method.encoder(to_float(x)))
        patches = seen["patches"]
        g = method.g(method.encoder(patches.flatten(0, 1)).reshape(8, -1))
    assert patches.shape == (8, 9, 3, 8, 8)
    want_loss = l_pirl(old[idx], f, g, old, 0.2, 0.4, "softmax")
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-5)
    want_rows = F.normalize(0.3 * old[idx] + 0.7 * F.normalize(f, dim=1), dim=1)
    torch.testing.assert_close(method.bank[idx], want_rows)
    rest = torch.ones(40, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(method.bank[rest], old[rest])
    assert not torch.allclose(method.bank[idx], old[idx])
    torch.testing.assert_close(logs["bank_sim"], (F.normalize(f, dim=1) * old[idx]).sum(1).mean())
    assert logs["bank_sim"].shape == ()


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
    assert method.num_negatives == 16


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
