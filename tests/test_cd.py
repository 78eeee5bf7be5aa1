"""Tests for sslpipe.methods.cd: losses and SGLD against naive references, CD.loss by hand from its
energies, buffer, BatchNorm, guards, a 2-D toy EBM, a learning test, a 1-epoch pretrain run."""
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
from sslpipe.methods.cd import CD, EnergyError, cd_loss, colour_noise, langevin, pair_nce
from sslpipe.models import build_encoder

MANIFEST = {"mean": [0.5] * 3, "std": [0.25] * 3}
IDENTITY_VIEWS = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine: one thread avoids oversubscription (often 10x faster).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(image_size: int = 8, width: int = 4, **over) -> CD:
    base = resolve({})["cd"]
    cfg = {**base, **over, "views": {**base["views"], **over.get("views", {})}}
    enc = build_encoder({"backbone": "small_cnn", "width": width}, MANIFEST)
    return CD(enc, cfg, CD.policy(cfg, image_size), num_train=100)


def fake(n: int, size: int = 8, lo: int = 0, hi: int = 256) -> torch.Tensor:
    return torch.randint(lo, hi, (n, 3, size, size), dtype=torch.uint8)


# ----------------------------------------------------------------------------- pure functions
def test_cd_loss_matches_naive_reference():
    torch.manual_seed(0)
    e_pos, e_neg, alpha = torch.randn(7), torch.randn(5), 0.3
    pos = sum(float(e) for e in e_pos) / len(e_pos)
    neg = sum(float(e) for e in e_neg) / len(e_neg)
    reg = sum(float(a) ** 2 for a in e_pos) / len(e_pos) + sum(float(b) ** 2 for b in e_neg) / len(e_neg)
    assert torch.allclose(cd_loss(e_pos, e_neg, alpha), torch.tensor(pos - neg + alpha * reg), atol=1e-6)
    # Sign: lowering data energy and raising negative energy lowers the loss.
    assert cd_loss(e_pos - 1, e_neg + 1, 0.0) < cd_loss(e_pos, e_neg, 0.0)
    # The analytic optimum the docstring names: -1/(2 alpha) at E+ = -1/(2 alpha), E- = +1/(2 alpha).
    a = 0.1
    assert cd_loss(torch.full((3,), -5.0), torch.full((3,), 5.0), a).item() == pytest.approx(-1 / (2 * a))


def naive_pair_nce(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z, n, total = [v / v.norm() for v in torch.cat([z1, z2])], len(z1), 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        energy = lambda k: -float(z[i] @ z[k]) / t  # E(v_i, v_k) = -cos / t
        total += energy(partner) + math.log(sum(math.exp(-energy(k)) for k in range(2 * n) if k != i))
    return total / (2 * n)


def test_pair_nce_matches_naive_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3) * 3
    assert pair_nce(z1, z2, 0.5).item() == pytest.approx(naive_pair_nce(z1, z2, 0.5), abs=1e-5)
    assert pair_nce(z1, z1 * 2, 0.5) < pair_nce(z1, z2, 0.5)  # aligned views: lower pair energy


def test_langevin_quadratic_energy_matches_update_formula():
    torch.manual_seed(0)
    c = torch.tensor([0.2, 0.9, 1.5, -0.4])  # the last two lie outside [0, 1]: clamping must hold
    energy = lambda x: 0.5 * (x - c).pow(2).sum(1)  # dE/dx = x - c
    x0 = torch.rand(5, 4)
    steps, step = 6, 0.3
    expected, drift = x0.clone(), 0.0
    for _ in range(steps):
        for i in range(len(expected)):
            for j in range(4):
                move = step * (float(expected[i, j]) - float(c[j]))
                drift += abs(move) / (steps * expected.numel())
                expected[i, j] = min(1.0, max(0.0, float(expected[i, j]) - move))
    out, d = langevin(energy, x0, steps, step, noise_std=0.0)
    assert torch.allclose(out, expected, atol=1e-6) and d.item() == pytest.approx(drift, rel=1e-5)
    assert out.min() >= 0 and out.max() <= 1 and not out.requires_grad
    assert (out[:, :2] - c[:2]).abs().max() < (x0[:, :2] - c[:2]).abs().max()  # moved toward c
    # Other bounds (the 2-D toy's box) are honoured too.
    assert langevin(energy, x0, 50, 1.0, 0.0, bounds=(-0.1, 0.5))[0][:, 3].allclose(torch.tensor(-0.1))


