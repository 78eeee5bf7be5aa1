"""The report's figures, as PNG bytes: accuracy dot plot, paired-difference forest plot, curves.

matplotlib's Figure (not pyplot) keeps no global state and needs no GUI backend: safe in jobs.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import metrics as mt


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def fig_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def dot_chart(rows: list[dict]) -> bytes:
    """Linear top-1 per model on an axis zoomed to the data, with value labels and the ±std over
    seeds; SSL methods and baselines told apart in the legend."""
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.2))
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1]
    for kind, color in (("ssl", "tab:blue"), ("baseline", "tab:gray")):
        sel = [i for i, r in enumerate(rows) if r["kind"] == kind]
        if sel:
            ax.errorbar([100 * rows[i]["linear_top1_mean"] for i in sel], ys[sel],
                        xerr=[100 * rows[i]["linear_top1_std"] for i in sel], fmt="o", color=color, capsize=3,
                        label="self-supervised" if kind == "ssl" else "baseline")
    for y, r in zip(ys, rows):
        ax.annotate(f"{100 * r['linear_top1_mean']:.1f}", (100 * r["linear_top1_mean"], y),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    ax.set_yticks(ys, [r["name"] for r in rows])
    ax.set_xlabel("linear top-1 (%), mean ± sample std over seeds")
    ax.margins(x=0.15, y=0.12)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return fig_png(fig)


def forest_chart(comps: list[dict], metric: str) -> bytes:
    """Paired difference (points) of each method against each baseline, with its 95 % interval;
    the zero line is where "beats" starts."""
    sel = [c for c in comps if c["metric"] == metric]
    fig = Figure(figsize=(7, 0.4 * len(sel) + 1.2))
    ax = fig.subplots()
    ys = np.arange(len(sel))[::-1]
    colors = {"beats": "tab:green", "worse": "tab:red", "no clear difference": "tab:gray"}
    for y, c in zip(ys, sel):
        d, lo, hi = 100 * c["diff"], 100 * c["lo"], 100 * c["hi"]
        ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", capsize=3, color=colors[c["verdict"]])
        ax.annotate(f"{d:+.1f}", (d, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"{c['method']} − {c['baseline']}" for c in sel])
    ax.set_xlabel(f"{mt.label(metric)}: difference in points, 95 % paired bootstrap interval")
    ax.margins(y=0.15)
    ax.grid(axis="x", alpha=0.3)
    return fig_png(fig)


def curve_chart(histories: dict[str, list[pd.DataFrame]], column: str, ylabel: str, title: str,
                 scale: float = 1.0) -> bytes:
    # Seed-averaged curve per method, with a ±std band when there are several seeds. Rows where
    # `column` is empty are skipped (the kNN monitor runs only every few epochs).
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for method, dfs in histories.items():
        g = pd.concat(dfs)[["epoch", column]].dropna().groupby("epoch")[column]
        mean, std = scale * g.mean(), scale * g.std().fillna(0.0)
        ax.plot(mean.index, mean.values, marker="o" if len(mean) < 20 else None, label=f"{method} (n={len(dfs)})")
        if len(dfs) > 1:
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig_png(fig)
