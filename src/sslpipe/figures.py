"""The report's figures, as PNG bytes: accuracy dot plot, paired-difference forest plot, curves
(small multiples per method), previews with column headers, confusion matrices.

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
        if len(mean) < 6:  # a few monitor points: error bars, which overlap less than bands
            ax.errorbar(mean.index, mean.values, yerr=std.values if len(dfs) > 1 else None, marker="o", capsize=3,
                        label=f"{method} (n={len(dfs)})")
            continue
        ax.plot(mean.index, mean.values, label=f"{method} (n={len(dfs)})")
        if len(dfs) > 1:
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: covers no band
    return fig_png(fig)


def small_multiples(histories: dict[str, list[pd.DataFrame]], column: str, ylabel: str, title: str,
                    scale: float = 1.0, ncols: int = 5) -> bytes:
    """One panel per method, each on its own y axis (the objectives differ in scale and sign:
    PIRL's loss is ~10, the DAE's ~0, CD's can be negative): seed mean, ±std band, final value."""
    names = list(histories)
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(2.9 * ncols, 2.4 * nrows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, method in zip(axes, names):
        dfs = histories[method]
        g = pd.concat(dfs)[["epoch", column]].dropna().groupby("epoch")[column]
        mean, std = scale * g.mean(), scale * g.std().fillna(0.0)
        ax.plot(mean.index, mean.values, marker="o" if len(mean) < 20 else None, ms=3, color="tab:blue")
        if len(dfs) > 1:
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.25, color="tab:blue")
        if len(mean):
            ax.annotate(f"{mean.values[-1]:.3g}", (mean.index[-1], mean.values[-1]), textcoords="offset points",
                        xytext=(-4, 6), ha="right", fontsize="small")
        ax.set_title(f"{method} (n={len(dfs)})", fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel, fontsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig_png(fig)


def grid_columns(width: int, height: int, tile: int, padding: int = 2) -> tuple[int, int]:
    """(columns, enlargement factor) of a torchvision make_grid picture of tile x tile images,
    enlarged by an integer factor (io.save_png); (0, 1) if no factor fits."""
    for f in range(1, 65):
        if width % f == 0 and height % f == 0:
            w, h = width // f - padding, height // f - padding
            if w > 0 and h > 0 and w % (tile + padding) == 0 and h % (tile + padding) == 0:
                return w // (tile + padding), f
    return 0, 1


def preview_with_headers(png: bytes, tile: int, labels: list[str]) -> bytes:
    """The augmentation preview (rows: images; columns: the original, then each view) with a
    header over each column; unchanged when its columns cannot be told."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = img.shape[:2]
    cols, f = grid_columns(w, h, tile)
    if not cols:
        return png
    labels = (labels + [f"view {i}" for i in range(len(labels), cols)])[:cols]
    dpi = 110
    fig = Figure(figsize=(max(w, 110 * cols) / dpi, h / dpi + 0.4), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + 0.4 * dpi)))
    ax.imshow(img, interpolation="nearest", aspect="auto")
    ax.set_xticks([f * (2 + c * (tile + 2) + tile / 2) for c in range(cols)], labels, fontsize="small")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    return fig_png(fig)


def enlarge(png: bytes, min_width: int = 480) -> bytes:
    """Small pictures (a grid of 16 px samples) enlarged by an integer factor, pixels kept sharp."""
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    factor = -(-min_width // im.width)
    if factor <= 1:
        return png
    buf = io.BytesIO()
    im.resize((im.width * factor, im.height * factor), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def confusion_grid(matrices: dict[str, np.ndarray], class_names: list[str] | None, ncols: int = 4) -> bytes:
    """The linear probe's mistakes on the test set (summed over seeds), one panel per model: each
    off-diagonal cell is the fraction of a true class predicted as another, on one colour scale
    for all panels; the diagonal (accuracy, which would drown the errors) is left blank and each
    panel's title gives the overall accuracy."""
    names = list(matrices)
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(2.8 * ncols + 0.8, 2.8 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rows = {n: np.asarray(m, dtype=float) / np.maximum(np.asarray(m, dtype=float).sum(1, keepdims=True), 1)
            for n, m in matrices.items()}
    for r in rows.values():
        np.fill_diagonal(r, np.nan)
    vmax = max([np.nanmax(r) for r in rows.values() if np.isfinite(r).any()] + [0.01])
    im = None
    for ax, name in zip(axes, names):
        m = np.asarray(matrices[name], dtype=float)
        im = ax.imshow(rows[name], vmin=0, vmax=vmax, cmap="Reds")
        k = len(m)
        ticks = class_names if class_names and len(class_names) == k and k <= 10 else [str(i) for i in range(k)]
        step = max(1, k // 10)
        ax.set_xticks(range(0, k, step), ticks[::step], fontsize=6, rotation=90)
        ax.set_yticks(range(0, k, step), ticks[::step], fontsize=6)
        ax.set_title(f"{name}: {100 * np.trace(m) / max(m.sum(), 1):.1f}%", fontsize="medium")
    axes[0].set_ylabel("true class", fontsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols:len(names)]:
        ax.set_xlabel("predicted class", fontsize="small")
    if im is not None:
        fig.colorbar(im, ax=axes.tolist(), shrink=0.6, label="fraction of the true class predicted as")
    return fig_png(fig)