def test_langevin_noise_has_noise_std():
    torch.manual_seed(0)
    x0 = torch.full((20000,), 0.5)
    out, drift = langevin(lambda x: 0.0 * x, x0, 1, 1.0, noise_std=0.01)
    assert abs((out - x0).std().item() - 0.01) < 5e-4 and drift == 0


def test_colour_noise_keeps_the_data_colour_space():
    torch.manual_seed(0)
    grey = torch.rand(64, 1, 8, 8).expand(64, 3, 8, 8) * 0.5 + 0.25  # grey data in [0.25, 0.75]
    noise = colour_noise(grey, 500)
    assert noise.shape == (500, 3, 8, 8) and 0 <= noise.min() <= noise.max() <= 1
    assert (noise - noise.mean(1, keepdim=True)).abs().mean() < 0.02   # grey data -> grey noise
    assert (noise.mean(0) - grey.mean(0)).abs().mean() < 0.03          # the data's mean image
    assert abs(noise.std().item() - grey.std().item()) < 0.03          # the data's spread
    with torch.autocast("cpu", dtype=torch.bfloat16):  # exactly grey data under autocast (digits)
        flat = torch.rand(64, 1, 8, 8).expand(64, 3, 8, 8)
        assert (colour_noise(flat, 50).std(1)).max() < 1e-3
    red = torch.zeros(64, 3, 8, 8)
    red[:, 0] = torch.rand(64, 8, 8)
    assert colour_noise(red, 200)[:, 1:].abs().max() < 0.1              # red data -> red noise


def test_pcd_draw_distinct_slots_and_reinit_fraction():
    torch.manual_seed(0)
    slots, reinit = cd_mod.pcd_draw(50000, 20000, 0.05, torch.device("cpu"))
    assert len(slots.unique()) == 20000 and slots.max() < 50000
    assert abs(reinit.float().mean().item() - 0.05) < 0.006  # binomial sd ~0.0015


# ----------------------------------------------------------------------------- the method
@pytest.mark.parametrize("objective", ["energy", "hybrid"])
def test_cd_loss_step_equals_hand_computation_from_its_energies(objective):
    """One CD.loss on a fixed batch equals the loss computed here from the energies (and
    projections) it produced; the rows taken as positives are the data, the negatives the chains."""
    torch.manual_seed(0)
    model = make(objective=objective, negatives=4, buffer_size=64, alpha=0.3, langevin_steps=3,
                 views=IDENTITY_VIEWS, energy_bound=5.0, nce_weight=0.7)
    inputs, heads, projs = [], [], []
    model.encoder.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    model.head.register_forward_hook(lambda m, i, o: heads.append(o.detach().squeeze(1).float()))
    if objective == "hybrid":
        model.proj.register_forward_hook(lambda m, i, o: projs.append(o.detach().float()))
    x = fake(8, lo=60, hi=200)
    loss, logs = model.loss(x, torch.arange(8))
    (k,) = [i for i, h in enumerate(heads) if len(h) == 2 * 4]  # the training forward: 4 data, 4 negatives
    batch, e = inputs[k], 5.0 * torch.tanh(heads[k] / 5.0)
    assert (batch[:4] - to_float(x[:4])).abs().mean() < 0.03  # positives: the data (+ data_noise)
    slots_written = (model.buffer.float().flatten(1) != 0).any(1).nonzero().squeeze(1)
    assert len(slots_written) == 64  # buffer filled with restart noise at the first step
    pos, neg = [float(a) for a in e[:4]], [float(a) for a in e[4:]]
    mean = lambda a: sum(a) / len(a)
    expected = mean(pos) - mean(neg) + 0.3 * (mean([p * p for p in pos]) + mean([q * q for q in neg]))
    assert logs["l_cd"].item() == pytest.approx(expected, abs=1e-5)
    assert logs["e_gap"].item() == pytest.approx(mean(pos) - mean(neg), abs=1e-5)
    if objective == "hybrid":
        (z,) = projs
        assert len(z) == 16  # both views of all 8 images
        expected += 0.7 * naive_pair_nce(z[:8], z[8:], model.cfg["temperature"])
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    # The negatives in the forward are the chains written back to the buffer.
    written = model.buffer.float()
    assert all(any(torch.allclose(batch[4 + j].half().float(), written[s], atol=1e-3) for s in slots_written)
               for j in range(4))


