"""The method interface (methods/base.py): every method has it, its optional hooks are optional,
each method's training path calls the loss function its own tests check, and the loop knows no
method by name (CPU, seconds)."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

from sslpipe import data
from sslpipe import pretrain as pt
from sslpipe import supervised
from sslpipe.checkpoint import Checkpoint
from sslpipe.config import resolve
from sslpipe.methods import METHODS, base, cd, dae, moco, pirl, simclr
from sslpipe.models import DivergedError, TrainingError, build_encoder

TINY = {"methods": sorted(METHODS), "device": "cpu", "precision": "fp32",
        "data": {"source": "digits", "image_size": 16, "max_train": 64, "max_test": 20},
        "model": {"width": 8}, "pretrain": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
        "moco": {"queue_size": 32}, "pirl": {"grid": 2, "num_negatives": 16},
        "cd": {"langevin_steps": 2, "buffer_size": 32, "objective": "hybrid"}, "tracking": {"enabled": False}}
# The function each method's tests check against the paper, in the module its loss looks it up in.
TESTED_LOSS = {"simclr": (simclr, "nt_xent"), "moco": (moco, "info_nce"), "pirl": (pirl, "l_pirl"),
               "dae": (dae, "reconstruction_error"), "cd": (cd, "cd_loss")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("interface")
    cfg = resolve(TINY)
    data.prepare(cfg["data"], root / "data")
    manifest = data.load_manifest(root / "data")
    x = pt.load_train_tensor(root / "data", torch.device("cpu"), False)
    return {"cfg": cfg, "data_dir": root / "data", "manifest": manifest, "x": x}


def build(tiny, name):
    torch.manual_seed(0)
    policy = METHODS[name].policy(tiny["cfg"][name], 16)
    return pt.build_method(tiny["cfg"], name, policy, tiny["manifest"], len(tiny["x"]), torch.device("cpu"))[1]


def test_every_method_has_the_interface_and_is_registered_by_its_name(tiny):
    assert list(METHODS) == ["simclr", "moco", "pirl", "dae", "cd"]  # the schema's enum, in its order
    for name, cls in METHODS.items():
        assert cls.name == name and isinstance(build(tiny, name), base.Method)
    # The supervised baseline has the same shape but is no method the pipeline pretrains.
    assert supervised.Supervised.name not in METHODS
    enc = build_encoder(tiny["cfg"]["model"], tiny["manifest"])
    assert isinstance(supervised.Supervised(enc, torch.zeros(64, dtype=torch.long), 10,
                                            supervised.mild_policy(16)), base.Method)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_training_loss_is_the_tested_function(tiny, name, monkeypatch):
    """`loss` returns (a term of) what the function its tests check returns, computed there."""
    module, fn_name = TESTED_LOSS[name]
    real, results = getattr(module, fn_name), []

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    method = build(tiny, name)
    monkeypatch.setattr(module, fn_name, spy)
    idx = torch.arange(16)
    loss, logs = method.loss(tiny["x"][idx], idx)
    assert results, f"{name}.loss never called {module.__name__}.{fn_name}"
    if name == "cd":  # hybrid: the CD term plus the pair InfoNCE (cd.pair_nce, tested in test_cd.py)
        assert torch.equal(logs["l_cd"], results[-1].detach().float())
        assert torch.allclose(loss, results[-1] + tiny["cfg"]["cd"]["nce_weight"] * logs["l_nce"])
    else:  # dae also scores the corrupted input with it (a log): the loss is one of the calls
        assert any(loss is r for r in results)


class Bare(nn.Module):
    """A method with the required members only: no after_step, global_bn or diagnostics."""
    name = "bare"

    @staticmethod
    def policy(cfg, image_size):
        return {"method": "bare", "image_size": image_size, "n_views": 1, "views": {}}

    @staticmethod
    def preview(policy, x):
        return [x]

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def loss(self, x, idx):
        return self.encoder(x.float() / 255).pow(2).mean(), {}


def test_optional_hooks_are_optional(tiny):
    cfg, cpu = tiny["cfg"], torch.device("cpu")
    torch.manual_seed(0)
    enc = build_encoder(cfg["model"], tiny["manifest"])
    method = pt.place(cfg, Bare(enc), enc, cpu)
    assert isinstance(method, base.Method) and base.global_bn(method) and not base.has_diagnostics(method)
    assert base.diagnostics(method, tiny["x"][:4], ".") == {} and base.divergence_hint(method) == ""
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    st, _, resumed = pt.fit(cfg, cfg["pretrain"], method, "bare", tiny["x"], 0, cpu, None,
                            Checkpoint(None, "", 1, cpu), lambda m, s=None: None, lambda line: None, "train bare")
    assert resumed is None and st.step == 64 // 16 and len(st.history) == 1 and not method.training
    assert any(not torch.equal(before[k], v) for k, v in enc.state_dict().items())  # it trained


def test_the_loop_knows_no_method_by_name():
    """The loop catches the TrainingError hierarchy, not one method's error; a method's own
    advice on divergence is its `divergence_hint`."""
    source = inspect.getsource(pt)
    assert "methods.cd" not in source and "EnergyError" not in source
    assert issubclass(cd.EnergyError, DivergedError) and issubclass(DivergedError, TrainingError)
    assert "cd.step_size" in base.divergence_hint(cd.CD)
    assert json.dumps(supervised.mild_policy(16))  # the baseline's policy is JSON-able, as every method's
