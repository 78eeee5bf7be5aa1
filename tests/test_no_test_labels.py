"""Pretraining never reads the test split: the kNN monitor scores held-out *training* images
(the probe's validation split), and test labels are read once, in linear_eval."""
from __future__ import annotations

import shutil

import pandas as pd
import torch

from sslpipe import data, evaluate as ev, pretrain
from sslpipe.config import resolve
from sslpipe.methods import METHODS
from sslpipe.io import write_json

CFG = {"methods": ["simclr"], "device": "cpu", "precision": "fp32", "data": {"image_size": 16, "max_train": 200, "max_test": 60},
       "model": {"width": 8}, "pretrain": {"epochs": 2, "batch_size": 50, "warmup_epochs": 0},
       "evaluate": {"knn_monitor_every": 1}, "tracking": {"enabled": False}}


def test_pretraining_runs_without_the_test_split(tmp_path):
    cfg = resolve(CFG)
    data_dir = tmp_path / "data"
    data.prepare(cfg["data"], data_dir)
    (data_dir / "test.npz").unlink()  # any read of the test split (images or labels) now fails
    manifest = data.load_manifest(data_dir)
    policy = METHODS["simclr"].policy(cfg["simclr"], manifest["image_size"])
    write_json(tmp_path / "policy.json", policy)
    torch.set_num_threads(1)
    pretrain.run(cfg, "simclr", 0, data_dir, tmp_path / "policy.json", tmp_path / "out")
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert "val_knn_top1" in history and history["val_knn_top1"].notna().all()
    assert "knn_top1" not in history  # no column that could be read as a test score


def test_monitor_scores_the_probes_validation_split(tmp_path):
    """The monitor's queries are exactly the validation images linear evaluation holds out."""
    cfg = resolve(CFG)
    data_dir = tmp_path / "data"
    data.prepare(cfg["data"], data_dir)
    shutil.copy(data_dir / "train.npz", tmp_path / "train_copy.npz")
    x, y = data.load_split(data_dir, "train")
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    every, fn = pretrain.knn_monitor(cfg, encoder, xt, data_dir, torch.device("cpu"), seed=3)
    bank, val = ev.validation_split(y, cfg["evaluate"]["val_fraction"], 3)
    k = ev.knn_k_for(cfg["evaluate"]["knn_k"], len(bank))
    expected = ev.knn_monitor(encoder, xt[bank], y[bank], xt[val], y[val], torch.device("cpu"), None, k,
                              cfg["evaluate"]["knn_temperature"])
    assert every == 1 and fn() == expected
    assert set(bank).isdisjoint(val) and len(bank) + len(val) == len(y)


def test_knn_k_follows_the_training_set_size():
    assert ev.knn_k_for(None, 1437) == 20 and ev.knn_k_for(None, 50_000) == 200 and ev.knn_k_for(7, 10) == 7
