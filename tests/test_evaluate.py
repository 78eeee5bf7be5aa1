import math

import numpy as np
import pytest
import torch

from sslpipe import data, evaluate as ev
from sslpipe.config import resolve
from sslpipe.models import build_encoder, state_fingerprint


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: one thread avoids oversubscribing a shared 2-core runner (the
    pipeline's evaluation jobs also run with one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.mark.slow
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


def test_validation_split_is_balanced_and_disjoint():
    y = np.repeat(np.arange(5), 40)
    tr, va = ev.validation_split(y, 0.1, seed=1)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert np.bincount(y[va]).tolist() == [4] * 5
    assert np.array_equal(va, ev.validation_split(y, 0.1, seed=1)[1])


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


def test_label_subsets_are_class_balanced_nested_and_seeded():
    y = np.repeat(np.arange(10), [100] * 9 + [3])      # 903 labels; class 9 is tiny
    ten = ev.label_subset(y, 0.1, seed=0)
    assert len(np.unique(ten)) == len(ten)
    assert np.bincount(y[ten]).tolist() == [9] * 9 + [3]  # round(0.1 * 903 / 10) each, all of class 9
    one = ev.label_subset(y, 0.01, seed=0)
    assert np.bincount(y[one]).tolist() == [1] * 10       # at least one of every class
    assert np.isin(one, ten).all()                        # one seed: the 1% subset lies inside the 10%
    assert np.array_equal(ten, ev.label_subset(y, 0.1, seed=0))
    assert not np.array_equal(ten, ev.label_subset(y, 0.1, seed=1))
    # A stream of its own: the subset is not the first draws of the probe's validation split.
    assert not np.isin(ev.validation_split(y, 0.1, seed=0)[1], ten).all()


def test_fraction_names():
    assert [ev.fraction_tag(f) for f in (0.01, 0.1, 0.07, 0.25, 0.005)] == ["1pct", "10pct", "7pct", "25pct", "0p5pct"]
    # Clashing names are a config error, found when the config is resolved, before any job runs.
    with pytest.raises(ValueError, match=r"evaluate.label_fractions.*clashing metric names"):
        resolve({"evaluate": {"label_fractions": [0.1, 0.1 + 1e-13]}})


def test_label_efficient_probe_selects_on_its_subset_and_never_tunes_on_test(digits_dir):
    xtr, ytr = data.load_split(digits_dir, "train")
    xte, yte = data.load_split(digits_dir, "test")
    ecfg = resolve({"evaluate": {"weight_decays": [0.0, 0.01], "probe_steps": 50}})["evaluate"]
    ftr, fte = ev.pixel_features(xtr), ev.pixel_features(xte)
    ten = ev.label_efficient_probe(ftr, ytr, fte, yte, 10, 0.1, ecfg, 0, full_data_wd=0.123)
    assert ten["n_labels_10pct"] == len(ev.label_subset(ytr, 0.1, 0)) < len(ytr) // 5
    assert ten["probe_wd_source_10pct"] == "subset" and ten["probe_weight_decay_10pct"] in (0.0, 0.01)
    assert ten["linear_top1_10pct"] > 0.7               # ~14 labels a class separate digits' pixels
    # One label per class: no validation split is possible, so the full-data choice is reused.
    one = ev.label_efficient_probe(ftr, ytr, fte, yte, 10, 0.01, ecfg, 0, full_data_wd=0.123)
    assert one["n_labels_1pct"] == 10 and one["probe_wd_source_1pct"] == "full"
    assert one["probe_weight_decay_1pct"] == 0.123
    scrambled = np.random.default_rng(0).permutation(yte)
    again = ev.label_efficient_probe(ftr, ytr, fte, scrambled, 10, 0.1, ecfg, 0, full_data_wd=0.123)
    assert again["probe_weight_decay_10pct"] == ten["probe_weight_decay_10pct"]
    assert again["linear_top1_10pct"] < 0.3


def test_top5_is_at_least_top1_and_null_with_five_classes_or_fewer(digits_dir):
    xtr, ytr = data.load_split(digits_dir, "train")
    xte, yte = data.load_split(digits_dir, "test")
    ecfg = resolve({"evaluate": {"weight_decays": [0.001], "probe_steps": 30}})["evaluate"]
    ftr, fte = ev.pixel_features(xtr[:600]), ev.pixel_features(xte)
    ten = ev.evaluate_features(ftr, ytr[:600], fte, yte, 10, ecfg, 0)
    assert 0.8 < ten["linear_top1"] <= ten["linear_top5"] <= 1.0
    assert {"linear_top1_1pct", "linear_top1_10pct"} <= set(ten)
    tr, te = ytr[:600] < 5, yte < 5
    five = ev.evaluate_features(ftr[tr], ytr[:600][tr], fte[te], yte[te], 5, ecfg, 0)
    assert five["linear_top5"] is None and five["linear_top1"] > 0.8


def test_knn_monitor_changes_nothing_and_matches_the_full_knn(digits_dir):
    manifest = data.load_manifest(digits_dir)
    xtr, ytr = data.load_split(digits_dir, "train")
    xte, yte = data.load_split(digits_dir, "test")
    xtr, ytr, xte, yte = xtr[:300], ytr[:300], xte[:100], yte[:100]
    torch.manual_seed(0)
    enc = build_encoder({"backbone": "small_cnn", "width": 8}, manifest)
    enc.train()
    enc.backbone[1].eval()  # a mixed state (one frozen BatchNorm) must come back as it was
    modes = [m.training for m in enc.modules()]
    before, rng = state_fingerprint(enc), torch.get_rng_state()
    # As pretraining holds them: uint8 N x 3 x H x W tensors; labels as tensors.
    xt = torch.from_numpy(xtr).permute(0, 3, 1, 2).contiguous()
    acc = ev.knn_monitor(enc, xt, torch.from_numpy(ytr), xte, yte, torch.device("cpu"), None, k=20, temperature=0.1)
    assert [m.training for m in enc.modules()] == modes
    assert state_fingerprint(enc) == before                # BatchNorm statistics did not move
    assert torch.equal(torch.get_rng_state(), rng)        # training's random stream is untouched
    assert all(p.requires_grad for p in enc.parameters())
    # Below the caps the monitor is the full kNN evaluation of the same features.
    ftr = ev.extract_features(enc, xtr, torch.device("cpu"))
    fte = ev.extract_features(enc, xte, torch.device("cpu"))
    full = (ev.knn_predict(ftr, torch.from_numpy(ytr).long(), fte, 10, 20, 0.1) == torch.from_numpy(yte)).float().mean()
    assert acc == pytest.approx(full.item()) and acc > 0.3  # chance is 0.1
    # Caps: a fixed, evenly spread subset, the same whatever the input's type.
    capped = ev.knn_monitor(enc, xtr, ytr, xte, yte, torch.device("cpu"), None, k=20, temperature=0.1,
                            max_train=100, max_test=50)
    assert capped == ev.knn_monitor(enc, xt, ytr, xte, yte, torch.device("cpu"), None, k=20, temperature=0.1,
                                    max_train=100, max_test=50)


def test_pca_finds_the_dominant_direction_and_the_picture_is_a_png(tmp_path, monkeypatch):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, generator=g)
    f = 0.1 * torch.randn(300, 6, generator=g)
    f[:, 2] += 5 * t                                      # the first principal axis
    f[:, 4] += 2 * torch.randn(300, generator=g)          # the second
    xy, explained = ev.pca_2d(f)
    assert explained[0] > explained[1] > 0.05 and sum(explained) <= 1 + 1e-9
    assert torch.corrcoef(torch.stack([xy[:, 0], f[:, 2]]))[0, 1] > 0.99  # the sign is fixed, too
    assert torch.equal(xy, ev.pca_2d(f)[0])
    # Wide features (raw pixels of large images) take the randomised path: same picture, and
    # the global random stream is left alone.
    monkeypatch.setattr(ev, "EXACT_PCA_MAX_DIM", 3)
    rng = torch.get_rng_state()
    wide, wide_explained = ev.pca_2d(f)
    assert torch.allclose(wide, xy, atol=1e-4) and wide_explained == pytest.approx(explained)
    assert torch.equal(torch.get_rng_state(), rng)
    monkeypatch.undo()
    out = tmp_path / "embedding.png"
    assert ev.write_embedding(out, f, (t > 0).numpy().astype(int), "toy", ["neg", "pos"]) == explained
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.size[0] > 200 and img.size[1] > 200
    assert [p.name for p in tmp_path.iterdir()] == ["embedding.png"]  # no temporary left behind


