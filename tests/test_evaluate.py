import math

import numpy as np
import torch

from sslpipe import data, evaluate as ev
from sslpipe.config import resolve
from sslpipe.models import build_encoder, state_fingerprint


def knn_reference(ftr, ytr, fte, num_classes, k, t):
    """Weighted kNN vote, one test point at a time."""
    preds = []
    for f in fte:
        sims = [(float(torch.dot(f, g) / (f.norm() * g.norm())), int(y)) for g, y in zip(ftr, ytr)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


def test_knn_matches_reference():
    torch.manual_seed(0)
    ftr, fte = torch.randn(60, 5), torch.randn(20, 5)
    ytr = torch.randint(0, 4, (60,))
    for k, t in ((1, 0.07), (7, 0.5), (200, 0.07)):
        got = ev.knn_predict(ftr, ytr, fte, 4, k, t, chunk=7).tolist()
        assert got == knn_reference(ftr, ytr, fte, 4, min(k, 60), t)


def test_linear_probe_separates_digits_pixels_and_never_tunes_on_test(digits_dir):
    xtr, ytr = data.load_split(digits_dir, "train")
    xte, yte = data.load_split(digits_dir, "test")
    ecfg = resolve({})["evaluate"]
    ftr, fte = ev.pixel_features(xtr), ev.pixel_features(xte)
    out = ev.linear_probe(ftr, ytr, fte, yte, 10, ecfg["weight_decays"], 0.1, 100, seed=0)
    assert out["linear_top1"] > 0.9 and out["linear_top5"] >= out["linear_top1"]
    # Scramble the test labels: the chosen weight decay and the validation score must not move
    # (they come from the training set alone); only the final test score may.
    scrambled = np.random.default_rng(0).permutation(yte)
    again = ev.linear_probe(ftr, ytr, fte, scrambled, 10, ecfg["weight_decays"], 0.1, 100, seed=0)
    assert again["probe_weight_decay"] == out["probe_weight_decay"]
    assert again["probe_val_top1"] == out["probe_val_top1"]
    assert again["linear_top1"] < 0.3


def test_stratified_split_is_balanced_and_disjoint():
    y = np.repeat(np.arange(5), 40)
    tr, va = ev.stratified_split(y, 0.1, seed=1)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert np.bincount(y[va]).tolist() == [4] * 5
    assert np.array_equal(va, ev.stratified_split(y, 0.1, seed=1)[1])


def test_evaluate_encoder_leaves_weights_unchanged(digits_dir):
    manifest = data.load_manifest(digits_dir)
    xtr, ytr = data.load_split(digits_dir, "train")
    xte, yte = data.load_split(digits_dir, "test")
    torch.manual_seed(0)
    enc = build_encoder({"backbone": "small_cnn", "width": 8}, manifest)
    enc.train()  # evaluation must switch to eval mode, or BatchNorm statistics would drift
    before = state_fingerprint(enc)
    ecfg = resolve({"evaluate": {"weight_decays": [0.001], "probe_steps": 50}})["evaluate"]
    out = ev.evaluate_encoder(enc, xtr[:300], ytr[:300], xte[:100], yte[:100], 10, ecfg, 0,
                              torch.device("cpu"), None)
    assert out["encoder_unchanged"] and state_fingerprint(enc) == before
    assert out["feature_dim"] == 32 and 0 <= out["knn_top1"] <= 1
