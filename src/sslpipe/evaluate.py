"""Linear evaluation of a frozen encoder: a linear probe and a kNN classifier on its features.

Protocol: features are extracted once (inference mode, no augmentation) and reused by every
probe. The probe's weight decay is chosen on a validation split held out from the *training*
set; the probe is then refit on the whole training set and scored once on test. Test labels
are read only for that final scoring. The encoder's weights are fingerprinted before and after
to prove probing did not change them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslpipe.models import state_fingerprint


@torch.inference_mode()
def extract_features(encoder: torch.nn.Module, x: np.ndarray, device: torch.device,
                     amp_dtype: torch.dtype | None = None, batch: int = 512) -> Tensor:
    """x: uint8 N x H x W x 3 -> float32 features N x D (on the CPU)."""
    encoder.eval().to(device)
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out.append(encoder(xb).float().cpu())
    return torch.cat(out)


def pixel_features(x: np.ndarray) -> Tensor:
    """The raw-pixel baseline: flattened pixels in [0, 1]. N x (H*W*3)."""
    return torch.from_numpy(x.reshape(len(x), -1)).float().div_(255)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `fraction` of each class (at least one) in val."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        val.extend(idx[: max(1, int(round(fraction * len(idx))))])
    val = np.sort(np.array(val))
    return np.setdiff1d(np.arange(len(y)), val), val


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


def linear_probe(ftr: Tensor, ytr: np.ndarray, fte: Tensor, yte: np.ndarray, num_classes: int,
                 weight_decays: list[float], val_fraction: float, steps: int, seed: int) -> dict:
    """Choose weight decay on a validation split of train, refit on all of train, score test once."""
    ytr_t = torch.from_numpy(ytr).long()
    mean, std = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    ftr, fte = (ftr - mean) / std, (fte - mean) / std  # statistics from train only
    tr, va = stratified_split(ytr, val_fraction, seed)
    val_acc = {}
    for wd in weight_decays:
        clf = fit_linear(ftr[tr], ytr_t[tr], num_classes, wd, steps, seed)
        with torch.no_grad():
            val_acc[wd] = topk_accuracy(clf(ftr[va]), ytr_t[va], 1)
    best = max(weight_decays, key=lambda wd: (val_acc[wd], -wd))  # ties: the smallest weight decay
    clf = fit_linear(ftr, ytr_t, num_classes, best, steps, seed)
    with torch.no_grad():
        logits = clf(fte)
    yte_t = torch.from_numpy(yte).long()  # the only place test labels are read
    return {"linear_top1": topk_accuracy(logits, yte_t, 1),
            "linear_top5": topk_accuracy(logits, yte_t, 5) if num_classes > 5 else None,
            "probe_weight_decay": best, "probe_val_top1": val_acc[best]}


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


def evaluate_features(ftr: Tensor, ytr: np.ndarray, fte: Tensor, yte: np.ndarray, num_classes: int,
                      ecfg: dict, seed: int) -> dict:
    out = linear_probe(ftr, ytr, fte, yte, num_classes, ecfg["weight_decays"], ecfg["val_fraction"],
                       ecfg["probe_steps"], seed)
    pred = knn_predict(ftr, torch.from_numpy(ytr).long(), fte, num_classes, ecfg["knn_k"], ecfg["knn_temperature"])
    out["knn_top1"] = (pred == torch.from_numpy(yte).long()).float().mean().item()
    out["feature_dim"] = int(ftr.shape[1])
    return out


def evaluate_encoder(encoder: torch.nn.Module, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                     yte: np.ndarray, num_classes: int, ecfg: dict, seed: int, device: torch.device,
                     amp_dtype: torch.dtype | None) -> dict:
    """Extract features once, probe them, and check the encoder is unchanged afterwards."""
    before = state_fingerprint(encoder)
    for p in encoder.parameters():
        p.requires_grad_(False)
    ftr = extract_features(encoder, xtr, device, amp_dtype)
    fte = extract_features(encoder, xte, device, amp_dtype)
    out = evaluate_features(ftr, ytr, fte, yte, num_classes, ecfg, seed)
    out["encoder_unchanged"] = state_fingerprint(encoder) == before
    if not out["encoder_unchanged"]:
        raise RuntimeError("the encoder's weights changed during linear evaluation: this is a bug in sslpipe")
    return out