@pytest.mark.parametrize("objective", ["energy", "hybrid"])
def test_energies_use_eval_mode_batchnorm(objective):
    """Every energy is a per-sample function (BatchNorm in eval mode, running statistics): with the
    pure energy the statistics never move from their init; in hybrid only the views' forward
    updates them. The encoder evaluation loads computes the trained network."""
    torch.manual_seed(0)
    model = make(mode="cd", langevin_steps=2, objective=objective)
    model.train()
    stats = lambda: {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    before = stats()
    x = torch.rand(6, 3, 8, 8)
    assert torch.allclose(model.energy(x[:1]), model.energy(x)[:1], atol=1e-5)  # no batch dependence
    assert all(torch.equal(stats()[k], v) for k, v in before.items())
    assert all(m.training for m in model.modules())  # train mode restored after each energy
    loss, _ = model.loss(fake(16), torch.arange(16))
    loss.backward()
    moved = [not torch.equal(stats()[k], v) for k, v in before.items()]
    assert all(moved) if objective == "hybrid" else not any(moved)
    enc = build_encoder({"backbone": "small_cnn", "width": 4}, MANIFEST)
    enc.load_state_dict(model.encoder.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.energy_of(enc.eval()(x)), model.energy(x), atol=1e-5)


def test_sampling_leaves_parameters_alone_and_runs_under_autocast():
    torch.manual_seed(0)
    model = make(langevin_steps=2)
    x_neg, drift = model.sample(torch.rand(6, 3, 8, 8))
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert x_neg.dtype == torch.float32 and not x_neg.requires_grad and 0 <= x_neg.min() <= x_neg.max() <= 1
    assert drift > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole training step works under autocast
        loss, logs = model.loss(fake(8), torch.arange(8))
        x_neg, _ = model.sample(torch.rand(6, 3, 8, 8))
    loss.backward()
    assert x_neg.dtype == torch.float32  # chains accumulate in fp32 even when the passes are bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and model.buffer.dtype == torch.float16
    assert {"e_pos", "e_neg", "e_gap", "e_noise", "drift_noise", "neg_spread", "l_cd"} <= set(logs)


def test_pcd_writes_back_exactly_the_drawn_slots(monkeypatch):
    torch.manual_seed(0)
    model = make(buffer_size=1000, reinit_fraction=0.25, langevin_steps=1, step_size=1e-3, noise_std=0.01)
    assert model.state_dict()["buffer"].shape == (1000, 3, 8, 8) and not model.filled  # resumable state
    model.loss(fake(400), torch.arange(400))  # the first step fills the buffer
    assert model.filled
    drawn = []
    real_draw = cd_mod.pcd_draw
    monkeypatch.setattr(cd_mod, "pcd_draw", lambda *a: drawn.append(real_draw(*a)) or drawn[-1])
    before = model.buffer.clone()
    loss, logs = model.loss(fake(400), torch.arange(400))
    (slots, reinit), = drawn
    changed = (model.buffer != before).flatten(1).any(1)
    assert set(changed.nonzero().squeeze(1).tolist()) == set(slots.tolist())
    # Restarted chains jump to fresh noise; the others move ~noise_std.
    jump = (model.buffer[slots].float() - before[slots].float()).abs().flatten(1).mean(1)
    assert torch.equal(jump > 0.1, reinit)
    assert 60 <= int(reinit.sum()) <= 140  # ~0.25 * 400 = 100, binomial sd ~8.7
    assert torch.isfinite(loss) and all(v.dim() == 0 for v in logs.values())


def test_cd_mode_chains_start_at_data_plus_kick(monkeypatch):
    torch.manual_seed(0)
    model = make(mode="cd", init_noise=0.05, data_noise=0.0)
    assert not hasattr(model, "buffer")
    starts = []
    monkeypatch.setattr(model, "views", lambda x: [to_float(x)])  # identity view
    monkeypatch.setattr(model, "sample", lambda x0: starts.append(x0) or (x0, torch.zeros(())))
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
        model.head[-1].weight.mul_(1e3)
    x = torch.rand(32, 3, 8, 8)
    with model.bn_eval():
        raw = model.head(model.encoder(x)).squeeze(1)
    e = model.energy(x)
    assert e.abs().max() <= 0.5 and raw.abs().max() > 5
    assert torch.allclose(e, 0.5 * torch.tanh(raw / 0.5))


def test_non_finite_energy_raises_clear_error():
    torch.manual_seed(0)
    model = make(buffer_size=64)
    model.loss(fake(16), torch.arange(16))
    with torch.no_grad():
        model.head[-1].bias.fill_(float("nan"))
    before = model.buffer.clone()
    with pytest.raises(EnergyError, match=r"non-finite.*cd\.step_size.*cd\.alpha"):
        model.loss(fake(16), torch.arange(16))
    assert torch.equal(model.buffer, before)  # the failed step did not poison the buffer


def test_collapsed_chains_raise_clear_error(monkeypatch):
    """An energy with one sharp minimum pulls every chain onto the same image: the negatives no
    longer differ from one another, and the step stops with a one-line message."""
    torch.manual_seed(0)
    model = make(buffer_size=64)
    model.loss(fake(16), torch.arange(16))  # the defaults sample without collapsing
    target = torch.rand(3, 8, 8)
    monkeypatch.setattr(model, "energy", lambda v: 0.25 * (v - target).pow(2).flatten(1).sum(1))
    model.sampler.update(noise_std=0.0)
    before = model.buffer.clone()
    with pytest.raises(EnergyError, match=r"chains collapsed.*cd\.collapse_ratio") as err:
        model.loss(fake(16), torch.arange(16))
    assert "\n" not in str(err.value)
    assert torch.equal(model.buffer, before)  # the collapsed chains were not written back


def test_policy_and_preview():
    cfg = resolve({})["cd"]
    policy = CD.policy(cfg, 16)
    assert json.loads(json.dumps(policy)) == policy
    assert policy["n_views"] == 1 and policy["langevin"] == {
        "mode": "pcd", "langevin_steps": 20, "step_size": 1.0, "noise_std": 0.01, "init_noise": 0.1,
        "restart": "data", "data_noise": 0.015}
    assert CD.policy({**cfg, "objective": "hybrid"}, 16)["n_views"] == 2
    torch.manual_seed(0)
    x = to_float(fake(8, 16, lo=100, hi=150))
    views = CD.preview(policy, x)
    assert len(views) == 2 and all(v.shape == x.shape and 0 <= v.min() <= v.max() <= 1 for v in views)
    cd_views = CD.preview(CD.policy({**cfg, "mode": "cd"}, 16), x)
    assert abs((cd_views[1] - cd_views[0]).std().item() - 0.1) < 0.01


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
        x_neg, _ = langevin(energy, torch.rand(128, 2) * 6 - 3, 10, 0.05, 0.05, bounds=box)
        loss = cd_loss(energy(spiral(128)), energy(x_neg), 0.1)
        opt.zero_grad(), loss.backward(), opt.step()
    data, noise = spiral(2000), torch.rand(2000, 2) * 6 - 3
    assert energy(data).mean() + 1.0 < energy(noise).mean()
    samples, _ = langevin(energy, noise, 20, 0.05, 0.05, bounds=box)
    dist = lambda a: torch.cdist(a, data).min(1).values.mean()
    assert dist(samples) < 0.5 * dist(noise)


# ----------------------------------------------------------------------------- learning
def tinted_digits(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images with a nuisance: scikit-learn's digits at 16 px, each tinted by a random RGB
    colour (uint8 N x 3 x 16 x 16, labels N); a random encoder's features follow the tint."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.interpolate(torch.from_numpy(d.images[:n]).float()[:, None] / 16.0, size=16,
                                  mode="bilinear", align_corners=False)        # N x 1 x 16 x 16 in [0, 1]
    x = (x * (0.2 + 0.8 * torch.rand(len(x), 3, 1, 1, generator=g)) * 255).round().clamp(0, 255).to(torch.uint8)
    return x, torch.from_numpy(d.target[:n]).long()


def knn_top1(model: CD, xtr, ytr, xte, yte) -> float:
    from sslpipe.evaluate import knn_predict

    model.eval()  # as evaluation sees the encoder: BatchNorm on its running statistics
    with torch.no_grad():
        ftr, fte = model.encoder(to_float(xtr)), model.encoder(to_float(xte))
    model.train()
    return float((knn_predict(ftr, ytr, fte, 10, k=10, temperature=0.07) == yte).float().mean())


@pytest.mark.slow
def test_cd_hybrid_learns_features_on_tinted_digits():
    """The learning test: 384 real (tinted) digits at 16 px, 60 steps of hybrid pcd CD on one thread
    (a few seconds) lift kNN top-1 well above the same encoder at its random init."""
    x, y = tinted_digits()
    test = torch.arange(len(x)) % 4 == 0
    xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
    torch.manual_seed(0)
    views = {"crop_scale": [0.5, 1.0], "flip_p": 0.0, "jitter_p": 0.8, "grayscale_p": 0.2}
    model = make(16, width=8, objective="hybrid", langevin_steps=5, negatives=32, buffer_size=256,
                 alpha=1.0, nce_weight=4.0, step_size=10.0, views=views)
    random_init = knn_top1(model, xtr, ytr, xte, yte)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, len(xtr), (64,))
        loss, logs = model.loss(xtr[idx], idx)
        opt.zero_grad(), loss.backward(), opt.step()
    trained = knn_top1(model, xtr, ytr, xte, yte)
    assert trained > random_init + 0.08, (random_init, trained)  # measured: 0.60 -> 0.75
    assert all(torch.isfinite(v) for v in logs.values())