def test_probe_is_refit_on_all_training_data_after_choosing_weight_decay():
    """Features built so that the answer depends on the refit: the fit half of the validation
    split carries the label in dimension 0 (and weakly against it in dimension 1), the held-out
    half in dimension 1 only, and the test set in dimension 1 only. A probe refit on all of
    train puts a positive weight on dimension 1 (test ~100 %); one fit on the fit half alone
    puts a negative one there (test ~0 %)."""
    g = torch.Generator().manual_seed(0)
    n, frac = 400, 0.5
    y = np.tile([0, 1], n // 2)
    sign = torch.from_numpy(2.0 * y - 1)
    fit, held = ev.validation_split(y, frac, seed=0)
    f = 0.05 * torch.randn(n, 2, generator=g)
    f[fit, 0] += sign[fit]
    f[fit, 1] -= 0.3 * sign[fit]
    f[held, 1] += 2 * sign[held]
    yte = np.tile([0, 1], 50)
    fte = 0.05 * torch.randn(100, 2, generator=g)
    fte[:, 1] += torch.from_numpy(2.0 * yte - 1)
    out = ev.linear_probe(f, y, fte, yte, 2, [0.0, 0.01], frac, 100, seed=0)
    assert out["linear_top1"] > 0.95, out


def test_test_features_are_standardised_with_training_statistics_only():
    """One feature; train: class 0 at -1, class 1 at +1; test: class 1 only, at +1 (+ noise).
    With the training mean and std the test points stay on class 1's side; standardised with
    their own statistics they would be centred on the boundary (about half wrong)."""
    g = torch.Generator().manual_seed(0)
    ytr = np.tile([0, 1], 100)
    ftr = torch.from_numpy(2.0 * ytr - 1)[:, None] + 0.1 * torch.randn(200, 1, generator=g)
    yte = np.ones(100, dtype=int)
    fte = 1 + 0.1 * torch.randn(100, 1, generator=g)
    out = ev.linear_probe(ftr.float(), ytr, fte.float(), yte, 2, [0.0], 0.2, 50, seed=0)
    assert out["linear_top1"] == 1.0, out
    # The function itself, against its definition.
    a, b = ev.standardise(ftr, fte)
    mean, std = ftr.mean(0), ftr.std(0)
    torch.testing.assert_close(b, (fte - mean) / std)
    torch.testing.assert_close(a, (ftr - mean) / std)
    # The label-efficient probes use the same training statistics.
    few = ev.label_efficient_probe(ftr.float(), ytr, fte.float(), yte, 2, 0.1, {
        "weight_decays": [0.0], "val_fraction": 0.2, "probe_steps": 50}, 0, full_data_wd=0.0)
    assert few["linear_top1_10pct"] == 1.0, few


def test_confusion_matrix_counts_test_predictions_by_true_class():
    """Rows are true classes, columns predictions: a class whose test points sit on another's side
    lands off the diagonal, and the diagonal's share is linear top-1."""
    g = torch.Generator().manual_seed(0)
    ytr = np.tile([0, 1, 2], 60)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    ftr = centres[ytr] + 0.2 * torch.randn(180, 2, generator=g)
    yte = np.repeat([0, 1, 2], 10)
    fte = centres[np.where(yte == 2, 1, yte)] + 0.2 * torch.randn(30, 2, generator=g)  # class 2 looks like 1
    out = ev.linear_probe(ftr, ytr, fte, yte, 3, [0.0], 0.2, 50, seed=0)
    assert out["linear_confusion"] == [[10, 0, 0], [0, 10, 0], [0, 10, 0]]
    assert out["linear_top1"] == pytest.approx(20 / 30)
