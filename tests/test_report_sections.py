"""The report's sections, its table of contents and report.md's figures (files beside it), on
the synthetic results of test_report.py (its fixtures)."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from test_report import BASELINES, DATASET, METHODS, PROVENANCE, SEEDS, _json, build_report, optional, results  # noqa: F401


def test_report_holds_each_section(optional: Path, tmp_path: Path) -> None:
    """The table of contents lists every section and links to it; report.md carries the same
    figures as files beside it; previews get column headers; confusion matrices when present."""
    Image.new("RGB", (4 * 32, 4 * 22), "red").save(optional / "augment/simclr/preview.png")  # make_grid: 3 x 2 tiles of 8 px
    for path in optional.glob("linear_eval/*/seed*/metrics.json"):
        m = json.loads(path.read_text())
        _json(path, {**m, "linear_confusion": (np.eye(10, dtype=int) * 30).tolist()})
    out = tmp_path / "sec"
    build_report(optional, DATASET, METHODS, SEEDS, BASELINES + ["supervised"], out, PROVENANCE)
    html = (out / "report.html").read_text(encoding="utf-8")
    toc = re.search(r'<nav class="toc">(.*?)</nav>', html).group(1)
    sections = re.findall(r'<a href="#([^"]+)">([^<]+)</a>', toc)
    assert [t for _, t in sections] == ["Summary", "Training curves", "Embeddings", "Confusion matrices",
                                        "Method: dae", "Method: simclr", "MLflow runs", "Provenance"]
    for anchor, title in sections:
        assert f'<h2 id="{anchor}">{title}</h2>' in html
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "- [Method: simclr](#method-simclr)" in md
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert {"figures/accuracy.png", "figures/loss.png", "figures/confusion.png", "figures/embedding_pixels.png",
            "figures/preview_simclr.png"} <= set(linked)
    for rel in linked:  # each figure is a real PNG, and the very bytes the HTML inlines
        data = (out / rel).read_bytes()
        Image.open(io.BytesIO(data)).verify()
        assert base64.b64encode(data).decode() in html
    raw = Image.open(optional / "augment/simclr/preview.png").size
    headed = Image.open(out / "figures/preview_simclr.png").size
    assert headed[1] > raw[1]  # a header band above the columns
    # Small diagnostics are enlarged (nearest neighbour) to be readable: an 8 px test PNG becomes 480 px wide.
    assert Image.open(out / "figures/dae_energy_vs_corruption_seed0.png").size[0] >= 480