# ----------------------------------------------------------------------------- pretrain smoke
@pytest.mark.slow
def test_pretrain_one_epoch(tmp_path, monkeypatch):
    from sslpipe import data, pretrain
    from sslpipe.methods import METHODS

    monkeypatch.setitem(METHODS, "cd", CD)
    cfg = resolve({"methods": ["cd"], "model": {"width": 8}, "pretrain": {"epochs": 1, "batch_size": 32},
                   "data": {"image_size": 16}, "cd": {"langevin_steps": 5, "objective": "hybrid", "negatives": 16}})
    data.prepare({**cfg["data"], "max_train": 128, "max_test": 64}, tmp_path / "data")
    policy_path = tmp_path / "policy.json"
    policy_path.write_text(json.dumps(CD.policy(cfg["cd"], 16)))
    out = tmp_path / "run"
    summary = pretrain.run(cfg, "cd", 0, tmp_path / "data", policy_path, out, echo=lambda s: None)
    state = torch.load(out / "encoder.pt", weights_only=True)
    assert any(k.startswith("backbone.") for k in state)
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert {"e_pos", "e_neg", "e_gap", "e_noise", "drift_noise", "neg_spread", "l_cd", "l_nce"} <= set(header)
    assert np.isfinite(summary["final_loss"])
    for name in ("cd_energy_histogram.png", "cd_negatives.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(out / "cd_negatives.png").height >= 512  # enlarged: readable
    assert set(summary["diagnostics"]) == {"cd_energy_data", "cd_energy_negatives", "cd_energy_noise",
                                           "cd_drift_noise", "cd_neg_spread"}
    assert all(np.isfinite(v) for v in summary["diagnostics"].values())
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temp files
