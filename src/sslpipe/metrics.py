"""Metric names, their aggregation over seeds, and the paired confidence intervals that decide
what the report and `compare` may claim. Each fact about metrics is defined here once.

Names. linear_eval writes `linear_top1`, `linear_top5`, `knn_top1` and, per label fraction f,
`linear_top1_{tag}` (`fraction_tag`: '1pct', '10pct'); its predictions.npz holds, for
each top-1 metric, one 0/1 hit per test image, in the test split's order.

Claims. "A beats B" is said only when the 95 % confidence interval of the paired difference
excludes zero; "B beats A" likewise; otherwise "no clear difference". The interval is a paired
bootstrap (Efron & Tibshirani 1993, ch. 13, percentile interval) over both sources of noise:
each of `N_BOOT` resamples draws the seeds with replacement (when there are two or more) and the
test images with replacement (the same images for every seed, since all seeds share one test
split), and takes the mean of hit_A - hit_B over the drawn (seed, image) pairs. Pairs are matched
by seed: method seed s against baseline seed s (the random-init baseline is initialised from the
same seed as the method's encoder) and the same test image. With one seed the interval covers
test-set sampling only, and says so (`resampled`).
"""
from __future__ import annotations

import re
import statistics
from typing import Any, Iterable

import numpy as np

METRICS = ("linear_top1", "linear_top5", "knn_top1")
METRIC_LABELS = {"linear_top1": "Linear top-1", "linear_top5": "Linear top-5", "knn_top1": "kNN top-1"}
PCT = re.compile(r"^linear_top1_(\d+(?:p\d+)?)pct$")  # the probe trained on p% of the labels ('0p5' = 0.5)
# Baselines that bound the methods from above (trained with labels): not a bar a method must clear.
REFERENCES = frozenset({"supervised"})
N_BOOT = 2000
LEVEL = 0.95
BOOT_SEED = 0  # the intervals are a pure function of the predictions


def fraction_tag(fraction: float) -> str:
    """'1pct' for 0.01, '10pct' for 0.1 (round(100 f)); a fraction that is not a whole percent
    keeps its digits ('0p5pct' for 0.005), so two fractions never share a name."""
    pct = 100 * fraction
    return f"{round(pct)}pct" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}".replace(".", "p") + "pct"


def clashing_tags(fractions: list[float]) -> list[str] | None:
    """The fractions' tags when two of them share one (their metric names would clash), else None
    (`config.problems` checks `evaluate.label_fractions` with it)."""
    tags = [fraction_tag(f) for f in fractions]
    return tags if len(set(tags)) != len(tags) else None


def load_hits(path) -> dict[str, np.ndarray] | None:
    """An evaluation's predictions.npz: per top-1 metric, 0/1 per test image (as float64, ready
    for `paired_bootstrap`); None when the file is absent."""
    from pathlib import Path

    if not Path(path).is_file():
        return None
    with np.load(path) as z:
        return {k: z[k].astype(np.float64) for k in z.files}


def _pct_value(key: str) -> float:
    return float(PCT.match(key).group(1).replace("p", "."))


def metric_keys(metrics: Iterable[dict]) -> list[str]:
    """The standard metrics, then each label-efficient probe present, by label fraction."""
    pct = {k for m in metrics for k in m if PCT.match(k)}
    return list(METRICS) + sorted(pct, key=_pct_value)


def top1_keys(keys: Iterable[str]) -> list[str]:
    """The metrics that have per-image hits (every top-1; not top-5)."""
    return [k for k in keys if k != "linear_top5"]


def label(key: str) -> str:
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    return f"Linear top-1 ({PCT.match(key).group(1).replace('p', '.')}% labels)"


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """Mean and sample std of the non-null values; std is 0.0 for a single value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def summarise(name: str, kind: str, metrics: list[dict], keys: list[str]) -> dict:
    """One row: `{m}_mean`, `{m}_std`, `{m}_n` for each metric over the seeds' metrics dicts."""
    row: dict[str, Any] = {"name": name, "kind": kind, "n_seeds": len(metrics)}
    for m in keys:
        row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = mean_std(r.get(m) for r in metrics)
    return row


def fmt_mean_std(row: dict, metric: str) -> str:
    mean, std, n = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"]
    return "—" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f} (n={n})"


def csv_columns(keys: list[str]) -> list[str]:
    return ["name", "kind", "n_seeds"] + [f"{m}_{s}" for m in keys for s in ("mean", "std")]


# ---- paired intervals ------------------------------------------------------------------------

def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = BOOT_SEED) -> dict:
    """Difference of mean accuracy A - B with its paired bootstrap interval.

    a, b: S x N hits (0/1) of the two models, row s = seed s of each (paired), column i = test
    image i. Returns {diff, lo, hi, n_seeds, n_images, resampled}: fractions (x100 for points).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired hits need one shape, got {a.shape} and {b.shape}")
    s, n = a.shape
    d = a - b                                                         # d: S x N
    rng = np.random.default_rng(seed)
    # Resample counts rather than indices: weight w_i = how often image i was drawn (sums to N).
    wi = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)           # wi: n_boot x N
    ws = rng.multinomial(s, np.full(s, 1 / s), size=n_boot) if s > 1 else np.ones((n_boot, 1))  # n_boot x S
    boot = np.einsum("bs,sn,bn->b", ws, d, wi) / (s * n)              # boot: n_boot
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n_seeds": s, "n_images": n,
            "resampled": "seeds and test images" if s > 1 else "test images (one seed)"}


def verdict(ci: dict) -> str:
    """'beats', 'worse' or 'no clear difference', as the interval says."""
    if ci["lo"] > 0:
        return "beats"
    if ci["hi"] < 0:
        return "worse"
    return "no clear difference"


def fmt_ci(ci: dict) -> str:
    """'+12.3 [+10.1, +14.6]' in accuracy points."""
    return f"{100 * ci['diff']:+.1f} [{100 * ci['lo']:+.1f}, {100 * ci['hi']:+.1f}]"


def comparisons(hits: dict[str, dict[int, dict[str, np.ndarray]]], methods: list[str], baselines: list[str],
                keys: list[str]) -> list[dict]:
    """Every method against every baseline, for each top-1 metric both have hits for.

    hits[name][seed][metric]: 0/1 per test image. Seeds are paired; only seeds both have count.
    """
    out = []
    for m in methods:
        for base in baselines:
            seeds = sorted(set(hits.get(m, {})) & set(hits.get(base, {})))
            for key in top1_keys(keys):
                if not seeds or any(key not in hits[n][s] for n in (m, base) for s in seeds):
                    continue
                ci = paired_bootstrap(np.stack([hits[m][s][key] for s in seeds]),
                                      np.stack([hits[base][s][key] for s in seeds]))
                out.append({"method": m, "baseline": base, "metric": key, **ci, "verdict": verdict(ci)})
    return out


def sentence(c: dict) -> str:
    """The report's wording for one comparison, following its interval."""
    what = f"on {label(c['metric']).lower()}"
    ci = f"({100 * c['diff']:+.1f} points, 95 % CI {100 * c['lo']:+.1f} to {100 * c['hi']:+.1f})"
    if c["verdict"] == "beats":
        return f"{c['method']} beats {c['baseline']} {what} {ci}"
    if c["verdict"] == "worse":
        return f"{c['method']} is worse than {c['baseline']} {what} {ci}"
    return f"{c['method']} vs {c['baseline']} {what}: no clear difference {ci}"
