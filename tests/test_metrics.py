"""The paired intervals behind every "beats" in the report and `compare`, against references
written here: a naive index-resampling bootstrap, and the normal approximation for one seed."""
from __future__ import annotations

import numpy as np
import pytest

from sslpipe import metrics as mt


def _naive_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Draw seeds (if several) and images by index, one resample at a time."""
    rng = np.random.default_rng(seed)
    s, n = a.shape
    boots = []
    for _ in range(n_boot):
        si = rng.integers(0, s, s) if s > 1 else np.zeros(1, dtype=int)
        ii = rng.integers(0, n, n)
        boots.append((a[si][:, ii] - b[si][:, ii]).mean())
    return tuple(np.quantile(boots, [0.025, 0.975]))


def _pair(rng, n: int, pa: float, pb: float, seeds: int = 1) -> tuple[np.ndarray, np.ndarray]:
    return (rng.random((seeds, n)) < pa).astype(float), (rng.random((seeds, n)) < pb).astype(float)


def test_one_seed_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a, b = _pair(rng, 4000, 0.60, 0.55)
    ci = mt.paired_bootstrap(a, b)
    d = (a - b)[0]
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert ci["diff"] == pytest.approx(d.mean())
    assert ci["lo"] == pytest.approx(d.mean() - half, abs=0.003)
    assert ci["hi"] == pytest.approx(d.mean() + half, abs=0.003)
    assert ci["resampled"] == "test images (one seed)" and ci["n_images"] == 4000


def test_several_seeds_match_a_naive_bootstrap():
    rng = np.random.default_rng(2)
    # Seeds that disagree: the seed-level spread must widen the interval beyond the images' alone.
    a = np.stack([(rng.random(1000) < p).astype(float) for p in (0.50, 0.62, 0.56)])
    b = (rng.random((3, 1000)) < 0.50).astype(float)
    ci = mt.paired_bootstrap(a, b, n_boot=4000)
    lo, hi = _naive_bootstrap(a, b, 4000, seed=5)
    assert ci["lo"] == pytest.approx(lo, abs=0.006) and ci["hi"] == pytest.approx(hi, abs=0.006)
    images_only = mt.paired_bootstrap(a.reshape(1, -1), b.reshape(1, -1))
    assert ci["hi"] - ci["lo"] > 1.3 * (images_only["hi"] - images_only["lo"])
    assert ci["resampled"] == "seeds and test images"


def test_pairing_matters():
    """The same two models, once paired by image and once with b's images shuffled: pairing removes
    the shared difficulty of the images and narrows the interval."""
    rng = np.random.default_rng(3)
    hard = rng.random(2000) < 0.4                      # images both models get wrong more often
    a = ((rng.random(2000) < 0.9) & ~hard | (rng.random(2000) < 0.2) & hard).astype(float)[None]
    b = ((rng.random(2000) < 0.85) & ~hard | (rng.random(2000) < 0.15) & hard).astype(float)[None]
    paired = mt.paired_bootstrap(a, b)
    unpaired = mt.paired_bootstrap(a, b[:, rng.permutation(2000)])
    assert paired["hi"] - paired["lo"] < 0.8 * (unpaired["hi"] - unpaired["lo"])


@pytest.mark.parametrize("pa,pb,expected", [(0.70, 0.55, "beats"), (0.55, 0.70, "worse"), (0.60, 0.60, "no clear difference")])
def test_verdict_follows_the_interval(pa, pb, expected):
    rng = np.random.default_rng(4)
    ci = mt.paired_bootstrap(*_pair(rng, 1000, pa, pb))
    assert mt.verdict(ci) == expected
    assert mt.verdict({"lo": -0.001, "hi": 0.2}) == "no clear difference"


def test_comparisons_pair_seeds_and_skip_missing():
    rng = np.random.default_rng(5)
    hit = lambda p: (rng.random(500) < p).astype(float)  # noqa: E731
    hits = {"simclr": {0: {"linear_top1": hit(0.8), "knn_top1": hit(0.7)}, 1: {"linear_top1": hit(0.8)}},
            "random": {0: {"linear_top1": hit(0.4), "knn_top1": hit(0.3)}, 1: {"linear_top1": hit(0.4)}}}
    comps = mt.comparisons(hits, ["simclr"], ["random"], ["linear_top1", "linear_top5", "knn_top1"])
    by = {c["metric"]: c for c in comps}
    assert set(by) == {"linear_top1"}  # knn_top1 lacks seed 1's hits; top-5 has none
    assert by["linear_top1"]["n_seeds"] == 2 and by["linear_top1"]["verdict"] == "beats"
    assert mt.sentence(by["linear_top1"]).startswith("simclr beats random on linear top-1 (+")


def test_metric_names():
    keys = mt.metric_keys([{"linear_top1_10pct": 1, "linear_top1_1pct": 1, "linear_top1_0p5pct": 1}])
    assert keys == ["linear_top1", "linear_top5", "knn_top1", "linear_top1_0p5pct", "linear_top1_1pct",
                    "linear_top1_10pct"]
    assert mt.label("linear_top1_0p5pct") == "Linear top-1 (0.5% labels)"
    assert mt.top1_keys(keys)[:2] == ["linear_top1", "knn_top1"]
