"""Evaluation of a frozen encoder: linear probes (all labels and a few), kNN, an embedding picture.

Protocol (linear evaluation as in SimCLR, Chen et al. 2020, sec. 4, and the label-efficient
variant of Zhai et al. 2019, S4L):

* Features are extracted once per job (inference mode, eval-mode BatchNorm, no augmentation)
  and reused by every probe, the kNN classifier and the PCA picture. They are not cached on
  disk across jobs: each (method, seed) is evaluated by exactly one job, so a cache would only
  add an undeclared output for Snakemake to track.
* Features are standardised with statistics of the training features (no labels involved).
* The probe's weight decay is chosen on a validation split held out from the *training* set;
  the probe is then refit on the whole training set and scored once on test. Test labels are
  read only for that final scoring (and to colour the embedding picture).
* Label-efficient probes (`evaluate.label_fractions`) fit the same probe on a class-balanced,
  seeded subset of the training labels. The weight decay is chosen on a validation split of
  the subset itself when it holds at least two examples of every class (so both halves see
  every class); otherwise the full-data choice is reused, and `probe_wd_source_*` says which.
* The encoder's weights are fingerprinted before and after, to prove probing did not change them.

`knn_monitor` is the cheap version of the kNN classifier for use *during* pretraining (Wu et
al. 2018 monitor instance discrimination this way): a fixed, capped subset, no weight changes,
the encoder's train/eval modes and torch's random state left as they were.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslpipe.data import stratified_split
from sslpipe.metrics import fraction_tag
from sslpipe.models import eval_mode, state_fingerprint

LABEL_SUBSET_STREAM = 1  # a random stream of its own, so subsets do not mirror the val split's draws


# ---- features --------------------------------------------------------------------------------

def _as_nchw_float(xb) -> Tensor:
    """A batch as float N x 3 x H x W in [0, 1]: numpy uint8 N x H x W x 3 (as stored on disk)
    or a torch uint8 N x 3 x H x W (as pretraining keeps it on the device)."""
    if isinstance(xb, np.ndarray):
        xb = torch.from_numpy(xb).permute(0, 3, 1, 2)
    return xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()


@torch.inference_mode()
def _encode(encoder: torch.nn.Module, x, device: torch.device, amp_dtype: torch.dtype | None,
            batch: int) -> Tensor:
    out = []
    for i in range(0, len(x), batch):
        xb = _as_nchw_float(x[i:i + batch]).to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out.append(encoder(xb).float().cpu())
    return torch.cat(out)


def extract_features(encoder: torch.nn.Module, x: np.ndarray, device: torch.device,
                     amp_dtype: torch.dtype | None = None, batch: int = 512) -> Tensor:
    """x: uint8 N x H x W x 3 -> float32 features N x D (on the CPU)."""
    encoder.eval().to(device)
    return _encode(encoder, x, device, amp_dtype, batch)


def pixel_features(x: np.ndarray) -> Tensor:
    """The raw-pixel baseline: flattened pixels in [0, 1]. N x (H*W*3)."""
    return torch.from_numpy(x.reshape(len(x), -1)).float().div_(255)


# ---- splits and label subsets ----------------------------------------------------------------

def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `fraction` of each class in val and at least one (the probe's
    weight decay is chosen on val, so every class must be scored there); a class of one image
    goes to val whole."""
    return stratified_split(y, fraction, seed, min_held=1, min_kept=0)


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset holding about `fraction` of the labels.

    Every class contributes the same number, round(fraction * N / C) and at least one (all of
    a class smaller than that). Each class's order is one seeded permutation whatever the
    fraction, so for one seed the 1% subset lies inside the 10% subset, and the same seed
    always gives the same subset.
    """
    classes = np.unique(y)
    per_class = max(1, int(round(fraction * len(y) / len(classes))))
    rng = np.random.default_rng((seed, LABEL_SUBSET_STREAM))
    idx = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(idx))


# ---- the linear probe ------------------------------------------------------------------------

def fit_linear(f: Tensor, y: Tensor, num_classes: int, weight_decay: float, steps: int, seed: int) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS. f: N x D (standardised), y: N."""
    torch.manual_seed(seed)
    clf = torch.nn.Linear(f.shape[1], num_classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(f), y) + 0.5 * weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def topk_accuracy(logits: Tensor, y: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean().item()


def standardise(ftr: Tensor, fte: Tensor) -> tuple[Tensor, Tensor]:
    """Zero mean, unit variance per feature, with statistics of the training features only."""
    mean, std = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    return (ftr - mean) / std, (fte - mean) / std


def choose_weight_decay(f: Tensor, y: np.ndarray, num_classes: int, weight_decays: list[float],
                        val_fraction: float, steps: int, seed: int) -> tuple[float, float]:
    """(weight decay, its validation top-1): fit on a stratified split of (f, y), score the rest."""
    y_t = torch.from_numpy(y).long()
    tr, va = validation_split(y, val_fraction, seed)
    val_acc = {}
    for wd in weight_decays:
        clf = fit_linear(f[tr], y_t[tr], num_classes, wd, steps, seed)
        with torch.no_grad():
            val_acc[wd] = topk_accuracy(clf(f[va]), y_t[va], 1)
    best = max(weight_decays, key=lambda wd: (val_acc[wd], -wd))  # ties: the smallest weight decay
    return best, val_acc[best]


def _fit_and_predict(f: Tensor, y: np.ndarray, fte: Tensor, num_classes: int, wd: float, steps: int,
                     seed: int) -> Tensor:
    clf = fit_linear(f, torch.from_numpy(y).long(), num_classes, wd, steps, seed)
    with torch.no_grad():
        return clf(fte)


def linear_probe(ftr: Tensor, ytr: np.ndarray, fte: Tensor, yte: np.ndarray, num_classes: int,
                 weight_decays: list[float], val_fraction: float, steps: int, seed: int,
                 correct: dict | None = None) -> dict:
    """Choose weight decay on a validation split of train, refit on all of train, score test once.
    Top-5 is reported only with more than 5 classes (with 5 or fewer it is trivially 1)."""
    ftr, fte = standardise(ftr, fte)
    best, val_top1 = choose_weight_decay(ftr, ytr, num_classes, weight_decays, val_fraction, steps, seed)
    logits = _fit_and_predict(ftr, ytr, fte, num_classes, best, steps, seed)
    yte_t = torch.from_numpy(yte).long()  # the only place test labels are read
    if correct is not None:
        correct["linear_top1"] = (logits.argmax(1) == yte_t).numpy()
    # Confusion matrix of the test predictions (row: true class, column: predicted), for the report.
    confusion = torch.bincount(yte_t * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    return {"linear_top1": topk_accuracy(logits, yte_t, 1),
            "linear_top5": topk_accuracy(logits, yte_t, 5) if num_classes > 5 else None,
            "probe_weight_decay": best, "probe_val_top1": val_top1,
            "linear_confusion": confusion.view(num_classes, num_classes).tolist()}


def label_efficient_probe(ftr: Tensor, ytr: np.ndarray, fte: Tensor, yte: np.ndarray, num_classes: int,
                          fraction: float, ecfg: dict, seed: int, full_data_wd: float,
                          correct: dict | None = None) -> dict:
    """The linear probe trained on `label_subset(ytr, fraction, seed)` only; keys are suffixed
    with the fraction's tag (`linear_top1_1pct`, ...). Standardisation uses every training
    feature: those images are unlabelled, not unseen, in the semi-supervised setting."""
    tag = fraction_tag(fraction)
    ftr, fte = standardise(ftr, fte)
    idx = label_subset(ytr, fraction, seed)
    f, y = ftr[idx], ytr[idx]
    if np.bincount(y)[np.unique(y)].min() >= 2:
        wd, _ = choose_weight_decay(f, y, num_classes, ecfg["weight_decays"], ecfg["val_fraction"],
                                    ecfg["probe_steps"], seed)
        source = "subset"
    else:  # one example of some class: a validation split would leave it out of training
        wd, source = full_data_wd, "full"
    logits = _fit_and_predict(f, y, fte, num_classes, wd, ecfg["probe_steps"], seed)
    yte_t = torch.from_numpy(yte).long()
    if correct is not None:
        correct[f"linear_top1_{tag}"] = (logits.argmax(1) == yte_t).numpy()
    return {f"linear_top1_{tag}": topk_accuracy(logits, yte_t, 1),
            f"n_labels_{tag}": int(len(idx)), f"probe_weight_decay_{tag}": wd, f"probe_wd_source_{tag}": source}


# ---- kNN -------------------------------------------------------------------------------------

def knn_predict(ftr: Tensor, ytr: Tensor, fte: Tensor, num_classes: int, k: int, temperature: float,
                chunk: int = 1024) -> Tensor:
    """Weighted kNN vote (Wu et al. 2018): the k most cosine-similar training features vote with
    weight exp(s / T). Returns predicted labels for fte."""
    ftr = F.normalize(ftr, dim=1)
    k = min(k, len(ftr))
    preds = []
    for i in range(0, len(fte), chunk):
        sim = F.normalize(fte[i:i + chunk], dim=1) @ ftr.T            # sim: n x Ntrain
        top, idx = sim.topk(k, dim=1)                                  # n x k
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, ytr[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


KNN_K_LARGE, KNN_K_SMALL, KNN_LARGE_FROM = 200, 20, 50_000


def knn_k_for(k: int | None, n_train: int) -> int:
    """`evaluate.knn_k`, or for null the size rule: 200 neighbours from 50,000 training images up
    (Wu et al. 2018 on CIFAR and ImageNet), 20 below."""
    if k is not None:
        return k
    return KNN_K_LARGE if n_train >= KNN_LARGE_FROM else KNN_K_SMALL


def _labels(y) -> Tensor:
    return y.detach().long().cpu() if isinstance(y, Tensor) else torch.from_numpy(np.asarray(y)).long()


def _strided(n: int, cap: int) -> np.ndarray:
    """At most `cap` indices spread evenly over 0..n-1: a fixed subset (the same every epoch,
    covering class-sorted data too) that draws nothing from the training run's random state."""
    return np.unique(np.linspace(0, n - 1, min(n, cap)).round().astype(np.int64))


def knn_monitor(encoder: torch.nn.Module, xtr, ytr, xte, yte, device: torch.device,
                amp_dtype: torch.dtype | None, k: int, temperature: float,
                max_train: int = 2000, max_test: int = 1000, batch: int = 512) -> float:
    """kNN top-1 of the encoder's current features, for monitoring during pretraining.

    x*: uint8 images, numpy N x H x W x 3 or torch N x 3 x H x W (on any device); y*: labels.
    Uses evenly spaced subsets of at most `max_train` / `max_test` images. Features come from
    eval mode under inference mode, so neither weights nor BatchNorm statistics change; every
    submodule's train/eval flag is put back as it was. The encoder must already be on `device`.
    """
    with eval_mode(encoder):
        itr, ite = _strided(len(xtr), max_train), _strided(len(xte), max_test)
        take = (lambda x, i: x[torch.from_numpy(i).to(x.device)] if isinstance(x, Tensor) else x[i])
        ftr = _encode(encoder, take(xtr, itr), device, amp_dtype, batch)
        fte = _encode(encoder, take(xte, ite), device, amp_dtype, batch)
    ytr_t, yte_t = _labels(ytr)[torch.from_numpy(itr)], _labels(yte)[torch.from_numpy(ite)]
    num_classes = int(max(ytr_t.max(), yte_t.max())) + 1
    pred = knn_predict(ftr, ytr_t, fte, num_classes, k, temperature)
    return (pred == yte_t).float().mean().item()


# ---- the embedding picture -------------------------------------------------------------------

EXACT_PCA_MAX_DIM = 2048  # above this (raw pixels of large images) the D x D covariance gets too big


def pca_2d(f: Tensor) -> tuple[Tensor, list[float]]:
    """Project f (N x D, D >= 2) on its first two principal axes. Returns (N x 2, the fraction
    of the variance each axis explains). Up to EXACT_PCA_MAX_DIM features: eigen-decomposition
    of the D x D covariance in float64 (exact); above, randomised PCA (Halko et al. 2011,
    `torch.pca_lowrank`) drawn from a fixed seed without touching the global random stream.
    Each axis's sign is fixed so that its largest loading is positive, so the same features
    always give the same picture."""
    x = f.double() - f.double().mean(0)
    if x.shape[1] <= EXACT_PCA_MAX_DIM:
        evals, evecs = torch.linalg.eigh(x.T @ x)                     # ascending order
        axes = evecs[:, -2:].flip(1)                                  # D x 2, largest first
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, _, v = torch.pca_lowrank(x, q=min(8, *x.shape), center=False, niter=6)
        axes = v[:, :2]
    signs = torch.sign(axes[axes.abs().argmax(0), torch.arange(2)])
    axes = axes * torch.where(signs == 0, 1.0, signs)
    xy = x @ axes
    total = x.pow(2).sum().clamp_min(1e-12)                           # the trace of the scatter matrix
    explained = [float(v) for v in xy.pow(2).sum(0) / total]
    return xy.float(), explained


def write_embedding(path: str | Path, f: Tensor, y: np.ndarray, title: str,
                    class_names: list[str] | None = None) -> list[float]:
    """A scatter of the 2-D PCA of f coloured by label y, as a PNG written atomically.
    Returns the explained-variance fractions of the two axes."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    from sslpipe.io import save_figure

    xy, explained = pca_2d(f)
    xy, y = xy.numpy(), np.asarray(y)
    classes = np.unique(y)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]  # a lookup, not a global change
    for i, c in enumerate(classes):
        m = y == c
        label = class_names[c] if class_names and c < len(class_names) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=label,
                   rasterized=True, linewidths=0)
    if len(classes) <= 20:
        ax.legend(fontsize="small", markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set(xlabel=f"PC 1 ({100 * explained[0]:.1f}% of variance)",
           ylabel=f"PC 2 ({100 * explained[1]:.1f}% of variance)", title=title)
    save_figure(fig, path)
    return explained


# ---- putting it together ---------------------------------------------------------------------

def evaluate_features(ftr: Tensor, ytr: np.ndarray, fte: Tensor, yte: np.ndarray, num_classes: int,
                      ecfg: dict, seed: int, embedding: str | Path | None = None, title: str = "",
                      class_names: list[str] | None = None, correct: dict | None = None) -> dict:
    """Every probe on one set of features: linear (all labels, then each label fraction), kNN,
    and, when `embedding` is a path, the PCA picture of the test features. With `correct` (a
    dict), fills it with each top-1 metric's per-test-image hits (bool, test order), which the
    report's paired confidence intervals resample."""
    t0 = time.perf_counter()
    out = linear_probe(ftr, ytr, fte, yte, num_classes, ecfg["weight_decays"], ecfg["val_fraction"],
                       ecfg["probe_steps"], seed, correct)
    for fraction in ecfg["label_fractions"]:
        out.update(label_efficient_probe(ftr, ytr, fte, yte, num_classes, fraction, ecfg, seed,
                                         out["probe_weight_decay"], correct))
    out["probe_s"] = time.perf_counter() - t0
    k = knn_k_for(ecfg["knn_k"], len(ftr))
    pred = knn_predict(ftr, torch.from_numpy(ytr).long(), fte, num_classes, k, ecfg["knn_temperature"])
    out["knn_k"] = k
    hits = pred == torch.from_numpy(yte).long()
    out["knn_top1"] = hits.float().mean().item()
    if correct is not None:
        correct["knn_top1"] = hits.numpy()
    out["feature_dim"] = int(ftr.shape[1])
    if embedding is not None:
        explained = write_embedding(embedding, fte, yte, title, class_names)
        out["embedding_explained_variance"] = explained
    return out


def evaluate_encoder(encoder: torch.nn.Module, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                     yte: np.ndarray, num_classes: int, ecfg: dict, seed: int, device: torch.device,
                     amp_dtype: torch.dtype | None, embedding: str | Path | None = None, title: str = "",
                     class_names: list[str] | None = None, correct: dict | None = None) -> dict:
    """Extract features once, probe them, and check the encoder is unchanged afterwards."""
    before = state_fingerprint(encoder)
    for p in encoder.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    ftr = extract_features(encoder, xtr, device, amp_dtype)
    fte = extract_features(encoder, xte, device, amp_dtype)
    extract_s = time.perf_counter() - t0
    out = evaluate_features(ftr, ytr, fte, yte, num_classes, ecfg, seed, embedding, title, class_names, correct)
    out["extract_s"] = extract_s
    out["encoder_unchanged"] = state_fingerprint(encoder) == before
    if not out["encoder_unchanged"]:
        raise RuntimeError("the encoder's weights changed during linear evaluation: this is a bug in sslpipe")
    return out
