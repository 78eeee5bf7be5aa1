"""Tests for contrastive divergence (sslpipe.methods.cd): loss, Langevin sampler, replay buffer,
stability guards, a 2-D toy EBM and a 1-epoch pretrain run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sslpipe.augment import to_float
from sslpipe.config import resolve
from sslpipe.methods import cd as cd_mod
from sslpipe.methods.cd import CD, EnergyError, cd_loss, langevin
from sslpipe.models import build_encoder

MANIFEST = {"mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine: one thread avoids oversubscription (often 10x faster).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(image_size: int = 8, **over) -> CD:
    cfg = {**resolve({})["cd"], **over}
    enc = build_encoder({"backbone": "small_cnn", "width": 4}, MANIFEST)
    return CD(enc, cfg, CD.policy(cfg, image_size), num_train=100)


def fake(n: int, size: int = 8, lo: int = 0, hi: int = 256) -> torch.Tensor:
    return torch.randint(lo, hi, (n, 3, size, size), dtype=torch.uint8)


# ----------------------------------------------------------------------------- pure functions
def test_cd_loss_matches_naive_reference():
    torch.manual_seed(0)
    e_pos, e_neg, alpha = torch.randn(7), torch.randn(7), 0.3
    pos = sum(float(e) for e in e_pos) / len(e_pos)
    neg = sum(float(e) for e in e_neg) / len(e_neg)
    reg = sum(float(a) ** 2 + float(b) ** 2 for a, b in zip(e_pos, e_neg)) / len(e_pos)
    assert torch.allclose(cd_loss(e_pos, e_neg, alpha), torch.tensor(pos - neg + alpha * reg), atol=1e-6)
    # Sign: lowering data energy and raising negative energy lowers the loss.
    assert cd_loss(e_pos - 1, e_neg + 1, 0.0) < cd_loss(e_pos, e_neg, 0.0)


def test_langevin_quadratic_energy_matches_update_formula():
    torch.manual_seed(0)
    c = torch.tensor([0.2, 0.9, 1.5, -0.4])  # the last two lie outside [0, 1]: clamping must hold
    energy = lambda x: 0.5 * (x - c).pow(2).sum(1)  # dE/dx = x - c
    x0 = torch.rand(5, 4)
    steps, step = 6, 0.3
    expected = x0.clone()
    for _ in range(steps):
        for i in range(len(expected)):
            for j in range(4):
                v = float(expected[i, j]) - step / 2 * (float(expected[i, j]) - float(c[j]))
                expected[i, j] = min(1.0, max(0.0, v))
    out = langevin(energy, x0, steps, step, noise_std=0.0)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1 and not out.requires_grad
    assert (out[:, :2] - c[:2]).abs().max() < (x0[:, :2] - c[:2]).abs().max()  # moved toward c
    # Other bounds (the 2-D toy's box) are honoured too.
    assert langevin(energy, x0, 50, 1.0, 0.0, bounds=(-0.1, 0.5))[:, 3].allclose(torch.tensor(-0.1))


def test_langevin_noise_has_noise_std():
    torch.manual_seed(0)
    x0 = torch.full((20000,), 0.5)
    out = langevin(lambda x: 0.0 * x, x0, 1, 1.0, noise_std=0.01)
    assert abs((out - x0).std().item() - 0.01) < 5e-4


def test_pcd_draw_distinct_slots_and_reinit_fraction():
    torch.manual_seed(0)
    slots, reinit = cd_mod.pcd_draw(50000, 20000, 0.05, torch.device("cpu"))
    assert len(slots.unique()) == 20000 and slots.max() < 50000
    assert abs(reinit.float().mean().item() - 0.05) < 0.006  # binomial sd ~0.0015


# ----------------------------------------------------------------------------- the method
def test_sampling_leaves_parameters_and_batchnorm_alone():
    torch.manual_seed(0)
    model = make()
    model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x_neg = model.sample(torch.rand(6, 3, 8, 8))
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.encoder.training  # train mode restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn_before.items())
    assert x_neg.dtype == torch.float32 and not x_neg.requires_grad and 0 <= x_neg.min() <= x_neg.max() <= 1


def test_sampler_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = make(langevin_steps=2)
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.sample(torch.rand(4, 3, 8, 8))
        model.head(torch.randn(2, model.encoder.feat_dim))  # control: autocast is really on here
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole training step works under autocast
        loss, _ = model.loss(fake(8), torch.arange(8))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and model.buffer.dtype == torch.float16


def test_pcd_writes_back_exactly_the_drawn_slots(monkeypatch):
    torch.manual_seed(0)
    model = make(buffer_size=1000, reinit_fraction=0.25, langevin_steps=1, step_size=1e-3, noise_std=0.01)
    assert model.state_dict()["buffer"].shape == (1000, 3, 8, 8)  # resumable state
    drawn = []
    real_draw = cd_mod.pcd_draw
    monkeypatch.setattr(cd_mod, "pcd_draw", lambda *a: drawn.append(real_draw(*a)) or drawn[-1])
    before = model.buffer.clone()
    loss, logs = model.loss(fake(400), torch.arange(400))
    (slots, reinit), = drawn
    changed = (model.buffer != before).flatten(1).any(1)
    assert set(changed.nonzero().squeeze(1).tolist()) == set(slots.tolist())
    # Restarted chains jump to fresh uniform noise (mean |change| ~1/3); the others move ~noise_std.
    jump = (model.buffer[slots].float() - before[slots].float()).abs().flatten(1).mean(1)
    assert torch.equal(jump > 0.1, reinit)
    assert 60 <= int(reinit.sum()) <= 140  # ~0.25 * 400 = 100, binomial sd ~8.7
    assert torch.isfinite(loss) and set(logs) == {"e_pos", "e_neg"} and all(v.dim() == 0 for v in logs.values())
    loss.backward()
    assert model.head.weight.grad is not None


def test_cd_mode_chains_start_at_data_plus_kick(monkeypatch):
    torch.manual_seed(0)
    model = make(mode="cd", init_noise=0.05)
    assert not hasattr(model, "buffer")
    starts = []
    monkeypatch.setattr(model, "views", lambda x, n: [to_float(x)])  # identity view
    monkeypatch.setattr(model, "sample", lambda x0: starts.append(x0) or x0)
    x = fake(64, lo=100, hi=150)  # mid-grey: the kick is rarely clamped
    model.loss(x, torch.arange(64))
    kick = starts[0] - to_float(x)
    assert abs(kick.mean().item()) < 0.005 and abs(kick.std().item() - 0.05) < 0.005


def test_value_clipping_of_parameter_gradients():
    torch.manual_seed(0)
    model = make(mode="cd", alpha=1000.0, grad_clip=1e-3)
    loss, _ = model.loss(fake(16), torch.arange(16))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads.abs().max() <= 1e-3 + 1e-9
    assert (grads.abs() > 0.999e-3).any()  # clipping was active, so the bound is not vacuous


def test_energy_is_soft_bounded():
    torch.manual_seed(0)
    model = make(energy_bound=0.5)
    with torch.no_grad():
        model.head.weight.mul_(1000)
    model.eval()
    x = torch.rand(32, 3, 8, 8)
    raw = model.head(model.encoder(x)).squeeze(1)
    e = model.energy(x)
    assert e.abs().max() <= 0.5 and raw.abs().max() > 5
    assert torch.allclose(e, 0.5 * torch.tanh(raw / 0.5))


def test_non_finite_energy_raises_clear_error():
    torch.manual_seed(0)
    model = make(buffer_size=64)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    before = model.buffer.clone()
    with pytest.raises(EnergyError, match=r"cd\.step_size.*cd\.alpha"):
        model.loss(fake(16), torch.arange(16))
    assert torch.equal(model.buffer, before)  # the failed step did not poison the buffer


def test_policy_and_preview():
    cfg = resolve({})["cd"]
    policy = CD.policy(cfg, 16)
    assert json.loads(json.dumps(policy)) == policy
    assert policy["n_views"] == 1 and policy["langevin"] == {
        "mode": "pcd", "steps": 20, "step_size": 10.0, "noise_std": 0.005, "init_noise": 0.1}
    torch.manual_seed(0)
    x = to_float(fake(8, 16, lo=100, hi=150))
    views = CD.preview(policy, x)
    assert len(views) == 2 and all(v.shape == x.shape and 0 <= v.min() <= v.max() <= 1 for v in views)
    assert abs((views[1] - views[0]).std().item() - 0.1) < 0.01


# ----------------------------------------------------------------------------- 2-D toy EBM
def spiral(n: int) -> torch.Tensor:
    t = 0.5 + torch.rand(n) * 2.5 * math.pi
    r = 2.5 * t / (3 * math.pi)
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], 1) + 0.03 * torch.randn(n, 2)


def test_toy_spiral_energy_is_lower_on_data_than_noise():
    """The generic cd_loss + langevin learn a 2-D density in the box [-3, 3]^2 (short-run chains
    from uniform noise): data ends lower in energy than noise and samples move onto the spiral."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    energy = lambda v: net(v).squeeze(1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    box = (-3.0, 3.0)
    for _ in range(200):
        x_neg = langevin(energy, torch.rand(128, 2) * 6 - 3, 10, 0.1, 0.05, bounds=box)
        loss = cd_loss(energy(spiral(128)), energy(x_neg), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    data, noise = spiral(2000), torch.rand(2000, 2) * 6 - 3
    with torch.no_grad():
        assert energy(data).mean() + 1.0 < energy(noise).mean()
    samples = langevin(energy, noise, 20, 0.1, 0.05, bounds=box)
    dist = lambda a: torch.cdist(a, data).min(1).values.mean()
    assert dist(samples) < 0.5 * dist(noise)


# ----------------------------------------------------------------------------- pretrain smoke
def test_pretrain_one_epoch(tmp_path, monkeypatch):
    from sslpipe import data, pretrain
    from sslpipe.methods import METHODS

    monkeypatch.setitem(METHODS, "cd", CD)
    cfg = resolve({"methods": ["cd"], "model": {"width": 8}, "pretrain": {"epochs": 1, "batch_size": 32},
                   "data": {"image_size": 16}})
    data.prepare({**cfg["data"], "max_train": 128, "max_test": 64}, tmp_path / "data")
    policy_path = tmp_path / "policy.json"
    policy_path.write_text(json.dumps(CD.policy(cfg["cd"], 16)))
    out = tmp_path / "run"
    summary = pretrain.run(cfg, "cd", 0, tmp_path / "data", policy_path, out, echo=lambda s: None)
    state = torch.load(out / "encoder.pt", weights_only=True)
    assert any(k.startswith("backbone.") for k in state)
    history = (out / "history.csv").read_text().splitlines()
    assert "e_pos" in history[0] and "e_neg" in history[0]
    assert np.isfinite(summary["final_loss"])
    for name in ("cd_energy_histogram.png", "cd_negatives.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["diagnostics"]) == {"cd_energy_data", "cd_energy_negatives", "cd_energy_noise"}
    assert all(np.isfinite(v) for v in summary["diagnostics"].values())
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temp files
