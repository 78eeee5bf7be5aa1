"""The training loop itself (CPU, seconds): the learning-rate schedule the optimiser really steps
with, periodic checkpoints every N epochs, and what makes a checkpoint stale (code, data, world
size). Real training runs of a tiny SimCLR on real digits; the only hooks are an optimiser
step pre-hook that records the learning rate and a method subclass that turns the loss NaN.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sslpipe import checkpoint as ck
from sslpipe import data
from sslpipe import pretrain as pt
from sslpipe.config import resolve
from sslpipe.methods import METHODS

# 96 images / batch 32 = 3 steps per epoch.
TINY = {
    "seeds": [0], "methods": ["simclr"], "device": "cpu", "precision": "fp32",
    "data": {"source": "digits", "image_size": 16, "max_train": 96, "max_test": 30},
    "model": {"width": 8},
    "pretrain": {"epochs": 4, "batch_size": 32, "warmup_epochs": 1, "lr": 0.01},
    "tracking": {"enabled": False},
}
STEPS_PER_EPOCH = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    cfg = resolve(TINY)
    data.prepare(cfg["data"], root / "data")
    policy = root / "policy.json"
    policy.write_text(json.dumps(METHODS["simclr"].policy(cfg["simclr"], 16)))
    return {"cfg": cfg, "data_dir": root / "data", "policy": policy}


def run(tiny, cfg, out, **kw):
    return pt.run(cfg, "simclr", 0, tiny["data_dir"], tiny["policy"], out, echo=lambda s: None, **kw)


# ---- the schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("total, warmup, base", [(100, 10, 0.5), (12, 3, 0.01), (7, 0, 2e-3), (5, 5, 1.0)])
def test_lr_at_is_linear_warmup_then_half_cosine_to_zero(total, warmup, base):
    """SimCLR's schedule (Chen et al. 2020, B.1), written out here independently of lr_at."""
    got = [pt.lr_at(s, total, warmup, base) for s in range(total)]
    for s, lr in enumerate(got):
        if s < warmup:
            want = base * (s + 1) / warmup
        else:
            t = (s - warmup) / max(1, total - warmup)
            want = base * (1 + math.cos(math.pi * t)) / 2
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (s, lr, want)
    if warmup:  # warm-up ends at the base rate, rising by base/warmup per step
        assert got[warmup - 1] == pytest.approx(base) and got[0] == pytest.approx(base / warmup)
    after = got[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:])) and (not after or after[0] == pytest.approx(base))
    if len(after) > 2:  # half-way through the decay, half the base rate; the last step close to zero
        assert pt.lr_at(warmup + (total - warmup + 1) // 2, total, warmup, base) <= base / 2 + 1e-12
        assert after[-1] < 0.1 * base


def test_the_optimiser_steps_with_the_schedule(tiny, tmp_path, monkeypatch):
    """Every optimiser step of a real run uses lr_at(step): warm-up for one epoch, then cosine."""
    seen: list[float] = []
    real = pt.make_optimizer

    def recording(params, cfg, device):
        opt = real(params, cfg, device)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(pt, "make_optimizer", recording)
    run(tiny, tiny["cfg"], tmp_path / "out")
    total, warmup, base = 4 * STEPS_PER_EPOCH, STEPS_PER_EPOCH, TINY["pretrain"]["lr"]
    assert len(seen) == total
    assert seen[:warmup] == pytest.approx([base / 3, 2 * base / 3, base])  # by hand: 1/3, 2/3, 1
    assert seen == pytest.approx([pt.lr_at(s, total, warmup, base) for s in range(total)], rel=1e-12)
    # A new rate every step but one (the base rate ends the warm-up and starts the cosine); decayed at the end.
    assert seen[-1] < 0.05 * base and len(set(seen)) == total - 1
    rows = (tmp_path / "out" / "history.csv").read_text().splitlines()
    lr_col = rows[0].split(",").index("lr")
    logged = [float(r.split(",")[lr_col]) for r in rows[1:]]
    assert logged == pytest.approx(seen[STEPS_PER_EPOCH - 1::STEPS_PER_EPOCH])  # each epoch's last rate


# ---- periodic checkpoints ----------------------------------------------------------------------

def test_checkpoint_every_n_epochs_keeps_the_last_multiple(tiny, tmp_path, monkeypatch):
    """checkpoint_every: 2, the loss turns NaN at epoch 4: the checkpoint kept is the one after
    epoch 2 (with checkpoint_every: 1 it would be after epoch 3)."""
    cfg = copy.deepcopy(tiny["cfg"])
    cfg["pretrain"].update(checkpoint_every=2, epochs=6)
    base = METHODS["simclr"]

    class Diverging(base):  # NaN from the first step of epoch 4 (the 10th call) on
        calls = 0

        def loss(self, x, idx):
            type(self).calls += 1
            loss, logs = super().loss(x, idx)
            return (loss * float("nan") if type(self).calls >= 3 * STEPS_PER_EPOCH + 1 else loss), logs

    monkeypatch.setitem(METHODS, "simclr", Diverging)
    ckpt = tmp_path / "ck" / "checkpoint.pt"
    with pytest.raises(pt.TrainingError, match="non-finite at epoch 4") as err:
        run(tiny, cfg, tmp_path / "out", checkpoint=ckpt)
    assert "last good checkpoint, at epoch 3 after step 6 (its start)" in str(err.value), str(err.value)
    p = torch.load(ckpt, weights_only=True)["progress"]
    assert (p["epoch"], p["step"], len(p["history"])) == (3, 2 * STEPS_PER_EPOCH, 2)


def test_checkpoint_every_does_not_change_the_fingerprint(tiny):
    cfg, manifest = tiny["cfg"], data.load_manifest(tiny["data_dir"])
    policy = json.loads(tiny["policy"].read_text())
    other = copy.deepcopy(cfg)
    other["pretrain"]["checkpoint_every"] = 5
    cpu = torch.device("cpu")
    assert ck.fingerprint(cfg, "simclr", 0, manifest, policy, cpu, None) == \
        ck.fingerprint(other, "simclr", 0, manifest, policy, cpu, None)


# ---- what makes a checkpoint stale -------------------------------------------------------------

def test_checkpoint_is_ignored_after_a_change_of_code_data_or_world_size(tiny, tmp_path, monkeypatch):
    cfg, manifest, cpu = tiny["cfg"], data.load_manifest(tiny["data_dir"]), torch.device("cpu")
    policy = json.loads(tiny["policy"].read_text())

    def fp(cfg=cfg, manifest=manifest, world=1):
        return ck.fingerprint(cfg, "simclr", 0, manifest, policy, cpu, None, world)

    # A real checkpoint of a real (untrained) method and optimiser, written for this run.
    torch.manual_seed(0)
    _, method = pt.build_method(cfg, "simclr", policy, manifest, 96, cpu)
    opt = pt.make_optimizer(list(method.parameters()), cfg["pretrain"], cpu)
    path = tmp_path / "checkpoint.pt"
    ck.Checkpoint(path, fp(), 1, cpu).save(method, opt, ck.Progress(step=5), "here")

    def loads(fingerprint: str) -> bool:
        lines: list[str] = []
        st = ck.Checkpoint(path, fingerprint, 1, cpu).load(method, opt, lines.append)
        assert (st is None) == any("ignoring checkpoint" in line for line in lines)
        return st is not None

    assert loads(fp())
    other_data = dict(manifest, sha256="0" * 64)
    assert not loads(fp(manifest=other_data))
    assert not loads(fp(world=2))
    lr = copy.deepcopy(cfg)
    lr["pretrain"]["lr"] *= 2
    assert not loads(fp(cfg=lr))

    # The training code: a copy of the package in which one method file gains a comment.
    live, pkg = ck.code_hash(), tmp_path / "sslpipe"
    shutil.copytree(Path(ck.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(ck, "__file__", str(pkg / "checkpoint.py"))
    assert ck.code_hash() == live and loads(fp())
    (pkg / "report.py").write_text((pkg / "report.py").read_text() + "\n# not training code\n")
    assert ck.code_hash() == live
    for name in ("methods/simclr.py", "pretrain.py", "augment.py"):
        original = (pkg / name).read_text()
        (pkg / name).write_text(original + "\n# changed\n")
        assert ck.code_hash() != live and not loads(fp()), name
        (pkg / name).write_text(original)
    assert loads(fp())



class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_epoch_lines_are_plain_in_a_log_and_a_bar_on_a_terminal():
    from sslpipe import progress

    lines = ["pretrain simclr seed=0: 96 images", *(pt.progress_line(e, 3, {"loss": 1.0, "lr": 1e-3, "images_per_s": 50,
                                                                          "wall_s": 10.0 * e}) for e in (1, 2, 3)), "done"]
    log, tty = _Stream(False), _Stream(True)
    for line in lines:
        progress.say(line, log)
        progress.say(line, tty)
    assert log.text == "\n".join(lines) + "\n"  # a log file: one plain line each, no control characters
    assert "eta 0:20" in lines[1] and "elapsed 0:30 eta 0:00" in lines[3]
    # A terminal: the epochs redraw one line behind a bar (carriage returns), finished by a newline.
    shown = tty.text.split("\n")
    assert shown[0] == lines[0] and shown[2] == "done"
    assert shown[1].count("\r") == 3 and shown[1].endswith("\x1b[K") and "[####################] 100%" in shown[1]
    assert progress.clock(3725) == "1:02:05" and progress.clock(42) == "0:42"
