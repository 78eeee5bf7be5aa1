"""Evaluation does not depend on `precision` (nor so on the CPU's bf16 support): features are
extracted in fp32 whatever the training autocast is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sslpipe import stages
from sslpipe.config import resolve
from sslpipe.models import pick_dtype
from sslpipe.tracking import StageRun

BF16 = pick_dtype("auto", torch.device("cpu")) is not None


@pytest.mark.slow  # the evaluation stage twice
@pytest.mark.parametrize("precision", ["auto"] + (["bf16"] if BF16 else []))
def test_same_metrics_whatever_precision_says(digits_dir, tmp_path, precision):
    torch.set_num_threads(1)
    out = {}
    for p in ("fp32", precision):
        cfg = resolve({"device": "cpu", "precision": p, "model": {"width": 8},
                       "evaluate": {"probe_steps": 30, "label_fractions": [0.1]}})
        m = stages.linear_eval(cfg, "random", 0, digits_dir, None, tmp_path / p / "metrics.json", StageRun(None, None),
                               predictions=tmp_path / p / "predictions.npz")
        with np.load(tmp_path / p / "predictions.npz") as z:
            out[p] = (m, {k: z[k].copy() for k in z.files})
    (a, ha), (b, hb) = out["fp32"], out[precision]
    for key in ("linear_top1", "knn_top1", "linear_top1_10pct", "probe_weight_decay"):
        assert a[key] == b[key], key
    assert a["eval_precision"] == b["eval_precision"] == "fp32"
    assert ha.keys() == hb.keys() and all((ha[k] == hb[k]).all() for k in ha)
